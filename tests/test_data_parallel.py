"""Data-parallel settings that need no process group: loader workers per machine, the accelerate launcher's precision,
and the messages of failures a GPU run meets (the torchrun runs themselves are in test_distributed.py)."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

import cvfast.train.pipeline
import cvfast.train.runtime as runtime
from cvfast.cli import app
from cvfast.errors import CvfastError
from cvfast.train.runtime import Runtime


def test_gpu_loader_workers_share_this_machines_cores_among_its_processes_not_every_machines(monkeypatch):
    # 2 nodes of 2 GPUs... of 8: WORLD_SIZE counts all 16 processes, but only LOCAL_WORLD_SIZE = 2 share these 16 cores
    monkeypatch.setattr(runtime.Runtime, "torch_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    kwargs = Runtime().loader_kwargs()
    assert kwargs["num_workers"] == 7 and kwargs["pin_memory"]  # 16 cores / 2 processes, one left to each process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert Runtime().loader_kwargs()["num_workers"] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert Runtime().loader_kwargs()["num_workers"] == 8  # at most 8
    assert Runtime(workers=3).loader_kwargs()["num_workers"] == 3  # --workers decides


def test_cuda_out_of_memory_ends_in_advice_not_an_unexpected_error(s10, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
                                          "of which 1.06 GiB is free. Of the allocated memory 75.2 GiB is allocated by PyTorch")

    monkeypatch.setattr(cvfast.train.pipeline, "train_patch", out_of_memory)
    r = CliRunner().invoke(app, ["patch", "--data", str(s10), "--recipe", "demo-patch", "--out", str(tmp_path / "m")], env={"COLUMNS": "400"})
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), text
    assert text.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB). Lower --bs (per process)"), text
    assert all(advice in text for advice in ("--size", "--grad-acc", "--precision", "nvidia-smi")) and "unexpected" not in text


def test_the_shared_memory_hint_is_what_the_workers_need(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage(64 * 2**20, 16 * 2**20, 48 * 2**20))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    # 2 processes x 8 workers x 2 batches in flight x 100 MB = 3200 MB, 1.25 x that with headroom, and the 16 MB held already
    with pytest.raises(CvfastError, match=r"need about 3200 MB of shared memory; give the machine more \(docker run --shm-size=4g"):
        runtime.check_shared_memory(8, 100 * 2**20, shm=str(tmp_path))


def test_the_process_group_is_bound_to_the_ranks_gpu_with_the_timeout_cvfast_dist_timeout_sets(monkeypatch):
    from datetime import timedelta

    joined = []
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime.ensure_process_group(torch.device("cuda", 1))
    assert joined[-1] == dict(backend="nccl", timeout=timedelta(minutes=30), device_id=torch.device("cuda", 1))
    monkeypatch.setenv("CVFAST_DIST_TIMEOUT", "90")
    runtime.ensure_process_group(torch.device("cpu"))
    assert joined[-1] == dict(backend="gloo", timeout=timedelta(seconds=90))  # gloo binds no device
    monkeypatch.setenv("CVFAST_DIST_TIMEOUT", "soon")
    with pytest.raises(CvfastError, match="CVFAST_DIST_TIMEOUT='soon': expected a number of seconds above 0"):
        runtime.ensure_process_group(torch.device("cpu"))


def test_accelerate_launchs_mixed_precision_is_named_and_left_to_cvfasts_precision(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    settings = runtime.accelerator_settings()
    assert settings["mixed_precision"] == "no" and not settings["kwargs_handlers"][0].broadcast_buffers
    assert "accelerate asks for fp16 mixed precision" in caplog.text


def test_the_global_batch_is_logged_when_processes_or_accumulation_multiply_the_recipes(monkeypatch, caplog):
    from cvfast.train.pipeline import log_global_batch
    from cvfast.train.recipes import load_recipe, resolve

    caplog.set_level("INFO", logger="cvfast.train.pipeline")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    log_global_batch(resolve(load_recipe("demo-whole"), {"data": {"bs": 2, "grad_acc": 4}}))
    assert "global batch: 2 images per process x 16 processes x 4 accumulated batches = 128 images per optimizer step" in caplog.text
    caplog.clear()
    log_global_batch(resolve(load_recipe("demo-patch"), {"data": {"bs": 32}}))  # patch training accumulates nothing
    assert "global batch: 32 images per process x 16 processes x 1 accumulated batch = 512 images per optimizer step" in caplog.text
    monkeypatch.setenv("RANK", "3")
    caplog.clear()
    log_global_batch(resolve(load_recipe("demo-patch"), {}))
    assert "global batch" not in caplog.text  # rank 0 says it
