"""`dysco generate`: flags, JSON output, prompt sources and errors (tiny model patched in for the loader)."""

from __future__ import annotations

import io
import json
import re

import pytest

import decoder.loading
from decoder.cli import main
from decoder.generate_cli import parse_heads
from decoder.tiny import tiny_model


@pytest.fixture
def tiny_loader(monkeypatch, tmp_path):
    loaded = []

    def fake_load(spec, **kwargs):
        loaded.append(spec)
        return tiny_model("llama")

    monkeypatch.setattr(decoder.loading, "load_model", fake_load)
    monkeypatch.setenv("DYSCO_REGISTRY", str(tmp_path / "registry"))
    return loaded


def test_parse_heads():
    assert parse_heads("21:31, 21:18") == [(21, 31), (21, 18)]
    for bad in ("21-31", "a:1", "1:", ""):
        with pytest.raises(ValueError, match="LAYER:HEAD"):
            parse_heads(bad)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--method", "--heads", "--profile", "--strength", "--top-k", "--top-p", "--decay", "--warmup",
                 "--selection", "--intervention-warmup", "--temperature", "--max-new-tokens", "--prompt", "--prompt-file",
                 "--json"):
        assert flag in out


def test_json_output_has_text_and_diagnostics(tiny_loader, capsys):
    code = main(["generate", "--model", "tiny", "--heads", "1:0,2:3", "--strength", "3", "--top-k", "5", "--warmup", "4",
                 "--max-new-tokens", "5", "--prompt", "The value of key 17 is 42.", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert tiny_loader == ["tiny"]
    assert isinstance(out["text"], str) and len(out["tokens"]) == 5 and out["prompt_tokens"] > 0
    assert out["knobs"]["head_set"] == [[1, 0], [2, 3]] and out["knobs"]["top_k"] == 5
    assert len(out["diagnostics"]) == len(out["tokens"])
    assert all(1 <= d["selected"] for d in out["diagnostics"])


def test_selection_lagged_on_the_command_line(tiny_loader, capsys):
    args = ["generate", "--model", "tiny", "--heads", "1:0,2:3", "--strength", "3", "--top-k", "5", "--warmup", "4",
            "--max-new-tokens", "4", "--prompt", "The value of key 17 is 42.", "--json", "--selection", "lagged"]
    assert main(args + ["--lagged-probs", "biased"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["knobs"]["selection"], out["knobs"]["lagged_probs"]) == ("lagged", "biased")
    assert len(out["tokens"]) == 4 and len(out["diagnostics"]) == 4
    assert main(args + ["--fast"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["knobs"]["lagged_probs"] == "plain"
    with pytest.raises(SystemExit):
        main(args + ["--lagged-probs", "softmax"])


def test_prompt_from_stdin_and_file_give_the_same_text(tiny_loader, capsys, monkeypatch, tmp_path):
    args = ["generate", "--method", "vanilla", "--max-new-tokens", "4", "--json"]
    path = tmp_path / "prompt.txt"
    path.write_text("Alice lives in Paris.")
    assert main(args + ["--prompt-file", str(path)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("Alice lives in Paris."))
    assert main(args) == 0
    from_stdin = json.loads(capsys.readouterr().out)
    assert from_file["tokens"] == from_stdin["tokens"]
    assert from_file["diagnostics"] == []


def test_streamed_text_equals_the_json_text(tiny_loader, capsys):
    args = ["generate", "--heads", "1:0", "--max-new-tokens", "6", "--prompt", "Bob lives in Tokyo."]
    assert main(args + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert main(args) == 0
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "tiny", "--prompt", "hi"], 2, "needs a head set"),
        (["--heads", "9:0", "--prompt", "hi"], 1, "4 layers × 4 heads"),
        (["--heads", "1:0", "--strength", "0", "--prompt", "hi"], 2, "--strength must be > 0"),
        (["--heads", "1:0", "--top-p", "1.5", "--prompt", "hi"], 2, r"--top-p must be in \(0, 1\]"),
        (["--method", "attnts", "--prompt", "hi"], 2, "needs --temperature"),
        (["--method", "vanilla", "--temperature", "2", "--prompt", "hi"], 2, "AttnTS attention temperature"),
        (["--heads", "1:0", "--prompt", "   "], 2, "prompt is empty"),
        (["--heads", "1-0", "--prompt", "hi"], 2, "bad head '1-0'.*LAYER:HEAD"),
        (["--heads", "1:0", "--prompt-file", "/nonexistent/x.txt"], 1, "cannot read --prompt-file"),
        (["--profile", "no-such-model", "--prompt", "hi"], 1, "no-such-model"),
        (["--heads", "1:0", "--fast", "--sample", "--prompt", "hi"], 2, "--fast decodes greedily"),
        (["--heads", "1:0", "--intervention-warmup", "soon", "--prompt", "hi"], 2,
         "--intervention-warmup must be 'auto' .* or an integer >= 0, got 'soon'"),
    ],
)
def test_errors_are_one_clear_line(tiny_loader, capsys, args, code, message):
    assert main(["generate", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("dysco generate: ")
    assert re.search(message, err), err


def test_intervention_warmup_is_reported_as_given_and_in_tokens(tiny_loader, capsys):
    args = ["generate", "--model", "tiny", "--heads", "1:0,2:3", "--max-new-tokens", "3", "--prompt", "Key 17 is 42.",
            "--json"]
    assert main([*args, "--intervention-warmup", "0"]) == 0
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["intervention_warmup"] == 0 and knobs["intervention_warmup_tokens"] == 0
    assert main(args) == 0  # the published default: the tiny chat template's 9-token generation prompt
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["intervention_warmup"] == "auto" and knobs["intervention_warmup_tokens"] == 9
    assert main([*args, "--intervention-warmup", "AUTO"]) == 0
    assert json.loads(capsys.readouterr().out)["knobs"]["intervention_warmup_tokens"] == 9


def test_intervention_warmup_comes_from_the_profile_unless_overridden(tiny_loader, capsys, tmp_path):
    from decoder.loading import model_identity
    from registry import Knobs, Profile, Registry

    model, _ = tiny_model("llama")
    Registry(tmp_path / "registry").register(Profile(
        model=model_identity(model, "tiny"), head_set=[(1, 0)], knobs=Knobs(intervention_warmup=2)))
    args = ["generate", "--profile", "tiny@1", "--max-new-tokens", "2", "--prompt", "Key 17 is 42.", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["knobs"]["intervention_warmup_tokens"] == 2
    assert main([*args, "--intervention-warmup", "5"]) == 0
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["intervention_warmup"] == 5 and knobs["intervention_warmup_tokens"] == 5


@pytest.mark.parametrize("value", ["-1", "1.5", "auto-ish", ""])
def test_bad_intervention_warmup_fails_before_the_model_loads(tiny_loader, capsys, value):
    assert main(["generate", "--heads", "1:0", "--intervention-warmup", value, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dysco generate: error: --intervention-warmup must be 'auto'") and err.count("\n") == 1
    assert tiny_loader == []  # refused before any model was loaded


def test_fast_flag_gives_the_same_tokens(tiny_loader, capsys):
    """`--fast` (decoder.fast) generates the tokens and the per-step diagnostics of the default exact path."""
    args = ["generate", "--model", "tiny", "--heads", "1:0,2:3", "--top-k", "5", "--warmup", "4",
            "--max-new-tokens", "6", "--prompt", "The value of key 17 is 42.", "--json"]
    assert main(args) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main([*args, "--fast"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["path"] == "fast" and fast["tokens"] == exact["tokens"] and fast["text"] == exact["text"]
    assert fast["timings"]["prefill_s"] >= 0
    assert len(fast["diagnostics"]) == len(exact["diagnostics"]) == 6
    for a, b in zip(exact["diagnostics"], fast["diagnostics"]):
        assert b["selected"] == a["selected"] and b["mass"] == pytest.approx(a["mass"], abs=1e-5)


@pytest.mark.embedded
def test_smollm2_generate_json(smollm2, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(decoder.loading, "load_model", lambda spec, **kwargs: smollm2)
    monkeypatch.setenv("DYSCO_REGISTRY", str(tmp_path / "registry"))
    code = main(["generate", "--model", "smollm2-135m", "--heads", "8:2,15:4,20:1", "--max-new-tokens", "6",
                 "--prompt", "The secret number is 7319. What is the secret number?", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "smollm2-135m" and len(out["tokens"]) == 6 and out["text"]


def test_profile_failures_are_one_line_and_the_profile_used_is_reported(tiny_loader, capsys, tmp_path):
    """A profile for another model, a corrupted version: one line, exit 1; `@latest` is reported resolved."""
    from decoder.loading import model_identity
    from registry import Profile, Registry

    model, _ = tiny_model("llama")
    registry = Registry(tmp_path / "registry")
    registry.register(Profile(model=model_identity(model, "tiny"), head_set=[(1, 0)]))
    registry.register(Profile(model=model_identity(model, "tiny"), head_set=[(2, 3)]))
    base = ["generate", "--max-new-tokens", "2", "--prompt", "Key 17 is 42."]

    assert main([*base, "--profile", "tiny@latest", "--json"]) == 0
    used = json.loads(capsys.readouterr().out)["profile"]
    assert used["ref"] == "tiny@2" and used["content_hash"] == registry.load("tiny@2").content_hash()
    assert main([*base, "--profile", "tiny@1"]) == 0
    assert "[dysco] profile tiny@1 (content " in capsys.readouterr().err

    for force in ([], ["--force"]):  # the qwen3-8b seed's heads lie outside the tiny model
        assert main([*base, "--profile", "qwen3-8b@latest", *force]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dysco generate: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "qwen3-8b" in err

    profile_json = next((tmp_path / "registry").rglob("profile.json"))
    profile_json.write_text(profile_json.read_text().replace('"strength"', '"strength" ', 1) + " ")  # bytes change
    version = profile_json.parent.name
    assert main([*base, "--profile", f"tiny@{version}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dysco generate: ") and "Traceback" not in err
