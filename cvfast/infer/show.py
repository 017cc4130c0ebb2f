"""fastai's result grids for a trained model on labelled data: batches, results, top losses, confusion matrix."""

from __future__ import annotations

import io
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import pandas as pd
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner

from cvfast.data.blocks import data_files, patch_dataloaders, whole_image_dataloaders
from cvfast.data.classes import WHOLE_IMAGE_CLASSES
from cvfast.data.manifest import read_manifest
from cvfast.data.sample import PATCH_MANIFEST
from cvfast.errors import CvfastError
from cvfast.models.artifact import load_model, model_files
from cvfast.util.files import atomic_write_bytes, check_output_name, read_csv, refuse_overwrite

VIEWS = ("batch", "results", "top-losses", "confusion")


def model_learner(model_path: str | Path, data: str | Path, bs: int = 8, augment: bool = False) -> Learner:
    """A Learner of a trained model over labelled data (a patch set for patch models, a DATA folder for whole-image ones).

    The data pipeline uses the model's stored size and mean grey, not statistics of `data`.
    """
    model, sidecar = load_model(model_path)
    kwargs = dict(bs=bs, augment=augment, balance=False, mean=sidecar["mean_grey"])
    if sidecar["kind"] == "patch":
        if not (Path(data) / PATCH_MANIFEST).is_file() and Path(data).suffix != ".csv":
            raise CvfastError(f"{data}: a patch model is shown on a patch set (a folder from `cvfast patches`)")
        dls = patch_dataloaders(data, size=sidecar["size"][0], **kwargs)
    else:
        dls = whole_image_dataloaders(data, size=tuple(sidecar["size"]), **kwargs)
    return Learner(dls, model, loss_func=dls.loss_func)  # for showing only: no optimiser, splitter or metrics needed


def _labelled_rows(learn: Learner, data: str | Path, split: str) -> pd.DataFrame:
    """The rows of a split with the columns the learner's DataBlock reads (path and label)."""
    if learn.model.spec["kind"] == "patch":
        csv = Path(data) / PATCH_MANIFEST if Path(data).is_dir() else Path(data)
        df = read_csv(csv, "patch manifest", dtype={"image_id": str, "patient_id": str})
        df["path"] = [str(csv.parent / p) for p in df["path"]]
    else:
        df = read_manifest(data)
        df["target"] = [WHOLE_IMAGE_CLASSES[v] for v in df["label"]]
    df = df[df["split"] == split].reset_index(drop=True)
    if df.empty:
        raise CvfastError(f"{data}: no rows in split {split!r}")
    return df


def show(model_path: str | Path, data: str | Path, out: str | Path, view: str = "results", split: str = "valid", n: int = 9,
         bs: int = 8) -> Path:
    """Save a grid PNG: 'batch' (augmented training batch), 'results', 'top-losses' or 'confusion' on a split."""
    import matplotlib.pyplot as plt  # the current backend: Agg when headless, inline in notebooks

    if view not in VIEWS:
        raise CvfastError(f"--view {view}: expected one of {', '.join(VIEWS)}")
    refuse_overwrite([check_output_name(out)], [*model_files(model_path), *data_files(data)], hint="choose another --out for the grid")
    learn = model_learner(model_path, data, bs=bs, augment=view == "batch")
    if view == "batch":
        learn.dls.show_batch(max_n=n, figsize=(10, 10))
    else:
        dl = learn.dls.valid if split == "valid" else learn.dls.test_dl(_labelled_rows(learn, data, split), with_labels=True)
        with learn.no_bar():
            if view == "results":
                learn.show_results(dl=dl, max_n=n, figsize=(10, 10))
            else:
                interp = ClassificationInterpretation.from_learner(learn, dl=dl)
                if view == "top-losses":
                    interp.plot_top_losses(min(n, len(dl.dataset)), figsize=(12, 12))
                else:
                    interp.plot_confusion_matrix(figsize=(5, 5))
    buf = io.BytesIO()
    plt.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close("all")
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
