"""notebooks/quickstart.ipynb runs end to end (tiny sizes) and shows its figures and its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "dysco-toolkit-test"
# Cells tagged with these must end up with a PNG among their outputs.
FIGURES = ("heatmap", "study-history", "study-importances", "eval-plot")


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"the notebook should have one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_committed_notebook_has_no_outputs():
    """Outputs are cleared in the committed file: diffs stay readable and nothing stale is shown."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} hold outputs; clear them before committing"


@pytest.mark.embedded
def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from decoder.catalogue import check_checkpoint, source_path

    if check_checkpoint("smollm2-135m") == "not installed" and not source_path("smollm2-135m").is_file():
        pytest.fail("the embedded model smollm2-135m is not installed; run `bash install.sh` first", pytrace=False)

    # A kernel spec of our own, pointing at this very interpreter, found first through JUPYTER_PATH:
    # a user-level "python3" spec (another Python, another venv) can then never be picked instead.
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dysco-toolkit (test)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DYSCO_NOTEBOOK_SMALL", "1")
    out = tmp_path / "out"
    monkeypatch.setenv("DYSCO_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebook shows PNG files; no GUI backend is needed

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A generous per-cell limit: on a loaded 2-core machine one cell can take minutes.
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=900, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    for tag in FIGURES:
        outputs = _tagged(nb, tag).outputs
        assert any("image/png" in o.get("data", {}) for o in outputs), f"cell {tag!r} shows no image: {outputs}"
    table = "".join(o.get("data", {}).get("text/markdown", "") for o in _tagged(nb, "eval-table").outputs)
    assert "| task | length | vanilla | attnts | dysco |" in table, table
    assert "| needle | 256 |" in table and "| needle | 384 |" in table, table

    # What the notebook wrote: two profiles (head set, then its tuned child), the study, the eval.
    from registry import Registry

    registry = Registry(out / "registry")
    versions = [v for v in registry.list("smollm2-135m") if v.version != "seed"]  # the shipped seed is listed too
    assert len(versions) == 2, versions
    tuned = registry.load("smollm2-135m@2")
    assert tuned.provenance["parent"] == "smollm2-135m@1"
    assert (out / "calibration.db").is_file() and (out / "mlflow.db").is_file()
    report = json.loads((out / "eval" / "results.json").read_text())
    assert report["config"]["methods"] == ["vanilla", "attnts", "dysco"]
    assert {c["method"] for c in report["cells"]} == {"vanilla", "attnts", "dysco"}
    for name in ("qr.png", "optimization_history.png", "param_importances.png", "eval/accuracy.png"):
        assert (out / name).stat().st_size > 0, name
