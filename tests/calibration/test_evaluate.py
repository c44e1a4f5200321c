"""`dysco eval` mechanics on a tiny random model: same examples for every method, seeded statistics,
deterministic reports, files, MLflow, and clear errors. Quality is not checked here (random weights)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.evaluation import (
    ANSWER_MARGIN_TOKENS,
    CellResult,
    EvalError,
    EvalReport,
    PairedResult,
    bootstrap_interval,
    evaluate,
    format_length,
    paired_comparison,
    parse_length,
    parse_lengths,
    resolve_dysco,
)
from calibration.evaluation.statistics import sign_test
from decoder.tiny import tiny_model

# Smallest sizes the tasks can fill with the tiny tokenizer (kv needs ~500 tokens, needle ~250).
HEADS = [(1, 0), (2, 3)]
SMALL = dict(tasks="needle,kv", lengths="512", methods="vanilla,attnts,dysco", n=3, seed=0, max_new_tokens=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def report(tiny):
    model, tokenizer = tiny
    return evaluate(model, tokenizer, dysco=HEADS, model_name="tiny-llama", bootstrap_resamples=500, **SMALL)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,tokens", [("2k", 2048), ("4K", 4096), ("4096", 4096), (" 8k ", 8192), ("1", 1), (300, 300)])
def test_parse_length_accepts_counts_and_k(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", ["abc", "0", "-1k", "-5", "1.5k", "2m", "", "k", "0k", True])
def test_parse_length_rejects_malformed(text):
    with pytest.raises(EvalError, match="context length"):
        parse_length(text)


def test_parse_lengths_list_and_errors():
    assert parse_lengths("2k,4k,8k") == [2048, 4096, 8192]
    assert parse_lengths(["2k", 1000]) == [2048, 1000]
    with pytest.raises(EvalError, match="twice"):
        parse_lengths("2k,2048")
    with pytest.raises(EvalError, match="comma-separated"):
        parse_lengths("2k,,4k")
    assert [format_length(x) for x in (2048, 3000)] == ["2k", "3000"]


@given(st.integers(min_value=1, max_value=1 << 20))
def test_format_then_parse_round_trips(tokens):
    assert parse_length(format_length(tokens)) == tokens


# --------------------------------------------------------------------------- statistics


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=40), st.integers(0, 2**32 - 1))
def test_bootstrap_interval_contains_mean_and_is_seeded(scores, seed):
    low, high = bootstrap_interval(scores, seed, resamples=400)
    mean = float(np.mean(scores))
    assert low <= mean + 1e-12 and mean - 1e-12 <= high
    assert min(scores) - 1e-12 <= low <= high <= max(scores) + 1e-12
    assert bootstrap_interval(scores, seed, resamples=400) == (low, high)


def test_bootstrap_interval_width_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 10).astype(float)
    large = rng.integers(0, 2, 400).astype(float)
    w_small = np.subtract(*bootstrap_interval(small, 1)[::-1])
    w_large = np.subtract(*bootstrap_interval(large, 1)[::-1])
    assert w_large < w_small / 3  # width goes like 1/sqrt(n): sqrt(40) ≈ 6.3


def test_sign_test_exact_values():
    assert sign_test([1, 1, 1, 1, 1]) == pytest.approx(2 * 0.5**5)  # 0.0625
    assert sign_test([0, 0, 0]) == 1.0  # all ties
    assert sign_test([1, -1, 0, 0]) == pytest.approx(1.0)
    assert sign_test([1] * 9 + [-1]) == pytest.approx(2 * (10 + 1) / 2**10)


def test_paired_comparison_counts_and_interval():
    a = [1, 1, 0, 1, 0.5]
    b = [0, 1, 0, 0, 1.0]
    stats = paired_comparison(a, b, seed=3, resamples=2000)
    assert (stats["wins"], stats["losses"], stats["ties"]) == (2, 1, 2)
    assert stats["mean_difference"] == pytest.approx(0.3)
    assert stats["low"] <= 0.3 <= stats["high"]
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1, 0], [1], seed=0)


# --------------------------------------------------------------------------- the report


def test_every_method_sees_the_same_prompts(tiny, monkeypatch):
    from decoder.generation import Decoder

    model, tokenizer = tiny
    seen: dict[str, list] = {}
    continued: dict[str, list] = {}
    original_prefill, original_generate_from = Decoder.prefill, Decoder.generate_from

    def spy_prefill(self, prompts, **kwargs):  # generate() prefills too: AttnTS's own prompts land here
        seen.setdefault(self.method, []).append((prompts, kwargs["template_mask"]))
        return original_prefill(self, prompts, **kwargs)

    def spy_generate_from(self, state, **kwargs):
        continued.setdefault(self.method, []).append(id(state))
        return original_generate_from(self, state, **kwargs)

    monkeypatch.setattr(Decoder, "prefill", spy_prefill)
    monkeypatch.setattr(Decoder, "generate_from", spy_generate_from)
    evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 2, 7, dysco=HEADS, max_new_tokens=2,
             bootstrap_resamples=200)
    # One prefill per example for vanilla and DySCO together (made by the vanilla decoder), one for AttnTS.
    assert set(seen) == {"vanilla", "attnts"}
    assert seen["vanilla"] == seen["attnts"] and len(seen["vanilla"]) == 2  # batch size 1: one per example
    assert continued["vanilla"] == continued["dysco"]  # both continue the very same states
    # The chat template's positions are marked, so DySCO can leave them alone.
    prompts, masks = seen["vanilla"][0]
    assert any(masks[0]) and not all(masks[0])


def test_shared_prefill_gives_what_each_method_gives_alone(tiny):
    """Vanilla and DySCO from one shared prefill answer exactly as when each runs on its own."""
    model, tokenizer = tiny
    kw = dict(dysco=HEADS, max_new_tokens=6, bootstrap_resamples=200)
    together = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 3, 7, **kw)
    for method in ("vanilla", "dysco"):
        alone = evaluate(model, tokenizer, "needle", "512", method, 3, 7, **kw)
        assert [e["responses"][method] for e in alone.examples] == [e["responses"][method] for e in together.examples]


@pytest.mark.parametrize("intervention_warmup", [0, 3, "auto"])
def test_shared_prefill_leaves_out_the_intervention_warmup_too(tiny, intervention_warmup):
    """The shared prefill stops before DySCO's context plus intervention warmup, and DySCO from it
    answers as it does alone, whatever the intervention warmup."""
    from calibration.evaluation.batches import shared_prefill
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder

    model, tokenizer = tiny
    config = DyscoConfig(head_set=HEADS, context_warmup=4, intervention_warmup=intervention_warmup)
    decoders = {"vanilla": Decoder(model, tokenizer, "vanilla"), "dysco": Decoder(model, tokenizer, dysco=config)}
    batch = get_task("needle").generate(tokenizer, 2, 512, 0)
    state, _ = shared_prefill(decoders, batch, 4)
    tokens = {0: 0, 3: 3, "auto": 9}[intervention_warmup]  # auto: the tiny template's generation prompt
    assert decoders["dysco"].intervention_warmup == tokens
    assert state.input_ids.shape[1] - state.prefilled == 4 + tokens
    kw = dict(dysco=config, max_new_tokens=5, bootstrap_resamples=200)
    together = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 2, 0, **kw)
    alone = evaluate(model, tokenizer, "needle", "512", "dysco", 2, 0, **kw)
    assert [e["responses"]["dysco"] for e in alone.examples] == [e["responses"]["dysco"] for e in together.examples]
    assert together.config["dysco"]["intervention_warmup"] == intervention_warmup
    assert together.config["dysco"]["intervention_warmup_tokens"] == tokens


def test_report_shape_and_interval_bounds(report):
    cfg = report.config
    assert cfg["tasks"] == ["needle", "kv"] and cfg["lengths"] == [512] and cfg["n"] == 3
    assert len(report.cells) == 2 * 1 * 3
    for cell in report.cells:
        assert cell.n == 3
        assert 0.0 <= cell.low <= cell.mean <= cell.high <= 1.0
        assert cell.mean == pytest.approx(np.mean(report.scores(cell.task, cell.length, cell.method)))
    assert {(p.task, p.method) for p in report.paired} == {(t, m) for t in ("needle", "kv") for m in ("attnts", "dysco")}
    for p in report.paired:
        assert p.wins + p.losses + p.ties == 3 and 0 < p.p_value <= 1
        assert p.low <= p.mean_difference <= p.high
    # Each task × length has n distinct examples, each scored by every method.
    ids = [(e["task"], e["id"]) for e in report.examples]
    assert len(ids) == len(set(ids)) == 6
    assert all(set(e["scores"]) == {"vanilla", "attnts", "dysco"} for e in report.examples)
    assert all(0 < e["new_tokens"]["vanilla"] <= 3 for e in report.examples)
    speeds = {(s.method, s.length): s for s in report.speed}
    assert set(speeds) == {(m, 512) for m in ("vanilla", "attnts", "dysco")}
    for s in speeds.values():
        assert s.batches == 6 and s.ttft_s > 0 and s.seconds >= s.ttft_s and s.new_tokens > 0
    assert cfg["dysco"]["head_set"] == [[1, 0], [2, 3]] and cfg["attnts_temperature"] == 0.8
    assert cfg["dysco"]["intervention_warmup"] == "auto" and cfg["dysco"]["intervention_warmup_tokens"] == 9


def test_same_seed_same_report_other_seed_other_examples(tiny, report):
    model, tokenizer = tiny
    again = evaluate(model, tokenizer, dysco=HEADS, model_name="tiny-llama", bootstrap_resamples=500, **SMALL)
    first, second = report.to_dict(), again.to_dict()
    for key in ("cells", "paired", "examples"):
        assert first[key] == second[key], key
    other = evaluate(model, tokenizer, "needle", "512", "vanilla", 3, 2, max_new_tokens=1, bootstrap_resamples=200)
    assert [e["id"] for e in other.examples] != [e["id"] for e in report.examples if e["task"] == "needle"]


def test_save_writes_table_json_and_plot(report, tmp_path):
    paths = report.save(tmp_path / "out")
    table = paths["markdown"].read_text()
    assert "| needle | 512 |" in table and "dysco − vanilla" in table and "TTFT" in table
    data = json.loads(paths["json"].read_text())
    assert len(data["examples"]) == 6 and data["examples"][0]["scores"].keys() == {"vanilla", "attnts", "dysco"}
    assert data["config"]["paired_test"].startswith("paired bootstrap")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = EvalReport.from_dict(data)
    assert again.to_dict() == json.loads(report.to_json()) and again.markdown() == table


def test_batched_run_keeps_each_rows_budget(tiny):
    model, tokenizer = tiny
    r = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 3, 0, dysco=HEADS, batch_size=2,
                 bootstrap_resamples=200)
    assert [s.batches for s in r.speed] == [2, 2]
    for e in r.examples:  # default budget: the answer's tokens + a margin
        answer_tokens = len(tokenizer.encode(e["answer"], add_special_tokens=False))
        assert all(0 < k <= answer_tokens + ANSWER_MARGIN_TOKENS for k in e["new_tokens"].values())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(tasks="needle,banana"), "unknown dev task 'banana'.*accepted names are mrcr, pathtrans, kv, needle"),
        (dict(methods="vanilla,beam"), "unknown method 'beam'; accepted: vanilla, attnts, dysco"),
        (dict(methods="vanilla,vanilla"), "listed twice"),
        (dict(lengths="abc"), "bad context length 'abc'"),
        (dict(lengths="0"), "at least 1 token"),
        (dict(lengths="-1k"), "bad context length '-1k'"),
        (dict(n=0), "n .* must be an integer >= 1"),
        (dict(n=-2), "n .* must be an integer >= 1"),
        (dict(n=True), "n .* must be an integer >= 1"),
        (dict(lengths="8k"), "8k \\(8192 tokens\\) is beyond .* context of 4096 tokens"),
        (dict(lengths="100"), "task 'needle' at length 100"),
        (dict(methods="dysco", dysco=None), "method 'dysco' needs a head set"),
        (dict(methods="dysco", dysco=[(4, 0)]), "head 4:0 is outside .*\\(4 layers"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(attnts_temperature=0.0), "attnts_temperature must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
    ],
)
def test_bad_input_is_refused_before_decoding(tiny, monkeypatch, overrides, message):
    from decoder.generation import Decoder

    def forbidden(*args, **kwargs):
        raise AssertionError("decoding started despite bad input")

    monkeypatch.setattr(Decoder, "generate", forbidden)
    model, tokenizer = tiny
    args = dict(tasks="needle", lengths="512", methods="vanilla,attnts", n=1, seed=0, dysco=HEADS)
    args.update(overrides)
    with pytest.raises(EvalError, match=message):
        evaluate(model, tokenizer, **args)


def test_registry_fallback_and_missing_profile(tiny, tmp_path):
    from decoder.loading import model_identity
    from registry import Knobs, Profile, Registry

    model, _ = tiny
    with pytest.raises(EvalError, match="headfinder detect --model tiny-llama --register.*--heads"):
        resolve_dysco(model, "tiny-llama", registry=tmp_path)
    with pytest.raises(EvalError, match="profile 'nothing@2' not found"):
        resolve_dysco(model, "tiny-llama", profile="nothing@2", registry=tmp_path)
    profile = Profile(
        model=model_identity(model, "tiny-llama"), head_set=[(3, 1), (0, 2)], knobs=Knobs(strength=3.0, top_k=64),
        metrics={"attnts_temperature": 0.7},
    )
    Registry(tmp_path).register(profile)
    config, info = resolve_dysco(model, "tiny-llama", registry=tmp_path)
    assert config.head_set == ((3, 1), (0, 2)) and config.strength == 3.0 and config.top_k == 64
    # The version it resolved to and its content hash, not `@latest` (which names another profile tomorrow).
    assert info["profile"] == "tiny-llama@1" and info["attnts_temperature"] == 0.7
    assert info["content_hash"] == profile.content_hash()
    other, _ = tiny_model("llama", seed=1)  # same shape, other weights: the fingerprint refuses it
    with pytest.raises(EvalError, match="does not fit"):
        resolve_dysco(other, "tiny-llama", registry=tmp_path)


def test_resolve_dysco_carries_and_overrides_the_intervention_warmup(tiny, tmp_path):
    from decoder.loading import model_identity
    from registry import Knobs, Profile, Registry

    model, _ = tiny
    Registry(tmp_path).register(Profile(
        model=model_identity(model, "tiny-llama"), head_set=[(3, 1)], knobs=Knobs(intervention_warmup=2)))
    assert resolve_dysco(model, "tiny-llama", registry=tmp_path)[0].intervention_warmup == 2
    config, _ = resolve_dysco(model, "tiny-llama", registry=tmp_path, intervention_warmup="auto")
    assert config.intervention_warmup == "auto" and config.strength == Knobs().strength
    assert resolve_dysco(model, "tiny-llama", heads=HEADS)[0].intervention_warmup == "auto"
    assert resolve_dysco(model, "tiny-llama", heads=HEADS, intervention_warmup="7")[0].intervention_warmup == 7
    with pytest.raises(EvalError, match="--intervention-warmup must be 'auto' .* got -1"):
        resolve_dysco(model, "tiny-llama", heads=HEADS, intervention_warmup=-1)


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("value", ["x", "-3", "1.5"])
def test_cli_bad_intervention_warmup_is_one_line_before_any_model_load(monkeypatch, capsys, value):
    import decoder.loading
    from decoder.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad --intervention-warmup")

    monkeypatch.setattr(decoder.loading, "load_model", forbidden)
    assert main(["eval", "--heads", "1:0", "--intervention-warmup", value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dysco eval: error: --intervention-warmup must be 'auto'") and err.count("\n") == 1


def test_cli_end_to_end_with_mlflow(tiny, tmp_path, capsys):
    from mlflow import MlflowClient

    from decoder.cli import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    code = main([
        "eval", "--model", str(folder), "--heads", "1:0,2:3", "--tasks", "needle", "--lengths", "512",
        "--methods", "vanilla,dysco", "--n", "2", "--max-new-tokens", "2", "--out", str(out),
        "--tracking-uri", uri, "--json", "--quiet", "--intervention-warmup", "1",
    ])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["model"] == "tiny-llama" and len(printed["examples"]) == 2
    assert printed["config"]["dysco"]["intervention_warmup"] == 1
    assert printed["config"]["dysco"]["intervention_warmup_tokens"] == 1
    assert {p.name for p in out.iterdir()} == {"results.md", "results.json", "accuracy.png", "progress.jsonl"}
    run_id = json.loads((out / "results.json").read_text())["config"]["mlflow_run_id"]
    run = MlflowClient(uri).get_run(run_id)
    assert "score/needle/512/dysco" in run.data.metrics and run.data.params["n"] == "2"
    assert 0 <= run.data.metrics["selection_evidence_recall/needle/512/all"] <= 1  # DySCO's selection recall
    assert math.isfinite(run.data.metrics["decode_tokens_per_s/512/vanilla"])

    # The same command again reads every batch back; --fresh decodes them again.
    argv = ["eval", "--model", str(folder), "--heads", "1:0,2:3", "--tasks", "needle", "--lengths", "512",
            "--methods", "vanilla,dysco", "--n", "2", "--max-new-tokens", "2", "--out", str(out), "--json",
            "--intervention-warmup", "1"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["config"]["resumed_batches"] == 4 and again["examples"] == printed["examples"]
    # Another intervention warmup decides other answers: nothing is read back.
    assert main([*argv, "--intervention-warmup", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["resumed_batches"] == 0
    assert main([*argv, "--fresh"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["resumed_batches"] == 0


def test_cli_records_the_resolved_profile_version_and_its_content_hash(tiny, tmp_path, capsys):
    """Without --profile, results.json and results.md name `NAME@N` and its hash, never `@latest`."""
    from decoder.cli import main
    from decoder.loading import model_identity
    from registry import Profile, Registry

    model, tokenizer = tiny
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    registry = Registry(tmp_path / "registry")
    registry.register(Profile(model=model_identity(model, "tiny-llama"), head_set=[(1, 0)]))
    registry.register(Profile(model=model_identity(model, "tiny-llama"), head_set=[(2, 3)]))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(folder), "--registry", str(tmp_path / "registry"), "--tasks", "needle",
                 "--lengths", "512", "--methods", "dysco", "--n", "1", "--max-new-tokens", "1", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    used = json.loads((out / "results.json").read_text())["config"]["dysco_resolved"]
    digest = registry.load("tiny-llama@2").content_hash()
    assert used["profile"] == "tiny-llama@2" and used["content_hash"] == digest
    assert f"DySCO profile `tiny-llama@2` (content sha256 `{digest}`)" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tasks", "banana"], "unknown dev task 'banana'"),
        (["--methods", "beam"], "unknown method 'beam'"),
        (["--lengths=-1k"], "bad context length '-1k'"),
        (["--lengths", "0"], "at least 1 token"),
        (["--n", "0"], "must be an integer >= 1"),
        (["--heads", "1-0"], "LAYER:HEAD"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys):
    from decoder.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["--dtype", "float8"], 2, "--dtype 'float8' is not accepted; use one of float32"),
        (["--model", "/nonexistent/model"], 1, "cannot load model '/nonexistent/model'"),
    ],
)
def test_cli_bad_model_arguments_are_one_clear_line(tiny, tmp_path, argv, code, message, capsys):
    """A bad --dtype is a usage error (2) before loading, a model that does not load a runtime error (1)."""
    from decoder.cli import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()  # saving printed a progress bar
    status = main(["eval", "--model", str(folder), "--heads", "1:0", "--tasks", "needle", "--lengths", "512", "--n", "1",
                   "--quiet", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert status == code and err.startswith("dysco eval: error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_help_explains():
    from decoder.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["eval"]
    text = sub.format_help()
    for needle in ("--profile", "--heads", "--attnts-temperature", "--tracking-uri", "sign test", "headfinder"):
        assert needle in text


@pytest.mark.embedded
def test_embedded_smollm2_short_eval(smollm2):
    model, tokenizer = smollm2
    r = evaluate(model, tokenizer, "needle", "1k", "vanilla,dysco", 1, 0, dysco=[(14, 2), (17, 5)],
                 model_name="smollm2-135m", bootstrap_resamples=200)
    assert r.examples[0]["prompt_tokens"] <= 1024 and all(s.ttft_s > 0 for s in r.speed)
    assert set(r.examples[0]["responses"]) == {"vanilla", "dysco"}


def test_fast_path_gives_the_exact_paths_answers(tiny):
    """`fast=True` (`dysco eval --fast`) decodes with FastDecoder: same responses, scores and selection recall
    (per example and per outcome group, a padded batch included), timings recorded."""
    model, tokenizer = tiny
    kw = dict(dysco=HEADS, max_new_tokens=6, bootstrap_resamples=200, batch_size=2)
    exact = evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 3, 7, **kw)
    fast = evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 3, 7, fast=True, **kw)
    assert fast.config["path"] == "fast" and exact.config["path"] == "exact"
    for a, b in zip(exact.examples, fast.examples):
        assert a["responses"] == b["responses"] and a["scores"] == b["scores"]
        assert b["selection"]["dysco"]["evidence_recall"] is not None
        assert b["selection"]["dysco"] == pytest.approx(a["selection"]["dysco"], abs=1e-5)
    assert len(fast.selection) == len(exact.selection) == 5
    for a, b in zip(exact.selection, fast.selection):
        assert (b.outcome, b.n, b.examples) == (a.outcome, a.n, a.examples)
        for name in (*EVIDENCE_FIELDS, "selected"):
            assert getattr(b, name) == (None if getattr(a, name) is None else pytest.approx(getattr(a, name), abs=1e-5))
    assert fast.selection_unavailable() is None
    assert all(s.ttft_s > 0 and s.new_tokens > 0 for s in fast.speed)


def test_partial_grid_report_renders_each_tasks_own_lengths(tmp_path):
    """A report whose tasks have different lengths and counts (merged partial runs) still renders."""
    cells = [CellResult("kv", 8192, m, 50, 0.4, 0.3, 0.5) for m in ("vanilla", "dysco")]
    cells += [CellResult("kv", 16384, m, 50, 0.1, 0.0, 0.2) for m in ("vanilla", "dysco")]
    cells += [CellResult("mrcr", 8192, m, 25, 0.05, 0.0, 0.1) for m in ("vanilla", "dysco")]
    paired = [PairedResult(t, length, "dysco", "vanilla", n, 0.0, -0.1, 0.1, 1, 1, n - 2, 1.0)
              for t, length, n in (("kv", 8192, 50), ("kv", 16384, 50), ("mrcr", 8192, 25))]
    config = {"model": "m", "tasks": ["kv", "mrcr"], "lengths": [8192, 16384], "methods": ["vanilla", "dysco"],
              "n": 25, "seed": 0, "bootstrap_resamples": 100, "batch_size": 1}
    report = EvalReport(config, cells, paired, [], [], seconds=1.0)
    table = report.markdown()
    rows = [line for line in table.splitlines() if line.startswith("| kv") or line.startswith("| mrcr")]
    assert [r.split(" | ")[:2] for r in rows] == [["| kv", "8k"], ["| kv", "16k"], ["| mrcr", "8k"]]
    assert "kv 8k 50" in table and "mrcr 8k 25" in table  # counts differ, so each is named
    assert report.plot(tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def _decoded(calls):
    """An `on_batch` hook that records the method of every batch decoded (not read back)."""
    return lambda done: None if done.resumed else calls.append(done.method)


def test_interrupted_eval_resumes_from_its_checkpoint(tiny, tmp_path):
    """A run killed mid-way leaves its finished batches; the same call again decodes only the rest."""
    model, tokenizer = tiny
    kw = dict(dysco=HEADS, max_new_tokens=4, bootstrap_resamples=200)
    whole = evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 3, 7, **kw)

    checkpoint = tmp_path / "progress.jsonl"
    calls = []

    def dies_after_four(done):
        calls.append(done.method)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 3, 7, checkpoint=checkpoint,
                 on_batch=dies_after_four, **kw)
    with open(checkpoint, "a") as handle:
        handle.write('{"fingerprint": "cut sh')  # a write cut by the kill

    calls.clear()
    seen = []
    resumed = evaluate(model, tokenizer, "needle", "512", "vanilla,attnts,dysco", 3, 7, checkpoint=checkpoint,
                       on_batch=lambda done: (seen.append(done), _decoded(calls)(done)), **kw)
    assert len(calls) == 9 - 4 and resumed.config["resumed_batches"] == 4
    # The hook sees every batch in order, read back or decoded, with its own scores.
    assert [(d.method, d.start, d.resumed) for d in seen] == [
        (m, start, i < 4) for i, (start, m) in enumerate((s, m) for s in range(3) for m in ("vanilla", "attnts", "dysco"))]
    assert [score for d in seen if d.method == "dysco" for score in d.run.scores] == resumed.scores("needle", 512, "dysco")
    assert [e["responses"] for e in resumed.examples] == [e["responses"] for e in whole.examples]
    assert [(c.mean, c.low, c.high) for c in resumed.cells] == [(c.mean, c.low, c.high) for c in whole.cells]

    # Other settings (another seed here) share the file but none of its batches.
    calls.clear()
    evaluate(model, tokenizer, "needle", "512", "vanilla", 2, 3, checkpoint=checkpoint, on_batch=_decoded(calls), **kw)
    assert len(calls) == 2


def test_resume_reads_back_only_batches_of_the_same_example_content(tiny, tmp_path, monkeypatch):
    """Same ids and settings but other examples (an edited MRCR file, another needle depth): decoded again."""
    import dataclasses

    from calibration.tasks import get_task

    model, tokenizer = tiny
    calls = []
    kw = dict(dysco=HEADS, max_new_tokens=2, bootstrap_resamples=200, checkpoint=tmp_path / "progress.jsonl",
              on_batch=_decoded(calls))
    first = evaluate(model, tokenizer, "needle", "512", "vanilla", 2, 0, **kw)
    assert len(calls) == 2

    task = get_task("needle")
    plain = task.generate

    def moved(tokenizer, n, length, seed, **opts):  # the same ids, the needle's answer changed
        return [dataclasses.replace(e, answer=e.answer + "7") for e in plain(tokenizer, n, length, seed, **opts)]

    monkeypatch.setattr(task, "generate", moved)
    calls.clear()
    changed = evaluate(model, tokenizer, [task], "512", "vanilla", 2, 0, **kw)
    assert [e["id"] for e in changed.examples] == [e["id"] for e in first.examples]
    assert len(calls) == 2 and changed.config["resumed_batches"] == 0
    calls.clear()
    again = evaluate(model, tokenizer, "needle", "512", "vanilla", 2, 0, **kw)  # the first content: read back
    assert calls == [] and again.config["resumed_batches"] == 2


# --------------------------------------------------------------------------- selection recall

EVIDENCE_FIELDS = ("evidence_recall", "evidence_share", "evidence_importance")


def test_selection_recall_fields_exist_and_lie_in_the_unit_interval(report):
    """Every DySCO example carries its selection means; the cells average them, overall and by outcome."""
    for e in report.examples:
        sel = e["selection"]["dysco"]
        assert set(sel) == {"steps", "evidence_tokens", "selected", "mass", *EVIDENCE_FIELDS}
        assert sel["evidence_tokens"] > 0  # the tiny tokenizer locates every needle sentence and kv pair
        assert e["new_tokens"]["dysco"] <= sel["steps"] <= e["new_tokens"]["dysco"] + 1  # + the EOS step
        for name in (*EVIDENCE_FIELDS, "mass"):
            assert 0.0 <= sel[name] <= 1.0 + 1e-6, (name, sel[name])
        assert sel["selected"] >= 1
    assert set(e["selection"].keys()) == {"dysco"}
    paired = {(p.task, p.length): p for p in report.paired if p.method == "dysco"}
    for task in ("needle", "kv"):
        rows = {r.outcome: r for r in report.selection if r.task == task and r.length == 512}
        assert list(rows) == ["all", "right", "wrong", "win", "loss"]
        examples = [e for e in report.examples if e["task"] == task]
        assert rows["all"].n == rows["all"].examples == 3
        for name in EVIDENCE_FIELDS:
            mean = np.mean([e["selection"]["dysco"][name] for e in examples])
            assert getattr(rows["all"], name) == pytest.approx(mean) and 0.0 <= mean <= 1.0 + 1e-6
        assert rows["right"].examples + rows["wrong"].examples == 3
        assert rows["right"].examples == sum(e["scores"]["dysco"] >= 0.5 for e in examples)
        assert (rows["win"].examples, rows["loss"].examples) == (paired[(task, 512)].wins, paired[(task, 512)].losses)
        for r in rows.values():  # an empty group has no means, not zeros
            assert (r.evidence_recall is None) == (r.n == 0)
    table = report.markdown()
    assert "Selection recall (DySCO)" in table and "selected and not used" in table
    assert "| needle | 512 | all | 3/3 |" in table


def test_selection_recall_is_one_when_everything_is_selected(tiny):
    """top_p=1 and a top_k beyond the prompt up-weight every position, so every step's recall is 1; top_k=1
    up-weights at most one prompt position (plus the current one), so at most one evidence token."""
    from decoder.dysco import DyscoConfig

    model, tokenizer = tiny
    kw = dict(max_new_tokens=3, bootstrap_resamples=200, batch_size=2)  # batches of 2: left padding too
    everything = evaluate(model, tokenizer, "needle,kv", "512", "dysco", 3, 0,
                          dysco=DyscoConfig(head_set=HEADS, top_p=1.0, top_k=10**6), **kw)
    for e in everything.examples:
        assert e["selection"]["dysco"]["evidence_recall"] == pytest.approx(1.0, abs=1e-6)
    assert all(r.evidence_recall == pytest.approx(1.0, abs=1e-6) for r in everything.selection if r.n)
    assert not any(r.outcome in ("win", "loss") for r in everything.selection)  # no vanilla to win against

    one = evaluate(model, tokenizer, "needle,kv", "512", "dysco", 3, 0,
                   dysco=DyscoConfig(head_set=HEADS, top_p=1.0, top_k=1), **kw)
    for e in one.examples:
        sel = e["selection"]["dysco"]
        assert sel["selected"] <= 2 and sel["evidence_recall"] * sel["evidence_tokens"] <= 1 + 1e-6


def test_selection_recall_round_trips_through_json(report, tmp_path):
    from calibration.evaluation import SelectionResult

    paths = report.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["selection_unavailable"] is None
    assert len(data["selection"]) == 2 * 5 and set(data["selection"][0]) == {
        "task", "length", "outcome", "examples", "n", "selected", *EVIDENCE_FIELDS}
    again = EvalReport.from_dict(data)
    assert again.selection == report.selection and all(isinstance(r, SelectionResult) for r in again.selection)
    assert [e["selection"] for e in again.examples] == [e["selection"] for e in report.examples]
    assert again.markdown() == report.markdown()
    # A results.json written before the diagnostic loads and renders without the section.
    del data["selection"], data["selection_unavailable"]
    old = EvalReport.from_dict(data)
    assert old.selection == [] and "Selection recall" not in old.markdown()


def test_resumed_run_keeps_the_selection_and_old_progress_files_resume_without_it(tiny, tmp_path):
    model, tokenizer = tiny
    checkpoint = tmp_path / "progress.jsonl"
    kw = dict(dysco=HEADS, max_new_tokens=3, bootstrap_resamples=200, checkpoint=checkpoint)
    first = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 2, 5, **kw)
    again = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 2, 5, **kw)
    assert again.config["resumed_batches"] == 4
    assert again.examples == first.examples and again.selection == first.selection
    assert all(e["selection"]["dysco"]["evidence_recall"] is not None for e in again.examples)

    # A progress file from before the diagnostic: its batches resume, their selection is missing (not 0).
    records = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    for record in records:
        del record["run"]["selection"]
    dysco_lines = [r for r in records if r["method"] == "dysco"]
    kept = [r for r in records if r is not dysco_lines[1]]  # the second DySCO batch is decoded again
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in kept))
    old = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 2, 5, **kw)
    assert old.config["resumed_batches"] == 3
    assert [e["responses"] for e in old.examples] == [e["responses"] for e in first.examples]
    assert old.examples[0]["selection"] == {"dysco": None}
    assert old.examples[1]["selection"] == first.examples[1]["selection"]
    everyone = next(r for r in old.selection if r.outcome == "all")
    assert (everyone.n, everyone.examples) == (1, 2)
    assert everyone.evidence_recall == pytest.approx(first.examples[1]["selection"]["dysco"]["evidence_recall"])
    assert "| needle | 512 | all | 1/2 |" in old.markdown()


def test_cli_fast_reports_the_selection_recall(tiny, tmp_path, capsys):
    """`dysco eval --fast` writes the selection-recall table and its JSON rows, as the exact path does."""
    from decoder.cli import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(folder), "--heads", "1:0,2:3", "--tasks", "needle", "--lengths", "512",
                 "--methods", "vanilla,dysco", "--n", "2", "--max-new-tokens", "2", "--out", str(out), "--json",
                 "--quiet", "--fast"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["path"] == "fast" and printed["selection_unavailable"] is None
    everyone = next(r for r in printed["selection"] if r["outcome"] == "all")
    assert everyone["n"] == everyone["examples"] == 2 and 0.0 <= everyone["evidence_recall"] <= 1.0
    assert all(e["selection"]["dysco"]["steps"] >= 2 for e in printed["examples"])
    table = (out / "results.md").read_text()
    assert "Selection recall (DySCO)." in table and "| needle | 512 | all | 2/2 |" in table


def test_an_older_fast_report_says_why_it_has_no_selection_recall(tiny):
    """A results.json of a --fast run made before the fast path measured selection loads and says so plainly."""
    model, tokenizer = tiny
    fast = evaluate(model, tokenizer, "needle", "512", "vanilla,dysco", 1, 7, dysco=HEADS, max_new_tokens=2,
                    bootstrap_resamples=200, fast=True)
    data = fast.to_dict()
    data["selection"] = []
    for e in data["examples"]:
        e["selection"] = {"dysco": None}
    old = EvalReport.from_dict(data)
    assert "--fast in a version whose fast path did not measure it" in old.selection_unavailable()
    table = old.markdown()
    assert "Selection recall (DySCO): not available — this run decoded with --fast" in table
    assert "0.000" not in table
    assert EvalReport.from_dict(json.loads(old.to_json())).markdown() == table


def test_selection_results_groups_by_outcome_and_skips_the_unmeasured():
    from calibration.evaluation import selection_results, summarize_selection

    steps = [{"selected": 4, "mass": 0.9, "evidence_recall": 1.0, "evidence_share": 0.5, "evidence_importance": 0.4},
             {"selected": 2, "mass": 0.7, "evidence_recall": 0.5, "evidence_share": 0.25, "evidence_importance": 0.2}]
    summary = summarize_selection(steps, 6)
    assert summary == {"steps": 2, "evidence_tokens": 6, "selected": 3.0, "mass": pytest.approx(0.8),
                       "evidence_recall": 0.75, "evidence_share": 0.375, "evidence_importance": pytest.approx(0.3)}
    unknown = summarize_selection([{"selected": 3, "mass": 0.5, **dict.fromkeys(EVIDENCE_FIELDS)}], 0)
    assert unknown["selected"] == 3.0 and all(unknown[f] is None for f in EVIDENCE_FIELDS)

    low = {**summary, "evidence_recall": 0.25}
    rows = {r.outcome: r for r in selection_results(
        "kv", 512, [summary, low, unknown, None], scores=[1.0, 0.0, 1.0, 0.0], baseline=[0.0, 1.0, 1.0, 0.0])}
    assert (rows["all"].examples, rows["all"].n, rows["all"].evidence_recall) == (4, 2, 0.5)
    assert (rows["right"].n, rows["right"].evidence_recall) == (1, 0.75)
    assert (rows["wrong"].n, rows["wrong"].evidence_recall) == (1, 0.25)
    assert (rows["win"].examples, rows["win"].evidence_recall) == (1, 0.75)
    assert (rows["loss"].examples, rows["loss"].evidence_recall) == (1, 0.25)
    nothing = selection_results("kv", 512, [None, unknown], scores=[1.0, 0.0])
    assert [r.outcome for r in nothing] == ["all", "right", "wrong"]
    assert all(r.n == 0 and r.evidence_recall is None and r.selected is None for r in nothing)
