"""Decode speed and memory on two GPUs: tensor parallelism vs device_map vs one GPU (exact or fast path).

The Qwen3-8B shape (36 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 12288,
vocab 151936) with random weights, written once in bf16 as a checkpoint (`--checkpoint`, ~16 GB) so that
every placement loads the same weights the way a user would. `--dtype float32` loads that same
checkpoint upcast (exactly the bf16 weights, computed in float32; 32 GB on the GPU):

- `single`: one process, the whole model on cuda:0;
- `tp`: `torchrun --nproc-per-node 2`, `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`
  (transformers' own tensor parallelism: each GPU holds 16 query heads and 4 KV heads of every layer);
- `device_map`: one process, layers 0-17 (and the embedding) on cuda:0, 18-35 (norm, head) on cuda:1,
  through accelerate's dispatch (`from_pretrained(device_map=...)`); without accelerate the same split
  is made here with forward pre-hooks that move each module's inputs to its device (said in the table).

For each placement, method (vanilla, exact-path DySCO with the published knobs and 16 heads at the
published Qwen3-8B positions) and context (batch 1): decode ms/token, tokens/s and peak memory per
GPU (torch's max_memory_allocated). The KV cache is random rather than a prompt's prefill (decode
speed does not depend on the cache's values, and a 128K exact-path prefill would take most of the
time budget): a DynamicCache filled with `context - warmup` random columns, then the exact Decoder
(`Decoder.generate_from`) feeds DySCO's warmup columns one at a time and decodes `--steps` tokens.
ms/token is the mean over the decoded tokens after the first.

`--path fast` measures `decoder.fast.FastDecoder` instead, on the same random cache (the prefill is
replaced by the same keys and values written into its static buffers): on one GPU with its defaults
(CUDA graphs and fused ops), under TP unfused and eager unless `--tp-graphs` (CUDA graphs with the
NCCL collectives captured), over device_map eager; ms/token from its CUDA-event timings.


Agreement with `single` (the same weights, cache and ids everywhere, so the greedy tokens should be
one GPU's): per method and context, how many tokens equal single's, the first step where they
differ, single's top-2 logit margin at that step and its logit gap between its token and this run's
(a near-tie flipped by another summation order has a margin near the logits' rounding; a bug has a
large one), the largest |logit difference| over the steps up to that one (the inputs are still
identical there), and for DySCO the first step whose up-weighted set of positions differs (a
digest of the set) with single's importance gap at its edge there: a selection that flips at the
top_k boundary changes the bias, and then the logits by much more than rounding, so a large logit
margin after a tiny importance gap is still a near-tie.
Each placement's per-step logits go to OUT/logits-<placement>.pt for this comparison; the driver
deletes them afterwards unless --keep-logits.
(The fast path gives tokens and logits, not its selections.)

    python benchmarks/tp_speed.py --out $OUT           # all three placements, then the tables
    python benchmarks/tp_speed.py --dtype float32 --contexts 32768 --out $OUT   # tokens and logits vs one GPU
    python benchmarks/tp_speed.py --path fast --tp-graphs --out $OUT   # the fast path
    torchrun --nproc-per-node 2 benchmarks/tp_speed.py --placement tp --out DIR   # one placement
    python benchmarks/tp_speed.py --tiny --out /tmp/tp  # CPU, gloo, a tiny model: checks the script runs

Writes `tp_speed.json` and `tp_speed.md` (date, machine, command, tables) into --out, rewritten after
each placement (a run cut short keeps the placements it finished), and prints the tables. Measured on
two H200s in bf16 at 32K and 128K with 12 steps: 124 s including the 16 GB checkpoint write
(docs/scaling.md).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_speed import QWEN3_8B_HEADS, NoTokenizer  # noqa: E402  (the published heads; id prompts)

TINY_HEADS = [(1, 0), (1, 3), (2, 2), (3, 1)]
PLACEMENTS = ("single", "tp", "device_map")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def log(*args) -> None:
    print(*args, flush=True)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------------
# The checkpoint
# ------------------------------------------------------------------------------------------------


def qwen3_config(tiny: bool):
    from transformers import Qwen3Config

    dims = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    if tiny:
        dims = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    return Qwen3Config(**dims, max_position_embeddings=262144, rope_theta=1_000_000.0, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None)


def ensure_checkpoint(path: str, tiny: bool) -> None:
    """Write a random-weight checkpoint of the shape to `path` unless one is there (bf16; tiny: float32).

    Always stored in that dtype, whatever --dtype computes in: float32 runs load the bf16 file upcast,
    so bf16 and float32 runs share one file and exactly the same weights.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    device = "cpu" if tiny else "cuda:0"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(tiny), dtype=torch.float32 if tiny else torch.bfloat16)
    model.generation_config.pad_token_id = 0
    model.to("cpu")  # random init is fast on the GPU; the file is written from host memory
    tmp = path + ".partial"
    model.save_pretrained(tmp, max_shard_size="4GB")
    os.replace(tmp, path)
    del model
    gc.collect()
    if not tiny:
        torch.cuda.empty_cache()
    log(f"checkpoint written to {path} ({time.time() - t0:.0f}s)")


# ------------------------------------------------------------------------------------------------
# Loading, per placement
# ------------------------------------------------------------------------------------------------


def layer_split(n_layers: int, devices: list) -> dict:
    """A pipeline placement: the first half of the layers (and the embedding) on devices[0], the rest on devices[1]."""
    half = n_layers // 2
    placement = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[1],
                 "lm_head": devices[1]}
    placement.update({f"model.layers.{i}": devices[0] if i < half else devices[1] for i in range(n_layers)})
    return placement


def _move_inputs_hook(module, args, kwargs):
    """What accelerate's AlignDevicesHook does for a layer: its tensor inputs go to its device."""
    device = next(module.parameters()).device

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, tuple):
            return tuple(move(y) for y in x)
        return x

    return move(args), {k: move(v) for k, v in kwargs.items()}


def load(path: str, placement: str, tiny: bool, dtype: torch.dtype, hooks: bool = False):
    """(model in `dtype`, how it was placed, the devices it uses)."""
    from transformers import AutoModelForCausalLM

    if placement == "tp":
        from transformers import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
        devices = [model.get_input_embeddings().weight.device]
        how = f"tensor parallel over {torch.distributed.get_world_size()} ranks (tp_plan auto)"
    elif placement == "single":
        device = "cpu" if tiny else "cuda:0"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
        devices, how = [torch.device(device)], f"one device ({device})"
    else:
        devices = ["cpu", "cpu"] if tiny else ["cuda:0", "cuda:1"]
        n_layers = qwen3_config(tiny).num_hidden_layers
        split = layer_split(n_layers, devices)
        where = " (both halves on the CPU: a dry run)" if tiny else ""
        if importlib.util.find_spec("accelerate") is not None and not hooks:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=split)
            how = "device_map over 2 devices (accelerate dispatch)" + where
        else:  # the same split, with the input moves accelerate's hooks would make
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": devices[0]})
            for name, device in split.items():
                if device != devices[0]:
                    module = model.get_submodule(name)
                    module.to(device)
                    module.register_forward_pre_hook(_move_inputs_hook, with_kwargs=True)
            how = "device_map over 2 devices (without accelerate: layers moved, inputs moved by pre-hooks)" + where
        devices = sorted({torch.device(d) for d in devices}, key=str)
    model.eval()
    return model, how, devices


# ------------------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------------------


def random_kv(model, layer: int, n_cached: int, seed: int = 0) -> torch.Tensor:
    """Keys and values [2, 1, this rank's KV heads, n_cached, head_dim] of `layer`'s random cache.

    Every placement gets the same cache: all KV heads drawn from one seed per layer, then this rank's
    contiguous slice of them under TP (colwise k_proj/v_proj)."""
    config = model.config
    weight = model.model.layers[layer].self_attn.k_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    n_local = local.shape[0] // config.head_dim
    first = torch.distributed.get_rank() * n_local if n_local < config.num_key_value_heads else 0
    layer_gen = torch.Generator(device=local.device).manual_seed(seed * 1000 + layer)
    shape = (2, 1, config.num_key_value_heads, n_cached, config.head_dim)
    return torch.randn(shape, generator=layer_gen, device=local.device, dtype=local.dtype)[:, :, first : first + n_local]


def random_prompt(model, context: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids [1, context] and the logits [1, vocab] its random cache stands for (CPU; the same on every rank)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size, (1, context), generator=gen)
    return ids, torch.randn(1, model.config.vocab_size, generator=gen)


def random_state(decoder, context: int, warmup: int, seed: int = 0):
    """A PrefillState of one row whose first `context - warmup` columns are random keys and values in the cache."""
    from transformers import DynamicCache

    from decoder.generation import PrefillState

    model, device = decoder.model, decoder.device
    ids, last = random_prompt(model, context, seed)
    ids = ids.to(device)
    cache = DynamicCache(config=model.config)
    n_cached = context - warmup
    for i in range(len(model.model.layers)):
        kv = random_kv(model, i, n_cached, seed)
        cache.update(kv[0].clone(), kv[1].clone(), i)
        del kv
    last = last.to(device) if warmup == 0 else None
    return PrefillState(cache, ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool),
                        [ids[0].tolist()], prefilled=n_cached, temperature=1.0, last_logits=last)


def selection_record(importance: torch.Tensor, up: torch.Tensor) -> dict:
    """Which positions one DySCO step up-weighted (row 0): their count, a digest of the set, and its edge.

    `gap`: the lowest selected importance minus the highest unselected one. The published top_k caps
    the nucleus on a random cache (4096 of 32K+ flat positions), so the count stays the same when the
    set changes; a set that changed where `gap` is near the importance's rounding is a near-tie.
    """
    imp = importance[0].float()  # [columns ranked]
    n = imp.shape[0]
    chosen = up[0, :n].clone()
    ranked = torch.ones_like(chosen)
    current = up.shape[1] - 1
    if current < n:  # the current column is always up-weighted, never ranked
        chosen[current], ranked[current] = False, False
    positions = chosen.nonzero().flatten().cpu()
    edge = imp[chosen].min() if chosen.any() else None
    rest = imp[ranked & ~chosen]
    gap = float(edge - rest.max()) if edge is not None and rest.numel() else None
    return {"n": int(positions.numel()), "digest": hashlib.blake2b(positions.numpy().tobytes(), digest_size=6).hexdigest(),
            "gap": gap, "edge": None if edge is None else float(edge)}


def random_fast_prefill(fast, seed: int = 0) -> None:
    """Make FastDecoder `fast` skip the prompt's forward: `random_state`'s keys and values go into its buffers."""
    run, model = fast.run, fast.model  # not `fast` itself: a cycle would keep its buffers alive after `del`

    def prefill(shape, ids, pads, n_prefill, start=0):
        for layer in run.k:  # [batch 1, kv_heads, max_len, head_dim]
            kv = random_kv(model, layer, n_prefill, seed)
            run.k[layer][:, :, :n_prefill].copy_(kv[0])
            run.v[layer][:, :, :n_prefill].copy_(kv[1])
            del kv
        if n_prefill < ids.shape[1]:
            return None
        return random_prompt(model, ids.shape[1], seed)[1].to(shape.logits.device)

    fast._prefill = prefill


def measure(model, method: str, context: int, steps: int, devices: list, tiny: bool, path: str = "exact",
            tp_graphs: bool = False) -> tuple[dict, torch.Tensor]:
    """One (method, context) decode: its row for the table, and its logits (float32 [steps, vocab], on the host)."""
    from decoder.dysco import DyscoConfig

    config = DyscoConfig(head_set=TINY_HEADS if tiny else QWEN3_8B_HEADS)
    dysco = config if method == "dysco" else None
    cuda = [d for d in devices if d.type == "cuda"]
    gc.collect()
    for d in cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d)
    selections: list[dict] = []
    if path == "fast":
        from decoder.fast import FastDecoder

        # One GPU: the defaults (graphs, fused ops); TP: unfused, graphs only when asked; device_map: eager.
        sharded = torch.distributed.is_initialized()
        fast = FastDecoder(model, NoTokenizer(), method, dysco=dysco, cuda_graphs=tp_graphs if sharded else None)
        random_fast_prefill(fast)
        ids = random_prompt(model, context)[0]
        out = fast.generate_ids(ids, max_new_tokens=steps, return_logits=True)  # a device-side copy a step
        ms = out.timings["decode_s_per_token"] * 1e3
        tokens = out.tokens[0].tolist()
        logits = out.logits[0].float().cpu()  # [steps, vocab]
        del fast, out
    else:
        from decoder import generation

        decoder = generation.Decoder(model, NoTokenizer(), method, dysco=dysco)
        state = random_state(decoder, context, decoder.warmup_columns(context))
        stamps: list[float] = []  # one per token, after its logits reached the host (tokens.tolist() synchronises)
        # Every DySCO step (the prompt's warmup columns', then one per generated token but the last)
        # hands its importance and up-weighted positions to selection_diagnostics when diagnostics are
        # asked for: recorded there. That, and the logits' copy to the host (600 KB a token), add about
        # a ms to a 100+ ms step; they are what the agreement columns are computed from.
        original = generation.selection_diagnostics

        def recording(importance, up, evidence=None):
            selections.append(selection_record(importance, up))
            return original(importance, up, evidence)

        generation.selection_diagnostics = recording
        try:
            result = decoder.generate_from(state, max_new_tokens=steps, return_logits=True,
                                           return_diagnostics=method == "dysco",
                                           callback=lambda event: stamps.append(time.perf_counter()))
        finally:
            generation.selection_diagnostics = original
        ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
        tokens = result.token_ids[0]
        logits = result.logits[0]  # [steps, vocab] float32
        del state, result
    peaks = {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in cuda}
    top2 = logits.topk(2, dim=-1).values
    row = {"method": method, "context": context, "steps": steps, "decode_ms": ms, "tokens_per_s": 1e3 / ms,
           "peak_GiB": peaks, "tokens": tokens,
           "margins": (top2[:, 0] - top2[:, 1]).tolist()}  # this run's top-2 logit margin per step
    if selections:  # per DySCO step, the prompt's first (`selection_record`): generated token i's
        # logits come from record offset + i
        row["selections"] = selections
        row["selection_offset"] = len(selections) - len(tokens)
    gc.collect()
    return row, logits


def logits_path(out: str, placement: str) -> str:
    return os.path.join(out, f"logits-{placement}.pt")


def worker(args) -> None:
    """Measure one placement; rank 0 writes OUT/placement-<name>.json and OUT/logits-<name>.pt."""
    tiny, dtype = args.tiny, DTYPES[args.dtype]
    ensure_checkpoint_on_rank0(args.checkpoint, tiny)
    t0 = time.time()
    model, how, devices = load(args.checkpoint, args.placement, tiny, dtype, args.hooks)
    if args.placement == "tp":  # every rank reports its own GPU
        devices = [model.get_input_embeddings().weight.device]
    log(f"[{args.placement}] loaded in {args.dtype}: {how} ({time.time() - t0:.0f}s)")
    contexts = [int(c) for c in args.contexts.split(",")]
    how += f"; {args.path} path"
    if args.path == "fast" and args.placement == "tp":
        how += ", CUDA graphs (--tp-graphs)" if args.tp_graphs else ", eager"
    measure(model, "vanilla", min(contexts[0], 1024), 3, devices, tiny, args.path, args.tp_graphs)  # warm-up
    rows, logits = [], {}
    for context in contexts:
        for method in args.methods.split(","):
            try:
                row, logits[f"{method}@{context}"] = measure(model, method, context, args.steps, devices, tiny,
                                                             args.path, args.tp_graphs)
            except torch.cuda.OutOfMemoryError as err:
                row = {"method": method, "context": context, "error": f"out of memory: {str(err)[:120]}"}
                gc.collect()
                torch.cuda.empty_cache()
            if args.placement == "tp":
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, row.get("peak_GiB", {}))
                row["peak_GiB"] = {f"rank{r} {d}": v for r, peaks in enumerate(gathered) for d, v in peaks.items()}
            row["placement"] = args.placement
            rows.append(row)
            if is_rank0():
                log(f"[{args.placement}] {context} {method}: " + (row.get("error") or
                    f"{row['decode_ms']:.1f} ms/token, {row['tokens_per_s']:.1f} tok/s, peak {row['peak_GiB']}"))
    if is_rank0():
        torch.save(logits, logits_path(args.out, args.placement))
        with open(os.path.join(args.out, f"placement-{args.placement}.json"), "w") as f:
            json.dump({"placement": args.placement, "how": how, "dtype": args.dtype, "rows": rows}, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ensure_checkpoint_on_rank0(path: str, tiny: bool) -> None:
    """Rank 0 writes the checkpoint if missing; the other ranks wait for its config.json (no collective yet)."""
    if is_rank0():
        ensure_checkpoint(path, tiny)
        return
    while not os.path.isfile(os.path.join(path, "config.json")):
        time.sleep(1)


# ------------------------------------------------------------------------------------------------
# The driver: every placement, then the table
# ------------------------------------------------------------------------------------------------


def agreement(row: dict, reference: dict, logits: torch.Tensor | None = None,
              reference_logits: torch.Tensor | None = None) -> dict:
    """How a run's greedy decode compares with the reference run's (single's) of the same method and context.

    Up to and including the first differing step both runs fed identical ids, so their logits there
    differ only by arithmetic (summation order, dtype); after it they decode different text.
    """
    tokens, expected = row["tokens"], reference["tokens"]
    n = min(len(tokens), len(expected))
    first = next((i for i in range(n) if tokens[i] != expected[i]), None)
    shared = n if first is None else first + 1  # steps whose inputs were identical
    out: dict = {"same": sum(a == b for a, b in zip(tokens, expected)), "of": n, "first_diff": first,
                 "reference_min_margin": min(reference["margins"][:shared]) if reference.get("margins") else None}
    if first is not None:
        if reference.get("margins"):
            out["reference_margin"] = reference["margins"][first]  # single's top-2 margin where they part
        if row.get("margins"):
            out["margin"] = row["margins"][first]
    if logits is not None and reference_logits is not None:
        diff = (logits[:shared] - reference_logits[:shared]).abs().amax(-1)  # [shared]
        out["max_abs_logit_diff"] = float(diff.max())
        out["logit_diff_per_step"] = diff.tolist()
        if first is not None:  # single's logit of its own token minus that of this run's token
            step = reference_logits[first]
            out["reference_gap"] = float(step[expected[first]] - step[tokens[first]])
    if row.get("selections") and reference.get("selections") and row["selection_offset"] == reference["selection_offset"]:
        # DySCO steps up to the one that made step `shared - 1`'s logits: the same ids went in.
        offset = reference["selection_offset"]
        pairs = list(zip(row["selections"], reference["selections"]))[: offset + shared]
        split = next((i for i, (a, b) in enumerate(pairs) if (a["n"], a["digest"]) != (b["n"], b["digest"])), None)
        out["selection_first_diff"] = None if split is None else split - offset  # < 0: a prompt column's step
        if split is not None:  # single's importance edge there: a near-tie has a gap near rounding
            out["reference_selection_gap"] = reference["selections"][split]["gap"]
            out["reference_selection_edge"] = reference["selections"][split]["edge"]
    return out


def compare_with_single(out: str, placements: list[dict]) -> None:
    """Add `vs_single` (`agreement`) to every row that has a `single` row of the same method and context."""
    single = next((p for p in placements if p["placement"] == "single"), None)
    if single is None:
        return

    def saved_logits(name: str) -> dict:
        path = logits_path(out, name)
        return torch.load(path) if os.path.isfile(path) else {}

    reference_logits = saved_logits("single")
    reference = {(r["method"], r["context"]): r for r in single["rows"] if "tokens" in r}
    for p in placements:
        logits = reference_logits if p is single else saved_logits(p["placement"])
        for row in p["rows"]:
            key = (row["method"], row["context"])
            if "tokens" in row and key in reference:
                name = f"{row['method']}@{row['context']}"
                row["vs_single"] = agreement(row, reference[key], logits.get(name), reference_logits.get(name))


def _num(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def markdown(meta: dict, placements: list[dict]) -> str:
    lines = [f"### tp_speed — {meta['date']}", "", f"- machine: {meta['machine']}", f"- software: {meta['software']}",
             f"- command: `{meta['command']}`",
             f"- model: {meta['model']}; {meta.get('path', 'exact')} path "
             f"(`{'decoder.fast.FastDecoder' if meta.get('path') == 'fast' else 'decoder.generation.Decoder'}`), "
             f"batch 1, random KV cache of the "
             f"context's length, {meta['steps']} decoded tokens; DySCO: published knobs, {meta['heads']} heads", ""]
    for p in placements:
        lines.append(f"- {p['placement']}: {p['how']}")
    lines += ["", "| placement | method | context | ms/token | tokens/s | peak memory per device (GiB) |",
              "|---|---|---:|---:|---:|---|"]
    for p in placements:
        for row in p["rows"]:
            if "error" in row:
                lines.append(f"| {p['placement']} | {row['method']} | {row['context']} | — | — | {row['error']} |")
                continue
            peaks = ", ".join(f"{d}: {v:.1f}" for d, v in row["peak_GiB"].items()) or "— (CPU)"
            lines.append(f"| {p['placement']} | {row['method']} | {row['context']} | {row['decode_ms']:.1f} | "
                         f"{row['tokens_per_s']:.1f} | {peaks} |")
    # The same weights, cache and ids everywhere: the greedy tokens should be single's. Where they part,
    # single's margin there says whether a near-tie flipped (a margin of the size of the logit
    # differences) or something else happened (a large one). Information: nothing here asserts.
    lines += ["", "Agreement with `single` (steps from 0; logit differences over the steps up to and including the "
              "first differing one, whose inputs were identical; for `single` itself: its smallest top-2 margin):", "",
              "| placement | method | context | tokens = single's | first differing step | single's top-2 margin there "
              "| single's gap to this token | max abs logit diff | DySCO selection first differs | single's importance gap there "
              "(edge) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for p in placements:
        for row in p["rows"]:
            a = row.get("vs_single")
            if a is None:
                continue
            if p["placement"] == "single":
                gaps = [r["gap"] for r in row.get("selections", []) if r["gap"] is not None]
                lines.append(f"| single | {row['method']} | {row['context']} | (reference) | — | "
                             f"min {_num(a['reference_min_margin'])} | — | — | — | "
                             f"{'min ' + _num(min(gaps)) if gaps else '—'} |")
                continue
            first = "none" if a["first_diff"] is None else str(a["first_diff"])
            selection = "—" if "selection_first_diff" not in a else \
                ("none" if a["selection_first_diff"] is None else str(a["selection_first_diff"]))
            margin = a.get("reference_margin") if a["first_diff"] is not None else None
            gap = "—" if a.get("selection_first_diff") is None else \
                f"{_num(a.get('reference_selection_gap'))} ({_num(a.get('reference_selection_edge'))})"
            lines.append(f"| {p['placement']} | {row['method']} | {row['context']} | {a['same']}/{a['of']} | {first} | "
                         f"{_num(margin)} | {_num(a.get('reference_gap'))} | {_num(a.get('max_abs_logit_diff'))} | "
                         f"{selection} | {gap} |")
    return "\n".join(lines) + "\n"


def driver(args) -> None:
    import transformers

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    ensure_checkpoint(args.checkpoint, args.tiny)
    if args.tiny:
        machine = f"CPU dry run ({platform.node()})"
    else:
        props = torch.cuda.get_device_properties(0)
        machine = f"{torch.cuda.device_count()} × {props.name}, {props.total_memory / 2**30:.0f} GiB ({platform.node()})"
    common = ["--out", args.out, "--checkpoint", args.checkpoint, "--contexts", args.contexts, "--steps",
              str(args.steps), "--methods", args.methods, "--dtype", args.dtype, "--path", args.path] + \
             (["--tiny"] if args.tiny else []) + (["--hooks"] if args.hooks else []) + \
             (["--tp-graphs"] if args.tp_graphs else [])
    script = os.path.abspath(__file__)
    launch = {
        "single": [sys.executable, script, "--placement", "single"],
        "tp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
               "--placement", "tp"],
        "device_map": [sys.executable, script, "--placement", "device_map"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    stored = "float32" if args.tiny else "bf16"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "software": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "command": "python benchmarks/tp_speed.py " + " ".join(sys.argv[1:]),
        "model": ("tiny Qwen3 (4 layers, 8 heads, 2 KV heads)" if args.tiny else "Qwen3-8B shape") +
                 f", random weights stored in {stored}, computed in {args.dtype}" +
                 (f" (float32 matmul precision: {torch.get_float32_matmul_precision()})" if args.dtype == "float32" else ""),
        "dtype": args.dtype, "steps": args.steps, "path": args.path,
        "heads": len(TINY_HEADS if args.tiny else QWEN3_8B_HEADS),
    }
    placements: list[dict] = []

    def write() -> str:
        """The JSON and the tables as they stand (after each placement: a run cut short keeps what finished)."""
        compare_with_single(args.out, placements)
        meta["wall_s"] = time.time() - t0
        with open(os.path.join(args.out, "tp_speed.json"), "w") as f:
            json.dump({"meta": meta, "placements": placements}, f, indent=1)
        table = markdown(meta, placements)
        with open(os.path.join(args.out, "tp_speed.md"), "w") as f:
            f.write(table)
        return table

    for name in args.placements.split(","):
        log(f"== {name} ({time.time() - t0:.0f}s)")
        done = subprocess.run(launch[name] + common, env=env)
        result_file = os.path.join(args.out, f"placement-{name}.json")
        if done.returncode != 0 or not os.path.isfile(result_file):
            log(f"{name} failed (exit {done.returncode})")
            continue
        with open(result_file) as f:
            placements.append(json.load(f))
        write()
    print(write())
    if not args.keep_logits:  # ~7 MB per (method, context) in the Qwen3-8B shape; the JSON keeps what they showed
        for name in PLACEMENTS:
            if os.path.isfile(logits_path(args.out, name)):
                os.remove(logits_path(args.out, name))
    missing = set(args.placements.split(",")) - {p["placement"] for p in placements}
    if missing:
        sys.exit(f"tp_speed: placement(s) {', '.join(sorted(missing))} failed; see the log above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--placement", choices=PLACEMENTS, help="measure this placement only (the driver sets it)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="the driver's placements, in order")
    parser.add_argument("--contexts", default=None, help="comma-separated (default 32768,65536,131072; tiny: 256,512)")
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens per measurement")
    parser.add_argument("--methods", default="vanilla,dysco")
    parser.add_argument("--checkpoint", default=None, help="random-weight checkpoint folder (written when missing)")
    parser.add_argument("--tiny", action="store_true", help="CPU (gloo), a tiny Qwen3: checks the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="what the model computes in (default bfloat16; tiny: float32); the checkpoint stays as written")
    parser.add_argument("--keep-logits", action="store_true", help="keep OUT/logits-<placement>.pt (per-step logits)")
    parser.add_argument("--path", choices=("exact", "fast"), default="exact",
                        help="exact: decoder.generation.Decoder; fast: decoder.fast.FastDecoder")
    parser.add_argument("--tp-graphs", action="store_true",
                        help="--path fast, placement tp: CUDA graphs (their NCCL collectives captured); default eager")
    parser.add_argument("--hooks", action="store_true",
                        help="device_map: place the layers with this script's pre-hooks even when accelerate is there")
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = "256,512" if args.tiny else "32768,65536,131072"
    if args.dtype is None:
        args.dtype = "float32" if args.tiny else "bfloat16"
    if args.checkpoint is None:
        args.checkpoint = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dysco-tp-speed",
                                       "qwen3-tiny" if args.tiny else "qwen3-8b-random")
    for name in args.placements.split(","):
        if name not in PLACEMENTS:
            parser.error(f"unknown placement {name!r}; choose from {', '.join(PLACEMENTS)}")
    if args.tp_graphs and (args.path != "fast" or args.tiny):
        parser.error("--tp-graphs needs --path fast on GPUs (CUDA graphs; --tiny runs on the CPU)")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (ms/token is measured between decoded tokens)")
    needed = 1 if set((args.placement or args.placements).split(",")) == {"single"} else 2
    if not args.tiny and torch.cuda.device_count() < needed:
        parser.error(f"needs {needed} CUDA device(s), this machine has {torch.cuda.device_count()} "
                     "(use --tiny for the CPU dry run)")
    os.makedirs(args.out, exist_ok=True)
    if args.placement is None:
        driver(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
