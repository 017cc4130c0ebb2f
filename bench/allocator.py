"""Benchmark: the memory allocator under CPU training -- glibc's default against glibc tunables, jemalloc and tcmalloc.

The same short `cvfast whole` (the demo's data and recipe, --epochs-scale 0.1, a fresh --out each run) under each
allocator, run after run in turn (ABAB...), so drift on the machine touches every allocator alike; wall, user and sys
time and peak memory of the child process (os.wait4), best and median of --runs. The figure: wall-clock ratio to glibc's
default measured in the same run. What it decides: `cvfast.allocator.DEFAULT`, what the CLI runs under unless CVFAST_ALLOCATOR says otherwise.

    python bench/allocator.py [--runs 3]       # ~1 min a run on 2 idle cores
    python bench/allocator.py --large          # + peak memory of the test suite's 1024x1024 VGG-heatmap training (~13 min a run)

--large decides whether a faster allocator is safe as the default: a heap that is never given back must not grow far
past glibc's at the paper's sizes (the tuned glibc did: killed past 18 GB in the test suite).

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
from cvfast.allocator import DEFAULT, DONE, find_library  # noqa: E402

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
    if not (data / "data" / "ddsm" / "patches_s10" / "patchset.json").is_file():  # the demo writes OUT/data/ddsm
        cli("demo", "--out", str(data), "--no-train", env=env)
    if not (model / "model.json").is_file():
        cli("patch", "--data", str(data / "data" / "ddsm" / "patches_s10"), "--recipe", "demo-patch", "--epochs-scale", "0.1",
            "--out", str(model), env=env)
    return data / "data" / "ddsm", model


LARGE = ("glibc (default)", "jemalloc, no decay")  # the default and the candidate (the tuned glibc was killed at this size)


def large_runs(data: Path, model: Path) -> dict[str, dict]:
    """One 1024x1024 VGG-heatmap training (tests/test_cli.py's) per allocator in LARGE: its peak memory; resumes."""
    path = WORK / "large.json"
    results: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
    for name in LARGE:
        if name in results or name not in variants():
            continue
        results[name] = cli("whole", "--patch", str(model), "--data", str(data), "--recipe", "whole-vgg-heatmap", "--size", "1024x1024",
                            "--bs", "8", "--quick", "--epochs-scale", "0.005", "--out", str(WORK / "large"), "--no-resume", env=variants()[name])
        path.write_text(json.dumps(results, indent=1))
        print(f"1024x1024: {name}: peak {results[name]['maxrss_mib']:.0f} MiB", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="also the 1024x1024 VGG-heatmap training's peak memory per allocator")
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
    if args.large:
        large = large_runs(data, model)
        lines += ["", "The test suite's 1024x1024 VGG-heatmap training (`cvfast whole --recipe whole-vgg-heatmap --size 1024x1024 --bs 8 "
                  "--quick --epochs-scale 0.005`), one run each: peak memory is what decides a default.", "",
                  "| allocator | wall s | user s | sys s | CPU s (user + sys) | peak MiB |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['wall']:.0f} | {r['user']:.0f} | {r['sys']:.0f} | {r['user'] + r['sys']:.0f} | {r['maxrss_mib']:.0f} |"
                  for name, r in large.items()]
    lines += ["", f"The CLI runs under `cvfast.allocator.DEFAULT` (now {DEFAULT!r}, where installed; else glibc's own). The tuned glibc "
              "is not the default: it ran a 1024x1024 training out of memory in the test suite. `CVFAST_ALLOCATOR=system` opts out; "
              f"`=glibc-tuned`, `=jemalloc` or `=tcmalloc` choose (`{DONE}` tells a child which it got)."]
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
