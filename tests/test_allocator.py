"""The CLI's memory allocator: preloaded by re-executing once when asked for, refused clearly when unknown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cvfast.allocator import find_library


def _cvfast(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvfast", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", **env})


@pytest.mark.skipif(find_library("jemalloc") is None, reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_jemalloc_is_preloaded_into_the_re_executed_process():
    r = _cvfast("--verbose", "recipes", "list", CVFAST_ALLOCATOR="jemalloc")
    assert r.returncode == 0, r.stderr
    assert "memory allocator: jemalloc" in r.stderr and "mias-cpu-patch" in r.stdout


def test_the_system_allocator_is_kept_when_asked_and_an_unknown_one_refused():
    r = _cvfast("--verbose", "recipes", "list", CVFAST_ALLOCATOR="system")
    assert r.returncode == 0 and "memory allocator: system" in r.stderr
    bad = _cvfast("recipes", "list", CVFAST_ALLOCATOR="hoard")
    assert bad.returncode != 0 and "CVFAST_ALLOCATOR='hoard'" in bad.stderr and "Traceback" not in bad.stderr
