"""The memory allocator the CLI runs under: the system's, or (CVFAST_ALLOCATOR=jemalloc|tcmalloc) one preloaded.

PyTorch's CPU training allocates and frees large tensors every step; glibc's malloc returns that memory to the kernel
and takes it back again, page fault by page fault (sys time). jemalloc with its decay switched off keeps it.
The CLI re-executes itself once with the library preloaded (LD_PRELOAD must be set before the process starts, which
no Python API can do after the fact -- hence this module). `DEFAULT` is what `auto` means: it becomes an allocator
only once bench/allocator.py has measured it faster on this stack (BENCHMARKS.md); until then `auto` is the system's.
Debian/Ubuntu: `apt-get install libjemalloc2` (or libtcmalloc-minimal4). A leaf: it imports nothing of cvfast.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "CVFAST_ALLOCATOR"  # auto (default) | jemalloc | tcmalloc | system
DONE = "_CVFAST_ALLOCATOR"  # set in the re-executed process: which allocator it runs under
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
# measured: jemalloc's default decay returns pages as glibc does (slower); no decay keeps them (bench/allocator.py)
SETTINGS = {"jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}, "tcmalloc": {}}
DEFAULT: str | None = None  # not yet measured on this stack: bench/allocator.py decides
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_library(name: str) -> str | None:
    """The path of an allocator's shared library, or None when it is not installed."""
    for file in LIBRARIES[name]:
        for folder in SEARCH:
            if (Path(folder) / file).is_file():
                return str(Path(folder) / file)
    found = ctypes.util.find_library(name)
    return found if found and Path(found).is_absolute() else None


def wanted() -> str | None:
    """The allocator to preload (None: the system's): CVFAST_ALLOCATOR, else the default when installed."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice not in ("auto", *LIBRARIES):
        raise SystemExit(f"error: {ENV}={choice!r}: expected auto, system, {', '.join(LIBRARIES)}")
    name = DEFAULT if choice == "auto" else choice
    return name if name and find_library(name) else None


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m cvfast ARGV` with the allocator preloaded (once; nothing when none is wanted)."""
    if DONE in os.environ:
        return
    name = wanted()
    if name is None:
        return
    lib = find_library(name)
    env = {**os.environ, DONE: name, **SETTINGS[name],
           "LD_PRELOAD": " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "cvfast", *argv], env)


def current() -> str:
    """The allocator this process runs under, for the log."""
    return os.environ.get(DONE, "system")
