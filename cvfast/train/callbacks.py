"""Callbacks: epoch checkpoints for resume, and the whole-image BatchNorm policy."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from fastai.callback.core import Callback, CancelFitException
from torch import nn

from cvfast.data.read import atomic_write_bytes
from cvfast.errors import CvfastError

log = logging.getLogger(__name__)


class HoldBodyBatchNorm(Callback):
    """Keep the pretrained body's BatchNorm running statistics fixed (eval mode) while everything else trains.

    At the whole-image batch size of 2, batch statistics are noise; the body's statistics learned on many
    patches are better. Its BN affine weights still train; the new top's BN layers train normally.
    """

    order = 1  # after TrainEvalCallback put the model in train mode

    def before_train(self):
        """Put the body's BN layers in eval mode."""
        for m in self.learn.model.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class EpochCheckpoint(Callback):
    """After every epoch: weights + optimizer state to checkpoints/last.pth and progress.json, both atomically."""

    order = 90

    def __init__(self, out_dir: str | Path, stage_index: int, fingerprint: str, start_epoch: int = 0):
        self.dir, self.stage_index, self.fingerprint, self.start_epoch = Path(out_dir) / "checkpoints", stage_index, fingerprint, start_epoch

    def after_epoch(self):
        """Checkpoint, record the epoch; stop with a clear message on a non-finite loss."""
        if self.epoch < self.start_epoch:
            return  # fastai still fires after_epoch for the epochs a resumed fit skips
        values = dict(zip(self.recorder.metric_names[1:-1], self.recorder.log[1:-1]))
        if not all(math.isfinite(float(v)) for k, v in values.items() if "loss" in k and v is not None):
            raise CancelFitException()  # handled by the caller; the last good checkpoint stays
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.learn.save(self.dir.resolve() / "last.tmp", with_opt=True)
        os.replace(tmp, self.dir / "last.pth")
        history = read_history(self.dir)
        history.append({"stage": self.stage_index, "epoch": self.epoch, **{k: _num(v) for k, v in values.items()}})
        log.info("stage %d epoch %d/%d: %s", self.stage_index + 1, self.epoch + 1, self.n_epoch,
                 ", ".join(f"{k} {_num(v):.4f}" if isinstance(_num(v), float) else f"{k} {v}" for k, v in values.items()))
        atomic_write_bytes(self.dir / "history.json", json.dumps(history, indent=1).encode())
        atomic_write_bytes(self.dir / "progress.json", json.dumps(
            {"fingerprint": self.fingerprint, "stage": self.stage_index, "epochs_done": self.epoch + 1}).encode())


def _num(v):
    """JSON-safe number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def read_history(checkpoint_dir: Path) -> list[dict]:
    """Epochs recorded so far."""
    f = Path(checkpoint_dir) / "history.json"
    return json.loads(f.read_text()) if f.is_file() else []


def read_progress(out_dir: str | Path, fingerprint: str) -> tuple[int, int] | None:
    """(stage, epochs done in it) of an interrupted run with the same recipe, or None."""
    d = Path(out_dir) / "checkpoints"
    f = d / "progress.json"
    if not f.is_file() or not (d / "last.pth").is_file():
        return None
    p = json.loads(f.read_text())
    if p.get("fingerprint") != fingerprint:
        raise CvfastError(f"{d}: holds checkpoints of a different recipe; use another --out or delete the folder")
    return int(p["stage"]), int(p["epochs_done"])
