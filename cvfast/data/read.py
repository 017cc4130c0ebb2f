"""Reading mammograms (DICOM, PNG, TIFF, PGM) into uint16 arrays, resizing, and the 16-bit PNG cache."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import tifffile
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from cvfast.data.decode import decode
from cvfast.errors import CvfastError
from cvfast.util.files import atomic_write_bytes

WORKING_SIZE: tuple[int, int] = (1152, 896)  # (height, width), the paper's whole-image size
RASTER_SUFFIXES = {".png", ".tif", ".tiff", ".pgm", ".jpg", ".jpeg"}

# cv2 worker threads fight the process pool for the same cores; one thread per process is faster overall.
cv2.setNumThreads(1)


@dataclass
class Mammogram:
    """Pixels as uint16 (0 = black, 65535 = white, MONOCHROME2 sense) plus what the file says about them."""

    pixels: np.ndarray
    source: str
    laterality: str | None = None
    view: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    patient_id: str | None = None
    extra: dict = field(default_factory=dict)


def read_mammogram(path: str | os.PathLike, allow_blank: bool = False) -> Mammogram:
    """Read a DICOM, PNG, TIFF or PGM mammogram as uint16; raise CvfastError naming the file on failure.

    An image whose pixels are all equal is refused too (it would be learnt and scored as a black image) unless
    `allow_blank` (an ROI mask may be empty).
    """
    path = Path(path)
    if not path.is_file():
        raise CvfastError(f"{path}: no such file")
    try:
        mammo = read_raster(path) if path.suffix.lower() in RASTER_SUFFIXES else read_dicom(path)
    except CvfastError:
        raise
    except Exception as e:  # a decoder's own failure (PIL's DecompressionBombError, a plugin's RuntimeError, ...)
        raise CvfastError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from None
    if not allow_blank and mammo.pixels.size and mammo.pixels.min() == mammo.pixels.max():
        raise CvfastError(f"{path}: every pixel has the same value ({int(mammo.pixels.flat[0])} of 65535): a blank image, not a mammogram")
    return mammo


def _check_finite(arr: np.ndarray, path: Path) -> None:
    """Refuse float pixels that are NaN or infinite: one such pixel would turn the whole scaled image black."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        y, x = np.argwhere(bad)[0]
        raise CvfastError(f"{path}: {int(bad.sum())} pixel(s) are NaN or infinite (the first at row {int(y)}, column {int(x)}); "
                          "the image cannot be scaled to grey levels")


def _output_range(ds: pydicom.Dataset, voi_applied: bool) -> tuple[float, float]:
    """The value range the modality/VOI LUT stages can produce, used to map onto 0..65535."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if voi_applied and ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (0.0, 2.0**bits - 1) if ds.get("PixelRepresentation", 0) == 0 else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:  # pydicom rescales only with both
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def read_dicom(path: str | os.PathLike) -> Mammogram:
    """Read a DICOM image: modality LUT, VOI LUT or window when present, MONOCHROME1 inverted, as uint16."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise CvfastError(f"{path}: not a DICOM file ({e})") from None
    except Exception as e:  # pydicom raises many types on truncated/garbled headers
        raise CvfastError(f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise CvfastError(f"{path}: DICOM has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    tsyntax = ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise CvfastError(f"{path}: pydicom has no decoder at all for transfer syntax {tsyntax.name} ({tsyntax})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise CvfastError(f"{path}: transfer syntax {tsyntax.name} ({tsyntax}) needs a decoder that is not installed ({missing})")
    try:
        raw = decode(ds)
    except Exception as e:
        raise CvfastError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None
    if raw.ndim != 2:
        raise CvfastError(f"{path}: expected one grey-level frame, got pixel array of shape {raw.shape}")
    has_voi = bool(ds.get("VOILUTSequence") or ds.get("WindowCenter") is not None)
    arr = apply_modality_lut(raw, ds)
    if ds.get("VOILUTSequence"):
        arr = _voi_lut_lookup(arr, ds.VOILUTSequence[0])
    elif has_voi:
        arr = apply_voi_lut(arr, ds)
    _check_finite(arr, path)  # a NaN rescale slope or window makes every pixel NaN
    lo, hi = _output_range(ds, has_voi)  # a window maps onto the same range the modality LUT produces
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CvfastError(f"{path}: the header's rescale or LUT gives a value range {lo:g}..{hi:g} that is not finite")
    pixels = _to_uint16(arr, lo, hi)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        pixels = np.subtract(65535, pixels, dtype=np.uint16)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return Mammogram(
        pixels=pixels,
        source=str(path),
        laterality=norm_side(ds.get("ImageLaterality") or ds.get("Laterality")),
        view=view_of(ds),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        patient_id=str(ds.get("PatientID")) if ds.get("PatientID") else None,
    )


# DICOM's view codes (CID 4014) by their meaning, for files that give the view as ViewCodeSequence only (CMMD)
VIEW_CODE_MEANINGS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML", "latero-medial": "LM",
                      "latero-medial oblique": "LMO", "exaggerated cranio-caudal": "XCCL", "cranio-caudal exaggerated laterally": "XCCL",
                      "caudo-cranial (from below)": "FB", "axillary tail": "AT"}


def view_of(ds: pydicom.Dataset) -> str | None:
    """The mammographic view: ViewPosition, or the meaning of the first ViewCodeSequence item."""
    if str(ds.get("ViewPosition", "") or "").strip():
        return str(ds.ViewPosition).strip().upper()
    seq = ds.get("ViewCodeSequence")
    meaning = str(seq[0].get("CodeMeaning", "")).strip().lower() if seq else ""
    return VIEW_CODE_MEANINGS.get(meaning)


def dicom_identity(path: str | os.PathLike) -> dict:
    """Patient, side, view and exam from a DICOM header (pixels not read); raises CvfastError for a bad header."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types on garbled headers
        raise CvfastError(f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from None
    return {"patient_id": str(ds.get("PatientID") or "") or None,
            "side": norm_side(ds.get("ImageLaterality") or ds.get("Laterality")),
            "view": view_of(ds),
            "exam_id": str(ds.get("StudyInstanceUID") or "") or None}


def _voi_lut_lookup(arr: np.ndarray, item: pydicom.Dataset) -> np.ndarray:
    """Apply the first VOI LUT of a VOILUTSequence (PS3.3 C.11.2.1.1).

    Written here because pydicom 3.0.2's apply_voi builds its index array in the LUT's output dtype, so an
    8-bit LUT with more than 256 entries wraps its inputs modulo 256.
    """
    n, first, _ = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    lut = (np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)).astype(np.float32)
    n = n or 65536  # a descriptor of 0 entries means 2^16
    idx = np.clip(np.asarray(arr, dtype=np.int64) - first, 0, min(n, len(lut)) - 1)
    return lut[idx]


def _to_uint16(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values in [lo, hi] linearly onto 0..65535 (a no-op copy-free path for plain 16-bit data)."""
    if arr.dtype == np.uint16 and lo == 0 and hi == 65535:
        return arr
    scale = 65535.0 / max(hi - lo, 1e-9)
    out = (arr.astype(np.float32) - lo) * scale
    return np.clip(out + 0.5, 0, 65535).astype(np.uint16)


def norm_side(value) -> str | None:
    """'L'/'R' from DICOM laterality or a file name token."""
    v = str(value or "").strip().upper()
    return {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}.get(v)


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """A TIFF that PIL cannot open (float64, for one) through tifffile, with the PIL mode its dtype corresponds to."""
    try:
        arr = tifffile.imread(path)
    except Exception as e:  # tifffile raises TiffFileError, ValueError, ... on files it cannot parse
        raise CvfastError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    arr = arr.squeeze()
    if arr.dtype.kind == "f":
        return arr, "F"
    if arr.dtype == np.uint8:
        return arr, "L"
    if arr.dtype.kind in "iu":
        return arr, "I"
    raise CvfastError(f"{path}: TIFF of pixel type {arr.dtype} is not supported; convert it to 16-bit unsigned grey")


def read_raster(path: str | os.PathLike) -> Mammogram:
    """Read a PNG/TIFF/PGM/JPEG as uint16 (8-bit data scaled by 257, colour converted to grey, floats scaled to their range)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "1"):
                im = im.convert("L")
                mode = "L"
            arr = np.array(im)
    except UnidentifiedImageError:
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise CvfastError(f"{path}: not an image file PIL can identify") from None
        arr, mode = _read_tiff(path)
    except (OSError, SyntaxError, ValueError) as e:
        raise CvfastError(f"{path}: unreadable image ({e})") from None
    if mode == "L":
        pixels = arr.astype(np.uint16) * 257
    elif arr.dtype == np.uint16:
        pixels = arr
    elif mode in ("I", "I;16", "I;16B", "I;16L"):
        if arr.min() < 0 or arr.max() > 65535:
            raise CvfastError(f"{path}: 32-bit integer values {int(arr.min())}..{int(arr.max())} do not fit 16 bits; convert it to 16-bit first")
        pixels = arr.astype(np.uint16)
    elif mode == "F":
        _check_finite(arr, path)
        lo, hi = float(arr.min()), float(arr.max())
        pixels = _to_uint16(arr, lo, hi)
    else:
        raise CvfastError(f"{path}: unsupported image mode {mode}")
    if pixels.ndim != 2:
        raise CvfastError(f"{path}: expected a grey-level image, got shape {pixels.shape}")
    return Mammogram(pixels=pixels, source=str(path))


def resize(pixels: np.ndarray, size: tuple[int, int] = WORKING_SIZE) -> np.ndarray:
    """Resize a grey image to (height, width), aspect ignored as in the paper; antialiased when shrinking."""
    h, w = size
    if pixels.shape == (h, w):
        return pixels
    k = min(pixels.shape[0] // h, pixels.shape[1] // w)
    if k >= 2:
        # Box-average by the integer factor first (cv2's INTER_AREA has an exact fast path for integer factors,
        # 3x faster than at a fractional one); the remaining factor is below 2, where bicubic needs no
        # antialiasing. At most k-1 edge rows/columns are dropped to make the factor exact.
        hh, ww = pixels.shape[0] // k * k, pixels.shape[1] // k * k
        pixels = cv2.resize(pixels[:hh, :ww], (ww // k, hh // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(pixels, (w, h), interpolation=cv2.INTER_CUBIC)  # saturates into the dtype's range


def resize_mask(mask: np.ndarray, size: tuple[int, int] = WORKING_SIZE) -> np.ndarray:
    """Resize a binary mask (any dtype, nonzero = lesion) to (height, width) as uint8 0/255."""
    frac = resize((mask > 0).astype(np.uint8) * 255, size)
    out = (frac >= 128).astype(np.uint8) * 255
    if not out.any() and mask.any():  # a tiny lesion must not vanish when shrunk
        out[np.unravel_index(np.argmax(frac), frac.shape)] = 255
    return out


def write_png(path: str | os.PathLike, pixels: np.ndarray, compression: int = 0) -> None:
    """Write a uint16 (or uint8) grey image as PNG, atomically.

    The cache is written uncompressed by default: at 1152x896 that is 3 ms instead of 19-56 ms per image
    (zlib level 1) for 35% more disk, and it is read back faster every training epoch (BENCHMARKS.md).
    """
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_png expects uint8 or uint16, got {pixels.dtype}")
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE if compression == 0 else cv2.IMWRITE_PNG_FILTER_SUB]
    ok, buf = cv2.imencode(".png", pixels, params)
    if not ok:
        raise CvfastError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes(), cache=True)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a cache PNG exactly as written (uint16 or uint8)."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise CvfastError(f"{path}: cannot read cached PNG")
    return arr


def mean_grey(paths: list[str], max_files: int = 2000, seed: int = 0) -> float:
    """Mean grey value in [0, 1] over (a deterministic sample of) the given 16-bit files: training files only."""
    if not paths:
        raise CvfastError("no training images to compute the mean grey value from")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), min(max_files, len(paths)), replace=False)
    total, count = 0.0, 0
    for i in sorted(pick):
        a = read_png(paths[i])
        total += float(a.sum(dtype=np.float64)) / (65535.0 if a.dtype == np.uint16 else 255.0)
        count += a.size
    return total / count
