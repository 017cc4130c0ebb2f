"""Synthetic mammograms in the real CBIS-DDSM and INbreast layouts: the kit's built-in, licence-free data.

The images are made to pose the paper's problem: a breast on a dark background with tissue texture (and
the pectoral muscle on MLO views), lesions covering a few percent of the image or less. Whole-image labels
alone are therefore weak evidence; ROI patches help. Two difficulties (``DIFFICULTIES``):

- ``hard`` (the default) makes the lesions as ambiguous as real ones: some malignant masses circumscribed and
  some benign ones irregular or spiculated, calcification counts and sizes that overlap between benign and
  malignant, faint lesions, denser tissue that can hide them, and INbreast-like negatives that mostly carry a
  benign finding (BI-RADS 2), as in INbreast itself -- so a method fault shows in the AUC.
- ``easy`` (the kit's first data, bit for bit): benign masses always round/oval and malignant ones always
  irregular and spiculated, few coarse vs many fine calcifications, full contrast; any model separates them.

Everything is deterministic from the seed; ``ground_truth.json`` records what was generated.
"""

from __future__ import annotations

import json
from io import BytesIO
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from cvfast.data.read import atomic_write_bytes
from cvfast.errors import CvfastError

log = logging.getLogger(__name__)
logging.getLogger("openjpeg").setLevel(logging.WARNING)  # its encoder logs every tile at INFO

# (height, width) of the DDSM-like and INbreast-like full images for each preset.
SIZE_PRESETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tiny": ((320, 240), (300, 244)),
    "small": ((1000, 750), (1020, 832)),
    "realistic": ((4000, 3000), (4084, 3328)),
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_MAMMO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DDSM_CSV_NAMES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
INBREAST_COLUMNS = ["Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR", "Bi-Rads"]


def parse_size(text: str) -> tuple[int, int]:
    """Parse 'HxW' (e.g. '1152x896') into (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CvfastError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 1152x896") from None
    if h < 32 or w < 32:
        raise CvfastError(f"size {text!r}: both sides must be at least 32 pixels")
    return h, w


@dataclass(frozen=True)
class Difficulty:
    """How much benign and malignant lesions look alike, and how well tissue hides them."""

    malignant_circumscribed: float  # P(a malignant mass is round/oval with a smooth margin)
    benign_irregular: float  # P(a benign mass is irregular); a third of those also spiculated
    benign_calcs: tuple[int, int]  # number of calcifications in a cluster [lo, hi)
    malignant_calcs: tuple[int, int]
    benign_calc_size: tuple[float, float]  # calcification diameter, in pixels at 600 px image width
    malignant_calc_size: tuple[float, float]
    contrast: tuple[float, float]  # lesion amplitude factor, drawn per lesion (below 1: fainter)
    tissue: float  # contrast of the fibroglandular texture (above 1: denser tissue hides more)
    inbreast_malignant: float  # INbreast-like breasts: P(BI-RADS 4-6), P(BI-RADS 3), P(BI-RADS 2, benign finding)
    inbreast_birads3: float
    inbreast_benign: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(0.0, 0.0, (3, 7), (14, 30), (3.0, 4.5), (1.0, 2.2), (1.0, 1.0), 1.0, 0.35, 0.10, 0.25),
    "hard": Difficulty(0.25, 0.25, (3, 12), (8, 30), (1.8, 4.5), (1.0, 2.8), (0.6, 1.0), 1.25, 0.30, 0.08, 0.45),
}


# ----------------------------------------------------------------------------------------------- drawing
def _noise_field(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Smooth random field: white noise on a coarse grid (about `cells` across) upsampled bicubically."""
    h, w = shape
    gh, gw = max(2, int(round(cells * h / w))), max(2, int(round(cells)))
    return cv2.resize(rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


@dataclass
class Breast:
    """Geometry of one synthetic breast projection (pixel units)."""

    h: int
    w: int
    side: str  # 'L' chest wall at the left edge, 'R' at the right
    view: str
    a: float  # ellipse semi-axis away from the chest wall
    b: float  # ellipse semi-axis along the chest wall
    cy: float
    pect_x: float  # pectoral triangle (MLO): width at the top edge
    pect_y: float  # and height along the chest wall

    def chest_x(self, x: np.ndarray) -> np.ndarray:
        """Distance from the chest wall for image columns x."""
        return x if self.side == "L" else (self.w - 1 - x)

    def inside(self, x: float, y: float, margin: float) -> bool:
        """True if (x, y) is inside the breast, `margin` (0..1) away from the skin and off the pectoral muscle."""
        dx = float(self.chest_x(np.float32(x)))
        r = (dx / self.a) ** 2 + ((y - self.cy) / self.b) ** 2
        in_pect = self.view == "MLO" and dx / self.pect_x + y / self.pect_y < 1.15
        return r < margin**2 and not in_pect and dx > 0.08 * self.a


def _breast(rng: np.random.Generator, h: int, w: int, side: str, view: str) -> Breast:
    """Random breast geometry for one image."""
    return Breast(h, w, side, view, a=w * rng.uniform(0.68, 0.88), b=h * rng.uniform(0.40, 0.47),
                  cy=h * rng.uniform(0.47, 0.55), pect_x=w * rng.uniform(0.28, 0.42), pect_y=h * rng.uniform(0.40, 0.58))


def _render_breast(rng: np.random.Generator, br: Breast, density: float, tissue: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Signal in [0, 1] (tissue attenuation) and the breast mask for one projection."""
    h, w = br.h, br.w
    ys, xs = np.ogrid[:h, :w]
    dx = br.chest_x(xs.astype(np.float32))
    r2 = (dx / br.a) ** 2 + ((ys.astype(np.float32) - br.cy) / br.b) ** 2
    # a slightly wavy skin line
    r2 = r2 * (1 + 0.04 * _noise_field(rng, (h, w), 4))
    inside = r2 < 1
    thickness = np.sqrt(np.clip(1 - r2, 0, 1))
    glandular = 0.55 * _noise_field(rng, (h, w), 10) + 0.3 * _noise_field(rng, (h, w), 28) + 0.15 * _noise_field(rng, (h, w), 70)
    glandular = 1 / (1 + np.exp(-(glandular * 2.2 + (density - 0.5) * 3)))  # fibroglandular fraction
    signal = (0.30 + 0.25 * thickness + 0.30 * tissue * glandular * thickness**0.5) * inside
    if br.view == "MLO":
        pect = (dx / br.pect_x + ys / br.pect_y) < 1
        signal = np.where(pect & inside, 0.78 + 0.05 * _noise_field(rng, (h, w), 6), signal)
    return signal.astype(np.float32), inside


def _local(canvas: np.ndarray, cx: float, cy: float, half: int) -> tuple[slice, slice]:
    """Slices of a (2*half)^2 window around (cx, cy), clipped to the canvas."""
    h, w = canvas.shape
    x0, y0 = int(cx) - half, int(cy) - half
    return slice(max(y0, 0), min(y0 + 2 * half, h)), slice(max(x0, 0), min(x0 + 2 * half, w))


def _draw_mass(rng: np.random.Generator, signal: np.ndarray, mask: np.ndarray, cx: float, cy: float, r: float,
               irregular: bool, spiculated: bool, contrast: float = 1.0) -> None:
    """Add a mass (round/oval, or irregular, optionally spiculated) to signal and its outline to mask."""
    half = int(r * 3) + 2
    sy, sx = _local(signal, cx, cy, half)
    ys, xs = np.mgrid[sy, sx].astype(np.float32)
    ys, xs = ys - cy, xs - cx
    theta, rot = np.arctan2(ys, xs), rng.uniform(0, np.pi)
    if irregular:
        radius = np.full_like(theta, r)
        for k in range(3, 9):
            radius *= 1 + rng.uniform(0.04, 0.10) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        dist = np.hypot(xs, ys) / radius
    else:
        ecc = rng.uniform(0.65, 1.0)
        u = xs * np.cos(rot) + ys * np.sin(rot)
        v = -xs * np.sin(rot) + ys * np.cos(rot)
        dist = np.hypot(u / r, v / (r * ecc))
    soft = 0.06 if irregular else 0.12
    body = 1 / (1 + np.exp(np.minimum((dist - 1) / soft, 60.0)))  # capped: exp overflows far from the mass
    amp = rng.uniform(0.16, 0.24) * contrast
    add = amp * body
    if spiculated:  # spicules radiating from the mass
        spic = np.zeros_like(add)
        for ang in rng.uniform(0, 2 * np.pi, rng.integers(10, 18)):
            length = r * rng.uniform(1.6, 2.6)
            p0 = (int(round(cx - sx.start)), int(round(cy - sy.start)))
            p1 = (int(round(p0[0] + length * np.cos(ang))), int(round(p0[1] + length * np.sin(ang))))
            cv2.line(spic, p0, p1, 1.0, max(1, int(round(r * 0.07))), lineType=cv2.LINE_AA)
        add = np.maximum(add, 0.75 * amp * cv2.GaussianBlur(spic, (0, 0), max(0.5, r * 0.03)))
    signal[sy, sx] += add
    mask[sy, sx] |= dist <= 1.0


def _draw_calcs(rng: np.random.Generator, signal: np.ndarray, mask: np.ndarray, cx: float, cy: float, r: float, malignant: bool,
                scale: float, difficulty: Difficulty, contrast: float = 1.0) -> None:
    """Add a calcification cluster (typically few coarse benign, many fine pleomorphic malignant); mask = its hull."""
    half = int(r * 1.6) + 4
    sy, sx = _local(signal, cx, cy, half)
    local = np.zeros((sy.stop - sy.start, sx.stop - sx.start), np.float32)
    n = int(rng.integers(*(difficulty.malignant_calcs if malignant else difficulty.benign_calcs)))
    pts = []
    for _ in range(n):
        ang, rad = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform(0, 1))
        px, py = cx + rad * np.cos(ang) - sx.start, cy + rad * np.sin(ang) - sy.start
        if malignant:
            ax = (max(0.6, scale * rng.uniform(*difficulty.malignant_calc_size)), max(0.6, scale * rng.uniform(0.5, 1.0)))
        else:
            d = max(1.2, scale * rng.uniform(*difficulty.benign_calc_size))
            ax = (d, d * rng.uniform(0.85, 1.0))
        center = (int(round(px * 16)), int(round(py * 16)))
        axes = (max(1, int(round(ax[0] * 16))), max(1, int(round(ax[1] * 16))))
        cv2.ellipse(local, center, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA, shift=4)
        pts.append((px, py))
    local = np.clip(local, 0, 1) * rng.uniform(0.45, 0.6) * contrast
    signal[sy, sx] += local
    hull = cv2.convexHull(np.round(np.array(pts, np.float32)).astype(np.int32))
    roi = np.zeros(local.shape, np.uint8)
    cv2.fillConvexPoly(roi, hull, 1)
    margin = max(2, int(round(scale * 4)))
    roi = cv2.dilate(roi, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
    mask[sy, sx] |= roi.astype(bool)


@dataclass
class LesionSpec:
    """One abnormality to draw: kind 'mass' or 'calc', malignant or not, size relative to image width; its look."""

    kind: str
    malignant: bool
    rel_size: float
    irregular: bool | None = None  # mass outline; None: as its pathology (malignant = irregular and spiculated)
    spiculated: bool | None = None
    contrast: float = 1.0


def plan_lesion(rng: np.random.Generator, kind: str, malignant: bool, rel_size: float, difficulty: Difficulty) -> LesionSpec:
    """A lesion's look, drawn once per breast (both views show the same lesion)."""
    if difficulty is DIFFICULTIES["easy"]:  # the first data's random stream, unchanged
        return LesionSpec(kind, malignant, rel_size)
    if malignant:
        irregular = bool(rng.random() >= difficulty.malignant_circumscribed)
        spiculated = irregular and bool(rng.random() < 0.7)
    else:
        irregular = bool(rng.random() < difficulty.benign_irregular)
        spiculated = irregular and bool(rng.random() < 1 / 3)
    return LesionSpec(kind, malignant, rel_size, irregular, spiculated, float(rng.uniform(*difficulty.contrast)))


def render_image(rng: np.random.Generator, h: int, w: int, side: str, view: str, lesions: list[LesionSpec],
                 density: float, difficulty: Difficulty = DIFFICULTIES["hard"]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[tuple[float, float]]]:
    """Render one projection: signal in [0,1], breast mask, one ROI mask per lesion, lesion centres."""
    br = _breast(rng, h, w, side, view)
    signal, breast = _render_breast(rng, br, density, difficulty.tissue)
    masks, centres = [], []
    for les in lesions:
        r = les.rel_size * w
        for _ in range(500):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            far = all(np.hypot(cx - ox, cy - oy) > max(3.2 * r, 0.3 * w) for ox, oy in centres)  # one lesion per patch
            if br.inside(cx, cy, 0.72) and far:
                break
        else:
            raise RuntimeError("could not place lesion; image too small for its lesions")
        m = np.zeros((h, w), bool)
        if les.kind == "mass":
            irregular = les.malignant if les.irregular is None else les.irregular
            spiculated = les.malignant if les.spiculated is None else les.spiculated
            _draw_mass(rng, signal, m, cx, cy, r, irregular, spiculated, les.contrast)
        else:
            _draw_calcs(rng, signal, m, cx, cy, r, les.malignant, w / 600, difficulty, les.contrast)
        masks.append(m & breast)
        centres.append((cx, cy))
    return np.clip(signal, 0, 1.2), breast, masks, centres


def to_ddsm_pixels(rng: np.random.Generator, signal: np.ndarray, with_label: bool) -> np.ndarray:
    """Scanned-film look: 16-bit, dark film base, film grain, sometimes a bright label sticker."""
    h, w = signal.shape
    v = 0.035 + 0.78 * signal + rng.normal(0, 0.008, signal.shape).astype(np.float32)
    if with_label:  # scanner label in a background corner: bright, must not fool breast segmentation
        lh, lw = int(h * 0.05), int(w * 0.12)
        y0 = int(h * 0.04)
        x0 = w - lw - int(w * 0.04) if signal[:, w // 2 :].mean() < signal[:, : w // 2].mean() else int(w * 0.04)
        v[y0 : y0 + lh, x0 : x0 + lw] = 0.92
    return (np.clip(v, 0, 1) * 65535 + 0.5).astype(np.uint16)


def to_inbreast_pixels(rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
    """Full-field digital look: 14-bit stored, brighter fat, compressed contrast, cleaner noise."""
    v = 0.05 + 0.62 * np.power(np.clip(signal, 0, None), 0.7) + rng.normal(0, 0.004, signal.shape).astype(np.float32)
    return (np.clip(v, 0, 1) * 16383 + 0.5).astype(np.uint16)


# ----------------------------------------------------------------------------------------------- DICOM
# the lossless transfer syntaxes make_dicom writes, and the pydicom encoding plugin of each ("" = make_dicom's own path)
ENCODERS = {ExplicitVRLittleEndian: "", RLELossless: "pylibjpeg", JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls",
            JPEGLosslessSV1: ""}

def make_dicom(path: Path, pixels: np.ndarray, *, patient_id: str, sop_class: str = SECONDARY_CAPTURE,
               bits_stored: int | None = None, syntax: str = ExplicitVRLittleEndian, laterality: str | None = None,
               view: str | None = None, spacing: float | None = None, photometric: str = "MONOCHROME2",
               uid_seed: str = "", extra: dict | None = None) -> None:
    """Write a single-frame grey DICOM (uint8/uint16) in a lossless transfer syntax (ENCODERS), atomically."""
    ds = pydicom.Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop", str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if syntax not in ENCODERS:
        raise ValueError(f"make_dicom writes {', '.join(map(str, ENCODERS))}, not {syntax}")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series", path.parent.name])
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, patient_id, "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    if spacing:
        ds.PixelSpacing = [spacing, spacing]
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if syntax == JPEGLosslessSV1:
        # pydicom has no JPEG Lossless encoder; libjpeg-turbo's (through imagecodecs) writes process 14, predictor 1
        frame = imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), lossless=True, predictor=1, bitspersample=ds.BitsStored)
        ds.PixelData, meta.TransferSyntaxUID = encapsulate([frame]), JPEGLosslessSV1
        ds["PixelData"].VR = "OB"
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, encoding_plugin=ENCODERS[syntax], generate_instance_uid=False)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- layouts
def _uid(seed: int, *parts: object) -> str:
    """Deterministic CBIS-style UID string."""
    return "1.3.6.1.4.1.9590.100.1.2." + str(zlib.crc32(repr((seed, parts)).encode()) * 1000003 + 17 * seed)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """Independent deterministic RNG for one item, so outputs do not depend on generation order."""
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])


def mass_descriptors(rng: np.random.Generator, les: LesionSpec) -> dict[str, str]:
    """CBIS-DDSM's mass shape and margins for the lesion as drawn (its look, not its pathology); the random draws are the
    first data's, so the easy data's CSVs stay as they were."""
    shape = str(rng.choice(["IRREGULAR", "LOBULATED"]) if les.malignant else rng.choice(["ROUND", "OVAL"]))
    margins = str(rng.choice(["SPICULATED", "ILL_DEFINED"])) if les.malignant else "CIRCUMSCRIBED"
    if les.irregular is None or les.irregular == les.malignant and les.spiculated == les.malignant:
        return {"mass shape": shape, "mass margins": margins}
    swap = {"IRREGULAR": "ROUND", "LOBULATED": "OVAL", "ROUND": "IRREGULAR", "OVAL": "LOBULATED"}
    shape = shape if les.irregular == les.malignant else swap[shape]
    return {"mass shape": shape, "mass margins": "SPICULATED" if les.spiculated else "ILL_DEFINED" if les.irregular else "CIRCUMSCRIBED"}


def synth_ddsm(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty = DIFFICULTIES["hard"]) -> dict:
    """Write a CBIS-DDSM-layout tree (four CSVs + CBIS-DDSM/ DICOM folders) and return its ground truth."""
    h, w = size
    rng = _rng(seed, "ddsm-plan")
    rows: dict[tuple[str, str], list[dict]] = {k: [] for k in DDSM_CSV_NAMES}
    truth: dict[str, dict] = {}
    n_test = max(1, int(round(patients * 0.2)))
    test_patients = set(rng.choice(patients, n_test, replace=False).tolist())
    image_no = 0
    for p in range(patients):
        pid = f"P_{p + 1:05d}"
        official = "test" if p in test_patients else "train"
        sides = ["LEFT", "RIGHT"] if rng.random() < 0.3 else [rng.choice(["LEFT", "RIGHT"])]
        for side in sides:
            kind = "mass" if rng.random() < 0.55 else "calc"
            n_les = 2 if rng.random() < 0.2 else 1
            lesions = [plan_lesion(rng, kind, bool(rng.random() < 0.45), rng.uniform(0.035, 0.055) if kind == "mass" else rng.uniform(0.04, 0.06), difficulty)
                       for _ in range(n_les)]
            density = int(rng.integers(1, 5))
            for view in ("CC", "MLO"):
                image_no += 1
                image_id = f"{pid}_{side}_{view}"
                irng = _rng(seed, "ddsm", image_id)
                signal, _, masks, centres = render_image(irng, h, w, side[0], view, lesions, density / 4, difficulty)
                pixels = to_ddsm_pixels(irng, signal, with_label=image_no % 2 == 0)
                prefix = f"{'Mass' if kind == 'mass' else 'Calc'}-{'Training' if official == 'train' else 'Test'}"
                folder = f"{prefix}_{image_id}"
                study, series = _uid(seed, image_id, "st"), _uid(seed, image_id, "se")
                layout_descriptive = image_no % 3 == 0
                full_dir = out / "CBIS-DDSM" / folder / (f"07-20-2016-DDSM-{image_no:05d}" if layout_descriptive else study)
                full_dir = full_dir / (f"1.000000-full mammogram images-{image_no:05d}" if layout_descriptive else series)
                make_dicom(full_dir / "1-1.dcm", pixels, patient_id=folder, syntax=RLELossless if image_no % 3 == 1 else ExplicitVRLittleEndian, uid_seed=f"{seed}{image_id}",
                           extra={"BodyPartExamined": "BREAST", "SeriesDescription": "full mammogram images"})
                csv_full = f"{folder}/{_uid(seed, image_id, 'csv-st')}/{_uid(seed, image_id, 'csv-se')}/000000.dcm"
                abns = []
                for k, (les, m, (cx, cy)) in enumerate(zip(lesions, masks, centres), start=1):
                    roi_folder = f"{folder}_{k}"
                    mask_px = (m.astype(np.uint8) * 255)
                    if (image_no + k) % 5 == 0:  # real CBIS-DDSM: some masks are a few pixels off the image size
                        mask_px = cv2.resize(mask_px, (w + 3, h - 2), interpolation=cv2.INTER_NEAREST)
                    ys, xs = np.nonzero(m)
                    crop = pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                    rdir = out / "CBIS-DDSM" / roi_folder / _uid(seed, roi_folder, "st") / _uid(seed, roi_folder, "se")
                    swap = (image_no + k) % 2 == 0  # download order of mask vs crop is not stable
                    make_dicom(rdir / ("1-2.dcm" if swap else "1-1.dcm"), mask_px, patient_id=roi_folder, uid_seed=f"{seed}{roi_folder}m")
                    make_dicom(rdir / ("1-1.dcm" if swap else "1-2.dcm"), np.ascontiguousarray(crop), patient_id=roi_folder, uid_seed=f"{seed}{roi_folder}c")
                    pathology = "MALIGNANT" if les.malignant else ("BENIGN_WITHOUT_CALLBACK" if (image_no + k) % 4 == 0 else "BENIGN")
                    base = {
                        "patient_id": pid, "left or right breast": side, "image view": view, "abnormality id": k,
                        "assessment": int(rng.choice([4, 5])) if les.malignant else int(rng.choice([2, 3, 4])),
                        "pathology": pathology, "subtlety": int(rng.integers(1, 6)), "image file path": csv_full,
                        # CBIS-DDSM's paths name 000000/000001.dcm and carry stray newlines; downloads say 1-1/1-2.
                        "cropped image file path": f"{roi_folder}/{_uid(seed, roi_folder, 'cst')}/{_uid(seed, roi_folder, 'cse')}/000000.dcm\n",
                        "ROI mask file path": f"{roi_folder}/{_uid(seed, roi_folder, 'cst')}/{_uid(seed, roi_folder, 'cse')}/000001.dcm\n",
                    }
                    if kind == "mass":
                        base |= {"breast_density": density, "abnormality type": "mass", **mass_descriptors(rng, les)}
                    else:
                        base |= {"breast density": density, "abnormality type": "calcification",
                                 "calc type": rng.choice(["PLEOMORPHIC", "FINE_LINEAR_BRANCHING"]) if les.malignant else rng.choice(["COARSE", "ROUND_AND_REGULAR"]),
                                 "calc distribution": "CLUSTERED"}
                    rows[(kind, official)].append(base)
                    abns.append({"abnormality_id": k, "kind": kind, "malignant": les.malignant, "pathology": pathology,
                                 "center": [round(cx, 1), round(cy, 1)], "mask_pixels": int(m.sum()), "contrast": round(les.contrast, 3),
                                 **({"irregular": les.malignant if les.irregular is None else les.irregular,
                                     "spiculated": les.malignant if les.spiculated is None else les.spiculated} if kind == "mass" else {})})
                truth[image_id] = {"patient_id": pid, "side": side[0], "view": view, "split": official,
                                   "label": int(any(a["malignant"] for a in abns)), "abnormalities": abns, "folder": folder}
    for (kind, split), name in DDSM_CSV_NAMES.items():
        cols = MASS_COLUMNS if kind == "mass" else CALC_COLUMNS
        df = pd.DataFrame(rows[(kind, split)], columns=cols)
        atomic_write_bytes(out / name, df.to_csv(index=False).encode())
    return {"size": [h, w], "images": truth, "rows": sum(len(v) for v in rows.values())}


def synth_inbreast(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty = DIFFICULTIES["hard"]) -> dict:
    """Write an INbreast-layout folder (AllDICOMs/ + INbreast.csv with BI-RADS) and return its ground truth."""
    h, w = size
    rng = _rng(seed, "inbreast-plan")
    sheet, truth = [], {}
    file_no = 20586900
    for p in range(patients):
        phash = f"{zlib.crc32(f'{seed}-{p}'.encode()):08x}{zlib.crc32(f'{p}-{seed}'.encode()):08x}"
        sides = ["L", "R"] if rng.random() < 0.75 else [str(rng.choice(["L", "R"]))]
        for side in sides:
            u, d = rng.random(), difficulty
            if u < d.inbreast_malignant:
                birads = str(rng.choice(["4a", "4b", "4c", "5", "6"]))
                lesions = [plan_lesion(rng, str(rng.choice(["mass", "calc"])), True, rng.uniform(0.035, 0.055), d)]
            elif u < d.inbreast_malignant + d.inbreast_birads3:
                birads, lesions = "3", [plan_lesion(rng, "mass", False, rng.uniform(0.035, 0.05), d)]
            elif u < d.inbreast_malignant + d.inbreast_birads3 + d.inbreast_benign:
                birads, lesions = "2", [plan_lesion(rng, str(rng.choice(["mass", "calc"])), False, rng.uniform(0.035, 0.05), d)]
            else:
                birads, lesions = "1", []
            acr = int(rng.integers(1, 5))
            for view in ("CC", "MLO"):
                file_no += int(rng.integers(1, 40))
                name = f"{file_no}_{phash}_MG_{side}_{view}_ANON.dcm"
                irng = _rng(seed, "inbreast", name)
                signal, _, _, centres = render_image(irng, h, w, side, view, lesions, acr / 4, difficulty)
                make_dicom(out / "AllDICOMs" / name, to_inbreast_pixels(irng, signal), patient_id=phash, sop_class=DX_MAMMO_PRESENTATION,
                           bits_stored=14, laterality=side, view=view, spacing=0.07, uid_seed=f"{seed}{name}")
                sheet.append({"Patient ID": "removed", "Patient age": "removed", "Laterality": side, "View": view,
                              "Acquisition date": f"2008{int(rng.integers(1, 13)):02d}", "File Name": file_no, "ACR": acr, "Bi-Rads": birads})
                truth[str(file_no)] = {"patient_id": phash, "side": side, "view": view, "birads": birads,
                                       "label": None if birads == "3" else int(birads[0] in "456"), "n_lesions": len(lesions)}
    # The real INbreast.csv is semicolon-separated.
    atomic_write_bytes(out / "INbreast.csv", pd.DataFrame(sheet, columns=INBREAST_COLUMNS).to_csv(index=False, sep=";").encode())
    return {"size": [h, w], "images": truth}


LAYOUTS = ("ddsm", "inbreast", "rsna", "vindr", "cmmd")


def synthesize(out: str | Path, patients: int = 24, seed: int = 0, size: str = "tiny", difficulty: str = "hard",
               layouts: tuple[str, ...] = ("ddsm", "inbreast")) -> dict:
    """Generate the chosen dataset layouts under OUT/<layout>; write and return OUT/ground_truth.json."""
    from cvfast.data.synth_screening import SCREENING_WRITERS  # that module draws with this one's functions

    out = Path(out)
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise CvfastError(f"layouts {', '.join(unknown) or '(none)'}: expected some of {', '.join(LAYOUTS)}")
    occupied = [p for sub in layouts if (out / sub).is_dir() for p in (out / sub).iterdir()]
    if occupied and not (out / "ground_truth.json").is_file():  # someone's data, not an earlier synth run's: keep it
        raise CvfastError(f"{out}: already holds {occupied[0]} (not written by `cvfast synth`); choose an empty --out")
    if patients < 2:
        raise CvfastError(f"--patients {patients}: need at least 2 patients for a train/test split")
    if difficulty not in DIFFICULTIES:
        raise CvfastError(f"--difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTIES)}")
    look = DIFFICULTIES[difficulty]
    if size in SIZE_PRESETS:
        ddsm_size, digital_size = SIZE_PRESETS[size]
    else:
        ddsm_size = parse_size(size)
        digital_size = (int(ddsm_size[0] * 1.021), int(ddsm_size[1] * 1.109))
    writers = {"ddsm": synth_ddsm, "inbreast": synth_inbreast, **SCREENING_WRITERS}
    truth = {"seed": seed, "patients": patients, "difficulty": difficulty}
    for name in layouts:
        truth[name] = writers[name](out / name, patients, seed, ddsm_size if name == "ddsm" else digital_size, look)
    atomic_write_bytes(out / "ground_truth.json", json.dumps(truth, indent=1).encode())
    log.info("synthetic data: %s in %s", ", ".join(f"{len(truth[n]['images'])} {n}-like images" for n in layouts), out)
    return truth
