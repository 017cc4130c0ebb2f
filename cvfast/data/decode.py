"""A DICOM's pixel data decoded by the fastest measured backend for its transfer syntax, with identical pixels.

pydicom picks among its installed plugins (pylibjpeg-openjpeg, -libjpeg, -rle, pyjpegls) on its own; imagecodecs
wraps the same codec libraries (OpenJPEG, libjpeg-turbo / liblj92, CharLS) without pydicom's per-frame buffer
handling; dicomsdl reads and decodes the file in C++ (its own parser, so only for files on disk).
`bench/decode_throughput.py` measures both on the same files; `FASTEST` holds its verdict (BENCHMARKS.md), and `tests/test_read.py` checks that every backend gives the same pixels.
"""

from __future__ import annotations

from typing import Callable

import dicomsdl
import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    RLELossless,
)

# imagecodecs' decoder for each encapsulated syntax it reads
IMAGECODECS: dict[str, Callable[[bytes], np.ndarray]] = {
    JPEG2000Lossless: imagecodecs.jpeg2k_decode, JPEG2000: imagecodecs.jpeg2k_decode,
    JPEGLosslessSV1: imagecodecs.ljpeg_decode, JPEGLossless: imagecodecs.ljpeg_decode,
    JPEGLSLossless: imagecodecs.jpegls_decode, JPEGLSNearLossless: imagecodecs.jpegls_decode,
}
BACKENDS = ("pydicom", "imagecodecs", "dicomsdl")
# the measured choice per transfer syntax (bench/decode_throughput.py, BENCHMARKS.md; medians of 18 decodes): dicomsdl
# for RLE (1.4x pydicom), JPEG 2000 (1.1x) and JPEG Lossless (4.8x, imagecodecs 3.8x), imagecodecs for JPEG-LS (3.8x)
FASTEST: dict[str, str] = {RLELossless: "dicomsdl", JPEG2000Lossless: "dicomsdl", JPEG2000: "dicomsdl", JPEGLosslessSV1: "dicomsdl",
                           JPEGLossless: "dicomsdl", JPEGLSLossless: "imagecodecs", JPEGLSNearLossless: "imagecodecs"}


def decode(ds: pydicom.Dataset, backend: str | None = None) -> np.ndarray:
    """The stored pixel values of a single-frame grey DICOM (before any LUT), by `backend` or the fastest for its syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    backend = backend or FASTEST.get(syntax, "pydicom")
    if backend == "imagecodecs" and syntax in IMAGECODECS and _plain(ds):
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        arr = IMAGECODECS[syntax](frame)
        if arr.shape == (ds.Rows, ds.Columns):
            return _stored_bits(arr, ds)
    elif backend == "dicomsdl" and isinstance(ds.filename, str) and _plain(ds):
        arr = dicomsdl.open(str(ds.filename)).pixelData(storedvalue=True)
        if arr.shape == (ds.Rows, ds.Columns):
            return _stored_bits(arr, ds)
    elif backend not in BACKENDS:
        raise ValueError(f"decode backend {backend!r}: expected one of {BACKENDS}")
    return ds.pixel_array


def _stored_bits(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Unsigned pixels with the bits above BitsStored cleared, as pydicom gives them: some files carry garbage there (PS3.5 8.1.1
    says those bits are not pixel data), which the direct decoders keep and which would saturate the image."""
    arr = arr.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16, copy=False)
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    # pydicom leaves JPEG 2000 and JPEG-LS alone (their codestream's own precision rules; a 14-bit stream in a 12-bit
    # header keeps its 14 bits), so clearing there would make the decoders disagree
    if ds.file_meta.TransferSyntaxUID in JPEG2000TransferSyntaxes + JPEGLSTransferSyntaxes:
        return arr
    if bits < ds.BitsAllocated:
        arr = np.bitwise_and(arr, np.array((1 << bits) - 1, arr.dtype), out=arr if arr.flags.writeable else None)
    return arr


def _plain(ds: pydicom.Dataset) -> bool:
    """One unsigned grey frame: what the direct path handles (anything else goes through pydicom)."""
    return (int(ds.get("NumberOfFrames", 1) or 1) == 1 and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("PixelRepresentation", 0)) == 0 and int(ds.get("BitsAllocated", 16)) in (8, 16))
