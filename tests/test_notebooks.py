"""The notebooks in nbs/ run top to bottom on the synthetic data on a CPU (so they cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parents[1] / "nbs"


@pytest.mark.parametrize("name", sorted(p.name for p in NBS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a separate process: one thread, like the xdist workers
    nb = nbformat.read(NBS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    work = next((tmp_path / "nb-work").iterdir())
    sidecars = [json.loads(p.read_text()) for p in work.rglob("model.json")]
    assert sidecars and all(s["weights_sha256"] for s in sidecars)  # each notebook trained and exported models
