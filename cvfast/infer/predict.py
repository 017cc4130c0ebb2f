"""Batched prediction with a trained model (or an ensemble), with the preprocessing stored beside it."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pandas as pd
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import default_device
from torch import nn

from cvfast.data.classes import MALIGNANT_PATCH_CLASSES
from cvfast.data.crop import Crop, CropSpec, cut_breast
from cvfast.data.manifest import REJECT_COLUMNS
from cvfast.data.read import read_mammogram, resize
from cvfast.errors import CvfastError
from cvfast.infer.inputs import collect_inputs
from cvfast.models.artifact import SIDECAR, load_model, model_files
from cvfast.util.batch_progress import BatchProgress
from cvfast.util.files import atomic_write_bytes, check_output_name, claim_output, file_identity, refuse_overwrite

log = logging.getLogger(__name__)

# the 4 flips of test-time augmentation, as tensor dims to flip (none, horizontal, vertical, both)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def working_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint16 pixels as the model saw them in training: prepare's resize, then float32 / 65535 (IntToFloatTensor's arithmetic)."""
    return resize(pixels, size).astype(np.float32) / 65535


class MammogramFiles(torch.utils.data.Dataset):
    """Images read and resized exactly as `prepare` caches them, as floats in [0, 1] (the training scale).

    Items are (image, failed): an unreadable file gives a zero image and failed=1, so one bad file cannot stop
    a batch; its reason is looked up afterwards.
    """

    def __init__(self, paths: Sequence[str], size: tuple[int, int], crop: CropSpec | None = None, cropped: Sequence[bool] = ()):
        self.paths, self.size, self.crop = list(paths), tuple(size), crop
        self.cropped = list(cropped) or [False] * len(self.paths)  # already cut to the breast by prepare: not again

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            pixels = read_mammogram(self.paths[i]).pixels
            if self.crop is not None and not self.cropped[i]:
                pixels = cut_breast(pixels, self.crop)[0]
            image = working_image(pixels, self.size)
        except Exception:  # CvfastError, or a decoder's own (PIL's DecompressionBombError, ...): reported afterwards
            return torch.zeros(1, *self.size), torch.tensor(1)
        return torch.from_numpy(image)[None], torch.tensor(0)


def _crop_spec(cell: dict | None) -> dict | None:
    """A stored crop spec in full (specs written before `blank` existed mean blank = False), None for no crop."""
    return asdict(CropSpec(**cell)) if cell else None


class AveragedProbabilities(nn.Module):
    """Mean class probabilities of one or more models over test-time flips; input: [0, 1] images.

    Each member subtracts its own training mean grey, so models trained on different data can be averaged.
    """

    def __init__(self, models: Sequence[nn.Module], means: Sequence[float], flips: Sequence[tuple[int, ...]] = ((),)):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.means = [float(m) for m in means]
        self.flips = [tuple(f) for f in flips]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Averaged softmax probabilities, (batch, classes)."""
        total = 0.0
        for model, mean in zip(self.members, self.means):
            z = x - mean
            for dims in self.flips:
                total = total + torch.softmax(model(z.flip(dims) if dims else z), dim=1)
        return total / (len(self.members) * len(self.flips))


@dataclass
class Predictions:
    """One row per predicted image (identity columns, p_<class>, p_cancer), the rejected inputs, and the models used."""

    frame: pd.DataFrame
    rejects: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # every file read: never written over by write_predictions


def load_members(models: Sequence[str | Path]) -> list[tuple[nn.Module, dict]]:
    """Load the models of an ensemble and check they predict the same classes."""
    if not models:
        raise CvfastError("no model given")
    members = [load_model(m) for m in models]
    seen: dict = {}
    for path, (_, sidecar) in zip(models, members):
        # the same model twice (one file by two spellings, or a copy of its weights) would count double in the average
        loaded = Path(path) if Path(path).is_file() else Path(path) / SIDECAR  # the file load_model read
        for key in (file_identity(loaded), ("weights", sidecar.get("weights_sha256") or str(path))):
            if key in seen:
                raise CvfastError(f"{path}: the same model as {seen[key]} (same {'weights' if key[0] == 'weights' else 'file'}); "
                                  "an ensemble averages different models, each given once")
            seen[key] = path
    classes = members[0][1]["classes"]
    for path, (_, sidecar) in zip(models, members):
        if sidecar["classes"] != classes:
            raise CvfastError(f"{path}: predicts {sidecar['classes']}, but {models[0]} predicts {classes}; an ensemble needs one class order")
    return members


def inference_learner(model: nn.Module, dl: DataLoader) -> Learner:
    """A fastai Learner around a model, only for get_preds on `dl`."""
    return Learner(DataLoaders(dl, dl), model, loss_func=CrossEntropyLossFlat())


def predict_probabilities(members: Sequence[tuple[nn.Module, dict]], paths: Sequence[str], tta: bool = False, bs: int = 8,
                          num_workers: int = 0, device: str | torch.device | None = None, progress: bool = True,
                          prepared_crops: Sequence[dict | None] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Averaged class probabilities (n, classes) for image files, and a mask of the files that could not be read.

    Members trained at different sizes or crops are run in one pass per size and crop; files are read by `num_workers`
    processes. A member trained on breast-cropped images gets every image cropped the same way, except those that
    `prepare` already cropped with the same settings (`prepared_crops`: each file's crop spec, None when uncropped);
    a file cropped with other settings than a member's is refused.
    """
    device = torch.device(device) if device is not None else default_device()
    flips = TTA_FLIPS if tta else ((),)
    by_input: dict[tuple, list[tuple[nn.Module, dict]]] = {}
    for model, sidecar in members:
        crop = json.dumps(_crop_spec(sidecar.get("breast_crop")), sort_keys=True)
        by_input.setdefault((tuple(sidecar["size"]), crop), []).append((model, sidecar))
    total, failed = None, np.zeros(len(paths), dtype=bool)
    prepared_crops = list(prepared_crops) or [None] * len(paths)
    for (size, crop), group in by_input.items():
        wanted = json.loads(crop)
        clash = next((i for i, c in enumerate(prepared_crops) if c is not None and _crop_spec(c) != wanted), None)
        if clash is not None:
            raise CvfastError(f"{paths[clash]}: prepared with crop {prepared_crops[clash]}, but a model here was trained on images with crop "
                              f"{wanted}; predict on the source images (they are cropped as the model needs) or prepare them again")
        cropped = [c is not None for c in prepared_crops]  # cut already, as this member wants
        spec = CropSpec(**wanted) if wanted else None
        dl = DataLoader(MammogramFiles(paths, size, spec, cropped), bs=bs, shuffle=False, drop_last=False, num_workers=num_workers, device=device)
        model = AveragedProbabilities([m for m, _ in group], [s["mean_grey"] for _, s in group], flips).to(device).eval()
        learn = inference_learner(model, dl)
        cbs = [BatchProgress(f"predicting at {size[0]}x{size[1]}")] if progress else []
        try:
            with learn.no_bar(), learn.no_logging():
                probs, flags = learn.get_preds(dl=dl, act=lambda p: p, cbs=cbs)  # the model already returns probabilities
        finally:
            for bar in cbs:
                bar.close()
        weighted = probs.numpy().astype(np.float64) * len(group)
        total = weighted if total is None else total + weighted
        failed |= flags.numpy().astype(bool)
    return (total / len(members)).astype(np.float32), failed


def predict(models: Sequence[str | Path], inputs: Sequence[str | Path], tta: bool = False, bs: int = 8, num_workers: int = 0,
            device: str | None = None, split: str | None = None, progress: bool = True) -> Predictions:
    """Predict images with one model or an averaged ensemble; returns per-image probabilities and rejects."""
    members = load_members(models)
    df, rejects = collect_inputs(inputs, split=split)
    # a DATA folder's own manifest.csv / rejects.csv are protected by name (check_output_name)
    read = [*(str(f) for m in models for f in model_files(m)), *map(str, inputs), *df["path"], *(r["source"] for r in rejects)]
    classes = members[0][1]["classes"]
    if df.empty:
        return Predictions(pd.DataFrame(columns=[*df.columns, *(f"p_{c}" for c in classes), "p_cancer"]), rejects, _describe(models, members), read)
    crops = [Crop.spec_of(c) for c in df["breast_crop"].fillna("")] if "breast_crop" in df.columns else []
    probs, failed = predict_probabilities(members, df["path"].tolist(), tta=tta, bs=bs, num_workers=num_workers, device=device, progress=progress,
                                          prepared_crops=crops)
    for path, image_id in zip(df.loc[failed, "path"], df.loc[failed, "image_id"]):
        try:  # read again in this process for the reason (the worker that failed cannot return text)
            resize(read_mammogram(path).pixels, (8, 8))
            reason = f"{path}: could not be read"
        except CvfastError as e:
            reason = str(e)
        except Exception as e:
            reason = f"{path}: {type(e).__name__}: {e}"
        rejects.append({"source": path, "row": image_id, "reason": reason})
    out = df.copy()
    for i, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, i]
    if "cancer" not in classes:  # a patch model: cancer is either malignant class
        out["p_cancer"] = out[[f"p_{c}" for c in MALIGNANT_PATCH_CLASSES]].sum(axis=1)
    return Predictions(out[~failed].reset_index(drop=True), rejects, _describe(models, members), read)


def _describe(models: Sequence[str | Path], members: Sequence[tuple[nn.Module, dict]]) -> list[dict]:
    """What was used to predict: each model's file, kind, size and weights hash."""
    return [{"model": str(p), "kind": s["kind"], "size": list(s["size"]), "weights_sha256": s.get("weights_sha256")} for p, (_, s) in zip(models, members)]


def write_predictions(result: Predictions, out: str | Path) -> Path:
    """Write the predictions CSV (and, when inputs were rejected, OUT.rejects.csv beside it) atomically; never onto an input."""
    out = check_output_name(out)
    refuse_overwrite([out, out.with_suffix(".rejects.csv")], result.inputs, hint="choose another --out for the predictions")
    for path in (out, out.with_suffix(".rejects.csv")):
        claim_output(path)  # both before either is written (the rejects file may be removed below: only cvfast's own)
    buf = io.StringIO()
    result.frame.to_csv(buf, index=False, float_format="%.9g")  # 6 digits would round confident scores to 1 and tie them
    atomic_write_bytes(out, buf.getvalue().encode())
    write_rejects(result, out)
    return out


def write_rejects(result: Predictions, out: str | Path) -> Path:
    """OUT.rejects.csv listing the inputs not predicted (removed when there are none)."""
    path = Path(out).with_suffix(".rejects.csv")
    refuse_overwrite([path], result.inputs, hint="choose another --out for the predictions")
    if result.rejects:
        buf = io.StringIO()
        pd.DataFrame(result.rejects, columns=REJECT_COLUMNS).to_csv(buf, index=False)
        atomic_write_bytes(path, buf.getvalue().encode())
    else:
        path.unlink(missing_ok=True)
    return path
