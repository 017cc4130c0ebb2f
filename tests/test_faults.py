"""Faults: a diverging loss, a full disk, a killed `patches` run, and reproducibility of a seeded run on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PATCH, run_cli
from fastai.callback.core import Callback
from typer.testing import CliRunner

from cvfast.cli import app
from cvfast.errors import CvfastError
from cvfast.train.pipeline import patch_learner_from_recipe, train_patch, train_schedule
from cvfast.train.recipes import load_recipe, resolve
from cvfast.train.schedule import Stage


class PoisonLoss(Callback):
    """Make one training batch's loss NaN, as a diverging run would."""

    def __init__(self, epoch: int):
        self.at = epoch

    def after_loss(self):
        if self.training and self.epoch == self.at and self.iter == 1:
            self.learn.loss_grad = self.learn.loss_grad * float("nan")
            self.learn.loss = self.learn.loss_grad.clone()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(s10, tmp_path):
    recipe = load_recipe("demo-patch")
    stages = [Stage(epochs=4, lr=1e-3, train="all", name="all")]
    learn, _ = patch_learner_from_recipe(recipe, s10, tmp_path)
    with learn.no_bar(), learn.no_logging(), pytest.raises(CvfastError, match="diverged.*last good checkpoint is kept"):
        train_schedule(learn, stages, tmp_path, recipe, cbs=lambda trackers: [PoisonLoss(epoch=2)])
    ckpt = tmp_path / "checkpoints"
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["epochs_done"] == 2 and progress["checkpoint"] == "s0e2.pth"  # the NaN epoch left nothing behind
    weights = torch.load(ckpt / "s0e2.pth", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())  # stopped before the backward pass: no NaN reached them

    fresh, _ = patch_learner_from_recipe(recipe, s10, tmp_path)  # the same command again, without the fault
    with fresh.no_bar(), fresh.no_logging():
        train_schedule(fresh, stages, tmp_path, recipe)
    history = json.loads((ckpt / "progress.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())


class PoisonWeights(Callback):
    """Make the weights non-finite with the last step of an epoch: every training loss was finite, validation is not."""

    def __init__(self, epoch: int):
        self.at = epoch

    def after_step(self):
        if self.epoch == self.at and self.iter == self.n_iter - 1:
            with torch.no_grad():
                next(self.learn.model.parameters()).fill_(float("nan"))


def test_weights_that_turn_non_finite_in_the_last_step_stop_as_divergence_not_in_the_metrics(ddsm_data, untrained_models, tmp_path):
    """The whole-image model's ROC AUC would fail on NaN scores in the Recorder ("Input contains NaN", unexpected)."""
    from cvfast.train.pipeline import whole_learner_from_recipe

    recipe = load_recipe("demo-whole")
    stages = [Stage(epochs=3, lr=1e-4, train="all", name="all")]
    learn = whole_learner_from_recipe(recipe, ddsm_data, untrained_models[0], tmp_path)
    with learn.no_bar(), learn.no_logging(), pytest.raises(CvfastError, match="diverged.*last good checkpoint is kept"):
        train_schedule(learn, stages, tmp_path, recipe, cbs=lambda trackers: [PoisonWeights(epoch=1)])
    assert json.loads((tmp_path / "checkpoints" / "progress.json").read_text())["epochs_done"] == 1


def test_same_seed_same_metrics_on_cpu(s10, tmp_path):
    recipe = resolve(load_recipe("demo-patch"), {}, epochs_scale=0.25)
    a = train_patch(recipe, s10, tmp_path / "a").metrics
    b = train_patch(recipe, s10, tmp_path / "b").metrics
    assert a == b and a["test_accuracy"] > 0  # bit-identical, not just close
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.fixture
def disk_full(monkeypatch):
    """Every atomic write goes to /dev/full, which fails with ENOSPC like a full disk."""
    def full(dir=None, prefix="", suffix=""):
        return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, f"{prefix}full{suffix}")

    monkeypatch.setattr("cvfast.util.files.tempfile.mkstemp", full)


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, disk_full):
    rng = np.random.default_rng(0)
    pd.DataFrame({"image_id": [f"i{k}" for k in range(40)], "patient_id": [f"p{k // 2}" for k in range(40)],
                  "label": np.arange(40) % 2, "p_cancer": rng.random(40)}).to_csv(tmp_path / "p.csv", index=False)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "p.csv"), "--n-boot", "100", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 1 and "the disk is full" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ev").exists() or not any((tmp_path / "ev").iterdir())


def test_killed_patches_run_ends_identical_to_an_uninterrupted_one(ddsm_data, s10, tmp_path):
    out = tmp_path / "patches"
    cmd = [sys.executable, "-m", "cvfast.cli", "patches", str(ddsm_data), "--size", str(PATCH), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 20:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "patches.csv").exists(), "the run must have been killed before it finished"
    r = run_cli("patches", str(ddsm_data), "--size", str(PATCH), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob(".*.tmp"))
    ours, ref = pd.read_csv(out / "patches.csv"), pd.read_csv(s10 / "patches.csv")
    pd.testing.assert_frame_equal(ours, ref)
    assert all((out / p).read_bytes() == (s10 / p).read_bytes() for p in ours["path"])


KILL_DURING_EXPORT = '''
"""Run `cvfast patch ...` and SIGKILL this process at a random point of its export (argv[1] seeds the point)."""
import os, random, signal, sys, tempfile
import cvfast.train.pipeline as pipeline
from cvfast.cli import app

export, seed = pipeline.export_model, int(sys.argv[1])

def export_then_die(learn, out, *args, **kwargs):
    events = [0]
    def count(frame, event, arg):
        events[0] += 1
        return count
    with tempfile.TemporaryDirectory() as scratch:  # a dry export counts the trace events (Python lines and calls)
        sys.settrace(count)
        export(learn, scratch, *args, **kwargs)
        sys.settrace(None)
    kill_at, seen = random.Random(seed).randint(1, events[0]), [0]
    def kill(frame, event, arg):
        seen[0] += 1
        if seen[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return kill
    sys.settrace(kill)
    export(learn, out, *args, **kwargs)

pipeline.export_model = export_then_die
app(sys.argv[2:])
'''


def _complete(out) -> list[str]:
    """The finished model files in `out`, each checked readable in full (a partial one raises)."""
    from fastai.learner import load_learner
    from safetensors.torch import load_file

    present = []
    if (out / "model.pkl").exists():
        with pytest.warns(UserWarning):
            load_learner(out / "model.pkl")
        present.append("model.pkl")
    if (out / "model.safetensors").exists():
        load_file(out / "model.safetensors")
        present.append("model.safetensors")
    if (out / "model.json").exists():
        json.loads((out / "model.json").read_text())
        present.append("model.json")
    return present


@pytest.mark.slow  # several killed exports in fresh processes
def test_killed_export_leaves_no_partial_file_and_a_rerun_finishes_identically(s10, tmp_path):
    args = ["patch", "--data", str(s10), "--recipe", "demo-patch", "--epochs-scale", "0.125"]
    assert run_cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    (tmp_path / "kill.py").write_text(KILL_DURING_EXPORT)
    for seed in (1, 2):  # two random points of the export
        out = tmp_path / f"killed{seed}"
        r = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(seed), *args, "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        before = _complete(out)  # whatever exists under a final name is whole
        assert "model.json" not in before or len(before) == 3  # the sidecar is written last
        r = run_cli(*args, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "resuming" in r.stderr
        assert _complete(out) == ["model.pkl", "model.safetensors", "model.json"] and not list(out.rglob("*.tmp"))
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
        assert json.loads((out / "model.json").read_text())["metrics"] == json.loads((tmp_path / "ref" / "model.json").read_text())["metrics"]
