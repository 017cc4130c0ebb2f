"""Callbacks: epoch checkpoints for resume (with the per-epoch CSV log), the whole-image BatchNorm policy, progress, TensorBoard."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import os
import random
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TrackerCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, Recorder
from fastai.torch_core import distrib_barrier, find_bs, get_model, num_distrib, rank_distrib
from torch import nn

from cvfast.errors import CvfastError, DiskFull
from cvfast.util.distributed import is_main_process
from cvfast.util.files import TEMP_PREFIX, atomic_write_bytes, disk_full, read_json

log = logging.getLogger(__name__)


class HoldBodyBatchNorm(Callback):
    """Keep the pretrained body's BatchNorm running statistics fixed (eval mode) while everything else trains.

    At the whole-image batch size of 2, batch statistics are noise; the body's statistics learned on many
    patches are better. Its BN affine weights still train; the new top's BN layers train normally.
    """

    order = 1  # after TrainEvalCallback put the model in train mode

    def before_train(self):
        """Put the body's BN layers in eval mode."""
        for m in get_model(self.learn.model).body.modules():  # get_model: under data parallel the model is wrapped in DDP
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def save_atomically(learn: Learner, path: Path, with_opt: bool, what: str) -> None:
    """learn.save to a temporary, then os.replace onto PATH (a .pth): a kill never leaves a half-written checkpoint behind
    (the temporary is removed at the next start), and a full disk is said to be one (torch calls it "unexpected pos")."""
    tmp = path.parent.resolve() / f"{TEMP_PREFIX}{path.stem}.tmp.pth"
    try:
        learn.save(tmp.with_suffix(""), with_opt=with_opt)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFull(f"{path.parent}: no space for {what}; free space and run the same command again: it resumes from the "
                           "last checkpoint") from None
        raise


class BestModel(SaveModelCallback):
    """SaveModelCallback on validation ROC AUC whose "best so far" survives a resume and carries across stages.

    Like the reference's AUC checkpointer, training goes on from the last epoch; the best epoch's weights are loaded
    once, after the last stage (train_schedule), not at the end of every stage."""

    def __init__(self, best: float | None = None, monitor: str = "roc_auc_score"):
        super().__init__(monitor=monitor, comp=np.less if monitor.endswith("loss") else np.greater, fname="best", reset_on_fit=best is None)
        if best is not None:
            self.best = best

    def after_epoch(self):
        """Save on improvement, logged (fastai's prints to stdout, which breaks the CLI's tables and logs)."""
        TrackerCallback.after_epoch(self)
        if self.new_best:
            log.info("best %s so far: %.4f (epoch %d of this stage)", self.monitor, self.best, self.epoch + 1)
            self._save(self.fname)

    def _save(self, name: str) -> None:
        """fastai writes best.pth in place, where a kill would leave half a file for the end of training to load."""
        if is_main_process():
            save_atomically(self.learn, self.path / self.model_dir / f"{name}.pth", self.with_opt, "the best epoch's weights")

    def after_fit(self, **kwargs):
        """Wait for rank 0's best.pth under data parallel; warn when no epoch was ever saved as best."""
        distrib_barrier()  # under data parallel only rank 0 writes it: the others wait until it has
        if not (self.path / self.model_dir / f"{self.fname}.pth").is_file():
            log.warning("validation %s never improved (one class in the validation split?); keeping the last epoch", self.monitor)


class EarlyStop(EarlyStoppingCallback):
    """Early stopping on validation ROC AUC, with its patience counter carried across a resume."""

    def __init__(self, patience: int, best: float | None = None, wait: int = 0, monitor: str = "roc_auc_score"):
        super().__init__(monitor=monitor, comp=np.less if monitor.endswith("loss") else np.greater, patience=patience,
                         reset_on_fit=best is None)
        self.wait = wait
        if best is not None:
            self.best = best

    def before_fit(self):
        """fastai zeroes the patience counter here; a resumed run keeps it."""
        wait = self.wait
        super().before_fit()
        if not self.reset_on_fit:
            self.wait = wait


class EpochCheckpoint(Callback):
    """After every epoch, a two-phase checkpoint: weights + optimizer to a new file, then progress.json (which
    names that file, the epoch history and the trackers' state) atomically, then the older file is removed. A kill
    at any point leaves progress.json naming a complete checkpoint."""

    order = 90  # after the Recorder and the trackers

    def __init__(self, out_dir: str | Path, stage_index: int, fingerprint: str, epoch_offset: int = 0):
        self.dir, self.stage_index, self.fingerprint, self.offset = Path(out_dir) / "checkpoints", stage_index, fingerprint, epoch_offset
        self.diverged, self.recorded = False, -1

    def after_epoch(self):
        """Checkpoint and record the epoch; stop on a non-finite loss (the caller reports it)."""
        values = dict(zip(self.recorder.metric_names[1:-1], self.recorder.log[1:-1]))
        if not all(math.isfinite(float(v)) for k, v in values.items() if "loss" in k and v is not None):
            self.diverged = True
            raise CancelFitException()
        self._checkpoint(values, stopped=False)

    def after_cancel_fit(self):
        """Early stopping cancels the fit before this callback's after_epoch: record that epoch, stage complete.

        StopOnNonFinite cancels it mid-epoch on a non-finite loss of any rank: then nothing is recorded.
        """
        if getattr(self.learn, "diverged", False):
            self.diverged = True
        if not self.diverged and self.recorded != self.epoch:
            self._checkpoint(dict(zip(self.recorder.metric_names[1:-1], self.recorder.log[1:-1])), stopped=True)

    def _checkpoint(self, values: dict, stopped: bool) -> None:
        self.recorded = self.epoch
        if not is_main_process():  # data parallel: rank 0 writes for all
            return
        epoch = self.offset + self.epoch
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"s{self.stage_index}e{epoch + 1}"
        save_atomically(self.learn, self.dir / f"{name}.pth", True, f"the checkpoint of epoch {epoch + 1}")
        state = read_progress_raw(self.dir)
        history = state.get("history", []) + [{"stage": self.stage_index, "epoch": epoch, **{k: _num(v) for k, v in values.items()}}]
        trackers = {type(cb).__name__: {"best": _num(getattr(cb, "best", None)), "wait": getattr(cb, "wait", 0)}
                    for cb in self.learn.cbs if isinstance(cb, (BestModel, EarlyStop))}
        atomic_write_bytes(self.dir / "progress.json", json.dumps({
            "fingerprint": self.fingerprint, "stage": self.stage_index, "checkpoint": f"{name}.pth",
            "epochs_done": self.n_epoch + self.offset if stopped else epoch + 1, "trackers": trackers, "history": history,
            "rng": rng_state(self.learn), "smooth_loss": smooth_loss_state(self.learn)}, indent=1).encode())
        write_history_csv(self.dir, history)
        for old in self.dir.glob("s*e*.pth"):
            if old.name != f"{name}.pth":
                old.unlink(missing_ok=True)
        log.info("stage %d epoch %d: %s%s", self.stage_index + 1, epoch + 1,
                 ", ".join(f"{k} {_num(v):.4f}" if isinstance(_num(v), float) else f"{k} {v}" for k, v in values.items()),
                 " (early stop)" if stopped else "")


HISTORY_CSV = "history.csv"


def write_history_csv(checkpoint_dir: Path, history: list[dict]) -> Path:
    """The per-epoch log (stage, epoch, losses, metrics) as CSV beside the checkpoints, rewritten whole and atomically.

    Written from the checkpointed history rather than with fastai's CSVLogger, which appends a header per fit (one per
    stage, with different columns for patch and whole-image runs) and, after a kill, keeps rows of epochs whose
    checkpoint was never saved: a resumed run's log would then differ from an uninterrupted one's.
    """
    columns = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(Path(checkpoint_dir) / HISTORY_CSV, buf.getvalue().encode())
    return Path(checkpoint_dir) / HISTORY_CSV


class AccumulateGradients(GradientAccumulation):
    """fastai's GradientAccumulation (n_acc samples per step), all-reducing the gradients under data parallel only on
    the batches that step.

    The other batches run under DDP's no_sync: their gradients add up in each rank's own .grad, and the stepping
    batch's all-reduce carries the sum -- one all-reduce per step instead of one per batch, the same weights. Every rank
    takes the same decision: the shards have equal batch counts and sizes (DistributedDL pads the last).
    """

    def before_fit(self):
        """Count samples from 0 (fastai's), with no batch left unsynced."""
        super().before_fit()
        self.unsynced = ExitStack()

    def before_batch(self):
        """Skip the all-reduce of a batch that will not step; before the forward pass, where DDP prepares it."""
        if hasattr(self.learn.model, "no_sync") and self.count + find_bs(self.learn.yb) < self.n_acc:
            self.unsynced.enter_context(self.learn.model.no_sync())

    def after_batch(self):
        """Leave no_sync (also after the batch was cancelled, which is how a batch that does not step ends)."""
        self.unsynced.close()

    def after_fit(self):
        """Leave no_sync when a stop cancelled the fit mid-batch."""
        self.unsynced.close()


class StopOnNonFinite(Callback):
    """Stop every rank together when the loss of any rank is not finite -- after the loss, before the backward pass.

    fastai's TerminateOnNaNCallback cancels only its own rank, after the step: under data parallel the others then wait
    in the next collective until the NCCL timeout (gloo: "connection closed by peer"), and the non-finite gradient has
    already been all-reduced into every rank's weights. Here the ranks agree on the stop with one all-reduce of a
    flag per batch (a few bytes); the epoch checkpoint then keeps the last good epoch and the caller reports it.
    """

    order = MixedPrecision.order + 1  # after MixedPrecision has left autocast: a stop here must not leave the process in it

    def before_fit(self):
        """A new fit (stage, or resumed run) starts undiverged."""
        self.learn.diverged = False

    def after_loss(self):
        """Cancel the fit on every rank when any rank's loss is nan or inf -- in validation too: weights a step made
        non-finite show there first when an epoch is one batch, and the metrics would fail on NaN scores."""
        bad = torch.tensor([0.0 if torch.isfinite(self.learn.loss).all() else 1.0], device=self.learn.loss.device)
        if num_distrib() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.learn.diverged = True
            if getattr(self.learn, "validating_alone", False):
                raise CancelValidException()  # rank 0 validates alone: ValidateOnRank0 tells the other ranks, which wait for it
            raise CancelFitException()


class RankStreams(Callback):
    """Under data parallel: each rank's own torch and Python random streams for augmentation and dropout.

    Every rank is seeded alike, so that all draw the same data order and take disjoint shards of it; without this,
    every GPU would also flip, rotate, zoom and shift its shard exactly as the others do, and drop the same units.
    Before each epoch the streams are seeded from (seed, rank, epoch) -- after the shared choices: the shuffle has
    its own generator per DataLoader and fastai's weighted sampler draws from NumPy's, both left alone -- so a
    resumed run draws what an uninterrupted one would.
    """

    order = -20  # before any callback that draws

    def __init__(self, seed: int, epoch_offset: int = 0):
        self.seed, self.epoch_offset = seed, epoch_offset

    def before_epoch(self):
        """Seed this rank's streams for the epoch."""
        torch_seed, python_seed = np.random.SeedSequence([self.seed, rank_distrib(), self.epoch_offset + self.epoch]).generate_state(2)
        torch.manual_seed(int(torch_seed))
        random.seed(int(python_seed))


def tensorboard_callback(log_dir: str | Path, epochs_before: int) -> Callback:
    """fastai's TensorBoardCallback (rank 0 only, as fastai runs it) on one step axis across stages and resumes.

    fastai restarts its step counter at every fit, i.e. at every stage of a schedule; here the steps continue from
    the epochs already trained, so a schedule (or a resumed run) draws one continuous curve.
    """
    try:
        from fastai.callback.tensorboard import TensorBoardCallback
    except ImportError:
        raise CvfastError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None

    class StagedTensorBoard(TensorBoardCallback):
        def before_fit(self):
            self.offset = epochs_before * len(self.dls.train)
            super().before_fit()

        def _setup_writer(self):
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops what the killed one logged after its last checkpoint (whose epoch-end metrics sit at step
            # `offset`), instead of drawing it twice
            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.offset + 1)

        def after_batch(self):
            if not self.training:  # fastai's logs the smoothed training loss on validation batches too
                return
            step = self.offset + self.train_iter
            self.writer.add_scalar("train_loss", self.smooth_loss, step)
            for i, h in enumerate(self.opt.hypers):
                for k, v in h.items():
                    self.writer.add_scalar(f"{k}_{i}", v, step)

        def after_epoch(self):
            for name, value in zip(self.recorder.metric_names[2:-1], self.recorder.log[2:-1]):
                self.writer.add_scalar(name, value, self.offset + self.train_iter)

    return StagedTensorBoard(log_dir=str(log_dir), trace_model=False, log_preds=False)


def smooth_loss_state(learn) -> list:
    """The Recorder's smoothed training loss (value, batches): it runs on across the epochs of a stage."""
    smooth = learn.recorder.smooth_loss
    return [float(smooth.val), int(smooth.count)]


class RestoreSmoothLoss(Callback):
    """A resumed stage's smoothed training loss continues from the checkpoint, so its log matches an uninterrupted run's."""

    order = Recorder.order + 1  # after the Recorder resets it at before_fit

    def __init__(self, state: list | None):
        self.state = state

    def before_fit(self):
        """Put the saved smoother state back (a progress.json of an older run has none: nothing to do)."""
        if self.state:
            self.learn.recorder.smooth_loss.val = torch.tensor(self.state[0])
            self.learn.recorder.smooth_loss.count = self.state[1]


def rng_state(learn) -> dict:
    """Every random state the next epoch draws from: Python's, NumPy's (fastai's weighted sampler), torch's (augmentation,
    dropout, worker seeds) and each DataLoader's own shuffling RNG -- so a resumed run continues exactly as an
    uninterrupted one would (JSON-safe, stored in progress.json beside the checkpoint it belongs to)."""
    np_state = np.random.get_state()
    state = {"python": _jsonable(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *map(_jsonable, np_state[2:])],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "loaders": [_jsonable(_base(dl).rng.getstate()) for dl in learn.dls.loaders]}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(learn, state: dict | None) -> None:
    """Put back the random states rng_state saved (a progress.json without them, from an older run: nothing to do)."""
    if not state:
        return
    try:
        random.setstate(_tupled(state["python"]))
        np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
        for dl, s in zip(learn.dls.loaders, state["loaders"]):
            _base(dl).rng.setstate(_tupled(s))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CvfastError(f"progress.json: its saved random state cannot be restored ({type(e).__name__}: {e}); "
                          "delete it, or pass --no-resume, to start over") from None


def _base(dl):
    """The DataLoader that shuffles: under data parallel fastai wraps it in a DistributedDL (`.dl`)."""
    return getattr(dl, "dl", dl)


def _jsonable(value):
    """Tuples (of Python's RNG state) as lists, recursively."""
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    """Lists back to the tuples Python's random.setstate expects."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _num(v):
    """JSON-safe number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None if v is None else str(v)


def read_progress_raw(checkpoint_dir: Path) -> dict:
    """progress.json as written, or {}; a damaged one is a clear error naming it."""
    f = Path(checkpoint_dir) / "progress.json"
    return read_json(f, "training progress (delete it, or pass --no-resume, to start over)") if f.is_file() else {}


def read_progress(out_dir: str | Path, fingerprint: str, legacy: str | None = None) -> dict | None:
    """progress.json of an interrupted run with the same recipe (and its checkpoint present), or None; LEGACY: the
    fingerprint a cvfast 0.1 run of it had (without its inputs' digests), resumed with a warning."""
    d = Path(out_dir) / "checkpoints"
    p = read_progress_raw(d)
    if not p or p.get("done"):
        return None
    if not isinstance(p.get("checkpoint"), str) or not (d / p["checkpoint"]).is_file():
        log.warning("%s names checkpoint %r, which is not there: training starts over", d / "progress.json", p.get("checkpoint"))
        return None
    if legacy is not None and p.get("fingerprint") == legacy:
        log.warning("%s: an unfinished run of cvfast 0.1, which did not record its inputs' content: resuming it on the inputs "
                    "as they are now (pass --no-resume if the DATA folder was re-prepared since)", d)
    elif p.get("fingerprint") != fingerprint:
        raise CvfastError(f"{d}: holds an unfinished run of a different recipe or data; use another --out, "
                          "pass --no-resume, or delete the folder")
    if not all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 0 for k in ("stage", "epochs_done")):
        raise CvfastError(f"{d / 'progress.json'}: stage / epochs_done are not epoch counts (edited?); delete it, or pass --no-resume")
    return p
