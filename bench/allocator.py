"""Benchmark: the memory allocator under CPU training -- glibc's default against glibc tunables, jemalloc and tcmalloc.

The same short `cvfast whole` (the demo's data and recipe, --epochs-scale 0.1, a fresh --out each run) under each
allocator, run after run in turn (ABAB...), so drift on the machine touches every allocator alike; wall, user and sys
time and peak memory of the child process (os.wait4), best and median of --runs. The figure: wall-clock ratio to glibc's
default measured in the same run. What it decides: `cvfast.allocator.DEFAULT`, what the CLI runs under unless CVFAST_ALLOCATOR says otherwise.

    python bench/allocator.py [--runs 3]       # ~1 min a run on 2 idle cores

Setup (synthetic data, patch set, a patch model) is made once under bench/out/allocator/ and reused; results resume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import publish  # noqa: E402
from bench._train import OUT, machine, reproduce, save_md, today  # noqa: E402
from cvfast.allocator import DONE, find_library  # noqa: E402

NAME = "allocator"
WORK = OUT / NAME


def variants() -> dict[str, dict[str, str]]:
    """Allocator name -> environment of the child (those whose library is installed)."""
    out = {"glibc (default)": {"CVFAST_ALLOCATOR": "system"},
           "glibc tunables (no trim, mmap at 1 GiB)": {"CVFAST_ALLOCATOR": "glibc-tuned"}}
    if find_library("jemalloc"):
        out["jemalloc, default decay"] = {"CVFAST_ALLOCATOR": "system", "LD_PRELOAD": find_library("jemalloc")}
        out["jemalloc, no decay"] = {"CVFAST_ALLOCATOR": "jemalloc"}
    if find_library("tcmalloc"):
        out["tcmalloc"] = {"CVFAST_ALLOCATOR": "tcmalloc"}
    return out


def cli(*args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -m cvfast ARGS` and return its wall, user, sys seconds and peak memory (MiB)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cvfast", *args], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"cvfast {' '.join(args)} failed:\n{err[-2000:]}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "maxrss_mib": usage.ru_maxrss / 1024}


def setup() -> tuple[Path, Path]:
    """The demo's data and a patch model, made once (under glibc: setup is not measured)."""
    data, model = WORK / "data", WORK / "patch"
    env = {"CVFAST_ALLOCATOR": "system"}
    if not (data / "ddsm" / "patches_s10" / "patchset.json").is_file():
        cli("demo", "--out", str(data), "--no-train", env=env)
    if not (model / "model.json").is_file():
        cli("patch", "--data", str(data / "data" / "ddsm" / "patches_s10"), "--recipe", "demo-patch", "--epochs-scale", "0.1",
            "--out", str(model), env=env)
    return data / "data" / "ddsm", model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--md-out", default=None)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data, model = setup()
    found = variants()
    results_path = WORK / "results.json"
    results: dict[str, list[dict]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for run in range(args.runs):
        for name, env in found.items():
            if len(results.get(name, [])) > run:
                continue  # done before a kill
            r = cli("whole", "--patch", str(model), "--data", str(data), "--recipe", "demo-whole", "--epochs-scale", "0.1",
                    "--out", str(WORK / "whole"), "--no-resume", env=env)
            results.setdefault(name, []).append(r)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"run {run + 1}: {name}: {r['wall']:.1f} s wall, {r['sys']:.1f} s sys", flush=True)
    base = min(r["wall"] for r in results["glibc (default)"])
    lines = [f"### Memory allocator under CPU training ({today()}, {machine()}, nothing else running)", "",
             f"Reproduce: `{reproduce('allocator.py', sys.argv[1:])}`. The same `cvfast whole` (demo data, recipe demo-whole, "
             f"--epochs-scale 0.1) under each allocator, {args.runs} runs each in turn; ratio = glibc's best wall time / this one's.", "",
             "| allocator | best wall s | median wall s | ratio to glibc | median user s | median sys s | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in results.items():
        med = lambda k: float(np.median([r[k] for r in rs]))  # noqa: E731
        best = min(r["wall"] for r in rs)
        lines.append(f"| {name} | {best:.1f} | {med('wall'):.1f} | {base / best:.2f}x | {med('user'):.1f} | {med('sys'):.1f} | {med('maxrss_mib'):.0f} |")
    lines += ["", f"The CLI runs under `cvfast.allocator.DEFAULT` (None: glibc's own, since the tuned glibc ran a 1024x1024 training out of "
              f"memory); `CVFAST_ALLOCATOR=glibc-tuned`, `=jemalloc` or `=tcmalloc` opt in (`{DONE}` tells a child which it got)."]
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
