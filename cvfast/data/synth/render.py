"""Synthetic mammograms drawn: breasts, tissue, lesions, and the DICOM files they are stored in (every layout uses these).

The images are made to pose the paper's problem: a breast on a dark background with tissue texture (and
the pectoral muscle on MLO views), lesions covering a few percent of the image or less. Whole-image labels
alone are therefore weak evidence; ROI patches help. Two difficulties (``DIFFICULTIES``):

- ``hard`` (the default) makes the lesions as ambiguous as real ones: some malignant masses circumscribed and
  some benign ones irregular or spiculated, calcification counts and sizes that overlap between benign and
  malignant, faint lesions, denser tissue that can hide them, and INbreast-like negatives that mostly carry a
  benign finding (BI-RADS 2), as in INbreast itself -- so a method fault shows in the AUC.
- ``easy`` (the kit's first data, bit for bit): benign masses always round/oval and malignant ones always
  irregular and spiculated, few coarse vs many fine calcifications, full contrast; any model separates them.

Everything is deterministic from the seed; ``ground_truth.json`` records what was generated."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from cvfast.errors import CvfastError
from cvfast.util.files import atomic_write_bytes

logging.getLogger("openjpeg").setLevel(logging.WARNING)  # its encoder logs every tile at INFO

# (height, width) of the DDSM-like and INbreast-like full images for each preset.


SIZE_PRESETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tiny": ((320, 240), (300, 244)),
    "small": ((1000, 750), (1020, 832)),
    "realistic": ((4000, 3000), (4084, 3328)),
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_MAMMO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


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
    atomic_write_bytes(path, buf.getvalue(), cache=True)


# ----------------------------------------------------------------------------------------------- layouts
def _uid(seed: int, *parts: object) -> str:
    """Deterministic CBIS-style UID string."""
    return "1.3.6.1.4.1.9590.100.1.2." + str(zlib.crc32(repr((seed, parts)).encode()) * 1000003 + 17 * seed)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """Independent deterministic RNG for one item, so outputs do not depend on generation order."""
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])
