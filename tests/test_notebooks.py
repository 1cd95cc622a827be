"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel, at small sizes."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
WRITES = {  # what each notebook leaves where it ran
    "quickstart": ["runs/notebook-quickstart/result.json"],
    "algorithm_comparison": [f"runs/notebook-comparison/{a}/result.json" for a in ("lsgd", "easgd", "data_parallel")],
    "toy_landscapes": [],
}


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "algorithm_comparison", "toy_landscapes"} <= names


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_error(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LSGD_RAY_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    # the kernel runs where a user would start it; its outputs (runs/) land in tmp_path
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    images = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, "the notebook shows no plot"
    for name in WRITES[path.stem]:
        assert (tmp_path / name).exists(), name
