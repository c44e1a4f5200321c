"""`dysco registry …` through the umbrella entry point, as scripts would call it (`--json`)."""

from __future__ import annotations

import json

import pytest

from decoder.cli import main
from registry import Registry
from test_registry import make_profile


def run_json(capsys, *argv: str) -> dict:
    assert main(["registry", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture()
def store(tmp_path) -> str:
    reg = Registry(tmp_path / "reg")
    reg.register(make_profile(0))
    reg.register(make_profile(1), tags=["prod"])
    return str(reg.root)


def test_list_json_shows_versions_seeds_and_corruption(capsys, store):
    rows = run_json(capsys, "list", "--registry", store)["versions"]
    by_ref = {row["ref"]: row for row in rows}
    assert {"tiny-llama@1", "tiny-llama@2", "qwen3-8b@seed"} <= set(by_ref)
    assert by_ref["tiny-llama@2"]["tags"] == ["prod"]
    assert by_ref["tiny-llama@1"]["head_set_size"] == 3
    profile_file = f"{store}/tiny-llama/1/profile.json"
    with open(profile_file, "a") as handle:
        handle.write(" ")
    rows = run_json(capsys, "list", "tiny-llama", "--registry", store)["versions"]
    assert [(r["ref"], r["status"]) for r in rows] == [("tiny-llama@1", "corrupt"),
                                                      ("tiny-llama@2", "ok")]
    assert "profile.json" in rows[0]["problem"]


def test_show_json_round_trips_the_profile(capsys, store):
    data = run_json(capsys, "show", "tiny-llama@prod", "--registry", store)
    expected = make_profile(1)
    assert data["ref"] == "tiny-llama@2"
    assert data["content_hash"] == expected.content_hash()
    assert [tuple(p) for p in data["head_set"]] == expected.head_set
    assert data["knobs"]["strength"] == 2.5
    assert data["head_scores"]["qr"] == expected.head_scores["qr"].tolist()


def test_show_text_is_readable(capsys, store):
    assert main(["registry", "show", "tiny-llama", "--registry", store]) == 0
    out = capsys.readouterr().out
    head = make_profile(1).head_set[0]
    assert "tiny-llama@2" in out and "strength=2.5" in out
    assert f"L{head[0]}H{head[1]}" in out and "dev_mrcr" in out and "probe_kind" in out


def test_diff_tag_export_import(capsys, store, tmp_path):
    report = run_json(capsys, "diff", "tiny-llama@1", "tiny-llama@2", "--registry", store)
    assert report["knobs"]["strength"] == {"a": 1.5, "b": 2.5}
    assert main(["registry", "diff", "tiny-llama@1", "tiny-llama@2", "--registry", store]) == 0
    assert "knobs.strength" in capsys.readouterr().out

    assert run_json(capsys, "tag", "tiny-llama@1", "best", "--registry", store) == {
        "ref": "tiny-llama@1", "tag": "best"}
    assert Registry(store).resolve("tiny-llama@best") == ("tiny-llama", 1)
    run_json(capsys, "tag", "tiny-llama", "best", "--remove", "--registry", store)
    assert "best" not in Registry(store).tags("tiny-llama")

    archive = str(tmp_path / "out.tar.gz")
    assert run_json(capsys, "export", "tiny-llama", archive, "--registry", store)["exported"] == [
        "tiny-llama@1", "tiny-llama@2"]
    other = str(tmp_path / "other")
    assert run_json(capsys, "import", archive, "--registry", other)["imported"] == [
        "tiny-llama@1", "tiny-llama@2"]
    assert Registry(other).load("tiny-llama@2") == make_profile(1)


def test_errors_are_one_line_on_stderr_with_status_1_or_2_for_usage(capsys, store):
    assert main(["registry", "show", "tiny-llama@9", "--registry", store]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dysco registry show: error: tiny-llama has no version 9")
    assert main(["registry", "show", "a@b@c", "--registry", store]) == 2
    assert "more than one '@'" in capsys.readouterr().err
    assert main(["registry", "tag", "tiny-llama@1", "latest", "--registry", store]) == 2
    assert "reserved" in capsys.readouterr().err


def test_registry_env_var_is_the_default(capsys, store, monkeypatch):
    monkeypatch.setenv("DYSCO_REGISTRY", store)
    assert run_json(capsys, "show", "tiny-llama@1")["ref"] == "tiny-llama@1"


def test_show_and_diff_name_the_intervention_warmup(capsys, tmp_path):
    import dataclasses

    reg = Registry(tmp_path / "reg")
    auto = make_profile(0)
    reg.register(auto)
    reg.register(make_profile(0, knobs=dataclasses.replace(auto.knobs, intervention_warmup=3)))
    root = str(reg.root)
    assert main(["registry", "show", "tiny-llama@1", "--registry", root]) == 0
    assert "intervention_warmup=auto" in capsys.readouterr().out
    assert run_json(capsys, "show", "tiny-llama@2", "--registry", root)["knobs"]["intervention_warmup"] == 3
    report = run_json(capsys, "diff", "tiny-llama@1", "tiny-llama@2", "--registry", root)
    assert report["knobs"] == {"intervention_warmup": {"a": "auto", "b": 3}}
    assert main(["registry", "diff", "tiny-llama@1", "tiny-llama@2", "--registry", root]) == 0
    assert 'knobs.intervention_warmup  "auto"  ->  3' in capsys.readouterr().out


def test_export_and_registry_paths_are_checked_before_anything_is_written(capsys, store, tmp_path):
    """Issue 15: bad export targets and a file given as --registry are one line, exit 1, nothing written."""
    cases = [
        (["export", "tiny-llama@1", str(tmp_path / "no-such-dir" / "x.tar.gz"), "--registry", store], "does not exist"),
        (["export", "tiny-llama@1", str(tmp_path), "--registry", store], "is a folder"),
        (["import", str(tmp_path / "x.tar.gz"), "--registry", "/etc/passwd"], "is a file, not a folder"),
        (["list", "--registry", "/etc/passwd"], "is a file, not a folder"),
    ]
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    for argv, message in cases:
        assert main(["registry", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dysco registry ") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # no temp file beside the folder
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_show_into_a_closed_pipe_exits_quietly(store):
    """`dysco registry show … | head`: the reader has left before the output; no BrokenPipeError traceback."""
    import subprocess
    import sys

    script = "import sys; from decoder.cli import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen(
        [sys.executable, "-c", script, "registry", "show", "tiny-llama@1", "--registry", store],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    child.stdout.close()  # the reader is gone long before the child has imported anything
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
