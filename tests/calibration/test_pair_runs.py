"""`benchmarks/pair_runs.py`: methods of two `dysco eval` runs paired on their shared examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from calibration.evaluation.statistics import paired_comparison, seed_for

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("pair_runs", ROOT / "benchmarks" / "pair_runs.py")
pair_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pair_runs)


def _run(path: Path, ids: list[str], scores: dict[str, list[float]], importance: float | None = None) -> Path:
    examples = []
    for i, example_id in enumerate(ids):
        example = {"id": example_id, "scores": {m: s[i] for m, s in scores.items()}}
        if importance is not None:
            example["selection"] = {"dysco": {"evidence_importance": importance * (i + 1), "evidence_share": 0.5,
                                              "evidence_recall": 0.25, "selected": 10.0}}
        examples.append(example)
    path.write_text(json.dumps({"examples": examples}))
    return path


def test_columns_are_paired_by_example_and_selection_split_by_outcome(tmp_path, capsys):
    ids = [f"kv-{i}" for i in range(6)]
    vanilla, kv_heads, prose_heads = [1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]
    a = _run(tmp_path / "a.json", ids, {"vanilla": vanilla, "dysco": kv_heads}, importance=0.1)
    b = _run(tmp_path / "b.json", ids, {"dysco": prose_heads})
    assert pair_runs.main(["pair", f"kv={a}", f"prose={b}", "--baseline", "kv:vanilla", "--out", str(tmp_path / "t.md")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())
    first = rows["comparisons"][0]
    assert (first["method"], first["against"]) == ("kv:dysco", "kv:vanilla")
    assert first == {"method": "kv:dysco", "against": "kv:vanilla",
                     **paired_comparison(kv_heads, vanilla, seed_for(0, "kv:dysco", "kv:vanilla"))}
    assert (first["wins"], first["losses"]) == (2, 0)
    prose_vs_kv = next(r for r in rows["comparisons"] if r["method"] == "kv:dysco" and r["against"] == "prose:dysco")
    assert (prose_vs_kv["wins"], prose_vs_kv["losses"]) == (3, 0)
    # only the run that recorded selection has selection rows: right = examples 0-3, wrong = 4-5
    by_outcome = {r["outcome"]: r for r in rows["selection"]}
    assert {r["method"] for r in rows["selection"]} == {"kv:dysco"}
    assert by_outcome["right"]["n"] == 4 and by_outcome["right"]["evidence_importance"] == pytest.approx(0.25)
    assert by_outcome["wrong"]["evidence_importance"] == pytest.approx(0.55)
    assert "| kv:dysco | kv:vanilla | 6 | +33.3" in capsys.readouterr().out


def test_runs_on_other_examples_are_refused(tmp_path):
    a = _run(tmp_path / "a.json", ["kv-0", "kv-1"], {"vanilla": [1, 0]})
    b = _run(tmp_path / "b.json", ["kv-1", "kv-0"], {"dysco": [1, 0]})
    with pytest.raises(SystemExit, match="holds other examples than the first run"):
        pair_runs.main(["pair", f"a={a}", f"b={b}", "--baseline", "a:vanilla"])


def test_pool_pairs_each_example_set_then_all_together(tmp_path):
    a = _run(tmp_path / "a.json", ["s2-0", "s2-1", "s2-2"], {"vanilla": [0, 0, 1]})
    a_cal = _run(tmp_path / "a_cal.json", ["s2-0", "s2-1", "s2-2"], {"dysco": [1, 0, 1]})
    b = _run(tmp_path / "b.json", ["s3-0", "s3-1"], {"vanilla": [1, 0], "dysco": [1, 1]})
    out = tmp_path / "pooled.md"
    assert pair_runs.main(["pool", f"{a}:vanilla", f"{a_cal}:dysco", f"{b}:vanilla", f"{b}:dysco", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["comparisons"]
    assert [(r["n"], r["wins"], r["losses"]) for r in rows] == [(3, 1, 0), (2, 1, 0), (5, 2, 0)]
    assert rows[-1]["p_value"] == pytest.approx(0.5)  # two wins, no loss: exact two-sided sign test
    with pytest.raises(SystemExit, match="hold other examples"):
        pair_runs.main(["pool", f"{a}:vanilla", f"{b}:dysco"])
    with pytest.raises(SystemExit, match="has no method 'attnts'"):
        pair_runs.main(["pool", f"{a}:attnts", f"{a_cal}:dysco"])
