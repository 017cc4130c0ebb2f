"""Benchmark: `prepare` throughput on realistic-size 16-bit DICOMs vs a naive loop and vs the decode floor.

All three are measured in the same run on the same files (half RLE Lossless, half uncompressed, ~4000x3000):
- naive: one process; pydicom decode, scikit-image cubic resize with anti-aliasing, 16-bit PNG via scikit-image;
- decode floor: pydicom decode only, spread over the same worker processes cvfast uses;
- cvfast: `convert_all` (decode + LUTs + resize + atomic 16-bit PNG write + record), same workers.
Results (images/s and ratios) are written into BENCHMARKS.md between this benchmark's markers.

    python bench/prepare_throughput.py [--images 32] [--size 4000x3000] [--workers N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import publish  # noqa: E402
from cvfast.data.convert import ImageJob, convert_all  # noqa: E402
from cvfast.data.read import WORKING_SIZE  # noqa: E402
from cvfast.data.synth.render import (  # noqa: E402
    LesionSpec,
    _rng,
    make_dicom,
    parse_size,
    render_image,
    to_ddsm_pixels,
)
from cvfast.util.parallel import default_workers, parallel_map  # noqa: E402


def make_files(folder: Path, n: int, unique: int, size: tuple[int, int]) -> list[Path]:
    """n DICOMs, half RLE Lossless, half uncompressed, from `unique` rendered mammograms (hard links beyond that)."""
    marker = folder / f"done-{n}-{unique}-{size[0]}x{size[1]}"
    files = [folder / f"{i:03d}_{kind}.dcm" for i in range(n // 2) for kind in ("rle", "raw")]
    if marker.is_file():
        return files
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n // 2):
        if i >= unique:  # rendering a 12-megapixel mammogram takes a second; decoding a copy costs the same
            for kind in ("rle", "raw"):
                os.link(folder / f"{i % unique:03d}_{kind}.dcm", folder / f"{i:03d}_{kind}.dcm")
            continue
        rng = _rng(0, "bench", i)
        lesion = LesionSpec("mass" if i % 2 else "calc", bool(i % 3 == 0), 0.045)
        signal, *_ = render_image(rng, size[0], size[1], "LR"[i % 2], ("CC", "MLO")[i % 2], [lesion], 0.5)
        px = to_ddsm_pixels(rng, signal, with_label=True)
        for kind in ("rle", "raw"):
            make_dicom(folder / f"{i:03d}_{kind}.dcm", px, patient_id=f"B{i}", syntax=RLELossless if kind == "rle" else ExplicitVRLittleEndian)
        print(f"  generated {2 * (i + 1)}/{n}", end="\r", flush=True)
    marker.touch()
    return files


def decode_only(path: str) -> tuple[int, int]:
    """The floor: read and decode the pixel data, nothing else."""
    return pydicom.dcmread(path).pixel_array.shape


def naive_one(path: Path, out: Path) -> None:
    """What a straightforward script does: pydicom, skimage cubic+antialias resize, skimage PNG write."""
    from skimage.io import imsave
    from skimage.transform import resize

    px = pydicom.dcmread(path).pixel_array
    small = resize(px, WORKING_SIZE, order=3, anti_aliasing=True, preserve_range=True)
    imsave(out / f"{path.stem}.png", np.clip(small, 0, 65535).astype(np.uint16), check_contrast=False)


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over repeats."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--unique", type=int, default=16, help="distinct rendered mammograms among the files")
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-images", type=int, default=None, help="time the (slow) naive loop on only this many of the files")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    size = parse_size(args.size)
    print(f"preparing {args.images} synthetic DICOMs of {size[0]}x{size[1]} ...")
    files = make_files(args.out / "dicoms", args.images, args.unique, size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache so that every method reads from memory
        f.read_bytes()
    n = len(files)

    naive_files = files[: args.naive_images or n]
    naive_dir = args.out / "naive"
    naive_dir.mkdir(parents=True, exist_ok=True)
    t_naive = timed(lambda: [naive_one(f, naive_dir) for f in naive_files], 1)
    floor = timed(lambda: list(parallel_map(decode_only, [str(f) for f in files], args.workers, "decode")), args.repeats)

    def run_cvfast() -> None:
        dest = args.out / "cvfast"
        shutil.rmtree(dest, ignore_errors=True)
        jobs = [ImageJob(f.stem, str(f)) for f in files]
        records, rejects = convert_all(jobs, dest, WORKING_SIZE, args.workers)
        assert len(records) == n and not rejects, rejects

    t_cv = timed(run_cvfast, args.repeats)
    def run_cvfast_one_process() -> None:
        shutil.rmtree(args.out / "cvfast1", ignore_errors=True)
        convert_all([ImageJob(f.stem, str(f)) for f in files], args.out / "cvfast1", WORKING_SIZE, 1)

    t_cv1 = timed(run_cvfast_one_process, 1)
    rates = {"naive": len(naive_files) / t_naive, "floor": n / floor, "cvfast": n / t_cv, "cvfast1": n / t_cv1}
    rows = [
        ("naive loop (1 process: pydicom + skimage cubic/antialias + skimage PNG)", rates["naive"], 1),
        (f"decode floor (pydicom decode only, {args.workers} processes)", rates["floor"], args.workers),
        ("cvfast prepare, 1 process", rates["cvfast1"], 1),
        (f"cvfast prepare, {args.workers} processes", rates["cvfast"], args.workers),
    ]
    lines = [
        f"### prepare throughput ({datetime.date.today()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()})",
        "",
        f"{n} synthetic 16-bit DICOMs of {size[0]}x{size[1]} ({n // 2} RLE Lossless, {n // 2} uncompressed, {args.unique} distinct images, "
        f"{mb:.0f} MB, page cache warm) "
        f"to the {WORKING_SIZE[0]}x{WORKING_SIZE[1]} 16-bit PNG cache. Median of {args.repeats} runs for the decode floor and "
        f"parallel cvfast, one run for the others; the naive loop on {len(naive_files)} of the files. "
        "Reproduce: `python bench/prepare_throughput.py`.",
        "",
        "| method | images/s | vs naive loop | decode floor / this |",
        "|---|---:|---:|---:|",
    ]
    for name, rate, _ in rows:
        lines.append(f"| {name} | {rate:.2f} | {rate / rates['naive']:.1f}x | {rates['floor'] / rate:.2f}x |")
    lines += ["", f"Targets: >= 3x the naive loop (measured {rates['cvfast'] / rates['naive']:.1f}x); within 1.5x of the decode "
              f"floor on the same cores (measured {rates['floor'] / rates['cvfast']:.2f}x)."]
    publish("prepare_throughput", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
