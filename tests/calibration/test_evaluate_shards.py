"""`dysco eval --devices`: the examples of every task × length split round robin over one process per
device, merged into one report. On CPU (`--devices cpu,cpu`) with a tiny random model: the sharded run
gives the one-process run's responses and statistics, a killed worker's shard resumes, bad --devices
fail before any model load."""

from __future__ import annotations

import json

import pytest

import decoder.loading
from calibration.evaluation import EvalError, evaluate
from calibration.evaluation.run import merge_shards, shard_sets
from decoder.tiny import tiny_model

HEADS = [(1, 0), (2, 3)]
KW = dict(tasks="needle", lengths="512", methods="vanilla,dysco", n=5, seed=3, max_new_tokens=3, dysco=HEADS,
          bootstrap_resamples=300)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _statistics(report):
    """Everything in a report that the examples decide (not timings, not the run's settings)."""
    return (report.examples, [(c.mean, c.low, c.high, c.n) for c in report.cells], report.paired, report.selection)


def test_shards_are_round_robin_and_merge_back_in_order():
    sets = {("t", 8): list("abcdefg")}
    parts = [shard_sets(sets, k, 3) for k in range(3)]
    assert [p[("t", 8)] for p in parts] == [list("adg"), list("be"), list("cf")]
    from calibration.evaluation import MethodRun

    runs = [{("t", 8, "m"): MethodRun(scores=[float(ord(x)) for x in p[("t", 8)]], responses=p[("t", 8)],
                                      new_tokens=[1] * len(p[("t", 8)]), timings=[])} for p in parts]
    merged = merge_shards(runs, sets)[("t", 8, "m")]
    assert merged.responses == list("abcdefg") and merged.scores == [float(ord(x)) for x in "abcdefg"]


def test_killed_worker_resumes_and_the_merged_report_is_the_one_process_report(tiny, tmp_path):
    model, tokenizer = tiny
    one = evaluate(model, tokenizer, **KW)
    checkpoint = tmp_path / "progress.jsonl"

    # Worker 1 of 2 (examples 1 and 3) is killed after its first two batches, mid-write of the third.
    done = []

    def dies_after_two(batch):
        done.append(batch)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, checkpoint=checkpoint, shards=2, shard=1, session="worker", on_batch=dies_after_two,
                 **KW)
    assert [d.examples[0].id for d in done] == [one.examples[1]["id"]] * 2  # its first example is the set's second
    shard_file = tmp_path / "progress.shard1of2.jsonl"
    with open(shard_file, "a") as handle:
        handle.write('{"fingerprint": "cut sh')

    # The parent decodes shard 0, then reads shard 1's two finished batches back and decodes the rest.
    decoded = []
    merged = evaluate(model, tokenizer, checkpoint=checkpoint, shards=2, session="parent",
                      on_batch=lambda d: None if d.resumed else decoded.append((d.method, d.examples[0].id)), **KW)
    assert len(decoded) == 3 * 2 + 1 * 2  # shard 0: examples 0, 2, 4; shard 1: example 3 only
    assert merged.config["resumed_batches"] == 2 and merged.config["shards"] == 2
    assert _statistics(merged) == _statistics(one)
    assert [e["responses"] for e in merged.examples] == [e["responses"] for e in one.examples]
    assert {p.name for p in tmp_path.iterdir()} == {"progress.shard0of2.jsonl", "progress.shard1of2.jsonl"}

    # Everything is in the shards' files now: the same call again decodes nothing.
    decoded.clear()
    again = evaluate(model, tokenizer, checkpoint=checkpoint, shards=2, session="later",
                     on_batch=lambda d: None if d.resumed else decoded.append(d), **KW)
    assert decoded == [] and again.config["resumed_batches"] == 10 and _statistics(again) == _statistics(one)


def test_bad_sharding_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(EvalError, match="shards must be an integer from 1 to n=5"):
        evaluate(model, tokenizer, checkpoint=tmp_path / "p.jsonl", shards=6, **KW)
    with pytest.raises(EvalError, match="shard must be an integer from 0 to shards - 1 = 1"):
        evaluate(model, tokenizer, checkpoint=tmp_path / "p.jsonl", shards=2, shard=2, **KW)
    with pytest.raises(EvalError, match="needs a checkpoint"):
        evaluate(model, tokenizer, shards=2, **KW)
    assert not list(tmp_path.iterdir())


def test_cli_devices_cpu_cpu_runs_a_worker_process_and_prints_one_report(tiny, tmp_path, capsys, monkeypatch):
    """A real worker process decodes shard 1; this process decodes shard 0 only and merges."""
    import calibration.evaluation.run as run_module
    from decoder.cli import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["eval", "--model", str(folder), "--heads", "1:0,2:3", "--tasks", "needle", "--lengths", "512",
            "--methods", "vanilla,dysco", "--n", "3", "--max-new-tokens", "2", "--json", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)

    real, here = run_module.run_batch, []
    monkeypatch.setattr(run_module, "run_batch", lambda dec, task, batch, **kw: (here.append(batch[0].id),
                                                                                  real(dec, task, batch, **kw))[1])
    out = tmp_path / "two"
    assert main([*argv, "--out", str(out), "--devices", "cpu,cpu"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert len(here) == 2 * 2  # this process decoded examples 0 and 2 (two methods); the worker example 1
    assert here and one["examples"][1]["id"] not in here
    for key in ("examples", "cells", "paired", "selection"):
        assert two[key] == one[key], key
    assert two["config"]["devices"] == ["cpu", "cpu"] and two["config"]["shards"] == 2
    assert {p.name for p in out.iterdir()} == {"results.md", "results.json", "accuracy.png", "progress.shard0of2.jsonl",
                                                "progress.shard1of2.jsonl"}
    worker_lines = [json.loads(line) for line in (out / "progress.shard1of2.jsonl").read_text().splitlines()]
    assert [r["ids"] for r in worker_lines] == [[one["examples"][1]["id"]]] * 2

    # The same command again: every batch, the worker's too, is read back.
    here.clear()
    assert main([*argv, "--out", str(out), "--devices", "cpu,cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert here == [] and again["config"]["resumed_batches"] == 6 and again["examples"] == one["examples"]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(decoder.loading, "load_model", refuse)


@pytest.mark.parametrize("argv,message", [
    (["--devices", "cpu,gpu1"], "argument --devices: expected cpu or CUDA device indices, e.g. 0,1, cuda:0,cuda:1 "
                                "or cpu,cpu; got 'gpu1' in 'cpu,gpu1'"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "argument --device: not allowed with argument --devices"),
])
def test_cli_devices_syntax_is_a_usage_error(argv, message, capsys, no_model_load):
    from decoder.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--heads", "1:0", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_devices_the_machine_lacks_fail_before_any_model_load(capsys, monkeypatch, tmp_path, no_model_load):
    import torch

    from decoder.cli import main

    def error(*devices_argv):
        assert main(["eval", "--heads", "1:0", "--out", str(tmp_path / "out"), *devices_argv]) == 2
        return capsys.readouterr().err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--devices cuda:0,cuda:1 asked for, but torch sees no CUDA device" in error("--devices", "0,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "this machine has 2 CUDA device(s) (cuda:0 to cuda:1, after CUDA_VISIBLE_DEVICES), so cuda:2 does not " \
           "exist" in error("--devices", "cpu,0,2")
    assert not (tmp_path / "out").exists()


def test_help_explains_devices():
    from decoder.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--devices" in text and "round robin" in text and "progress.shard1of2.jsonl" in text
