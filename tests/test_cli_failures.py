"""Every CLI's failure paths (issue 15): bad input, missing files, a corrupt registry and model, an
unreachable tracking server. Each must exit 2 (usage) or 1 (runtime) with one line on stderr naming
what is wrong, no traceback, nothing written or changed, and (for what the arguments alone decide)
no model load. Everything runs in-process on a tiny random model and temporary folders.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

import decoder.loading
from calibration.cli import build_parser as calibrate_parser
from calibration.cli import main as calibrate_main
from decoder.cli import build_parser as dysco_parser
from decoder.cli import main as dysco_main
from decoder.tiny import tiny_model
from headfinder.cli import build_parser as headfinder_parser
from headfinder.cli import main as headfinder_main

MAINS = {"dysco": dysco_main, "calibrate": calibrate_main, "headfinder": headfinder_main}
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny checkpoint folder named `tiny`, and a copy whose safetensors header is damaged."""
    root = tmp_path_factory.mktemp("models")
    model, tokenizer = tiny_model("llama")
    for name in ("tiny", "damaged"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    weights = root / "damaged" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\0" * 32
    weights.write_bytes(bytes(data))
    return {"model": root / "tiny", "damaged": root / "damaged", "identity": decoder.loading.model_identity(model, "tiny")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch, checkpoints):
    """A registry holding tiny@1 (intact) and tiny@2 (its profile.json changed after registration), a plain
    file, a garbage archive, empty model cache; every model load is recorded."""
    from registry import Profile, Registry

    registry = Registry(tmp_path / "registry")
    registry.register(Profile(model=checkpoints["identity"], head_set=[(1, 0)]))
    registry.register(Profile(model=checkpoints["identity"], head_set=[(2, 3)]))
    damaged = tmp_path / "registry" / "tiny" / "2" / "profile.json"
    damaged.write_text(damaged.read_text().replace('"strength"', '"strength" ', 1))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "garbage.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setenv("DYSCO_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("DYSCO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # default outputs (eval-…, calibration.db, mlflow.db) would land here
    loads = []
    real = decoder.loading.load_model

    def recording(spec, **kwargs):
        loads.append(spec)
        return real(spec, **kwargs)

    monkeypatch.setattr(decoder.loading, "load_model", recording)
    values = {"tmp": str(tmp_path), "reg": str(tmp_path / "registry"), "file": str(tmp_path / "file"),
              "model": str(checkpoints["model"]), "damaged": str(checkpoints["damaged"])}
    return tmp_path, values, loads


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# (program, argv, exit status, what the one line must say, whether the model may load first)
CASES = [
    # dysco generate
    ("dysco", ["generate", "--heads", "abc", "--prompt", "hi"], 2, r"bad head 'abc'.*LAYER:HEAD", False),
    ("dysco", ["generate", "--heads", "1:0", "--strength", "-1", "--prompt", "hi"], 2, "--strength must be > 0", False),
    ("dysco", ["generate", "--heads", "1:0", "--top-k", "0", "--prompt", "hi"], 2, "--top-k must be an integer >= 1",
     False),
    ("dysco", ["generate", "--heads", "1:0", "--top-p", "0", "--prompt", "hi"], 2, r"--top-p must be in \(0, 1\]", False),
    ("dysco", ["generate", "--heads", "1:0", "--decay", "1", "--prompt", "hi"], 2, r"--decay must be in \[0, 1\)", False),
    ("dysco", ["generate", "--heads", "1:0", "--warmup", "-1", "--prompt", "hi"], 2, "--warmup must be an integer >= 0",
     False),
    ("dysco", ["generate", "--method", "attnts", "--temperature", "0", "--prompt", "hi"], 2, "--temperature must be > 0",
     False),
    ("dysco", ["generate", "--heads", "1:0", "--dtype", "float8", "--prompt", "hi"], 2, "--dtype 'float8' is not accepted",
     False),
    ("dysco", ["generate", "--profile", "a@b@c", "--prompt", "hi"], 2, "more than one '@'", False),
    ("dysco", ["generate", "--profile", "tiny@9", "--prompt", "hi"], 1, "tiny has no version 9", False),
    ("dysco", ["generate", "--profile", "tiny@2", "--prompt", "hi"], 1, "checksum mismatch in .*profile.json", False),
    ("dysco", ["generate", "--heads", "1:0", "--prompt-file", "{tmp}/nope.txt"], 1, "cannot read --prompt-file", False),
    ("dysco", ["generate", "--model", "{damaged}", "--heads", "1:0", "--prompt", "hi"], 1,
     "weights in .*damaged are damaged", True),
    # dysco eval
    ("dysco", ["eval", "--profile", "a@b@c"], 2, "more than one '@'", False),
    ("dysco", ["eval", "--heads", "1:0", "--dtype", "float8"], 2, "--dtype 'float8' is not accepted", False),
    ("dysco", ["eval", "--heads", "1:0", "--out", "{file}"], 2, "--out .*file is a file", False),
    ("dysco", ["eval", "--model", "{model}", "--profile", "tiny@2"], 1, "cannot read profile 'tiny@2'.*checksum mismatch",
     False),
    ("dysco", ["eval", "--model", "{model}", "--profile", "tiny@9"], 1, "profile 'tiny@9' not found", False),
    ("dysco", ["eval", "--model", "{model}", "--heads", "1:0", "--tracking-uri", UNREACHABLE], 1,
     "cannot reach the MLflow tracking server", False),
    ("dysco", ["eval", "--model", "{model}", "--heads", "1:0", "--lengths", "8k"], 1,
     r"length 8k \(8192 tokens\) is beyond tiny's context of 4096 tokens", False),
    ("dysco", ["eval", "--model", "{damaged}", "--heads", "1:0", "--quiet"], 1, "weights in .*damaged are damaged", True),
    ("dysco", ["eval", "--heads", "1:0", "--devices", "1,cuda:1"], 2, "--devices lists a device twice: cuda:1,cuda:1",
     False),
    ("dysco", ["eval", "--heads", "1:0", "--devices", "cpu,cpu,cpu", "--n", "2"], 2,
     "--devices gives 3 processes but --n is 2: every process needs an example", False),
    # dysco registry
    ("dysco", ["registry", "show", "a@b@c"], 2, "more than one '@'", False),
    ("dysco", ["registry", "tag", "tiny@1", "latest"], 2, "reserved", False),
    ("dysco", ["registry", "show", "tiny@9"], 1, "tiny has no version 9", False),
    ("dysco", ["registry", "show", "tiny@2"], 1, "checksum mismatch", False),
    ("dysco", ["registry", "list", "--registry", "{file}"], 1, "is a file, not a folder", False),
    ("dysco", ["registry", "import", "{tmp}/missing.tar.gz"], 1, "missing.tar.gz does not exist", False),
    ("dysco", ["registry", "import", "{tmp}/garbage.tar.gz"], 1, "garbage.tar.gz: not a readable tar.gz", False),
    ("dysco", ["registry", "export", "tiny@1", "/nonexistent-dir/x.tar.gz"], 1, "folder /nonexistent-dir does not exist",
     False),
    # dysco models
    ("dysco", ["models", "pull", "gpt-17"], 2, "'gpt-17' is not in the model catalogue; accepted: .*smollm2-135m", False),
    ("dysco", ["models", "verify", "gpt-17"], 2, "'gpt-17' is not in the model catalogue", False),
    # calibrate
    ("calibrate", ["--dev", "nosuchtask", "--no-tracking"], 2, "unknown dev task 'nosuchtask'", False),
    ("calibrate", ["--dev", "kv", "--intervention-warmup", "soon", "--no-tracking"], 2, "--intervention-warmup must be",
     False),
    ("calibrate", ["--dev", "kv", "--needles", "4", "--no-tracking"], 2, "--needles applies to the mrcr task only", False),
    ("calibrate", ["--dev", "kv", "--max-cost", "2", "--no-tracking"], 2, "--max-cost .* needs a speed objective", False),
    ("calibrate", ["--dev", "kv", "--speed-objective", "measured", "--devices", "0,1", "--no-tracking"], 2,
     "--speed-objective measured compares decode times .* different GPUs", False),
    ("calibrate", ["--dev", "kv", "--model", "{model}", "--profile", "tiny@2", "--no-tracking"], 1, "checksum mismatch",
     False),
    ("calibrate", ["--dev", "kv", "--model", "{model}", "--registry", "{file}", "--no-tracking"], 1, "is a file", False),
    ("calibrate", ["--dev", "kv", "--model", "{damaged}", "--no-tracking"], 1,
     "no head set to start from .*no profile named 'damaged'.*--heads", False),
    ("calibrate", ["--dev", "kv", "--model", "{model}", "--heads", "1:0", "--tracking-uri", UNREACHABLE], 1,
     "cannot reach the MLflow tracking server", False),
    ("calibrate", ["--dev", "kv", "--model", "{damaged}", "--heads", "1:0", "--no-tracking", "--quiet"], 1,
     "weights in .*damaged are damaged", True),
    # headfinder
    ("headfinder", ["detect", "--model", "{model}", "--n-probes", "0", "--out", "{tmp}/out"], 2,
     "--n-probes must be at least 1", False),
    ("headfinder", ["detect", "--model", "{model}", "--dtype", "float8", "--out", "{tmp}/out"], 2,
     "--dtype 'float8' is not accepted", False),
    ("headfinder", ["detect", "--model", "{model}", "--register", "--registry", "{file}", "--out", "{tmp}/out"], 1,
     "is a file, not a folder", False),
    ("headfinder", ["detect", "--model", "{model}", "--context", "5000", "--out", "{tmp}/out"], 1,
     "--context 5000 is longer than tiny's context of 4096 tokens", False),
    ("headfinder", ["detect", "--model", "{model}", "--context", "40", "--out", "{tmp}/out"], 1,
     "context of 40 tokens is too short for these probes.*use at least \\d+ tokens", False),
    ("headfinder", ["validate", "--model", "{model}", "--heads", "1:0", "--context", "40"], 1,
     "context of 40 tokens is too short .*needle; use at least \\d+ tokens", False),
    ("headfinder", ["detect", "--model", "{damaged}", "--out", "{tmp}/out", "--no-progress"], 1,
     "weights in .*damaged are damaged", True),
    ("headfinder", ["validate", "--model", "{model}", "--heads", "abc"], 2, "bad head 'abc'", False),
    ("headfinder", ["validate", "--model", "{model}", "--from", "/tmp/nope-issue15"], 1,
     "/tmp/nope-issue15 does not exist; give a `headfinder detect` output folder", False),
    ("headfinder", ["show", "{tmp}/nope"], 1, "nope does not exist", False),
    ("headfinder", ["show", "tiny@2"], 1, "checksum mismatch", False),
]


@pytest.mark.parametrize(("program", "argv", "code", "message", "loads_model"), CASES,
                         ids=[f"{c[0]} {' '.join(c[1][:3])} -> {c[2]}" for c in CASES])
def test_failure_is_one_line_with_its_exit_status_and_changes_nothing(sandbox, capsys, program, argv, code, message,
                                                                       loads_model):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    tmp_path, values, loads = sandbox
    before = _tree(tmp_path)
    capsys.readouterr()
    status = MAINS[program]([arg.format(**values) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert status == code, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert re.search(message, errors[0]), err
    assert _tree(tmp_path) == before  # nothing written or changed
    if not loads_model:
        assert loads == []  # refused before any model load


def test_cli_warnings_are_one_clean_line(sandbox, capsys):
    """A warning (here: the latest version is corrupt, an older one is used) is one line, no source line."""
    assert dysco_main(["registry", "show", "tiny", "--json"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("dysco registry: warning: skipping corrupt version: tiny@2: checksum mismatch"), err
    assert err.count("\n") == 1 and "warnings.warn" not in err and ".py:" not in err


def _sub_commands(parser: argparse.ArgumentParser, prefix: str):
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield prefix, parser
    for action in actions:
        yield prefix, parser
        for name, sub in action.choices.items():
            yield from _sub_commands(sub, f"{prefix} {name}")


def test_every_command_help_shows_an_example():
    """The README says every command has --help with examples: each (sub-)command shows one it can run."""
    parsers = [*_sub_commands(dysco_parser(), "dysco"), *_sub_commands(headfinder_parser(), "headfinder"),
               ("calibrate", calibrate_parser())]
    names = {prefix for prefix, _ in parsers}
    assert {"dysco generate", "dysco eval", "dysco models pull", "dysco registry import", "headfinder validate"} <= names
    for prefix, parser in parsers:
        text = parser.format_help()
        example = re.search(rf"^\s+{re.escape(prefix)}\b.*$", text, re.MULTILINE)
        assert example, f"`{prefix} --help` shows no example"
