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


MASK_VERSION = "skin-line-1"  # recorded where a cut depends on the mask (patch sets): a new mask re-cuts them
SEGMENT_SIDE = 256  # the breast is segmented on a copy about this many pixels on its long side
SKIN_FRACTION = 0.25  # of the way from the background level to Otsu's threshold: the skin line of fatty breasts


def segment_breast(img: np.ndarray) -> np.ndarray:
    """Breast mask that follows the skin line: a low threshold, an opening that cuts labels off, the largest component.

    Otsu's threshold alone separates dense from fatty tissue and cuts inside the skin line of fatty breasts (measured
    on mini-MIAS); a threshold a quarter of the way from the background level (1st percentile) to Otsu's keeps the
    faint skin edge while staying above film grain. The opening (5x5 at ~256 px) detaches film labels and markers
    joined to the breast by thin bridges; holes are filled.
    """
    step = max(1, max(img.shape) // SEGMENT_SIDE)
    small = ndimage.median_filter(img[::step, ::step].astype(np.float32), 5)
    background = float(np.percentile(small, 1))
    fg = small > background + SKIN_FRACTION * (threshold_otsu(small) - background) if small.max() > small.min() else np.zeros(small.shape, bool)
    fg = ndimage.binary_opening(fg, np.ones((5, 5), bool))
    lab = label_components(fg)
    if lab.max() == 0:
        return np.ones(img.shape, bool)
    largest = ndimage.binary_fill_holes(lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1))
    return np.repeat(np.repeat(largest, step, 0), step, 1)[: img.shape[0], : img.shape[1]]


def background_value(pixels: np.ndarray, breast: np.ndarray) -> int:
    """The film or detector background: the median of the pixels outside the breast (labels are too few to move it)."""
    outside = pixels[~breast]
    return int(np.median(outside)) if outside.size else 0


def blank_outside(pixels: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """A copy with everything outside the breast mask set to the background value (film labels, markers, edge strips)."""
    out = pixels.copy()
    out[~breast] = background_value(pixels, breast)
    return out


@dataclass(frozen=True)
class CropSpec:
    """What `prepare` does before resizing: crop to the breast (or not), then flip every breast to one side (or not)."""

    breast: bool = False
    flip_to: str | None = None  # "left": the breast on the left of the image (chest wall at the left edge)
    margin: float = 0.01  # of the image's sides, added around the box
    blank: bool = False  # set everything outside the breast mask to the background value (labels inside the box go)

    def __post_init__(self):
        if self.flip_to not in (None, *SIDES):
            raise CvfastError(f"--flip-to {self.flip_to!r}: expected left or right")

    @property
    def active(self) -> bool:
        """True when images are changed before resizing."""
        return self.breast or self.flip_to is not None or self.blank


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


def plan_crop(pixels: np.ndarray, spec: CropSpec, breast: np.ndarray | None = None) -> Crop:
    """The crop of one source image: the breast's bounding box (or the whole image) and the flip that puts it on `flip_to`."""
    h, w = pixels.shape
    breast = segment_breast(pixels) if breast is None else breast
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


def cut_breast(pixels: np.ndarray, spec: CropSpec) -> tuple[np.ndarray, Crop, np.ndarray]:
    """What prepare does to a source image before resizing: blank outside the breast (spec.blank), crop, flip.

    Returns the cut image, its crop and the source-size breast mask (for checking ROIs against the breast).
    """
    breast = segment_breast(pixels)
    crop = plan_crop(pixels, spec, breast)
    return apply_crop(blank_outside(pixels, breast) if spec.blank else pixels, crop), crop, breast


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
