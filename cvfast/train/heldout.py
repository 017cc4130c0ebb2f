"""Held-out metrics of a freshly trained learner, through the learner's own data pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pandas as pd
from fastai.learner import Learner
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from cvfast.data.classes import PATCH_CLASSES, WHOLE_IMAGE_CLASSES
from cvfast.data.manifest import read_manifest
from cvfast.stats import patient_bootstrap_aucs, percentile_ci
from cvfast.util.batch_progress import BatchProgress
from cvfast.util.files import read_csv

log = logging.getLogger(__name__)


def predict_frame(learn: Learner, df: pd.DataFrame) -> np.ndarray:
    """Class probabilities for the rows of a frame with a 'path' column, through the learner's own pipeline."""
    dl = learn.dls.test_dl(df.reset_index(drop=True))
    bar = BatchProgress("held-out predictions")
    try:
        with learn.no_bar():  # fastai's bar prints into logs and terminals outside notebooks
            probs, _ = learn.get_preds(dl=dl, cbs=[bar])
    finally:
        bar.close()
    return probs.numpy()


def heldout_whole_metrics(learn: Learner, data: str | Path, split: str = "test") -> dict:
    """Image-level ROC AUC and accuracy on a held-out split of a prepared DATA folder."""
    df = _split_rows(data, split)
    if df.empty or df["label"].nunique() < 2:
        log.warning("no %s split with both classes in %s: held-out AUC not computed", split, data)
        return {}
    p = _with_scores(learn, df)["p_cancer"].to_numpy()
    boots = patient_bootstrap_aucs(df["label"].to_numpy(), [p], df["patient_id"].to_numpy(), n_boot=1000)
    return {f"{split}_auc": float(roc_auc_score(df["label"], p)), f"{split}_auc_ci95": percentile_ci(boots[:, 0]),
            f"{split}_accuracy": float(accuracy_score(df["label"], p > 0.5)), f"{split}_images": int(len(df))}


def heldout_scores(learn: Learner, data: str | Path, split: str = "test") -> pd.DataFrame:
    """The split's manifest rows with the model's cancer probability (column p_cancer)."""
    return _with_scores(learn, _split_rows(data, split))


def _split_rows(data: str | Path, split: str) -> pd.DataFrame:
    """The manifest rows of one split."""
    df = read_manifest(data)
    return df[df["split"] == split].reset_index(drop=True)


def _with_scores(learn: Learner, df: pd.DataFrame) -> pd.DataFrame:
    """The rows with the model's cancer probability added as p_cancer."""
    return df.assign(p_cancer=predict_frame(learn, df)[:, WHOLE_IMAGE_CLASSES.index("cancer")])


def heldout_patch_metrics(learn: Learner, patches: str | Path, split: str = "test") -> dict:
    """Patch accuracy (5 classes) and one-vs-rest macro AUC on a held-out split of a patch set."""
    csv = Path(patches) / "patches.csv" if Path(patches).is_dir() else Path(patches)
    df = read_csv(csv, "patch manifest")
    df = df[df["split"] == split].assign(path=lambda d: [str(csv.parent / p) for p in d["path"]])
    if df.empty:
        return {}
    probs = predict_frame(learn, df)
    y = df["class_idx"].to_numpy()
    out = {f"{split}_accuracy": float(accuracy_score(y, probs.argmax(1))), f"{split}_patches": int(len(df))}
    present = sorted(set(y))
    recall = recall_score(y, probs.argmax(1), labels=present, average=None, zero_division=0)
    out[f"{split}_class_recall"] = {PATCH_CLASSES[c]: float(r) for c, r in zip(present, recall)}  # where a patch model fails: per class
    if len(present) > 1:
        out[f"{split}_macro_auc"] = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    out["classes"] = PATCH_CLASSES
    return out
