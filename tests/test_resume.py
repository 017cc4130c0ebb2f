"""A prepare killed half-way resumes: finished images are skipped, the result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from cvfast.data.synth import synthesize

from conftest import run_cli


def test_killed_prepare_resumes_to_identical_output(tmp_path):
    truth = synthesize(tmp_path / "src", patients=4, seed=5, size="1600x1200")  # big enough that a run takes seconds
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "cvfast.cli", "prepare", "ddsm", str(tmp_path / "src" / "ddsm"), "--out", str(out), "--workers", "1", "--size", "288x224"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = out / ".records"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    total = len(truth["ddsm"]["images"])
    assert 2 <= len(done_before) < total, "the run must have been interrupted part-way"
    assert not (out / "manifest.csv").exists()  # no manifest until the run completes

    r = run_cli("prepare", "ddsm", str(tmp_path / "src" / "ddsm"), "--out", str(out), "--workers", "2", "--size", "288x224")
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done_before)} of {total} images already converted" in " ".join(r.stderr.split())
    assert all((records / n).stat().st_mtime_ns == t for n, t in done_before.items())  # finished images not redone
    assert not list(out.rglob(".*.tmp"))

    ref = tmp_path / "ref"
    assert run_cli("prepare", "ddsm", str(tmp_path / "src" / "ddsm"), "--out", str(ref), "--size", "288x224").returncode == 0
    a, b = pd.read_csv(out / "manifest.csv"), pd.read_csv(ref / "manifest.csv")
    pd.testing.assert_frame_equal(a, b)
    for rel in a["path"]:
        assert (out / rel).read_bytes() == (ref / rel).read_bytes()
