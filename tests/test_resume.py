"""Killed half-way: prepare resumes to identical output; training continues from its last epoch checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import run_cli

from cvfast.data.synth import synthesize

pytestmark = pytest.mark.slow  # kills and re-runs real CLI processes


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


def test_training_resumes_after_being_killed(s10, tmp_path):
    out = tmp_path / "m"
    # timm's tiny test_resnet from random init: one stage of 24 epochs that take a fraction of a second each
    cmd = [sys.executable, "-m", "cvfast.cli", "patch", "--data", str(s10), "--recipe", "demo-patch", "--arch", "test_resnet", "--no-pretrained",
           "--epochs-scale", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = out / "checkpoints" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["epochs_done"]
    total = 24  # 8 demo epochs x 3, one random-init stage
    assert 2 <= done < total and not (out / "model.pkl").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming at stage 1 (random-init), epoch {done + 1} of {total}" in " ".join(r.stderr.split())
    history = json.loads((out / "checkpoints" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(total))  # every epoch once: none lost, none repeated
    assert (out / "model.pkl").is_file() and not list(out.rglob("*.tmp*"))


@pytest.mark.parametrize("killed_after", [1, 3], ids=["mid-stage", "end-of-stage"])
def test_a_resumed_whole_image_run_ends_with_the_weights_of_an_uninterrupted_one(ddsm_data, untrained_models, tmp_path, monkeypatch, caplog,
                                                                                 killed_after):
    """Killed after an epoch and resumed: the same weights, bit for bit (data order, augmentation and the loaders'
    random state restored); skipping any of those restores changes them. Killed after a stage's last epoch, the
    resume says so (not "epoch 4 of 3")."""
    from safetensors.torch import load_file

    from cvfast.train import callbacks
    from cvfast.train.pipeline import train_whole
    from cvfast.train.recipes import load_recipe, resolve

    recipe = resolve(load_recipe("demo-whole"), {}, epochs_scale=0.1)
    assert [s["epochs"] for s in recipe["stages"]] == [3, 1]
    train_whole(recipe, ddsm_data, untrained_models[0], tmp_path / "whole")
    checkpoint = callbacks.EpochCheckpoint._checkpoint

    def killed(self, values, stopped):
        checkpoint(self, values, stopped)
        if self.offset + self.epoch + 1 == killed_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochCheckpoint, "_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_whole(recipe, ddsm_data, untrained_models[0], tmp_path / "resumed")
    monkeypatch.undo()
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "progress.json").read_text())["epochs_done"] == killed_after
    with caplog.at_level("INFO", logger="cvfast.train.pipeline"):
        train_whole(recipe, ddsm_data, untrained_models[0], tmp_path / "resumed")
    said = caplog.text
    if killed_after == recipe["stages"][0]["epochs"]:
        assert "resuming after stage 1 (" in said and "it was complete" in said and "epoch 4 of 3" not in said, said
    else:
        assert "resuming at stage 1 (" in said and f"epoch {killed_after + 1} of 3" in said, said
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
