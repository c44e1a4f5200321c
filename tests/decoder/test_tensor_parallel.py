"""DySCO on a model sharded with transformers' own tensor parallelism, against one unsharded process.

Two ranks of `torchrun` (gloo on the CPU; NCCL on two GPUs in the `gpu` test) load tiny random
llama and qwen3 checkpoints with `from_pretrained(path, tp_plan="auto")`: 4 query heads and 2 KV
heads per layer, so rank 0 holds heads 0-1 and rank 1 heads 2-3 (`tests/decoder/tp_worker.py` does the
ranks' work). In float32 the sharded model's logits differ from one process's only by the order of
the sums the row-parallel projections all-reduce: every comparison below allows 1e-5 and asks for
the same greedy tokens. The same holds for the fast path (decoder.fast) on the sharded model against
the fast path on one process; against the exact path it allows 1e-4, the fast path's own tolerance
(tests/decoder/test_fast.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_worker
from decoder.tensor_parallel import HeadShard, localize
from decoder.tiny import tiny_model

ARCHS = ("llama", "qwen3")
ATOL = 1e-5
FAST_VS_EXACT = 1e-4  # tests/decoder/test_fast.py's TOL: the fast path sums in another order than the exact one
WORKER = Path(__file__).with_name("tp_worker.py")


def _checkpoints(root: Path) -> list[str]:
    paths = []
    for arch in ARCHS:
        model, tokenizer = tiny_model(arch, heads=4, kv_heads=2)
        path = root / arch
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def _torchrun(paths: list[str], out: Path, nproc: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(WORKER), "--out", str(out), *paths]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _reference(paths: list[str], device: str = "cpu") -> dict:
    """The same captures, ablations and decodes in this one process, unsharded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = {}
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        reference[path] = {**tp_worker.captures_and_ablation(model, tokenizer),
                           "decodes": tp_worker.decodes(model, tokenizer), "fast": tp_worker.fast_decodes(model, tokenizer)}
    return reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(paths, per-rank results of the 2-rank gloo run, the one-process reference)."""
    root = tmp_path_factory.mktemp("tp")
    paths = _checkpoints(root)
    ranks = _torchrun(paths, root)
    return paths, ranks, _reference(paths)


def test_each_rank_holds_a_contiguous_half_of_the_heads(runs):
    paths, ranks, _ = runs
    for path in paths:
        for rank, result in enumerate(ranks):
            assert result[path]["shards"] == {layer: (2 * rank, 2) for layer in range(4)}, (path, rank)


def test_gather_gives_every_rank_every_head(runs):
    paths, ranks, _ = runs
    for path in paths:
        for result in ranks:
            for layer, values in result[path]["gathered"].items():
                expected = torch.tensor([100.0 * layer + h for h in range(4)])[None, :, None, None].expand(2, 4, 1, 5)
                assert torch.equal(values, expected), (path, layer)


def test_captured_probabilities_equal_the_unsharded_ones(runs):
    paths, ranks, reference = runs
    for path in paths:
        expected = reference[path]["captured"]
        assert sorted(expected) == [1, 2]
        for rank, result in enumerate(ranks):
            got = result[path]["captured"]
            assert sorted(got) == [1, 2]
            for layer in expected:
                assert got[layer].shape == expected[layer].shape  # [batch, heads asked, rows, positions]
                torch.testing.assert_close(got[layer], expected[layer], atol=ATOL, rtol=0, msg=f"{path} rank {rank}")


def test_ablated_heads_equal_the_unsharded_ablation(runs):
    paths, ranks, reference = runs
    for path in paths:
        for result in ranks:
            torch.testing.assert_close(result[path]["ablated"], reference[path]["ablated"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["vanilla", *tp_worker.CONFIGS])
def test_greedy_tokens_and_logits_equal_one_process(runs, method):
    paths, ranks, reference = runs
    for path in paths:
        expected = reference[path]["decodes"][method]
        for rank, result in enumerate(ranks):
            got = result[path]["decodes"][method]
            assert got["tokens"] == expected["tokens"], f"{path} rank {rank} {method}"
            for row_got, row_expected in zip(got["logits"], expected["logits"]):
                torch.testing.assert_close(row_got, row_expected, atol=ATOL, rtol=0)


def _assert_same_decode(got: dict, expected: dict, atol: float, what: str) -> None:
    assert got["tokens"] == expected["tokens"], what
    for row_got, row_expected in zip(got["logits"], expected["logits"], strict=True):
        torch.testing.assert_close(row_got, row_expected, atol=atol, rtol=0, msg=what)


@pytest.mark.parametrize("method", ["vanilla", *tp_worker.CONFIGS])
def test_fast_path_on_the_sharded_model_equals_one_process(runs, method):
    """FastDecoder on two ranks: the tokens and logits of FastDecoder on one process, and of the exact path."""
    paths, ranks, reference = runs
    for path in paths:
        one = reference[path]["fast"][method]
        exact = reference[path]["decodes"][method]
        for rank, result in enumerate(ranks):
            got = result[path]["fast"][method]
            _assert_same_decode(got, one, ATOL, f"{path} rank {rank} {method}: TP fast vs one-process fast")
            _assert_same_decode(got, exact, FAST_VS_EXACT, f"{path} rank {rank} {method}: TP fast vs exact")


def test_fast_path_on_the_sharded_model_continues_a_shared_prefill(runs):
    paths, ranks, reference = runs
    for path in paths:
        for result in ranks:
            assert result[path]["fast"]["dynamic_from_prefill"]["tokens"] == reference[path]["fast"]["dynamic"]["tokens"]


def test_fast_path_runs_each_ranks_own_heads(runs):
    paths, ranks, _ = runs
    for path in paths:
        for rank, result in enumerate(ranks):
            assert result[path]["fast_shards"] == {layer: (2 * rank, 2) for layer in range(4)}, (path, rank)
            assert result[path]["fast_defaults"] == (False, False)  # CPU: no graphs, no fused ops


def test_refusals_and_seeded_sampling(runs):
    paths, ranks, _ = runs
    for path in paths:
        for result in ranks:
            assert "whole heads" in result[path]["split_error"]
            assert "needs a seed" in result[path]["sample_error"]
            assert "fused ops (fuse=True)" in result[path]["fuse_error"]
        assert ranks[0][path]["seeded"] == ranks[1][path]["seeded"]  # the same seed draws the same tokens


def test_localize_maps_global_heads_to_this_ranks_slots():
    shard = HeadShard(first=4, count=4, group=None)
    local, held = localize(torch.tensor([0, 4, 7, 8, 5]), shard)
    assert held.tolist() == [False, True, True, False, True]
    assert local[held].tolist() == [0, 3, 1]
    assert ((local >= 0) & (local < 4)).all()  # heads held elsewhere still index a real head (then zeroed)


# --------------------------------------------------------------------------------------------------
# Two GPUs
# --------------------------------------------------------------------------------------------------


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_tensor_parallel_on_two_gpus_equals_one_gpu(tmp_path):
    paths = _checkpoints(tmp_path)
    ranks = _torchrun(paths, tmp_path)  # torchrun on a CUDA machine: NCCL, one GPU per rank
    reference = _reference(paths, "cuda:0")
    for path in paths:
        for rank, result in enumerate(ranks):
            for method, expected in reference[path]["decodes"].items():
                assert result[path]["decodes"][method]["tokens"] == expected["tokens"], (path, method)
                for got, want in zip(result[path]["decodes"][method]["logits"], expected["logits"]):
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
                # The fast path on two GPUs, eager and with its NCCL collectives captured in CUDA graphs.
                for variant in ("fast", "fast_graphs"):
                    what = f"{path} rank {rank} {method} {variant}"
                    _assert_same_decode(result[path][variant][method], reference[path]["fast"][method], 1e-4, what)
                    _assert_same_decode(result[path][variant][method], expected, 1e-4, what)


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_device_map_over_two_gpus_equals_one_gpu(tmp_path):
    pytest.importorskip("accelerate", reason="a device_map over several devices needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = _checkpoints(tmp_path)
    reference = _reference(paths, "cuda:0")
    for path in paths:
        placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                     "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=placement).eval()
        assert model.model.layers[3].self_attn.q_proj.weight.device == torch.device("cuda:1")
        decodes = tp_worker.decodes(model, AutoTokenizer.from_pretrained(path))
        for method, expected in reference[path]["decodes"].items():
            assert decodes[method]["tokens"] == expected["tokens"], (path, method)
            for got, want in zip(decodes[method]["logits"], expected["logits"]):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# The two-GPU benchmark's CPU dry run
# --------------------------------------------------------------------------------------------------


def _tp_speed():
    """benchmarks/tp_speed.py as a module (benchmarks/ is not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tp_speed", Path(__file__).parents[2] / "benchmarks" / "tp_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tp_speed_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/tp_speed.py --tiny: every placement runs (TP on two gloo ranks) and decodes what one device does."""
    import json

    script = Path(__file__).parents[2] / "benchmarks" / "tp_speed.py"
    command = [sys.executable, str(script), "--tiny", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "ckpt"),
               "--contexts", "64", "--steps", "4", "--hooks", "--dtype", "float32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "tp_speed.json").read_text())
    assert result["meta"]["dtype"] == "float32" and "computed in float32" in result["meta"]["model"]
    rows = {(p["placement"], r["method"]): r for p in result["placements"] for r in p["rows"]}
    assert set(rows) == {(p, m) for p in ("single", "tp", "device_map") for m in ("vanilla", "dysco")}
    for (placement, method), row in rows.items():
        assert row["decode_ms"] > 0 and len(row["tokens"]) == 4 and len(row["margins"]) == 4
        assert row["tokens"] == rows[("single", method)]["tokens"], (placement, method)  # float32: same greedy tokens
        agreement = row["vs_single"]
        assert (agreement["same"], agreement["of"], agreement["first_diff"]) == (4, 4, None), (placement, method)
        # The logits of every step were compared: float32 TP differs only by the order of the all-reduced sums.
        assert len(agreement["logit_diff_per_step"]) == 4 and agreement["max_abs_logit_diff"] <= ATOL, (placement, method)
        if method == "dysco":  # the prompt's DySCO steps, then one per generated token but the last
            assert len(row["selections"]) == row["selection_offset"] + 4 and row["selection_offset"] >= 0
            assert agreement["selection_first_diff"] is None and all(r["n"] > 0 for r in row["selections"])
    assert not list(tmp_path.glob("logits-*.pt"))  # removed once compared (--keep-logits keeps them)
    table = (tmp_path / "tp_speed.md").read_text()
    assert "| tp | dysco | 64 | 4/4 | none |" in table and "| placement | method | context | ms/token |" in table


def test_tp_speed_agreement_finds_where_tokens_part_and_the_margin_there():
    """The agreement columns: first differing step, single's margin and gap there, logit drift up to it only."""
    agreement = _tp_speed().agreement
    vocab = 6
    reference_logits = torch.zeros(4, vocab)
    reference_logits[torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0
    reference_logits[2, 5] = 0.999  # step 2: a near-tie between tokens 3 and 5
    logits = reference_logits.clone()
    logits[2, 5] += 0.002  # the other run's rounding flips it
    logits[3] += 50.0  # after the tokens part the runs see different ids: not counted as drift

    # Two DySCO steps on prompt columns (offset 1: the second made step 0's logits), then one per generated
    # token but the last: step i's logits come from record 1 + i.
    def steps(*digests):
        return [{"n": 3, "digest": d, "gap": 1e-3 * i, "edge": 0.1} for i, d in enumerate(digests)]

    reference = {"tokens": [1, 2, 3, 4], "margins": [1.0, 1.0, 0.001, 1.0], "selections": steps("a", "b", "c", "d", "e"),
                 "selection_offset": 1}
    row = {"tokens": [1, 2, 5, 0], "margins": [1.0, 1.0, 0.001, 1.0], "selections": steps("a", "b", "c", "d", "X"),
           "selection_offset": 1}
    a = agreement(row, reference, logits, reference_logits)
    assert (a["same"], a["of"], a["first_diff"]) == (2, 4, 2)
    assert a["reference_margin"] == 0.001
    assert a["reference_gap"] == pytest.approx(0.001, abs=1e-6)
    assert a["max_abs_logit_diff"] == pytest.approx(0.002, abs=1e-6) and len(a["logit_diff_per_step"]) == 3
    assert a["selection_first_diff"] is None  # record 4 made step 3's logits: after the tokens parted

    row["selections"] = steps("a", "Y", "c", "d", "e")  # the set changed at generated step 0 (record 1)
    a = agreement(row, reference)
    assert a["selection_first_diff"] == 0 and a["reference_selection_gap"] == pytest.approx(1e-3)
    row["selections"] = steps("Z", "b", "c", "d", "e")  # at the first prompt column's step
    assert agreement(row, reference)["selection_first_diff"] == -1
    row["selections"] = steps("a", "b", "c", "W", "e")  # at step 2, where the tokens part: counted
    assert agreement(row, reference)["selection_first_diff"] == 2
    same = agreement(reference, reference, reference_logits, reference_logits)
    assert (same["first_diff"], same["max_abs_logit_diff"], same["reference_min_margin"]) == (None, 0.0, 0.001)


@pytest.mark.slow
def test_tp_speed_benchmark_fast_path_runs_tiny_on_cpu(tmp_path):
    """benchmarks/tp_speed.py --path fast --tiny: FastDecoder on one device and on two gloo ranks, same tokens."""
    import json

    script = Path(__file__).parents[2] / "benchmarks" / "tp_speed.py"
    command = [sys.executable, str(script), "--tiny", "--path", "fast", "--placements", "single,tp", "--out",
               str(tmp_path), "--checkpoint", str(tmp_path / "ckpt"), "--contexts", "64", "--steps", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "tp_speed.json").read_text())
    assert result["meta"]["path"] == "fast"
    rows = {(p["placement"], r["method"]): r for p in result["placements"] for r in p["rows"]}
    assert set(rows) == {(p, m) for p in ("single", "tp") for m in ("vanilla", "dysco")}
    for (placement, method), row in rows.items():
        assert row["decode_ms"] > 0 and len(row["tokens"]) == 4
        assert row["tokens"] == rows[("single", method)]["tokens"], (placement, method)
        assert row["vs_single"]["first_diff"] is None and row["vs_single"]["max_abs_logit_diff"] <= ATOL
        assert "selections" not in row  # the fast path's selections are not recorded
    assert "fast path, eager" in (tmp_path / "tp_speed.md").read_text()
