"""The `headfinder` command: outputs, JSON, show/compare/validate, registering, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from headfinder.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a local checkpoint folder (4 layers × 4 heads, context 4096)."""
    from decoder.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detected(tiny_checkpoint, tmp_path_factory):
    """One `headfinder detect --json` run on the tiny checkpoint: (output folder, parsed JSON)."""
    out = tmp_path_factory.mktemp("runs") / "seed0"
    return out, _run_json(["detect", "--model", str(tiny_checkpoint), "--n-probes", "2", "--context", "700",
                           "--top", "3", "--out", str(out), "--json", "--threads", "1"])


def _run_json(argv):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return json.loads(buffer.getvalue())


def test_detect_writes_scores_head_set_heatmaps_and_summary(detected):
    out, result = detected
    assert [len(h) for h in result["heads"]] == [2, 2, 2]
    assert set(result["scores"]) == {"qr", "qr_ndcg", "retrieval"}
    tensors = load_file(str(out / "scores.safetensors"))
    for key in ("qr", "qr_ndcg", "retrieval"):
        assert tensors[key].shape == (4, 4)
        assert torch.allclose(tensors[key], torch.tensor(result["scores"][key]))
        assert (out / f"{key}.png").stat().st_size > 1000
    assert tensors["per_probe.qr"].shape == (2, 4, 4)
    heads = json.loads((out / "head_set.json").read_text())
    assert heads["heads"] == result["heads"] and heads["score"] == "qr"
    # The head set really is the top 3 of the QR matrix.
    qr = tensors["qr"]
    threshold = sorted(qr.flatten().tolist(), reverse=True)[2]
    assert all(qr[l, h] >= threshold for l, h in result["heads"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head_set"] == result["heads"] and summary["split_half_stability"]["k"] == 3
    assert set(result["files"]["heatmaps"]) == {"qr", "qr_ndcg", "retrieval"}


def test_detect_is_deterministic(detected, tiny_checkpoint, tmp_path):
    _, first = detected
    again = _run_json(["detect", "--model", str(tiny_checkpoint), "--n-probes", "2", "--context", "700",
                       "--top", "3", "--out", str(tmp_path / "again"), "--json", "--probes", "qr", "--threads", "1"])
    assert again["heads"] == first["heads"] and again["scores"]["qr"] == first["scores"]["qr"]


def test_show_and_compare_read_a_run(detected, capsys):
    out, result = detected
    shown = _run_json(["show", str(out), "--json"])
    assert shown["heads"] == result["heads"]
    assert main(["show", str(out), "--plot", str(out.parent / "plots")]) == 0
    assert "rank  layer  head" in capsys.readouterr().out
    assert (out.parent / "plots").is_dir() and any((out.parent / "plots").glob("*-qr.png"))
    report = _run_json(["compare", str(out), str(out), "--top", "3", "--json"])
    assert report["top_k_shared"] == 3 and report["spearman"] == pytest.approx(1.0)


def test_register_then_show_and_validate_the_profile(tiny_checkpoint, tmp_path):
    registry_root = tmp_path / "registry"
    result = _run_json(["detect", "--model", str(tiny_checkpoint), "--n-probes", "2", "--context", "700", "--top", "2",
                        "--probes", "qr", "--out", str(tmp_path / "run"), "--register", "--registry",
                        str(registry_root), "--json", "--threads", "1"])
    ref = result["summary"]["registered"]
    assert ref.endswith("@1")
    from registry import Registry

    profile = Registry(registry_root).load(ref)
    assert [list(h) for h in profile.head_set] == result["heads"]
    assert set(profile.head_scores) == {"qr", "qr_ndcg"}
    shown = _run_json(["show", ref, "--registry", str(registry_root), "--json"])
    assert shown["heads"] == result["heads"]
    report = _run_json(["validate", "--model", str(tiny_checkpoint), "--profile", ref, "--registry", str(registry_root),
                        "--n-probes", "1", "--context", "200", "--draws", "2", "--json", "--threads", "1"])
    assert report["heads"] == result["heads"] and len(report["random_accuracies"]) == 2
    assert 0.0 <= report["baseline_accuracy"] <= 1.0


def test_detect_on_kv_probes_registers_qr_scores_with_the_probe_kind(detected, tiny_checkpoint, tmp_path):
    registry_root = tmp_path / "registry"
    result = _run_json(["detect", "--model", str(tiny_checkpoint), "--n-probes", "2", "--context", "700", "--top", "2",
                        "--probes", "kv", "--out", str(tmp_path / "run"), "--register", "--registry",
                        str(registry_root), "--json", "--threads", "1"])
    summary = result["summary"]
    assert summary["probes"] == "kv" and summary["score"] == "qr" and set(result["scores"]) == {"qr", "qr_ndcg"}
    assert summary["qr_probes"]["two_hop"] == 0 and summary["qr_probes"]["tokens_max"] <= 700
    # other probes than the prose QR probes of the same count, length and seed (the `detected` run)
    assert torch.tensor(result["scores"]["qr"]).shape == torch.tensor(detected[1]["scores"]["qr"]).shape
    assert not torch.allclose(torch.tensor(result["scores"]["qr"]), torch.tensor(detected[1]["scores"]["qr"]))
    from registry import Registry

    profile = Registry(registry_root).load(summary["registered"])
    assert profile.provenance["probe_kind"] == "kv" and [list(h) for h in profile.head_set] == result["heads"]


def _expect_error(argv, message, capsys, code=2):
    """Exit `code` (2: usage error, 1: runtime error) with one line naming the problem."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("headfinder: error:") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--n-probes", "0"], 2, "--n-probes must be at least 1, got 0"),
        (["--context", "5000"], 1, "--context 5000 is longer than"),
        (["--top", "17"], 1, "--top 17 is larger than"),
        (["--probes", "needle", "--score", "qr"], 2, "--score qr needs the probes that compute it"),
    ],
)
def test_bad_detect_input_is_refused_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, extra, code, message):
    out = tmp_path / "out"
    _expect_error(["detect", "--model", str(tiny_checkpoint), "--out", str(out), *extra], message, capsys, code)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    _expect_error(["detect", "--model", "no-such-model-xyz", "--out", str(out)], "cannot load model 'no-such-model-xyz'",
                  capsys, 1)
    assert list(tmp_path.iterdir()) == []


def test_detect_refuses_to_overwrite_a_foreign_folder(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    _expect_error(["detect", "--model", str(tiny_checkpoint), "--out", str(tmp_path)], "is not a previous headfinder output",
                  capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_validate_rejects_heads_outside_the_model(tiny_checkpoint, capsys):
    _expect_error(["validate", "--model", str(tiny_checkpoint), "--heads", "1:2,9:0"],
                  "head (9, 0) is outside the model's 4 layers × 4 heads", capsys, 1)
    _expect_error(["validate", "--model", str(tiny_checkpoint), "--heads", "1-2"], "bad head '1-2'", capsys)


def test_show_rejects_what_is_neither_run_nor_profile(tmp_path, capsys):
    _expect_error(["show", str(tmp_path)], "is not a `headfinder detect` output", capsys, 1)
    _expect_error(["show", "nobody-knows@3", "--registry", str(tmp_path / "reg")], "neither a headfinder output", capsys, 1)


def test_register_into_a_file_fails_before_any_scoring(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`--register --registry FILE` used to fail only after the whole detection ran (issue 15)."""
    import headfinder.cli

    def no_load(args):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(headfinder.cli, "_load", no_load)
    code = main(["detect", "--model", str(tiny_checkpoint), "--register", "--registry", "/etc/passwd",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "is a file, not a folder" in err and "Traceback" not in err


def test_a_dotted_checkpoint_folder_registers_under_the_name_calibrate_looks_up(tiny_checkpoint, tmp_path):
    """Issue 14: `--model models/qwen2.5-0.5b --register` registered `qwen2.5-0` (Path.stem), while
    `calibrate` and `dysco eval` looked for `qwen2.5-0.5b`. One rule now: decoder.loading.model_name."""
    import shutil

    from decoder.loading import model_name
    from registry import Registry

    folder = tmp_path / "models" / "tiny-0.5b"
    shutil.copytree(tiny_checkpoint, folder)
    registry_root = tmp_path / "registry"
    result = _run_json(["detect", "--model", str(folder), "--n-probes", "1", "--context", "700", "--top", "2",
                        "--probes", "qr", "--out", str(tmp_path / "run"), "--register", "--registry",
                        str(registry_root), "--json", "--threads", "1"])
    assert result["summary"]["registered"] == "tiny-0.5b@1"
    assert model_name(str(folder)) == model_name(f"{folder}/") == "tiny-0.5b"  # what calibrate resolves
    assert Registry(registry_root).resolve(model_name(str(folder))) == ("tiny-0.5b", 1)
