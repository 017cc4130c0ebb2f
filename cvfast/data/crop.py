"""Breast segmentation, the breast crop and side flip applied before resizing, and the map back to source pixels.

Cropping each image to the breast's bounding box (the largest connected tissue component: film labels, markers and
the background fall outside it) spends the working resolution on tissue, as the RSNA 2023 winning solutions did.
The box and flip of every image are stored (manifest column ``breast_crop``, carried into predictions) so masks,
patches and predicted findings map back to the original pixels (`working_to_source`); a model trained on cropped
images stores the spec, and predict and heatmap crop new images the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label as label_components

from cvfast.errors import CvfastError

SIDES = ("left", "right")


def segment_breast(img: np.ndarray) -> np.ndarray:
    """Breast mask: Otsu threshold on a smoothed copy, largest connected component, holes filled."""
    small = img[::4, ::4].astype(np.float32)
    smooth = ndimage.uniform_filter(small, 5)
    fg = smooth > threshold_otsu(smooth)
    lab = label_components(fg)
    if lab.max() == 0:
        return np.ones(img.shape, bool)
    largest = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    largest = ndimage.binary_fill_holes(largest)
    return np.repeat(np.repeat(largest, 4, 0), 4, 1)[: img.shape[0], : img.shape[1]]


@dataclass(frozen=True)
class CropSpec:
    """What `prepare` does before resizing: crop to the breast (or not), then flip every breast to one side (or not)."""

    breast: bool = False
    flip_to: str | None = None  # "left": the breast on the left of the image (chest wall at the left edge)
    margin: float = 0.01  # of the image's sides, added around the box

    def __post_init__(self):
        if self.flip_to not in (None, *SIDES):
            raise CvfastError(f"--flip-to {self.flip_to!r}: expected left or right")

    @property
    def active(self) -> bool:
        """True when images are changed before resizing."""
        return self.breast or self.flip_to is not None


@dataclass(frozen=True)
class Crop:
    """One image's crop: the box (y0, x0, y1, x1) in source pixels, end exclusive, and whether it was flipped after cropping."""

    box: tuple[int, int, int, int]
    flipped: bool

    def to_json(self, spec: CropSpec) -> str:
        """The manifest's breast_crop cell (with the spec that planned it, which a model trained on it stores)."""
        return json.dumps({"box": list(self.box), "flipped": self.flipped, "spec": asdict(spec)})

    @staticmethod
    def spec_of(text: str) -> dict | None:
        """The crop spec recorded in a breast_crop cell (None for an empty cell: an uncropped image)."""
        return json.loads(text)["spec"] if text else None

    @classmethod
    def from_json(cls, text: str) -> "Crop":
        """Parse a breast_crop cell."""
        d = json.loads(text)
        return cls(tuple(int(v) for v in d["box"]), bool(d["flipped"]))


def plan_crop(pixels: np.ndarray, spec: CropSpec) -> Crop:
    """The crop of one source image: the breast's bounding box (or the whole image) and the flip that puts it on `flip_to`."""
    h, w = pixels.shape
    breast = segment_breast(pixels)
    if spec.breast:
        ys, xs = np.nonzero(breast.any(1))[0], np.nonzero(breast.any(0))[0]
        my, mx = int(round(spec.margin * h)), int(round(spec.margin * w))
        box = (max(0, int(ys[0]) - my), max(0, int(xs[0]) - mx), min(h, int(ys[-1]) + 1 + my), min(w, int(xs[-1]) + 1 + mx))
    else:
        box = (0, 0, h, w)
    flipped = False
    if spec.flip_to is not None:  # which side the tissue is on, from the pixels: headers and CSVs disagree on display sides
        cols = np.nonzero(breast[box[0] : box[2], box[1] : box[3]])[1]
        width = box[3] - box[1]
        on_left = (cols.mean() if cols.size else width / 2) < width / 2  # the chest wall pulls the centroid to its side
        flipped = bool(on_left != (spec.flip_to == "left"))
    return Crop(box, flipped)


def apply_crop(array: np.ndarray, crop: Crop) -> np.ndarray:
    """The source-size image or mask cut to the crop's box and flipped as planned."""
    y0, x0, y1, x1 = crop.box
    out = array[y0:y1, x0:x1]
    return np.ascontiguousarray(out[:, ::-1] if crop.flipped else out)


def crop_spec_of(cells: Iterable[str]) -> dict | None:
    """The one crop spec of a DATA folder's breast_crop cells (None when it was not cropped); refused when they differ."""
    specs = {json.dumps(Crop.spec_of(c), sort_keys=True) for c in cells if c}
    if len(specs) > 1:
        raise CvfastError(f"images prepared with different crop settings ({', '.join(sorted(specs))}); prepare them again with one")
    return json.loads(specs.pop()) if specs else None


def working_to_source(y: float, x: float, crop: Crop, working: tuple[int, int]) -> tuple[float, float]:
    """A working-size pixel's centre (row y, column x) in source pixel coordinates (the inverse of crop, flip and resize)."""
    y0, x0, y1, x1 = crop.box
    sy, sx = (y1 - y0) / working[0], (x1 - x0) / working[1]
    cx = (x + 0.5) * sx  # within the crop, flipped or not
    if crop.flipped:
        cx = (x1 - x0) - cx
    return y0 + (y + 0.5) * sy - 0.5, x0 + cx - 0.5
