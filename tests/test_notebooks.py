"""Every notebook runs headlessly from top to bottom (nbclient), on small settings."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from support import ROOT

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMALL = {"MSMOE_NB_STEPS": "12", "MSMOE_NB_CKPT_STEPS": "6,10"}


def test_the_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "parallel_layouts", "checkpoint"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # Stored without outputs, so the repository shows the code and a run shows fresh results.
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"{path.name} has stored outputs"
    for key, value in {**SMALL, "MSMOE_NB_RUNS": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", [])), \
        "the notebook draws its plot"
    assert os.listdir(tmp_path) or path.stem == "parallel_layouts"
