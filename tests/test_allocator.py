"""The CLI's memory allocator: preloaded by re-executing once when asked for, refused clearly when unknown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cvfast.allocator as allocator
from cvfast.allocator import GLIBC_TUNED, available, find_library


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
    assert bad.returncode != 0 and "expected one of auto, system, glibc-tuned, jemalloc, tcmalloc" in bad.stderr
    assert bad.returncode != 0 and "CVFAST_ALLOCATOR='hoard'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(not available("glibc-tuned"), reason="the C library is not glibc")
def test_the_default_is_jemalloc_where_installed_and_the_tuned_glibc_runs_only_when_asked():
    """glibc-tuned needs nothing installed but is opt-in (it ran a 1024x1024 training out of memory); a plain run gets
    jemalloc without decay where libjemalloc is installed, else glibc's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("CVFAST_ALLOCATOR", allocator.DONE, "LD_PRELOAD", "MALLOC_CONF")}
    default = "jemalloc" if find_library("jemalloc") else "system"
    for asked, says in ((None, f"memory allocator: {default}"), ("auto", f"memory allocator: {default}"),
                        ("glibc-tuned", "memory allocator: glibc-tuned")):
        r = subprocess.run([sys.executable, "-m", "cvfast", "--verbose", "recipes", "list"], capture_output=True, text=True, timeout=300,
                           env={**env, **({"CVFAST_ALLOCATOR": asked} if asked else {})})
        assert r.returncode == 0 and says in r.stderr, r.stderr


@pytest.mark.skipif(not available("glibc-tuned"), reason="the C library is not glibc")
def test_the_re_executed_environment_keeps_the_users_own_settings(monkeypatch):
    """GLIBC_TUNABLES the user set come after cvfast's (the later setting wins in glibc); LD_PRELOAD is left alone."""
    seen = {}
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: seen.update(env=env, argv=argv))
    monkeypatch.delenv(allocator.DONE, raising=False)
    monkeypatch.setenv("CVFAST_ALLOCATOR", "glibc-tuned")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    allocator.reexec_with_allocator(["recipes", "list"])
    env = seen["env"]
    assert env["GLIBC_TUNABLES"] == f"{GLIBC_TUNED}:glibc.malloc.arena_max=2" and env["LD_PRELOAD"] == "/opt/mine.so"
    assert env[allocator.DONE] == "glibc-tuned" and seen["argv"][-2:] == ["recipes", "list"]


def test_the_users_malloc_conf_follows_cvfasts_and_their_own_preloaded_allocator_is_left_alone(monkeypatch):
    """jemalloc reads MALLOC_CONF left to right (later options win); an allocator the user preloads is not stacked over."""
    seen = {}
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: seen.update(env=env))
    monkeypatch.setattr(allocator, "available", lambda name: True)
    monkeypatch.setattr(allocator, "find_library", lambda name: f"/usr/lib/lib{name}.so.2")
    monkeypatch.delenv(allocator.DONE, raising=False)
    monkeypatch.setenv("CVFAST_ALLOCATOR", "jemalloc")
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    allocator.reexec_with_allocator(["recipes", "list"])
    assert seen["env"]["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:2"
    seen.clear()
    monkeypatch.setenv("CVFAST_ALLOCATOR", "auto")
    monkeypatch.setattr(allocator, "DEFAULT", "jemalloc")
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libmimalloc.so")
    allocator.reexec_with_allocator(["recipes", "list"])
    assert seen == {}  # no re-exec: the user's mimalloc stays the allocator
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libfaketime.so")
    allocator.reexec_with_allocator(["recipes", "list"])
    assert seen["env"]["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2 /opt/lib/libfaketime.so"
