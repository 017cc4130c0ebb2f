"""Benchmark: peak memory of `cvfast prepare` on realistic-size DICOMs at two dataset sizes -- bounded, not growing.

Measured in the same run on the same files (bench/prepare_throughput.py's make_files: 16-bit, ~4000x3000, half
RLE Lossless, half uncompressed, hard links beyond `--unique` distinct images):
- baselines: the bytes of one decoded image's pixel array (H x W x 2), and the peak RSS of a python process that
  imports what `cvfast prepare csv` imports and reads one RLE DICOM with read_mammogram (what every conversion worker holds at least);
- `cvfast prepare csv LABELS --out DATA --workers N` run as a child process on the first --small files and on all
  --large files, each into an empty DATA folder. Two figures per run: the largest single process's peak RSS, from
  the kernel (os.wait4's ru_maxrss: the maximum over the child and the workers it reaped, each its own high-water
  mark, exact), and the peak of the RSS summed over the process tree (psutil, sampled every --interval s; RSS counts
  pages a forked worker shares with its parent once per process) together with the PSS sum at the same instant
  (each shared page split between all the processes that map it -- other programs using the same libraries included --
  so roughly the tree's own footprint).
The ratio large/small must be ~1: prepare streams the images through a fixed pool of workers.
Results are written into BENCHMARKS.md between this benchmark's markers.

    python bench/prepare_memory.py [--small 16] [--large 64] [--unique 8] [--size 4000x3000] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import publish  # noqa: E402
from bench.prepare_throughput import make_files  # noqa: E402
from cvfast.data.read import WORKING_SIZE  # noqa: E402
from cvfast.data.synth.render import parse_size  # noqa: E402

MB = 1024 * 1024
# what `cvfast prepare csv` imports (its adapter is imported when the command runs)
BASELINE_IMPORTS = "import sys, cvfast.cli; from cvfast.data.ingest import prepare_csv; from cvfast.data.read import read_mammogram"


def tree_peak(cmd: list[str], interval: float) -> dict:
    """Run cmd as a child; return its peak RSS/PSS summed over the process tree (sampled), the kernel's largest
    single-process peak RSS (exact), the most processes seen at once, the wall time and the exit code."""
    t = time.perf_counter()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child never blocks on a full pipe
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = most = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:  # reaped here, so the kernel's accounting of this child and its reaped workers is ours alone
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        rss = pss = 0
        procs = [root]
        try:
            procs += root.children(recursive=True)
        except psutil.Error:
            pass
        for p in procs:
            try:
                m = p.memory_full_info()
            except psutil.Error:  # exited between the listing and the read
                continue
            rss, pss = rss + m.rss, pss + m.pss
        if rss > peak_rss:
            peak_rss, peak_pss = rss, pss
        most = max(most, len(procs))
        time.sleep(interval)
    log.seek(0)
    output = log.read().decode(errors="replace")
    log.close()
    return {"rss_sum": peak_rss / MB, "pss_sum": peak_pss / MB, "max_single": usage.ru_maxrss * 1024 / MB, "procs": most,
            "seconds": time.perf_counter() - t, "rc": proc.returncode, "output": output}


def run_prepare(files: list[Path], out: Path, workers: int, interval: float) -> dict:
    """`cvfast prepare csv` over files into an empty out/data; the tree's peaks, plus the images it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    labels = out / "labels.csv"
    pd.DataFrame({"path": [str(f) for f in files], "label": [i % 2 for i in range(len(files))],
                  "patient_id": [f"M{i // 2:03d}" for i in range(len(files))]}).to_csv(labels, index=False)
    cmd = [sys.executable, "-m", "cvfast", "prepare", "csv", str(labels), "--out", str(out / "data"), "--workers", str(workers)]
    res = tree_peak(cmd, interval)
    written = len(list((out / "data" / "images").glob("*.png")))
    if res["rc"] != 0 or written != len(files):
        raise SystemExit(f"prepare failed (exit {res['rc']}, {written}/{len(files)} images written):\n{res['output'][-3000:]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=16, help="files in the small dataset (the first of the large one's)")
    ap.add_argument("--large", type=int, default=64, help="files in the large dataset")
    ap.add_argument("--unique", type=int, default=8, help="distinct rendered mammograms among the files (hard links beyond)")
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--workers", type=int, default=2, help="prepare --workers")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between samples of the process tree")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memory")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    size = parse_size(args.size)
    if not 0 < args.small < args.large or args.small % 2 or args.large % 2:
        ap.error("need even file counts with 0 < --small < --large")
    print(f"preparing {args.large} synthetic DICOMs of {size[0]}x{size[1]} ...")
    files = make_files(args.out / "dicoms", args.large, args.unique, size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache (the files are not counted in any process's RSS)
        f.read_bytes()
    rle = next(f for f in files if f.stem.endswith("_rle"))

    print("baselines ...")
    imports = tree_peak([sys.executable, "-c", BASELINE_IMPORTS], args.interval)
    one = tree_peak([sys.executable, "-c", f"{BASELINE_IMPORTS}; read_mammogram(sys.argv[1])", str(rle)], args.interval)
    for res in (imports, one):
        if res["rc"] != 0:
            raise SystemExit(f"baseline process failed:\n{res['output'][-3000:]}")
    pixels = size[0] * size[1] * 2 / MB
    base = one["max_single"]
    runs = {}
    for n in (args.small, args.large):
        print(f"cvfast prepare csv, {n} files, {args.workers} workers ...")
        runs[n] = run_prepare(files[:n], args.out / f"prepare_{n}", args.workers, args.interval)

    rows = [(f"one decoded {size[0]}x{size[1]} 16-bit pixel array (H x W x 2 bytes)", pixels),
            ("python importing what `cvfast prepare csv` imports: peak RSS", imports["max_single"]),
            ("the same + read_mammogram of one RLE DICOM: peak RSS (baseline)", base)]
    for n, res in runs.items():
        rows += [(f"cvfast prepare csv, {n} files, --workers {args.workers}: largest single process (kernel peak RSS)", res["max_single"]),
                 (f"cvfast prepare csv, {n} files, --workers {args.workers}: peak RSS summed over the process tree (PSS sum at "
                  f"that instant: {res['pss_sum']:.0f} MB)", res["rss_sum"])]
    small, large = runs[args.small], runs[args.large]
    lines = [f"### prepare peak memory ({datetime.date.today()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()})", "",
             f"`cvfast prepare csv --workers {args.workers}` as a child process on {args.small} and on {args.large} synthetic 16-bit DICOMs "
             f"of {size[0]}x{size[1]} ({args.large // 2} RLE Lossless, {args.large // 2} uncompressed, {args.unique} distinct images, "
             f"{mb:.0f} MB for the {args.large}; page cache warm), each into an empty DATA folder at {WORKING_SIZE[0]}x{WORKING_SIZE[1]}. "
             f"Largest single process: the kernel's peak RSS of the child and the workers it reaped (exact); tree sum: RSS of "
             f"the child and all its descendants summed, sampled every {args.interval * 1000:.0f} ms (a shared page counts once per "
             f"process; PSS splits it). Reproduce: `python bench/prepare_memory.py`.", "",
             "| measurement | peak MB | vs baseline process | vs one decoded image |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {v:.0f} | {v / base:.2f}x | {v / pixels:.1f}x |" for name, v in rows]
    lines += ["", f"Bounded: {args.large} files / {args.small} files = {large['max_single'] / small['max_single']:.2f}x for the largest "
              f"process, {large['rss_sum'] / small['rss_sum']:.2f}x for the tree's RSS sum, {large['pss_sum'] / small['pss_sum']:.2f}x "
              f"for its PSS sum (target ~1: memory does not grow with the dataset). At most {max(r['procs'] for r in runs.values())} "
              f"processes at once (the command and its {args.workers} workers); wall time {small['seconds']:.1f} s and "
              f"{large['seconds']:.1f} s ({large['seconds'] / small['seconds']:.2f}x for {args.large / args.small:.0f}x the files)."]
    publish("prepare_memory", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
