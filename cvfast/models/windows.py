"""Windows over the breast: the patches a patch classifier (or a frozen body) sees when it reads a whole image.

A whole-image score from a patch model -- the peak of its malignant heatmap on the breast -- and the frozen-ImageNet
linear probe both read the image window by window: every window that overlaps the breast is scored, each pixel gets
the mean score of the windows covering it (the sliding-window heatmap of `cvfast heatmap`), and the image's score is
the heatmap's highest value on the breast mask, so film labels and markers outside the breast never decide it and no
single window's noise does either.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cvfast.data.crop import segment_breast
from cvfast.data.sample import crop as cut_patch
from cvfast.errors import CvfastError


def breast_window_centres(image: np.ndarray, window: int, stride: int, breast: np.ndarray | None = None) -> np.ndarray:
    """(row, col) centres, every `stride` pixels, of the window x window patches inside the image that overlap the breast.

    Centres are those `cvfast.data.sample.crop` cuts around (top-left = centre - window // 2), flush with the far edges
    as well; an image whose mask is empty gives every window (a mask failure must not leave an image unscored).
    """
    h, w = image.shape
    if window > min(h, w):
        raise CvfastError(f"{window}-pixel windows do not fit a {h}x{w} image")
    if stride < 1:
        raise CvfastError(f"window stride {stride}: must be at least 1")
    half = window // 2
    ys = np.unique(np.r_[np.arange(0, h - window + 1, stride), h - window]) + half
    xs = np.unique(np.r_[np.arange(0, w - window + 1, stride), w - window]) + half
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    breast = segment_breast(image) if breast is None else breast
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = breast.astype(np.int64).cumsum(0).cumsum(1)
    y0, x0 = grid[:, 0] - half, grid[:, 1] - half
    on = (sat[y0 + window, x0 + window] - sat[y0, x0 + window] - sat[y0 + window, x0] + sat[y0, x0]) > 0
    return grid[on] if on.any() else grid


def window_heatmap(shape: tuple[int, int], centres: np.ndarray, scores: np.ndarray, window: int) -> np.ndarray:
    """Each pixel's mean score over the windows covering it (NaN where none does): the sliding-window heatmap."""
    total, count = np.zeros(shape, np.float64), np.zeros(shape, np.float64)
    half = window // 2
    for (y, x), v in zip(centres, scores):
        total[y - half:y - half + window, x - half:x - half + window] += v
        count[y - half:y - half + window, x - half:x - half + window] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def breast_peak(heatmap: np.ndarray, breast: np.ndarray) -> tuple[float, tuple[int, int]]:
    """The heatmap's highest value on the breast (anywhere covered, when the mask is empty) and its pixel (row, col)."""
    region = np.where(breast & ~np.isnan(heatmap), heatmap, -np.inf)
    if not np.isfinite(region).any():
        region = np.where(np.isnan(heatmap), -np.inf, heatmap)
    y, x = np.unravel_index(int(np.argmax(region)), region.shape)
    return float(region[y, x]), (int(y), int(x))


@torch.no_grad()
def score_tiles(fn: Callable[[torch.Tensor], torch.Tensor], tiles: np.ndarray, mean_grey: float, fed: int | None = None, bs: int = 256,
                device: str | torch.device = "cpu") -> np.ndarray:
    """fn over batches of square tiles ((N, s, s) floats in [0, 1]) minus the mean grey, resized to `fed` pixels when given."""
    out = []
    for i in range(0, len(tiles), bs):
        x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + bs], np.float32) - np.float32(mean_grey))[:, None].to(device)
        if fed and fed != x.shape[-1]:  # patches are fed at the network's scale, as in training
            x = F.interpolate(x, size=(fed, fed), mode="bilinear", align_corners=False)
        out.append(fn(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


def score_windows(fn: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, centres: np.ndarray, window: int, mean_grey: float,
                  fed: int | None = None, bs: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """fn over the image's windows around `centres` (image: working-size floats in [0, 1]): one output row per centre."""
    tiles = np.stack([cut_patch(image, int(y), int(x), window) for y, x in centres]) if len(centres) else np.zeros((0, window, window))
    return score_tiles(fn, tiles, mean_grey, fed, bs, device)
