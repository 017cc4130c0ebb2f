"""Benchmark: DICOM decode images/s per transfer syntax and backend, on the same files; prepare on JPEG 2000 vs its floor.

The same rendered mammograms are written in each lossless transfer syntax the public sets use (uncompressed, RLE
Lossless: CBIS-DDSM; JPEG 2000 Lossless: RSNA site 1, VinDr; JPEG Lossless process 14: RSNA site 2; JPEG-LS), then
each backend of cvfast.data.decode decodes every file on one core (pixels checked identical to the uncompressed
file). The fastest per syntax is what `cvfast.data.decode.FASTEST` should say. Then `convert_all` (decode + LUT +
resize + PNG write) runs over the JPEG 2000 files, against the decode floor on the same worker processes.

    python bench/decode_throughput.py [--images 6] [--size 3328x2560] [--workers 2] [--copies 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import machine, publish, today  # noqa: E402
from cvfast.data.convert import ImageJob, convert_all  # noqa: E402
from cvfast.data.decode import BACKENDS, FASTEST, IMAGECODECS, decode  # noqa: E402
from cvfast.data.read import WORKING_SIZE  # noqa: E402
from cvfast.data.synth.render import (  # noqa: E402
    DX_MAMMO_PRESENTATION,
    ENCODERS,
    LesionSpec,
    _rng,
    make_dicom,
    parse_size,
    render_image,
)
from cvfast.util.parallel import default_workers, parallel_map  # noqa: E402

NAME = "decode"

def make_files(folder: Path, n: int, size: tuple[int, int]) -> dict[str, list[Path]]:
    """n 12-bit mammograms in every transfer syntax make_dicom writes (reused when already there)."""
    files = {ts: [folder / f"{ts}-{i}.dcm" for i in range(n)] for ts in ENCODERS}
    marker = folder / f"done-{n}-{size[0]}x{size[1]}"
    if marker.is_file():
        return files
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n):
        rng = _rng(0, "decode-bench", i)
        signal, *_ = render_image(rng, *size, "LR"[i % 2], ("CC", "MLO")[i % 2], [LesionSpec("mass", bool(i % 2), 0.045)], 0.5)
        px = (np.clip(0.05 + 0.62 * np.clip(signal, 0, None) ** 0.7, 0, 1) * 4095 + 0.5).astype(np.uint16)
        for ts in ENCODERS:
            make_dicom(files[ts][i], px, patient_id=f"D{i}", sop_class=DX_MAMMO_PRESENTATION, bits_stored=12, syntax=ts)
        print(f"  generated {i + 1}/{n}", end="\r", flush=True)
    marker.touch()
    return files

def decode_file(args: tuple[str, str]) -> tuple[int, int]:
    """Decode one file with one backend (the floor of prepare)."""
    path, backend = args
    return decode(pydicom.dcmread(path), backend).shape

def main() -> None:
    """Measure every (syntax, backend) pair, check pixels, then prepare on JPEG 2000 against its floor."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", default="3328x2560", help="source image size (RSNA and VinDr are 2-4k pixels tall)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3, help="decodes of every file per backend (the median is reported)")
    ap.add_argument("--copies", type=int, default=8, help="hard links of each JPEG 2000 file in the prepare measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "decode")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    size = parse_size(args.size)
    files = make_files(args.out / "dicoms", args.images, size)
    reference = [pydicom.dcmread(f).pixel_array for f in files[pydicom.uid.ExplicitVRLittleEndian]]
    rows, fastest = [], {}
    for ts, paths in files.items():
        rates = {}
        for backend in BACKENDS:
            if backend == "imagecodecs" and ts not in IMAGECODECS:
                continue
            times = []
            for _ in range(args.repeats):
                for path, ref in zip(paths, reference):
                    t = time.perf_counter()  # from the file, as prepare reads it: header parse + decode
                    px = decode(pydicom.dcmread(path), backend)
                    times.append(time.perf_counter() - t)
                    assert np.array_equal(px, ref), f"{backend} decodes {ts.name} differently"
            rates[backend] = 1 / statistics.median(times)
        best = max(rates, key=rates.get)
        fastest[ts] = best
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        for backend, rate in rates.items():
            rows.append(f"| {ts.name} | {mb:.1f} | {backend} | {rate:.2f} | {rate / rates['pydicom']:.2f} |{' fastest' if backend == best else ''} |")
    # prepare against its floor on enough files that the worker processes' start-up does not dominate: hard links
    j2k = []
    for i, f in enumerate(files[pydicom.uid.JPEG2000Lossless]):
        for c in range(args.copies):
            link = f.with_name(f"{f.stem}-copy{c}.dcm")
            if not link.exists():
                link.hardlink_to(f)
            j2k.append(link)
    t = time.perf_counter()
    list(parallel_map(decode_file, [(str(p), fastest[pydicom.uid.JPEG2000Lossless]) for p in j2k], args.workers, "decoding"))
    floor = len(j2k) / (time.perf_counter() - t)
    dest = args.out / "prepared"
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    records, rejects = convert_all([ImageJob(p.stem, str(p)) for p in j2k], dest, WORKING_SIZE, args.workers)
    prepare = len(j2k) / (time.perf_counter() - t)
    assert len(records) == len(j2k) and not rejects, rejects
    lines = [f"### DICOM decode per transfer syntax ({today()}, {machine()})", "",
             f"Reproduce: `python bench/decode_throughput.py --images {args.images} --size {args.size} --workers {args.workers} "
             f"--copies {args.copies} --repeats {args.repeats}`. "
             f"{args.images} synthetic 12-bit mammograms of {size[0]}x{size[1]}, the same pixels in each syntax; one core, median "
             "over every file decoded --repeats times, each from the file (pydicom's header parse + decode; dicomsdl parses the file itself), page cache warm; every decoded "
             "array checked equal to the uncompressed file's.", "",
             "| transfer syntax | MB per file | backend | images/s | vs pydicom | |", "|---|---:|---|---:|---:|---|", *rows, "",
             f"`prepare` on {len(j2k)} JPEG 2000 files ({args.copies} hard links of each; {args.workers} processes, to "
             f"{WORKING_SIZE[0]}x{WORKING_SIZE[1]}, worker start-up included in both): {prepare:.2f} images/s "
             f"against a decode floor of {floor:.2f} images/s on the same processes: prepare runs at {prepare / floor:.0%} of the floor. "
             "The synthetic images compress several times better than real mammograms (0.7 MB of JPEG 2000 here, ~5-10 MB for a "
             "real RSNA file), so real files decode slower; the ratios are what carries over. No GPU was lent to this run, so "
             "nvImageCodec's GPU JPEG 2000 decode is not measured."]
    disagree = [f"{ts.name}: measured {b}, FASTEST says {FASTEST.get(ts, 'pydicom')}" for ts, b in fastest.items() if FASTEST.get(ts, "pydicom") != b]
    lines += ["", "`cvfast.data.decode.FASTEST` " + ("agrees with every row of this run." if not disagree else
                                                   "differs from this run in: " + "; ".join(disagree) + " (ties within noise, or update it).")]
    publish(NAME, lines, write=not args.no_write)

if __name__ == "__main__":
    main()
