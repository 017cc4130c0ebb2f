"""Shared parts of the training benchmarks (train_step.py, gpu_train.py): models, data, the bare PyTorch loop, timed fits.

Every measurement of one configuration uses the same model object and the same batches:
- bare loop: forward (autocast where the runtime uses it), cross-entropy, backward, Adam step, zero_grad -- plain
  PyTorch on batches already in memory on the device (the ceiling);
- fastai Learner on in-memory tensors: cvfast's learner factory (patch_learner / whole_image_learner) with its
  Runtime callbacks (MixedPrecision, ChannelsLast, compile), trained with cvfast's begin_stage/fit_stage on a
  fastai DataLoader that yields those same batches: the Learner's own overhead (callbacks, recorder, fastai's
  optimizer);
- cvfast full pipeline: the same Learner on cvfast's real DataLoaders over cached 16-bit PNGs (decode, the paper's
  augmentation as batch transforms, the Runtime's loader workers and pinned memory);
- loader alone: the real training DataLoader iterated without a model (what the loader can deliver).
Warm-up batches are excluded; validation is skipped (it is not part of a training step) and so are the per-epoch
checkpoints a `cvfast patch|whole` run writes.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import find_bs
from torch import nn

from bench._results import machine, today  # noqa: F401  (re-exported for the training benches)
from cvfast.data.blocks import DataInfo, patch_dataloaders, whole_image_dataloaders
from cvfast.data.classes import PATCH_CLASSES, WHOLE_IMAGE_CLASSES
from cvfast.data.ingest import prepare_ddsm
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import synthesize
from cvfast.models.body import create_body
from cvfast.models.patch import PatchClassifier
from cvfast.train.learners import patch_learner, whole_image_learner
from cvfast.train.pipeline import whole_training_cbs
from cvfast.train.recipes import fingerprint, load_recipe
from cvfast.train.runtime import Runtime, apply_runtime
from cvfast.train.schedule import Stage, begin_stage, fit_stage, stages_from

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


@dataclass
class Config:
    """One model/size/batch configuration to measure."""

    name: str
    kind: str  # 'patch' | 'whole'
    arch: str
    size: tuple[int, int]  # patch: (side, side); whole: (height, width)
    bs: int
    top: str = "resnet"
    widths: tuple[int, int, int] = (512, 512, 1024)
    vgg_width: int = 512
    source: tuple[int, int] | None = None  # patch configs: working size of the images the real pipeline's patches are cut from

    @property
    def data_size(self) -> tuple[int, int]:
        """Working size of the prepared DATA folder the full-pipeline measurement reads."""
        return tuple(self.size) if self.kind == "whole" else tuple(self.source or (4 * self.size[0], 3 * self.size[0]))

    @property
    def recipe(self) -> str:
        """The recipe whose last stage (all layers) gives lr and weight decay, and whose callbacks a whole model trains with."""
        return "patch-s10-resnet50" if self.kind == "patch" else f"whole-{self.top}"

    def describe(self) -> str:
        """One line for the report."""
        if self.kind == "patch":
            return f"patch classifier: {self.arch} body + GAP + FC (5 classes), {self.size[0]}x{self.size[1]} patches, batch {self.bs}"
        top = (f"ResNet top [{'-'.join(map(str, self.widths))}] x 2" if self.top == "resnet" else f"VGG top {self.vgg_width} x 3 twice")
        return f"whole-image classifier: {self.arch} body + {top}, {self.size[0]}x{self.size[1]}, batch {self.bs}"


def finished(out: Path, recipe: dict) -> dict | None:
    """The held-out metrics of a model already trained into OUT with this resolved recipe, or None (then train it).

    A finished training leaves no checkpoint to resume from, so calling train_* again would train it anew: benchmarks
    that share a model between runs, or resume after a kill, reuse it through this instead."""
    side, stored = out / "model.json", out / "recipe.json"
    if not (side.is_file() and stored.is_file()):
        return None
    trained = json.loads(stored.read_text())
    if fingerprint({k: trained.get(k) for k in recipe}) != fingerprint(json.loads(json.dumps(recipe, default=str))):
        return None
    return json.loads(side.read_text())["metrics"]


def device_line(device: torch.device) -> str:
    """The device in words: GPU name and CUDA version, or CPU threads."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Drop what the last configuration left (learners, loader workers, cached GPU blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- data


def synthetic_data(work: Path, size: tuple[int, int], patients: int, synth: str = "small", workers: int | None = None) -> Path:
    """A prepared DATA folder (16-bit PNG cache at `size`) from cvfast's synthetic DDSM-like set; reused when present."""
    data = work / f"data_{synth}_{patients}p_{size[0]}x{size[1]}"
    if not (data / "manifest.csv").is_file():
        src = work / f"synthetic_{synth}_{patients}p"
        if not (src / "ground_truth.json").is_file():
            synthesize(src, patients=patients, seed=0, size=synth)
        prepare_ddsm(src / "ddsm", PrepareOptions(out=data, size=size, seed=0, workers=workers))
    return data


def patch_set(data: Path, side: int, workers: int | None = None) -> Path:
    """The S10 patch set of side `side` cut from a DATA folder; reused when present."""
    out = data / f"patches_s10_{side}"
    if not (out / "patchset.json").is_file():
        make_patches(data, replace(PATCH_SETS["s10"], size=side, seed=0), out=out, workers=workers)
    return out


def real_dataloaders(cfg: Config, data: Path, runtime: Runtime, workers: int | None = None) -> DataLoaders:
    """cvfast's real DataLoaders for a configuration: files, decode, the paper's augmentation, the runtime's loader settings."""
    if cfg.kind == "patch":
        return patch_dataloaders(patch_set(data, cfg.size[0], workers), bs=cfg.bs, augment=True, **runtime.loader_kwargs())
    return whole_image_dataloaders(data, bs=cfg.bs, augment=True, **runtime.loader_kwargs())


def synthetic_batches(cfg: Config, n: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n distinct (images, labels) batches already on the device: 1-channel inputs after mean subtraction, random labels."""
    g = torch.Generator().manual_seed(seed)
    classes = len(PATCH_CLASSES) if cfg.kind == "patch" else len(WHOLE_IMAGE_CLASSES)
    return [((torch.rand(cfg.bs, 1, *cfg.size, generator=g) - 0.3).to(device), torch.randint(0, classes, (cfg.bs,), generator=g).to(device))
            for _ in range(n)]


def memory_dataloaders(cfg: Config, batches: list, device: torch.device) -> DataLoaders:
    """fastai DataLoaders yielding the given in-memory batches as they are (no collation, no transforms)."""
    train = DataLoader(batches, bs=None, device=device)  # bs=None: items are batches already
    valid = DataLoader(batches[:1], bs=None, device=device)
    dls = DataLoaders(train, valid, device=device)
    classes = PATCH_CLASSES if cfg.kind == "patch" else WHOLE_IMAGE_CLASSES
    dls.vocab = classes
    dls.info = DataInfo(classes=list(classes), mean_grey=0.3, size=tuple(cfg.size), kind=cfg.kind,
                        source_size=(4 * cfg.size[0], 4 * cfg.size[1]) if cfg.kind == "patch" else None,
                        crop=cfg.size[0] if cfg.kind == "patch" else None)
    return dls


# ---------------------------------------------------------------- models and learners


def build_learner(cfg: Config, dls: DataLoaders, path: Path):
    """cvfast's learner for the configuration: patch_learner, or whole_image_learner around an untrained patch model."""
    if cfg.kind == "patch":
        return patch_learner(dls, cfg.arch, path=path)
    patch = PatchClassifier(create_body(cfg.arch), len(PATCH_CLASSES))
    patch.spec = {"kind": "patch", "arch": cfg.arch, "head": "paper", "dropout": 0.0, "n_classes": len(PATCH_CLASSES)}
    return whole_image_learner(dls, patch, top=cfg.top, widths=cfg.widths, vgg_width=cfg.vgg_width, path=path)


def training_setup(cfg: Config) -> tuple[Stage, list]:
    """The recipe's all-layers stage (lr, weight decay) and the extra training callbacks cvfast uses for that kind."""
    recipe = load_recipe(cfg.recipe)
    stage = stages_from(recipe["stages"])[-1]
    return stage, (whole_training_cbs(recipe) if cfg.kind == "whole" else [])


def hold_body_bn(model: nn.Module) -> None:
    """What cvfast's HoldBodyBatchNorm does to a whole-image model: the body's BatchNorm layers in eval mode."""
    for m in model.body.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def amp_dtype(runtime: Runtime) -> torch.dtype | None:
    """The autocast dtype the runtime trains with (None: fp32)."""
    mode = runtime.amp_mode
    return None if mode is None else {"bf16": torch.bfloat16, "fp16": torch.float16}[mode.value]


def flops_per_image(cfg: Config, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], runtime: Runtime) -> float:
    """FLOPs of one training step per image (forward + backward, matmuls and convolutions), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = batch
    model.train()
    if cfg.kind == "whole":
        hold_body_bn(model)
    dtype = amp_dtype(runtime)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


# ---------------------------------------------------------------- the three ways to train


def bare_rate(cfg: Config, model: nn.Module, batches: list, warmup: int, stage: Stage, runtime: Runtime) -> float:
    """Images/s of a plain PyTorch training loop over the batches after `warmup` of them.

    Adam with the paper's settings (betas 0.9/0.999, eps 1e-8) and Keras-style L2 decay (torch's coupled weight_decay at
    2 * wd, on kernels only) at the stage's lr and wd: the same update cvfast's optimizer applies, in torch's own code. Autocast and channels_last as the runtime has them;
    for whole-image models the body's BatchNorm statistics are held, as cvfast's whole-image recipes do.
    """
    device = runtime.torch_device
    dtype = amp_dtype(runtime)
    if runtime.channels_last if runtime.channels_last is not None else device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    lr = stage.lr[-1] if isinstance(stage.lr, tuple) else stage.lr
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kernels = [p for n, p in trainable if p.ndim > 1]  # BatchNorm weights and biases are 1-d: not decayed
    others = [p for n, p in trainable if p.ndim <= 1]
    opt = torch.optim.Adam([{"params": kernels, "weight_decay": 2 * stage.wd}, {"params": others, "weight_decay": 0.0}],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.train()
    if cfg.kind == "whole":
        hold_body_bn(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for x, y in batches[:warmup]:
        step(x, y)
    sync(device)
    t = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y)
    sync(device)
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return sum(len(y) for _, y in batches[warmup:]) / dt


class StepTimer(Callback):
    """Times training batches `warmup`+1 .. `warmup`+`steps` of a fit (across epochs), skips validation, then stops the fit."""

    order = 100  # after every other callback of a batch

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.done, self.images, self.t0, self.t1 = 0, 0, None, None

    def after_batch(self):
        """Count the batch; start the clock after the warm-up, stop it (and the fit) after the timed steps."""
        if not self.training:
            return
        self.done += 1
        if self.done == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        elif self.done > self.warmup:
            self.images += find_bs(self.learn.yb)
        if self.done >= self.warmup + self.steps:
            sync(self.device)
            self.t1 = time.perf_counter()
            raise CancelFitException()

    def before_validate(self):
        """Validation is not part of a training step."""
        raise CancelValidException()

    @property
    def rate(self) -> float:
        """Images/s over the timed batches."""
        if self.t1 is None:
            raise RuntimeError(f"the fit ended after {self.done} training batches, before the {self.warmup + self.steps} needed")
        return self.images / (self.t1 - self.t0)


def fastai_rate(learn, warmup: int, steps: int, stage: Stage, cbs: list) -> float:
    """Images/s of cvfast's own training path (begin_stage + fit_stage, i.e. Learner.fit) on the learner's current dls."""
    timer = StepTimer(warmup, steps, learn.dls.device or torch.device("cpu"))
    per_epoch = max(1, len(learn.dls.train))
    begin_stage(learn, stage)
    with learn.no_bar(), learn.no_logging():
        fit_stage(learn, replace(stage, epochs=math.ceil((warmup + steps) / per_epoch) + 1), [timer, *cbs])
    return timer.rate


def loader_rate(dl, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s the DataLoader alone delivers to the device (decode, collation, transfer, batch augmentation), across epochs."""
    done, images, t = 0, 0, None
    while True:
        for xb, yb in dl:
            done += 1
            if done == warmup:
                sync(device)
                t = time.perf_counter()
            elif done > warmup:
                images += len(yb)
            if done >= warmup + steps:
                sync(device)
                return images / (time.perf_counter() - t)


def matmul_ceiling(device: torch.device, n: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """Achieved FLOP/s of a large square matrix product on the device (bf16 on a GPU, fp32 on CPU): a same-run ceiling."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    dt = time.perf_counter() - t
    return 2 * n**3 * repeats / dt, f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matrix product"


@dataclass
class Measured:
    """Best images/s of each way over the rounds, for one configuration."""

    cfg: Config
    bare: float = 0.0
    fastai_memory: float = 0.0
    pipeline: float | None = None
    loader: float | None = None
    flops: float | None = None  # per image, forward + backward
    workers: int = 0
    train_images: int = 0


def measure_config(cfg: Config, runtime: Runtime, warmup: int, steps: int, rounds: int, work: Path, pipeline: bool = True,
                   patients: int = 24, synth: str = "small", prep_workers: int | None = None, count_flops: bool = True) -> Measured:
    """All the ways for one configuration, `rounds` times in turn (bare, fastai in memory, full pipeline, loader); best of each."""
    device = runtime.torch_device
    warmup = max(1, warmup)  # the clock starts at the end of the last warm-up batch
    batches = synthetic_batches(cfg, warmup + steps, device)
    mem = memory_dataloaders(cfg, batches, device)
    learn = build_learner(cfg, mem, work / "learner")
    stage, cbs = training_setup(cfg)
    learn.model.to(device)
    result = Measured(cfg)
    if count_flops:
        result.flops = flops_per_image(cfg, learn.model, batches[0], runtime)
    learn = apply_runtime(learn, runtime)  # MixedPrecision / ChannelsLast callbacks, compile in place: the bare loop shares the model
    real = None
    if pipeline:
        data = synthetic_data(work, cfg.data_size, patients, synth, prep_workers)
        real = real_dataloaders(cfg, data, runtime, prep_workers)
        result.workers, result.train_images = real.train.fake_l.num_workers, len(real.train.dataset)
    bare_rate(cfg, learn.model, batches[:warmup + 1], warmup, stage, runtime)  # priming, discarded: the first way measured pays no first-use costs
    for _ in range(rounds):
        result.bare = max(result.bare, bare_rate(cfg, learn.model, batches, warmup, stage, runtime))
        learn.dls = mem
        result.fastai_memory = max(result.fastai_memory, fastai_rate(learn, warmup, steps, stage, cbs))
        if real is not None:
            learn.dls = real
            result.pipeline = max(result.pipeline or 0.0, fastai_rate(learn, warmup, steps, stage, cbs))
            result.loader = max(result.loader or 0.0, loader_rate(real.train, warmup, steps, device))
    del learn, mem, real, batches
    free_memory()
    return result



# ---------------------------------------------------------------- reporting


def table_lines(m: Measured, device: torch.device, peak: float | None = None, ceiling: float | None = None) -> list[str]:
    """Markdown table of one configuration: images/s and the ratio to the bare loop; FLOP/s and MFU where FLOPs were counted."""
    flops = m.flops is not None and (peak or ceiling)
    head = "| way | images/s | vs bare loop |" + (" TFLOP/s | MFU (vs datasheet peak) | vs measured matmul ceiling |" if flops else "")
    rule = "|---|---:|---:|" + ("---:|---:|---:|" if flops else "")
    what = "patches" if m.cfg.kind == "patch" else "images"
    pinned = ", pinned memory" if device.type == "cuda" else ""
    rows = [("bare PyTorch loop on in-memory batches (forward, cross-entropy, backward, Adam step, zero_grad): the baseline", m.bare),
            ("fastai Learner (cvfast learner factory + Runtime callbacks, fit_stage) on the same in-memory batches", m.fastai_memory)]
    if m.pipeline is not None:
        rows.append((f"cvfast full pipeline: same Learner on cvfast's DataLoaders ({m.train_images} training {what} = "
                     f"{m.train_images // m.cfg.bs} batches per epoch, 16-bit PNG decode, "
                     f"the paper's augmentation, {m.workers} loader workers{pinned})", m.pipeline))
    lines = [head, rule]
    for name, r in rows:
        line = f"| {name} | {r:.2f} | {r / m.bare:.2f}x |"
        if flops:
            achieved = r * m.flops
            line += (f" {achieved / 1e12:.3g} | {f'{100 * achieved / peak:.1f}%' if peak else '--'} |"
                     f" {f'{100 * achieved / ceiling:.1f}%' if ceiling else '--'} |")
        lines.append(line)
    if m.loader is not None:
        lines.append(f"| loader alone: the same training DataLoader iterated without a model | {m.loader:.2f} | -- |" + (" -- | -- | -- |" if flops else ""))
    return lines


def summary_line(m: Measured) -> str:
    """Overheads in words: the Learner's, the data pipeline's, and the loader's headroom."""
    parts = [f"fastai Learner overhead {100 * (m.bare / m.fastai_memory - 1):+.1f}% time per image vs the bare loop"]
    if m.pipeline is not None:
        parts.append(f"reading and augmenting files adds {100 * (m.fastai_memory / m.pipeline - 1):+.1f}% on top")
    if m.loader is not None and m.pipeline:
        if m.workers == 0:
            parts.append(f"the loader alone delivers {m.loader / m.pipeline:.1f}x the full pipeline's rate, but with no worker "
                         "processes its time adds to every step")
        else:
            parts.append(f"the loader alone delivers {m.loader / m.pipeline:.1f}x what the full pipeline trains on"
                         + (" (it keeps up)" if m.loader >= 1.1 * m.pipeline else " (the loader is the bottleneck)"))
    if m.flops is not None:
        parts.append(f"{m.flops / 1e9:.3g} GFLOP per image per training step (FlopCounterMode, forward + backward)")
    return "; ".join(parts) + "."


def reproduce(script: str, argv: list[str]) -> str:
    """The command line of this run, without the output-only flags."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--no-write", "--summary-only"):
            continue
        if a in ("--md-out", "--export"):
            skip = True
            continue
        if a.startswith(("--md-out=", "--export=")):
            continue
        keep.append(a)
    return " ".join([f"python bench/{script}", *keep])


def save_md(lines: list[str], path: str | None) -> None:
    """Also write the section's Markdown to a file (e.g. $OUT on a remote machine), for `python -m bench._results`."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n")
