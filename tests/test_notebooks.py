"""The notebooks in nbs/ run top to bottom on the synthetic data on a CPU (so they cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parents[1] / "nbs"


pytestmark = pytest.mark.slow  # executes the three notebooks end to end


def run_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute nbs/NAME in a fresh kernel in tmp_path; check it ran clean and exported models."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a separate process: one thread, like the xdist workers
    nb = nbformat.read(NBS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    work = next((tmp_path / "nb-work").iterdir())
    sidecars = [json.loads(p.read_text()) for p in work.rglob("model.json")]
    assert sidecars and all(s["weights_sha256"] for s in sidecars)  # each notebook trained and exported models


QUICKSTART, TRANSFER, INSPECT = "01_quickstart.ipynb", "02_transfer_your_site.ipynb", "03_inspect_a_model.ipynb"


# one class per notebook: `--dist loadscope` sends each class to a worker of its own
class TestQuickstart:
    def test_runs(self, tmp_path, monkeypatch):
        run_notebook(QUICKSTART, tmp_path, monkeypatch)


class TestTransferYourSite:
    def test_runs(self, tmp_path, monkeypatch):
        run_notebook(TRANSFER, tmp_path, monkeypatch)


class TestInspectAModel:
    def test_runs(self, tmp_path, monkeypatch):
        run_notebook(INSPECT, tmp_path, monkeypatch)


def test_every_notebook_is_executed():
    assert {p.name for p in NBS.glob("*.ipynb")} == {QUICKSTART, TRANSFER, INSPECT}
