"""The training runtime: device choice, mixed precision, channels_last, torch.compile and loader workers."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision

from cvfast.errors import CvfastError
from cvfast.models.artifact import load_model
from cvfast.train.pipeline import patch_learner_from_recipe, train_patch, train_schedule
from cvfast.train.recipes import load_recipe, resolve
from cvfast.train.runtime import Runtime

GPU = torch.cuda.is_available()


@pytest.mark.skipif(GPU, reason="checks the CPU defaults")
def test_cpu_defaults_and_refusals():
    rt = Runtime()
    assert rt.torch_device.type == "cpu" and rt.amp_mode is None
    assert rt.loader_kwargs() == dict(num_workers=0, pin_memory=False, device=torch.device("cpu"))
    with pytest.raises(CvfastError, match="mixed precision needs a CUDA device"):
        _ = Runtime(precision="bf16").amp_mode
    with pytest.raises(CvfastError, match="no CUDA GPU"):
        _ = Runtime(device="cuda").torch_device
    with pytest.raises(CvfastError, match="device 'gpu0'"):
        _ = Runtime(device="gpu0").torch_device
    with pytest.raises(CvfastError, match="precision 'fp8'"):
        Runtime(precision="fp8")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_defaults(s10, tmp_path):
    rt = Runtime()
    assert rt.torch_device.type == "cuda" and rt.amp_mode is not None and rt.loader_kwargs()["pin_memory"]
    learn, _ = patch_learner_from_recipe(resolve(load_recipe("demo-patch"), {}, epochs_scale=0.1), s10, tmp_path, runtime=rt)
    assert isinstance(learn.mixed_precision, MixedPrecision) and isinstance(learn.channels_last, ChannelsLast)
    assert next(learn.model.parameters()).device.type == "cuda" and learn.dls.device.type == "cuda"


def test_channels_last_compile_and_workers_train_and_export_a_plain_model(s10, tmp_path):
    rt = Runtime(device="cpu", channels_last=True, compile=True, workers=1)
    result = train_patch(resolve(load_recipe("demo-patch"), {}, epochs_scale=0.125), s10, tmp_path / "m", runtime=rt)
    learn = result.learn
    assert learn.dls.train.fake_l.num_workers == 1
    assert all(dl.__dict__.get("_job_loader") is None for dl in learn.dls.loaders)  # trained: its loader workers were stopped
    assert not any(isinstance(cb, (ChannelsLast, MixedPrecision)) for cb in learn.cbs)  # the export is runtime-free
    model, _ = load_model(tmp_path / "m")  # safetensors: plain parameter names despite compile
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), learn.model.eval()(x), atol=1e-5)
    from fastai.learner import load_learner

    with pytest.warns(UserWarning):  # the pickle must load as well (a compiled function would not pickle)
        assert load_learner(tmp_path / "m" / "model.pkl") is not None


def test_cli_runtime_options_are_checked(s10, tmp_path):
    r = run_cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--precision", "fp8", "--out", str(tmp_path / "m"))
    assert r.returncode == 1 and "precision 'fp8'" in r.stderr and "Traceback" not in r.stderr
    if not GPU:
        r = run_cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--device", "cuda", "--out", str(tmp_path / "m"))
        assert r.returncode == 1 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(GPU, reason="checks the CPU default")
def test_the_cpu_trains_channels_last_by_default(s10, tmp_path):
    recipe = resolve(load_recipe("demo-patch"), {}, epochs_scale=0.1)
    learn, _ = patch_learner_from_recipe(recipe, s10, tmp_path / "a", runtime=Runtime(device="cpu"))
    assert isinstance(learn.channels_last, ChannelsLast)  # 1.3-1.6x faster training steps on this CPU (bench/memory_format.py)
    learn, _ = patch_learner_from_recipe(recipe, s10, tmp_path / "b", runtime=Runtime(device="cpu", channels_last=False))
    assert not hasattr(learn, "channels_last")


def test_mfu_peaks_tell_the_h200_sxm_from_the_nvl():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.gpu_train import peak_for_name

    assert peak_for_name("NVIDIA H200")[0] == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA H200 NVL")[0] == pytest.approx(835.5e12)
    assert peak_for_name("NVIDIA GH200 480GB")[0] == pytest.approx(989.4e12)
    assert peak_for_name("NVIDIA H100 PCIe")[0] == pytest.approx(756e12) and peak_for_name("Some GPU")[0] is None


def test_a_small_dev_shm_is_named_before_a_worker_dies_of_it(s10, tmp_path, monkeypatch):
    from collections import namedtuple

    import cvfast.train.runtime as runtime

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))  # docker's default /dev/shm
    whole = 2 * 1152 * 896 * 4  # the paper's batch of 2 at 1152x896, int32 pixels
    with pytest.raises(CvfastError, match=r"64 MB free, but 8 loader workers with batches of 7.9 MB need about 126 MB.*--shm-size=1g.*--workers 3"):
        runtime.check_shared_memory(8, whole, shm=str(tmp_path))
    runtime.check_shared_memory(3, whole, shm=str(tmp_path))  # what the message proposes fits
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage(10 * 2**20, 0, 10 * 2**20))
    recipe = resolve(load_recipe("demo-patch"), {"data": {"bs": 400}}, epochs_scale=0.1)  # 400 x 48 x 48 x 4 bytes = 3.5 MB a batch
    with pytest.raises(CvfastError, match="10 MB free, but 2 loader workers with batches of 3.5 MB"):
        patch_learner_from_recipe(recipe, s10, tmp_path / "m", runtime=Runtime(device="cpu", workers=2))


def test_compile_stays_compiled_through_a_schedule_and_in_a_second_model(s10, tmp_path):
    """Every compiled module of a process shares one dynamo cache: after a 3-stage schedule, a second model's last
    epoch must still run its compiled graph, not fall back to eager at torch's recompile limit (8)."""
    import torch._dynamo
    from fastai.callback.core import Callback

    from cvfast.train.schedule import stages_from

    calls = []

    def counting(gm, example_inputs):  # a torch.compile backend that runs the graph eagerly and counts each call
        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run

    class CountEpochs(Callback):
        def before_epoch(self):
            self.start = len(calls)

        def after_epoch(self):
            self.learn.compiled_calls = getattr(self.learn, "compiled_calls", []) + [len(calls) - self.start]

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 8  # torch's default, whatever ran before in this process
    recipe = resolve(load_recipe("demo-patch"), {}, epochs_scale=0.125)
    stages = stages_from(recipe["stages"])
    assert len(stages) == 3
    runtime = Runtime(device="cpu", compile=True, compile_backend=counting)
    for k, arch in enumerate(["tf_efficientnet_lite0", "test_resnet"]):
        r = resolve(recipe, {"model": {"arch": arch, "pretrained": False}})
        learn, _ = patch_learner_from_recipe(r, s10, tmp_path / str(k), runtime=runtime)
        with learn.no_bar(), learn.no_logging():
            train_schedule(learn, stages, tmp_path / str(k), r, cbs=lambda trackers: [CountEpochs()])
        batches = len(learn.dls.train) + len(learn.dls.valid)
        assert len(learn.compiled_calls) == 3 and all(n >= batches for n in learn.compiled_calls), learn.compiled_calls


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_torchrun_rank_takes_only_its_own_gpu(monkeypatch, local_rank):
    """Simulated torchrun on 2 GPUs: every rank lands on cuda:LOCAL_RANK, made current before anything allocates;
    a --device naming another rank's GPU is refused instead of putting two ranks on one GPU."""
    import cvfast.train.runtime as runtime

    current = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked for the current device: a context on GPU 0"))
    monkeypatch.setattr(runtime, "default_device", lambda *a: pytest.fail("fastai's default_device asks torch.cuda.current_device"))
    mine = torch.device("cuda", local_rank)
    assert Runtime().torch_device == mine and current == [mine]
    assert Runtime(device="cuda").torch_device == mine
    assert Runtime(device=f"cuda:{local_rank}").torch_device == mine
    other = 1 - local_rank
    with pytest.raises(CvfastError, match=rf"--device cuda:{other} under torchrun: rank {local_rank} trains on the GPU of its LOCAL_RANK \({local_rank}\)"):
        _ = Runtime(device=f"cuda:{other}").torch_device
    assert Runtime(device="cpu").torch_device == torch.device("cpu")  # gloo on CPU stays on the CPU
