"""notebooks/quickstart.ipynb runs top to bottom (tiny random model) and is committed stripped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_MISSING = 'install the dev extra: pip install -e ".[dev]"'
nbformat = pytest.importorskip("nbformat", reason=_MISSING)
nbclient = pytest.importorskip("nbclient", reason=_MISSING)
pytest.importorskip("ipykernel", reason=_MISSING)

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_is_stripped():
    nb = _read()
    nbformat.validate(nb)
    dirty = [cell.get("id") for cell in nb.cells if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None
                  or "execution" in cell.metadata)]
    assert not dirty, f"strip the outputs of cells {dirty} before committing"


def test_notebook_has_the_visual_qa_section():
    sources = [cell.source for cell in _read().cells if cell.cell_type == "markdown"]
    assert any(s.startswith("## Ask a question about the detections") for s in sources)


def test_notebook_runs_top_to_bottom(tmp_path):
    nb = _read()
    # The kernel is the "python3" kernel that ipykernel provides: jupyter_client starts it
    # with this interpreter (sys.executable), so it imports the installed grounding.
    env = {**os.environ, "GROUNDING_NOTEBOOK_TINY": "1", "OMP_NUM_THREADS": "1",
           "GROUNDING_NOTEBOOK_OUT": str(tmp_path / "runs"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env=env)

    errors = [(cell.get("id"), out.get("ename"), out.get("evalue"))
              for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert not errors
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)

    by_id = {cell.get("id"): cell for cell in code}
    # A Result shows itself as its overlay (image/png), in the detect cell and the others.
    for cell_id in ("detect", "expression", "points", "custom-prompt", "parse-real-answer"):
        assert any("image/png" in out.get("data", {}) for out in by_id[cell_id].outputs), cell_id
    # The real answer parsed: the receipt fixture has 39 text lines.
    parsed = "".join(out.get("text", "") for out in by_id["parse-real-answer"].outputs)
    assert parsed.startswith("39 boxes")
    # Everything the notebook wrote went to the temporary folder, none into the repository.
    run = tmp_path / "runs" / "quickstart-tiny"
    assert (run / "predictions.jsonl").is_file()
    assert (run / "export" / "coco" / "annotations.json").is_file()
    assert (run / "export" / "yolo" / "data.yaml").is_file()
    assert not (NOTEBOOK.parent / "runs").exists()
