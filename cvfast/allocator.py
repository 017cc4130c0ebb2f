"""The memory allocator the CLI runs under: jemalloc with its decay off where it is installed (the default), else glibc's
as it comes; glibc tuned to keep freed memory (CVFAST_ALLOCATOR=glibc-tuned) or tcmalloc on request.

PyTorch's CPU training allocates and frees large tensors every step; glibc's malloc returns that memory to the kernel
and takes it back again, page fault by page fault (sys time). jemalloc with its decay switched off keeps and reuses
them; so does glibc told not to trim its heap and to serve blocks up to 1 GiB from it (GLIBC_TUNABLES). bench/allocator.py
measured both ~1.3x faster on a short CPU training at 256x192, and at 1024x1024 (the test suite's VGG-heatmap training)
jemalloc peaked at 14.8 GB against glibc's 14.1 GB while spending 22 s in the kernel instead of 800 s (BENCHMARKS.md).
The tuned glibc is not the default: at that size its heap fragmented, was never trimmed, and grew past 18 GB until the
kernel killed it. `DEFAULT` is what `auto` means; CVFAST_ALLOCATOR=system keeps the system's.
The CLI re-executes itself once with the setting in its environment (LD_PRELOAD and MALLOC_CONF are read when a
process starts, which no Python API can change after the fact -- hence this module). A leaf: imports nothing of cvfast.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path

ENV = "CVFAST_ALLOCATOR"  # auto (default) | glibc-tuned | jemalloc | tcmalloc | system
DONE = "_CVFAST_ALLOCATOR"  # set in the re-executed process: which allocator it runs under
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
GLIBC_TUNED = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=1073741824:glibc.malloc.top_pad=268435456"
# measured: jemalloc's default decay returns pages as glibc does (slower); no decay keeps them (bench/allocator.py)
SETTINGS = {"glibc-tuned": {"GLIBC_TUNABLES": GLIBC_TUNED}, "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
            "tcmalloc": {}}
CHOICES = ("auto", "system", *SETTINGS)
DEFAULT: str | None = "jemalloc"  # where installed (apt-get install libjemalloc2); the tuned glibc ran out of memory at 1024x1024
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_library(name: str) -> str | None:
    """The path of an allocator's shared library, or None when it is not installed."""
    for file in LIBRARIES.get(name, ()):
        for folder in SEARCH:
            if (Path(folder) / file).is_file():
                return str(Path(folder) / file)
    found = ctypes.util.find_library(name) if name in LIBRARIES else None
    return found if found and Path(found).is_absolute() else None


def available(name: str) -> bool:
    """Whether an allocator can run here: the tuned glibc where the C library is glibc, the others when installed."""
    return platform.libc_ver()[0] == "glibc" if name == "glibc-tuned" else find_library(name) is not None


def wanted() -> str | None:
    """The allocator to preload (None: the system's): CVFAST_ALLOCATOR, else the default when installed."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice not in CHOICES:
        raise SystemExit(f"error: {ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "auto" and any("malloc" in Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()):
        return None  # the user preloads an allocator of their own: the default does not stack another in front of it
    name = DEFAULT if choice == "auto" else choice
    return name if name and available(name) else None


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m cvfast ARGV` with the allocator preloaded (once; nothing when none is wanted)."""
    if DONE in os.environ:
        return
    name = wanted()
    if name is None:
        return
    env = {**os.environ, DONE: name, **SETTINGS[name]}
    for var, sep in (("GLIBC_TUNABLES", ":"), ("MALLOC_CONF", ",")):  # the user's own settings come last: theirs win
        if var in SETTINGS[name] and os.environ.get(var):
            env[var] = f"{SETTINGS[name][var]}{sep}{os.environ[var]}"
    if name in LIBRARIES:
        env["LD_PRELOAD"] = " ".join(p for p in (find_library(name), os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "cvfast", *argv], env)


def current() -> str:
    """The allocator this process runs under, for the log."""
    return os.environ.get(DONE, "system")
