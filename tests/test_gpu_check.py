"""bench/gpu_check.sh --dry-run: the GPU machine's one-call check, every step at tiny sizes on the CPU, as CI's rehearsal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # eight steps, each in its own process (~2.5 minutes on 2 cores)


def _check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", *args], capture_output=True, text=True, env=env,
                          timeout=1800)


def test_the_dry_run_writes_every_steps_figures_and_a_second_call_resumes(tmp_path):
    r = _check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text()) == {s: "ok" for s in
                                                                   ("env", "train_step", "eager", "channels_last", "compiled", "loader", "predict", "mias_fold")}
    steps = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json") if p.stem != "summary"}
    assert all(d["dry_run"] and (d["seconds"] > 0 or "skipped" in d) for d in steps.values())
    assert steps["env"]["matmul_tflops"] > 0 and steps["env"]["torch"]
    assert {k: v["ok"] for k, v in steps["train_step"].items() if isinstance(v, dict)} == {"whole-resnet": True, "whole-vgg": True, "patch": True}
    for way in ("eager", "channels_last", "compiled"):
        for model in ("whole-resnet", "patch"):
            d = steps[way][model]
            assert d["bare_per_s"] > 0 and d["fastai_per_s"] > 0 and d["gflop_per_image"] > 0 and 0 < d["mfu_vs_matmul"] < 2, (way, model, d)
    assert steps["loader"]["loader_alone_per_s"] > 0 and steps["loader"]["train_images"] > 0
    assert steps["predict"]["cvfast_predict_per_s"] > 0 and steps["predict"]["bare_forward_per_s"] > 0
    assert "dry run" in steps["mias_fold"]["skipped"]

    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import section

    text = "\n".join(section(tmp_path))
    assert "| compiled | patch classifier" in text and "Loader:" in text and "Predict:" in text and "without figures" not in text
    (tmp_path / "predict.json").unlink()  # as if the predict step had been killed at its limit
    assert "Steps without figures (killed at their limit or failed): predict." in "\n".join(section(tmp_path))

    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json") if p.stem != "summary"}
    r = _check(tmp_path)  # the second call: only the missing step runs
    assert r.returncode == 0, r.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the missing step runs, and the skipped mini-MIAS fold is tried again; the rest were done
    assert summary["predict"] == summary["mias_fold"] == "ok" and all(v == "done before" for k, v in summary.items() if k not in ("predict", "mias_fold"))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.stem != "mias_fold")

    from bench.gpu_check import done_before

    assert done_before(tmp_path / "env.json", dry_run=True) and not done_before(tmp_path / "env.json", dry_run=False)


def test_a_step_killed_at_its_limit_takes_its_own_children_with_it(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import run_limited

    pidfile = tmp_path / "child.pid"
    status = run_limited(["bash", "-c", f"sleep 120 & echo $! > {pidfile}; wait"], 2, None)
    assert status == "killed at its 2 s limit"
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    try:
        os.kill(pid, 0)
        alive = not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except ProcessLookupError:
        alive = False
    assert not alive, "the step's child outlived it (an orphaned mias_cv.py would keep the GPU)"
    assert run_limited([sys.executable, "-c", "raise SystemExit(3)"], 30, None) == "failed (exit 3)"


def test_without_wheels_or_fastai_it_says_what_to_carry(tmp_path):
    if (ROOT / ".whl").is_dir():
        pytest.skip(".whl/ is present here: the script would install it")
    # an interpreter that cannot import fastai: the system's Python without the project's venv
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=120,
                       env={"PATH": os.environ["PATH"], "PYTHON": "/usr/bin/python3", "OUT": str(tmp_path / "o"), "SITE": str(tmp_path / "site"),
                            "HOME": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 1 and "lacks fastai or pydicom and .whl/ holds no wheels" in r.stdout + r.stderr
