"""Shared by the bench scripts: timing, and writing a benchmark's section into BENCHMARKS.md between its markers."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path
from typing import Callable

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure is a ratio against a baseline measured in the same run.\n\n"


def today() -> str:
    """ISO date of the run."""
    return str(datetime.date.today())


def machine() -> str:
    """Cores and processor of this machine."""
    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"


def markers(name: str) -> tuple[str, str]:
    """The begin/end markers of a benchmark's section."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section of benchmark `name` in BENCHMARKS.md with body."""
    begin, end = markers(name)
    text = f"{begin}\n{body.strip()}\n{end}"
    old = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    new = old[: old.index(begin)] + text + old[old.index(end) + len(end):] if begin in old else old.rstrip() + "\n\n" + text + "\n"
    BENCHMARKS.write_text(new)


def publish(name: str, lines: list[str], write: bool = True) -> None:
    """Print a benchmark's Markdown lines and, unless write is False, put them into BENCHMARKS.md."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(name, text)


if __name__ == "__main__":  # python -m bench._results NAME FILE: put a section saved elsewhere (--md-out) into BENCHMARKS.md
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench._results NAME SECTION.md")
    write_section(sys.argv[1], Path(sys.argv[2]).read_text())
    print(f"{BENCHMARKS}: section {sys.argv[1]} updated")


def best_rate(fn: Callable[[], object], n: int, repeats: int = 1) -> float:
    """Images per second of fn() over n images: the best of `repeats` timed runs (the least disturbed one)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / min(times)
