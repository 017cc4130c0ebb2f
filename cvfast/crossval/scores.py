"""Per-image scores of one fold: the patch model's max over breast windows, the frozen probe, and the trivial baselines.

Every baseline is fitted on the fold's training patients (train + valid) and applied to its held-out patients only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cvfast.data.classes import MALIGNANT_PATCH_CLASSES
from cvfast.data.crop import segment_breast
from cvfast.data.read import read_png
from cvfast.models.windows import breast_peak, breast_window_centres, score_windows, window_heatmap
from cvfast.util.progress import progress_bar

# the columns a density prior can read, in the order they are tried (mini-MIAS tissue F/G/D; RSNA, VinDr, CSV density)
DENSITY_COLUMNS = ("tissue", "density")


def auc(y, s) -> float:
    """ROC AUC, NaN when one class is missing."""
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def working_image(path: str) -> np.ndarray:
    """A cached working-size image as [0, 1] floats."""
    return read_png(path).astype(np.float32) / 65535


def brightness(fold: pd.DataFrame, means: dict[str, float]) -> np.ndarray:
    """Mean grey value of each held-out image, signed so that the training images' direction holds (a fixed, fitted sign)."""
    mean = fold["image_id"].map(means).to_numpy(dtype=float)
    train = (fold["split"] != "test").to_numpy()
    sign = 1.0 if auc(fold.loc[train, "label"], mean[train]) >= 0.5 else -1.0
    return sign * mean[~train]


def density_prior(fold: pd.DataFrame) -> np.ndarray | None:
    """The training images' cancer rate per breast-density category, for each held-out image (None without a density column)."""
    col = next((c for c in DENSITY_COLUMNS if c in fold.columns and fold[c].notna().any()), None)
    if col is None:
        return None
    train, test = fold[fold["split"] != "test"], fold[fold["split"] == "test"]
    rate = (train.groupby(col)["label"].sum() + 0.5) / (train.groupby(col)["label"].count() + 1.0)  # smoothed
    default = (train["label"].sum() + 0.5) / (len(train) + 1.0)
    return test[col].map(rate).fillna(default).astype(float).to_numpy()


def malignant_fn(model: torch.nn.Module, classes: list[str]):
    """fn(batch) -> the patch model's summed malignant probability per window."""
    idx = [classes.index(c) for c in MALIGNANT_PATCH_CLASSES]
    return lambda x: torch.softmax(model(x), 1)[:, idx].sum(1)


def class_probabilities_fn(model: torch.nn.Module):
    """fn(batch) -> the patch model's class probabilities."""
    return lambda x: torch.softmax(model(x), 1)


@dataclass
class WindowScores:
    """One image's scored windows, its heatmap (each pixel: the mean score of the windows covering it) and breast mask."""

    centres: np.ndarray
    scores: np.ndarray
    heatmap: np.ndarray
    breast: np.ndarray

    @property
    def peak(self) -> tuple[float, tuple[int, int]]:
        """The image score -- the heatmap's highest value on the breast -- and where it is (row, col)."""
        return breast_peak(self.heatmap, self.breast)


def window_scores(fn, image: np.ndarray, window: int, stride: int, mean_grey: float, fed: int | None) -> WindowScores:
    """fn's score for every window overlapping the breast of one working-size image, and the heatmap they make."""
    breast = segment_breast(image)
    centres = breast_window_centres(image, window, stride, breast)
    scores = score_windows(fn, image, centres, window, mean_grey, fed).reshape(len(centres), -1)[:, 0]
    return WindowScores(centres, scores, window_heatmap(image.shape, centres, scores, window), breast)


def image_window_scores(fn, images: dict[str, np.ndarray], ids: list[str], window: int, stride: int, mean_grey: float,
                        fed: int | None, what: str) -> dict[str, WindowScores]:
    """window_scores of each image (a progress bar over images)."""
    out = {}
    with progress_bar(enabled=len(ids) > 1) as bar:
        task = bar.add_task(what, total=len(ids))
        for i in ids:
            out[i] = window_scores(fn, images[i], window, stride, mean_grey, fed)
            bar.advance(task)
    return out


def pointing_game(scores: WindowScores, masks: list[np.ndarray]) -> dict | None:
    """Whether the heatmap's peak on the breast lies in a lesion, and the share of breast pixels in a lesion (chance's hit rate)."""
    if not masks:
        return None
    union = np.zeros(masks[0].shape, bool)
    for m in masks:
        union |= m
    _, (y, x) = scores.peak
    return {"hit": bool(union[y, x]), "chance": float(union[scores.breast].mean()) if scores.breast.any() else float(union.mean())}


def malignant_masks(row: pd.Series) -> list[np.ndarray]:
    """The working-size masks of an image's malignant abnormalities (those with a mask)."""
    return [read_png(a["mask"]) > 0 for a in row["abnormalities"] if a.get("mask") and a.get("pathology") == "MALIGNANT"]


def lesion_type(abnormalities: list[dict]) -> str:
    """A cancer image's lesion type for the by-type table: mass, calcification, or distortion/asymmetry (mini-MIAS ARCH/ASYM)."""
    malignant = [a for a in abnormalities if a.get("pathology") == "MALIGNANT"] or abnormalities
    if not malignant:
        return "normal"
    a = malignant[0]
    if a.get("mias_class") in ("ARCH", "ASYM"):
        return "distortion/asymmetry"
    return {"calc": "calcification", "mass": "mass"}.get(a.get("kind", ""), "other")
