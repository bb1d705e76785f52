"""notebooks/study.ipynb runs from top to bottom without an error (in a fresh kernel)."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "study.ipynb"


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A `python3` kernel spec running this interpreter (the venv's ipykernel), found first."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fashion-cnn tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return "python3"


def test_study_notebook_runs_without_errors(real_data, tmp_path, this_python_kernel):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # smaller quick settings than the notebook's own: what is tested is that every cell runs
    for old, new in (("SUBSET, EPOCHS = 3000, 2", "SUBSET, EPOCHS = 1000, 1"),
                     ("epochs_scale=0.04, subset=2000", "epochs_scale=0.04, subset=600")):
        cells = [c for c in notebook.cells if old in c.source]
        assert len(cells) == 1, f"the notebook no longer has {old!r}: update this test"
        cells[0].source = cells[0].source.replace(old, new)
    work = tmp_path / "work"  # the notebook writes runs/ under its working directory
    work.mkdir()
    client = nbclient.NotebookClient(notebook, kernel_name=this_python_kernel, timeout=600,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # model1 trains with its progress display: tqdm's notebook widget (ipywidgets), one per
    # epoch, or where ipywidgets is missing tqdm's text bar with ms/step and the running loss
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if widgets:  # the widgets' last state (kept by nbclient) holds the bar's text, as HTML
        # with figure spaces (tqdm.notebook's padding)
        state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
        values = [model["state"].get("value") for model in state["state"].values()]
        text = html.unescape(" ".join(v for v in values if isinstance(v, str)))
        text = text.replace("\u2007", " ")
    assert "ms/step" in text and "loss:" in text and "Epoch 1/1" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # live learning curves of model1 and of the study's runs, confusion matrix, predictions,
    # weights, augmentation preview, study learning curves
    assert len(images) >= 7
    reports = list(work.glob("runs/notebook-*/study/report.html"))
    assert len(reports) == 1
