"""Work over many items in worker processes, in order, with one progress bar (conversion, patch cutting, thumbnails)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

from cvfast.errors import CvfastError
from cvfast.util.progress import progress_bar


def default_workers() -> int:
    """Worker processes: one per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def parallel_map(fn: Callable, items: list, workers: int, description: str, chunksize: int = 1) -> Iterator:
    """Map fn over items in worker processes (or inline for workers<=1) with a rich progress bar, in order."""
    with progress_bar(enabled=bool(items)) as progress:
        task = progress.add_task(description, total=len(items))
        if workers <= 1 or len(items) <= 1:
            results: Iterable = map(fn, items)
            pool = None
        else:
            # fork is fast and works from unguarded scripts, but a parent that imported torch holds OpenMP threads
            # that fork would copy in a broken state: then spawn (which needs the usual __main__ guard in scripts)
            method = "spawn" if "torch" in sys.modules else "fork"
            pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context(method))
            results = pool.map(fn, items, chunksize=chunksize)
        try:
            for r in results:
                progress.advance(task)
                yield r
        except BrokenProcessPool:
            raise CvfastError(f"a worker process died while {description} (out of memory? try fewer --workers); "
                              "finished work is kept: re-run the same command to resume") from None
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
