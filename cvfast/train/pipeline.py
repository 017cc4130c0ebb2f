"""The three training commands as library functions: patch, whole-image, fine-tune (the CLI is a shell on these)."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier, num_distrib, set_seed

from cvfast.data.blocks import data_files, patch_dataloaders, patch_set_train_mean, whole_image_dataloaders
from cvfast.data.loader import close_readers
from cvfast.data.manifest import MANIFEST_NAME
from cvfast.errors import CvfastError
from cvfast.models.artifact import PKL, SIDECAR, WEIGHTS, create_model, export_model, load_model, model_files
from cvfast.train.callbacks import (
    HISTORY_CSV,
    AccumulateGradients,
    BestModel,
    EarlyStop,
    EpochCheckpoint,
    HoldBodyBatchNorm,
    RankStreams,
    RestoreSmoothLoss,
    StopOnNonFinite,
    read_progress,
    read_progress_raw,
    restore_rng_state,
    tensorboard_callback,
    write_history_csv,
)
from cvfast.train.heldout import heldout_patch_metrics, heldout_whole_metrics
from cvfast.train.learners import learner_for, patch_learner, whole_image_learner
from cvfast.train.optim import optimizer_from, optimizer_settings
from cvfast.train.recipes import Recipe, fingerprint, typed
from cvfast.train.runtime import (
    Runtime,
    apply_runtime,
    check_shared_out,
    data_parallel,
    export_ready,
    rank0_decision,
    this_process_only,
)
from cvfast.train.schedule import Stage, begin_stage, describe, fit_stage, random_init_schedule, stages_from
from cvfast.util.batch_progress import BatchProgress
from cvfast.util.distributed import is_main_process
from cvfast.util.files import TEMP_PREFIX, atomic_write_bytes, claim_output, exclusive, file_sha256, refuse_overwrite

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training command produced."""

    learn: Learner
    out: Path
    metrics: dict


def train_schedule(learn: Learner, stages: list[Stage], out: Path, recipe: dict, cbs: Callable[[dict], list] | None = None,
                   resume: bool = True, logger: str | None = None) -> None:
    """Run the stages with epoch checkpoints, a per-epoch CSV log and progress bars; continue an interrupted run of the
    same recipe and inputs.

    cbs(tracker_state) returns the extra callbacks of a stage; tracker_state carries early stopping's
    best value and patience counter across a resume. logger='tensorboard' also logs to OUT/tensorboard.
    """
    fp = fingerprint(recipe)
    ckpt = out / "checkpoints"
    inputs = {k: v for k, v in recipe.get("inputs", {}).items() if not k.endswith("_sha256")}
    progress = read_progress(out, fp, legacy=fingerprint({**recipe, "inputs": inputs})) if resume else None
    if progress is None and is_main_process():  # a fresh run: no checkpoint of an earlier run may leak into this one
        for old in [*ckpt.glob("s*e*.pth"), ckpt / "progress.json", ckpt / "best.pth", ckpt / "history.json", ckpt / HISTORY_CSV]:
            old.unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # an earlier run's curves would be drawn over this one's
    distrib_barrier()
    carried: dict = {}  # a resumed run's best validation score, for the stage after a completed one
    for i, stage in enumerate(stages):
        if progress and i < progress["stage"]:
            continue
        begin_stage(learn, stage)
        start, trackers, carried, smooth = 0, carried, {}, None
        if progress and i == progress["stage"]:
            learn.load((ckpt / progress["checkpoint"]).with_suffix("").resolve(), with_opt=True)  # after begin_stage: same groups
            restore_rng_state(learn, progress.get("rng"))  # the same data order and augmentation as an uninterrupted run
            start, trackers, smooth, progress = progress["epochs_done"], progress.get("trackers", {}), progress.get("smooth_loss"), None
            if start < stage.epochs:
                log.info("resuming at stage %d (%s), epoch %d of %d", i + 1, stage.name, start + 1, stage.epochs)
        if start >= stage.epochs:  # the stage was complete when the run stopped: the best score so far carries on
            log.info("resuming after stage %d (%s): it was complete", i + 1, stage.name)
            carried = {k: v for k, v in trackers.items() if k == "BestModel"}
            continue
        log.info("stage %d (%s): %d epochs, lr %s, wd %s, training %s", i + 1, stage.name, stage.epochs, stage.lr, stage.wd, stage.train)
        checkpoint = EpochCheckpoint(out, i, fp, start)
        extra = [BatchProgress(f"stage {i + 1}/{len(stages)} ({stage.name})", start, stage.epochs), RestoreSmoothLoss(smooth)]
        epochs_before = sum(s.epochs for s in stages[:i]) + start
        if num_distrib() > 1:
            extra.append(RankStreams(_settings(recipe).train.seed, epochs_before))
        if logger == "tensorboard":
            extra.append(tensorboard_callback(out / "tensorboard", epochs_before))
        # constant learning rates: resuming is fitting the remaining epochs (no schedule position to restore)
        try:
            fit_stage(learn, replace(stage, epochs=stage.epochs - start),
                      [checkpoint, StopOnNonFinite(), *extra, *(cbs(trackers) if cbs else [])])
        finally:
            extra[0].close()
        if checkpoint.diverged:
            if read_progress_raw(ckpt).get("checkpoint"):
                raise CvfastError(f"training diverged (non-finite loss) in stage {i + 1}; the last good checkpoint is kept in {ckpt}: "
                                  "re-run the same command to resume from it (it restores the data order and random state, so on "
                                  "a CPU it meets the same batch again; then lower the stage's lr in a recipe and train into "
                                  "another --out, or pass --no-resume)")
            raise CvfastError(f"training diverged (non-finite loss) in stage {i + 1} before any epoch finished, so there is no "
                              "checkpoint to resume from: lower the stage's lr in a recipe and train again")
    if (ckpt / "best.pth").is_file():  # also when a run was killed after its last epoch, before export
        learn.load((ckpt / "best").resolve(), with_opt=False)


def _finish(learn: Learner, out: Path, recipe: dict, extra: Callable[[], dict]) -> TrainResult:
    """Validate, export (pkl + safetensors + JSON), save the resolved recipe and the epoch history beside the model."""
    export_ready(learn)  # scored as exported (fp32, contiguous, uncompiled): the held-out figures are what predict reproduces
    values = learn.validate()
    # a metric undefined on this validation split (malignant_auc without a malignant patch) is None, not NaN: NaN != NaN
    metrics = {"valid_loss": float(values[0]), **{m.name: float(v) if np.isfinite(float(v)) else None for m, v in zip(learn.metrics, values[1:])},
               **extra()}
    export_model(learn, out, recipe, metrics)
    atomic_write_bytes(out / "recipe.json", json.dumps(recipe, indent=1, default=str).encode())
    ckpt = out / "checkpoints"
    history = read_progress_raw(ckpt).get("history", [])
    atomic_write_bytes(ckpt / "history.json", json.dumps(history, indent=1).encode())
    write_history_csv(ckpt, history)  # a kill between progress.json and the CSV at the last epoch is made good here
    for old in [*ckpt.glob("s*e*.pth"), ckpt / "progress.json", ckpt / "best.pth"]:  # complete: nothing to resume
        old.unlink(missing_ok=True)
    return TrainResult(learn, out, metrics)


def _settings(recipe: dict) -> Recipe:
    """A checked recipe's typed settings, every default filled in (checked by load_recipe / resolve, not again here)."""
    return typed(recipe, validate=False)


def _schedule(recipe: dict, random_init: bool) -> list[Stage]:
    """The recipe's stages, or the random-init schedule for untrained weights."""
    stages = stages_from(recipe["stages"])
    return random_init_schedule(stages, _settings(recipe).train.random_init_lr) if random_init else stages


def whole_training_cbs(recipe: dict, hold_body_bn: bool = True) -> list:
    """The whole-image recipes' training callbacks: BatchNorm policy and gradient accumulation."""
    cfg = _settings(recipe)
    cbs = [HoldBodyBatchNorm()] if cfg.train.bn_policy == "hold_body_stats" and hold_body_bn else []
    if cfg.data.grad_acc > 1:
        cbs.append(AccumulateGradients(n_acc=cfg.batch_size * cfg.data.grad_acc))  # fastai counts samples
    return cbs


def log_global_batch(recipe: dict) -> None:
    """Say, on rank 0, how many images one optimizer step sees when that is not the recipe's batch: --bs is per process,
    and each process accumulates grad_acc batches (whole-image and fine-tune recipes) before a step."""
    cfg, processes = _settings(recipe), max(1, num_distrib())
    acc = cfg.data.grad_acc if recipe["kind"] != "patch" else 1
    if (processes > 1 or acc > 1) and is_main_process():
        log.info("global batch: %d images per process x %d process%s x %d accumulated batch%s = %d images per optimizer step "
                 "(the recipe's lr is not scaled to it)", cfg.batch_size, processes, "es" if processes > 1 else "", acc,
                 "es" if acc > 1 else "", cfg.batch_size * processes * acc)


def _stage_cbs(recipe: dict, hold_body_bn: bool = True) -> Callable[[dict], list]:
    """Per-stage callbacks: training ones (whole-image and fine-tune recipes), the best epoch on the validation score
    kept across all stages (the reference's checkpointers: AUC for whole images, accuracy for patches), early stopping."""
    cfg = _settings(recipe)
    patience, keep_best = cfg.train.early_stopping_patience, cfg.train.keep_best
    # the reference's checkpointers (accuracy for patches, AUC for whole images) unless the recipe names another
    monitor = cfg.monitor
    patch_monitors = ("accuracy", "balanced_accuracy_score", "malignant_auc", "valid_loss")
    if monitor not in (patch_monitors if recipe["kind"] == "patch" else ("roc_auc_score", "valid_loss")):
        raise CvfastError(f"recipe {recipe.get('name', '?')}: train.monitor = {monitor!r} is not a {recipe['kind']} model's validation metric")
    last: dict = {}  # the previous stage's BestModel: its best score carries over to the next stage

    def make(trackers: dict) -> list:
        cbs = whole_training_cbs(recipe, hold_body_bn) if recipe["kind"] != "patch" else []
        best = trackers.get("BestModel", {}).get("best")
        if best is None and "best" in last:
            best = last["best"].best
        if keep_best:
            last["best"] = BestModel(best, monitor)
            cbs.append(last["best"])
        if patience:
            stop = trackers.get("EarlyStop", {})
            cbs.append(EarlyStop(patience, stop.get("best"), stop.get("wait", 0), monitor))
        return cbs

    return make


def _whole_dls(recipe: dict, data: str | Path, runtime: Runtime, mean: float | None = None, mean_source: str | None = None):
    """Whole-image DataLoaders per the recipe's data section (no size: the cache's own size); `mean`: a given mean grey."""
    cfg = _settings(recipe)
    size = cfg.data.size
    return whole_image_dataloaders(data, bs=cfg.batch_size, size=(size, size) if isinstance(size, int) else size,
                                   augment=cfg.data.augment, seed=cfg.train.seed, mean=mean,
                                   mean_source=mean_source, **runtime.loader_kwargs())


# the file that says what an input holds: a patch set's description (its patches and their DATA manifest), a DATA
# folder's manifest (splits, labels), a model's sidecar (its weights' digest)
DEFINING_FILES = ("patchset.json", MANIFEST_NAME, SIDECAR)


def _defining_digest(path: Path) -> str:
    """SHA-256 of the file that defines an input (a file input: the file itself)."""
    if path.is_file():
        return file_sha256(path)
    for name in DEFINING_FILES:
        if (path / name).is_file():
            return file_sha256(path / name)
    raise CvfastError(f"{path}: neither a DATA folder, a patch set nor a model folder")


def _inputs(**paths) -> dict:
    """Absolute input paths and digests of their content, part of the resolved recipe (and so of the resume fingerprint):
    a run is not resumed onto a re-split DATA folder, a re-cut patch set or a replaced starting model."""
    found = {k: Path(v) for k, v in paths.items() if v is not None}
    return {**{k: str(p.resolve()) for k, p in found.items()}, **{k: None for k, v in paths.items() if v is None},
            **{f"{k}_sha256": _defining_digest(p) for k, p in found.items()}}


def patch_learner_from_recipe(recipe: dict, patches: str | Path, out: str | Path, weights: str | Path | None = None,
                              runtime: Runtime | None = None) -> tuple[Learner, str]:
    """The recipe's patch learner on a patch set; returns it and how it was initialised (random | hub | package NAME | file PATH)."""
    cfg, runtime = _settings(recipe), runtime or Runtime()
    m, seed = cfg.model, cfg.train.seed
    if m.arch is None:
        raise CvfastError(f"recipe {cfg.name or '?'}: a patch recipe needs [model] arch (or --arch)")
    set_seed(seed)
    mean = None if cfg.data.mean == "paper" else patch_set_train_mean(patches, seed)  # "reference": the patch set's own
    dls = patch_dataloaders(patches, bs=cfg.batch_size, size=cfg.data.size, augment=cfg.data.augment, seed=seed, mean=mean,
                            **runtime.loader_kwargs())
    if mean is not None:
        dls.info.mean_source = "the patch set's own train patches (the reference code's, data.mean = 'reference')"
    pretrained = m.pretrained and weights is None
    kwargs = dict(head=m.head, dropout=m.dropout, path=Path(out), opt_func=optimizer_from(cfg.train), fold_std=m.fold_input_std)
    try:
        learn = patch_learner(dls, m.arch, weights=weights, pretrained=pretrained, **kwargs)
        init = learn.model.body.weights_source  # random | hub | package NAME | file PATH
    except CvfastError as e:
        if not pretrained:
            raise
        log.warning("%s; training from random init instead, with the paper's random-init schedule. "
                    "Use --weights PATH for a local weights file.", e)
        learn, init = patch_learner(dls, m.arch, **kwargs), "random"
    return apply_runtime(learn, runtime), rank0_decision(init, "the patch classifier's initialisation", runtime.torch_device)


def whole_learner_from_recipe(recipe: dict, data: str | Path, patch: str | Path, out: str | Path, runtime: Runtime | None = None) -> Learner:
    """The recipe's whole-image learner, converted from a trained patch classifier."""
    cfg = _settings(recipe)
    set_seed(cfg.train.seed)
    patch_model, sidecar = load_model(patch)
    if sidecar["kind"] != "patch":
        raise CvfastError(f"{patch}: is a {sidecar['kind']} model; the whole-image step needs a patch classifier")
    m, runtime = cfg.model, runtime or Runtime()
    if "mean_grey_source" not in sidecar:
        log.warning("%s: a patch model from before patch sets carried their DATA folder's mean grey: its mean grey is of its "
                    "patches, not of the whole images (the paper's); retrain it on a freshly cut patch set", patch)
    # the paper's one mean grey: the patch model's (the whole-image train split of the DATA folder its patches were cut from);
    # data.mean = "reference": the whole images' own train mean, whatever the patch model used (the reference code's two values)
    if cfg.data.mean == "paper":
        dls = _whole_dls(recipe, data, runtime, mean=sidecar["mean_grey"], mean_source=f"the patch model's ({patch})")
    else:
        dls = _whole_dls(recipe, data, runtime, mean_source=f"the train split of {data} (the reference code's, data.mean = 'reference')")
    learn = whole_image_learner(dls, patch_model, top=m.top, heatmap=m.heatmap, widths=m.widths, stages=m.stages, units=m.units,
                                vgg_width=m.vgg_width, vgg_convs=m.vgg_convs, dropout=m.dropout, heatmap_pool=m.heatmap_pool, path=Path(out),
                                opt_func=optimizer_from(cfg.train))
    return apply_runtime(learn, runtime)


def finetune_learner_from_recipe(recipe: dict, data: str | Path, source: str | Path, out: str | Path, scratch: bool = False,
                                 runtime: Runtime | None = None) -> Learner:
    """A learner for transfer: the source whole-image model (or, scratch=True, the same architecture untrained)."""
    cfg = _settings(recipe)
    set_seed(cfg.train.seed)
    model, sidecar = load_model(source)
    if sidecar["kind"] != "whole":
        raise CvfastError(f"{source}: is a {sidecar['kind']} model; fine-tuning needs a whole-image model (`cvfast whole`)")
    runtime = runtime or Runtime()
    # the reference fine-tunes on INbreast with INbreast's own train mean (44.3 vs DDSM's 52.2 of 255)
    dls = _whole_dls(recipe, data, runtime, mean_source=f"the train split of {data} (the target dataset's own)")
    return apply_runtime(learner_for(dls, create_model(sidecar["spec"]) if scratch else model, path=Path(out),
                                     opt_func=optimizer_from(cfg.train)), runtime)


def learner_from_recipe(recipe: dict, data: str | Path, model: str | Path | None, out: str | Path,
                        runtime: Runtime | None = None) -> tuple[Learner, list]:
    """The learner any recipe builds, by its kind -- patch (DATA = a patch set), whole (MODEL = a patch model) or finetune
    (MODEL = a whole-image model) -- and the training callbacks its kind trains with (pass them to fit or find_lr)."""
    if recipe["kind"] != "patch" and model is None:
        raise CvfastError(f"a {recipe['kind']} recipe needs a model to start from (a {'patch' if recipe['kind'] == 'whole' else 'whole-image'} model)")
    if recipe["kind"] == "patch":
        return patch_learner_from_recipe(recipe, data, out, runtime=runtime)[0], []
    learn = (whole_learner_from_recipe(recipe, data, model, out, runtime) if recipe["kind"] == "whole"
             else finetune_learner_from_recipe(recipe, data, model, out, runtime=runtime))
    return learn, whole_training_cbs(recipe)


def _refuse_overwriting_inputs(out: Path, data: str | Path, model: str | Path | None = None) -> None:
    """A model folder must not be (or write over) the model or data it is trained from: `whole --patch M --out M` would
    replace the patch model while reading it."""
    inputs = [*data_files(data), *(model_files(model) if model else [])]
    outputs = [out / n for n in (PKL, WEIGHTS, SIDECAR, "recipe.json")]
    refuse_overwrite(outputs, inputs, hint="train into a new --out folder")


def _train(learn: Learner, stages: list[Stage], out: Path, recipe: dict, extra: Callable[[], dict], cbs=None, resume: bool = True,
           runtime: Runtime | None = None) -> TrainResult:
    """Train (data-parallel under torchrun / accelerate launch), then validate and export on rank 0 only."""
    check_shared_out(out, learn.dls.device)
    log_global_batch(recipe)
    # fastai's bar and printed table give way to rich bars and EpochCheckpoint's log lines: readable in terminals, logs, notebooks
    # one run at a time per --out (rank 0 holds the lock for all): two would overwrite each other's checkpoints
    with exclusive(out, "cvfast training run") if is_main_process() else nullcontext(), learn.no_bar(), learn.no_logging():
        for tmp in (out / "checkpoints").glob(f"{TEMP_PREFIX}*.tmp.pth") if is_main_process() else []:
            tmp.unlink(missing_ok=True)  # a checkpoint a killed run was writing
        for name in (PKL, WEIGHTS, SIDECAR, "recipe.json", "checkpoints/history.json", f"checkpoints/{HISTORY_CSV}"):
            if is_main_process():
                claim_output(out / name)  # before training, not after it: a user's own file of one of these names stops the run now
        try:
            with data_parallel(learn):
                train_schedule(learn, stages, out, recipe, cbs=cbs, resume=resume, logger=(runtime or Runtime()).log)
            if not is_main_process():
                return TrainResult(learn, out, {})
            with this_process_only():
                return _finish(learn, out, recipe, extra)
        finally:
            close_readers(learn.dls)  # done: the loader workers need not wait for the garbage collector


def train_patch(recipe: dict, patches: str | Path, out: str | Path, weights: str | Path | None = None, resume: bool = True,
                runtime: Runtime | None = None) -> TrainResult:
    """Step 1: the patch classifier on a patch set (S1/S10); returns the trained learner and its metrics (empty on ranks > 0)."""
    out = Path(out)
    _refuse_overwriting_inputs(out, patches, weights)
    learn, init = patch_learner_from_recipe(recipe, patches, out, weights, runtime)
    stages = _schedule(recipe, init == "random")
    recipe = {**recipe, "init": init, "inputs": _inputs(patches=patches, weights=weights), "resolved_stages": describe(stages),
              "optimizer": optimizer_settings(_settings(recipe).train)}
    return _train(learn, stages, out, recipe, lambda: {"init": init, **heldout_patch_metrics(learn, patches)}, cbs=_stage_cbs(recipe),
                  resume=resume, runtime=runtime)


def train_whole(recipe: dict, data: str | Path, patch: str | Path, out: str | Path, resume: bool = True,
                runtime: Runtime | None = None) -> TrainResult:
    """Step 2: convert a trained patch classifier into the whole-image classifier and train it end to end."""
    out = Path(out)
    _refuse_overwriting_inputs(out, data, patch)
    learn = whole_learner_from_recipe(recipe, data, patch, out, runtime)
    stages = _schedule(recipe, False)
    recipe = {**recipe, "inputs": _inputs(data=data, patch_model=patch), "resolved_stages": describe(stages),
              "optimizer": optimizer_settings(_settings(recipe).train)}
    return _train(learn, stages, out, recipe, lambda: heldout_whole_metrics(learn, data), cbs=_stage_cbs(recipe), resume=resume,
                  runtime=runtime)


def finetune(recipe: dict, data: str | Path, source: str | Path, out: str | Path, scratch: bool = False, resume: bool = True,
             runtime: Runtime | None = None) -> TrainResult:
    """Transfer: fine-tune a whole-image model on a dataset with image-level labels only.

    scratch=True trains the same architecture from random init with the same budget (the paper's control).
    """
    out = Path(out)
    _refuse_overwriting_inputs(out, data, source)
    learn = finetune_learner_from_recipe(recipe, data, source, out, scratch, runtime)
    stages = _schedule(recipe, scratch)
    recipe = {**recipe, "inputs": _inputs(data=data, source_model=source), "scratch": scratch, "resolved_stages": describe(stages),
              "optimizer": optimizer_settings(_settings(recipe).train)}
    # the from-scratch control has no pretrained BatchNorm statistics to hold: its BN layers train normally
    return _train(learn, stages, out, recipe, lambda: heldout_whole_metrics(learn, data), cbs=_stage_cbs(recipe, hold_body_bn=not scratch),
                  resume=resume, runtime=runtime)
