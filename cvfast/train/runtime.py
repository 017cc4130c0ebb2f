"""Where and how training runs: device, mixed precision, channels_last, torch.compile, loader workers, data parallel."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import shutil
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner, Recorder
from fastai.torch_core import default_device, distrib_barrier, num_distrib, rank_distrib
from torch import nn

from cvfast.allocator import current as current_allocator
from cvfast.data.loader import PREFETCH, PersistentWorkers
from cvfast.errors import CvfastError
from cvfast.util.distributed import check_distributed_environment

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class Runtime:
    """Execution settings of a training command: they change speed, not the method, so they are not part of the recipe."""

    device: str | None = None  # None: the best available (cuda, mps, cpu)
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 with loss scaling; fp32 off the GPU
    channels_last: bool | None = None  # None: on a CUDA GPU and on the CPU (1.3-1.6x faster training steps there: bench/memory_format.py)
    compile: bool = False  # torch.compile the model (in place: state_dict keys and exports are unchanged)
    compile_backend: str | Callable = "inductor"  # torch.compile's backend ("eager", "aot_eager" for cheap checks on a CPU)
    workers: int | None = None  # DataLoader reader processes; None: up to 8 per process on a GPU, none on CPU
    log: str | None = None  # 'tensorboard': also log to OUT/tensorboard (the per-epoch CSV is always written)

    def __post_init__(self):
        check_distributed_environment()
        if self.precision not in PRECISIONS:
            raise CvfastError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.log not in (None, "tensorboard"):
            raise CvfastError(f"--log {self.log}: expected tensorboard")
        if self.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise CvfastError("--log tensorboard needs the tensorboard package: pip install tensorboard (or cvfast[log])")
        if self.workers is not None and self.workers < 0:
            raise CvfastError(f"workers {self.workers}: must be at least 0")

    @property
    def torch_device(self) -> torch.device:
        """The device to train on; under torchrun/accelerate each process takes the GPU of its local rank, and only it.

        Under data parallel the rank's GPU is made current before anything allocates: fastai's default_device() asks
        torch.cuda.current_device(), which would open a CUDA context on GPU 0 from every rank.
        """
        distributed, local = num_distrib() > 1, int(os.environ.get("LOCAL_RANK", 0))
        try:
            if self.device:
                device = torch.device(self.device)
            else:
                device = torch.device("cuda", local) if distributed and torch.cuda.is_available() else default_device()
        except RuntimeError as e:
            raise CvfastError(f"device {self.device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CvfastError(f"device {self.device!r}: no CUDA GPU is visible to torch")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CvfastError(f"device {self.device!r}: MPS is not available")
        if device.type == "cuda" and distributed:
            if device.index is not None and device.index != local:
                raise CvfastError(f"--device {self.device} under torchrun: rank {rank_distrib()} trains on the GPU of its LOCAL_RANK ({local}); "
                                  "pass --device cuda, or no --device, and each rank takes its own")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        return device

    @property
    def amp_mode(self) -> AMPMode | None:
        """The autocast dtype, or None for fp32 (autocast here is CUDA's; other devices train in fp32)."""
        if self.torch_device.type != "cuda":
            if self.precision in ("bf16", "fp16"):
                raise CvfastError(f"precision {self.precision}: mixed precision needs a CUDA device (training on {self.torch_device})")
            return None
        if self.precision == "auto":
            return AMPMode.BF16 if torch.cuda.is_bf16_supported() else AMPMode.FP16
        return None if self.precision == "fp32" else AMPMode(self.precision)

    def loader_kwargs(self) -> dict:
        """DataLoader arguments: reader processes, pinned memory and the target device (batch transforms run there)."""
        device = self.torch_device
        gpu = device.type == "cuda"
        workers = self.workers if self.workers is not None else (gpu_loader_workers() if gpu else 0)
        return dict(num_workers=workers, pin_memory=gpu, device=device)


def gpu_loader_workers() -> int:
    """Loader workers per process on a GPU: up to 8, from this machine's cores shared among this machine's processes
    (LOCAL_WORLD_SIZE; WORLD_SIZE counts every machine's), one core left to each process itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2  # a container's share
    return min(8, max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))


def check_shared_memory(workers: int, batch_bytes: int, shm: str = "/dev/shm") -> None:
    """Refuse loader workers whose batches would not fit in shared memory, where a worker would die with "Bus error".

    Docker gives containers 64 MB of /dev/shm by default; 8 workers with 2 batches each of 2 images of 1152x896 int32
    pixels need ~130 MB.
    """
    if workers <= 0 or not os.path.isdir(shm):
        return
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # every rank of this machine fills the one /dev/shm
    usage = shutil.disk_usage(shm)
    need, free = ranks * workers * PREFETCH * batch_bytes, usage.free
    if free < 1.25 * need:  # headroom: the collation's own temporaries
        fit = int(free / 1.25 // (ranks * PREFETCH * batch_bytes))
        size = math.ceil((1.25 * need + usage.total - usage.free) / 2**30)  # what others hold there stays held
        who = f"{workers} loader workers" + (f" in each of {ranks} processes" if ranks > 1 else "")
        raise CvfastError(f"{shm} has {free / 2**20:.0f} MB free, but {who} with batches of {batch_bytes / 2**20:.1f} MB need "
                          f"about {need / 2**20:.0f} MB of shared memory; give the machine more (docker run --shm-size={size}g, or a larger tmpfs "
                          f"on {shm}) or pass --workers {fit}")


def batch_bytes(dls) -> int:
    """Bytes of one training batch as the loader workers hand it over: the files' pixels as read (resizing is a batch
    transform, in the main process), measured on the first training item."""
    x = dls.train.dataset[0][0]
    return int(dls.train.bs or 1) * x.numel() * x.element_size()


def apply_runtime(learn: Learner, runtime: Runtime) -> Learner:
    """Move the learner to the runtime's device and add fastai's MixedPrecision / ChannelsLast callbacks; compile if asked."""
    device = runtime.torch_device
    workers = learn.dls.train.fake_l.num_workers
    if workers and hasattr(learn.dls, "info"):
        check_shared_memory(workers, batch_bytes(learn.dls))
    learn.model.to(device)
    learn.dls.to(device)
    if (amp := runtime.amp_mode) is not None:
        learn.add_cb(MixedPrecision(amp_mode=amp))
    if runtime.channels_last if runtime.channels_last is not None else device.type in ("cuda", "cpu"):
        learn.add_cb(ChannelsLast())
    if runtime.compile:
        compile_in_place(learn.model, runtime.compile_backend)
    log.info("training on %s, %s%s%s, %d loader workers, %s allocator", device, amp.value if amp else "fp32",
             ", channels_last" if hasattr(learn, "channels_last") else "", ", compiled" if runtime.compile else "",
             learn.dls.train.fake_l.num_workers, current_allocator())
    return learn


# Guard entries one model's training needs: each stage of a freeze schedule changes requires_grad, training and
# evaluation trace apart, and the short last batch adds one -- about 7 for the paper's 3 stages; twice that for slack.
COMPILE_ENTRIES_PER_MODEL = 16
_compiled_models = 0  # in this process: from the second on, dynamo's process-wide cache is reset first


def compile_in_place(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """nn.Module.compile (state_dict keys unchanged), with a recompile budget of its own, and recompiles logged.

    nn.Module.compile compiles Module._call_impl, one code object shared by every module of the process, whose dynamo
    cache holds torch's recompile_limit (8) entries in all: a 3-stage schedule nearly fills it, so the second model of
    a process (bench/mias_cv.py's folds, a notebook's next run) fell back to eager without a word.
    """
    global _compiled_models
    if _compiled_models:
        # cvfast trains one model at a time (export_ready uncompiles the last): a fresh cache gives this one its own budget,
        # and lifts dynamo's run-eager-from-now-on mark should an earlier model have hit the limit
        torch._dynamo.reset()
    _compiled_models += 1
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before torch 2.7
    setattr(config, limit, max(getattr(config, limit), COMPILE_ENTRIES_PER_MODEL))
    if "TORCH_LOGS" not in os.environ and not torch._logging._internal.log_state.is_artifact_enabled("recompiles"):
        torch._logging.set_logs(recompiles=True)  # each recompile and its reason on stderr (TORCH_LOGS, when set, decides)
    model.compile(backend=backend)
    return model


def export_ready(learn: Learner) -> Learner:
    """The learner without its runtime: fp32, contiguous, uncompiled, so its pickle loads anywhere (CPU included)."""
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (MixedPrecision, ChannelsLast))])
    learn.model.to(memory_format=torch.contiguous_format)
    learn.model._compiled_call_impl = None  # undo nn.Module.compile (a compiled function does not pickle)
    return learn


# torch's default for gloo (NCCL's is 10 minutes, short for ranks that wait on rank 0 writing a checkpoint to a network
# disk, or on one rank's first torch.compile); CVFAST_DIST_TIMEOUT sets another
DEFAULT_DIST_TIMEOUT_S = 1800


def dist_timeout() -> timedelta:
    """How long a rank waits in a collective for the others (CVFAST_DIST_TIMEOUT seconds, default 30 minutes): a rank
    that died or hangs then ends every rank with torch's timeout error instead of holding the GPUs."""
    text = os.environ.get("CVFAST_DIST_TIMEOUT", str(DEFAULT_DIST_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise CvfastError(f"CVFAST_DIST_TIMEOUT={text!r}: expected a number of seconds above 0")
    return timedelta(seconds=seconds)


def ensure_process_group(device: torch.device) -> None:
    """Join torchrun's process group now (accelerate, which fastai's data parallel uses, adopts it at the first fit).

    On a GPU with device_id: NCCL then binds the communicator to this rank's GPU at once, instead of guessing one at the
    first collective (the warning "using GPU 0 ... as device used by this process is currently unknown").
    """
    if num_distrib() > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=dist_timeout(), **({"device_id": device} if cuda else {}))


def rank0_decision(value, what: str, device: torch.device):
    """Rank 0's value of a decision every rank made alone, on every rank (a hub may answer one rank and not another:
    ranks would then run different schedules). Data parallel copies rank 0's weights to every rank at its start."""
    if num_distrib() <= 1:
        return value
    ensure_process_group(device)
    box = [value]
    dist.broadcast_object_list(box, src=0)
    if box[0] != value:
        log.warning("rank %d: %s was %r here but %r on rank 0; following rank 0", rank_distrib(), what, value, box[0])
    return box[0]


# how long a rank looks for rank 0's token in --out: a network file system may show a new file to another machine late
SHARED_OUT_WAIT_S = 60.0  # an NFS client may answer from its cache of a folder's listing for 30-60 s


def check_shared_out(out: Path, device: torch.device) -> None:
    """Under data parallel, refuse an --out that some rank does not see as rank 0 writes it, before any training.

    Rank 0 alone writes checkpoints, progress.json and best.pth, and every rank reads them back (the best epoch's
    weights, a resume): on a disk local to each machine the other ranks would resume or load something else, or wait
    forever. Rank 0 writes a token of this launch (under a new name each time, so no cached "no such file" answers for
    it), every rank looks for it, and all learn together whether every one saw it.
    """
    if num_distrib() <= 1:
        return
    ensure_process_group(device)
    box = [(secrets.token_hex(8), str(Path(out).resolve())) if rank_distrib() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    (secret, where), token = box[0], Path(out) / f".cvfast-shared-{box[0][0]}"
    failed = None  # an OSError here must not end one rank alone: the others would wait in the next collective
    if rank_distrib() == 0:
        try:
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text(secret)
        except OSError as e:
            failed = f"{e.filename or where}: {e.strerror or e}"
    dist.barrier()
    deadline = time.monotonic() + SHARED_OUT_WAIT_S
    while not (seen := failed is None and _holds(token, secret)) and failed is None and time.monotonic() < deadline:
        time.sleep(0.5)
    flags = [None] * num_distrib()
    dist.all_gather_object(flags, (socket.gethostname(), seen, failed))  # also the barrier after which rank 0 may remove the token
    if rank_distrib() == 0 and failed is None:
        token.unlink(missing_ok=True)
    if flags[0][2]:
        raise CvfastError(f"--out {where}: rank 0 cannot write there ({flags[0][2]})")
    blind = [f"rank {r} (on {host})" for r, (host, ok, _) in enumerate(flags) if not ok]
    if blind:
        raise CvfastError(f"--out must be on a file system every process sees: {', '.join(blind)} cannot see the file rank 0 wrote in "
                          f"{where} (a disk local to each machine?); rank 0 alone writes checkpoints and the best epoch's weights, and "
                          "every rank reads them back. Pass an --out on a shared file system (NFS, Lustre, ...)")


@contextmanager
def this_process_only() -> Iterator[None]:
    """Run fastai code on rank 0 alone after data-parallel training: fastai gathers predictions from every process
    whenever WORLD_SIZE > 1, and the other ranks have finished."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = saved


class BackendDistributedDL(PersistentWorkers, DistributedDL):
    """fastai's DistributedDL, but broadcasting its shuffled order on the process group's device, and reading through
    the wrapped DataLoader's persistent workers.

    fastai moves the order to CUDA unconditionally (NCCL's requirement), which fails under the gloo backend
    that CPU runs use. fastai wraps the DataLoaders anew for every fit (each stage of a schedule): the readers belong
    to the wrapped DataLoader, so they outlive the wrappers.
    """

    def job_loader(self):
        """The wrapped DataLoader's readers (they read with its item and batch steps, as fastai's DistributedDL does)."""
        return self.dl.job_loader() if isinstance(self.dl, PersistentWorkers) and self.fake_l.num_workers else None

    def close(self) -> None:
        """Stop the wrapped DataLoader's readers (a fit that raised leaves the wrappers in place of the DataLoaders)."""
        if isinstance(self.dl, PersistentWorkers):
            self.dl.close()

    def _broadcast(self, t, rank):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(t, dtype=torch.long, device=device)
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def get_idxs(self):
        """This rank's slice of the epoch's order (fastai's), kept as `shard`: disjoint across ranks up to the last batch's padding."""
        self.shard = super().get_idxs()
        return self.shard


class DataParallel(DistributedTrainer):
    """fastai's DistributedTrainer (DDP through accelerate) with dataloaders that also work on the gloo backend."""

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else BackendDistributedDL(dl, device=self.learn.model.device)


def _holds(path: Path, text: str) -> bool:
    """Whether PATH can be read and holds TEXT (its folders listed first: on NFS a listing revalidates the cached
    "no such file" of a folder another machine has just made)."""
    for folder in (path.parent.parent, path.parent):
        try:
            os.listdir(folder)
        except OSError:
            pass
    try:
        return path.read_text() == text
    except OSError:
        return False


class ValidateOnRank0(Callback):
    """Under data parallel, validate each epoch on rank 0 alone, over the whole validation set once, and give every rank
    its figures.

    Sharded, each rank validated its half with the last batch padded by repeated items, and only the AUCs were gathered:
    valid_loss and accuracy were rank 0's half (duplicates included) on rank 0 and rank 1's half on rank 1, so the best
    epoch, early stopping and the history followed a part of the set, and ranks could stop at different epochs (a hang).
    Rank 0 validates the bare model (not DDP) with its own BatchNorm statistics, the ones it saves; the others wait.
    """

    order = Recorder.order + 1  # after the Recorder has reset the metrics (before) and logged them (after)

    def before_fit(self):
        """No validation in progress."""
        self.alone, self.ddp = ExitStack(), None

    def before_validate(self):
        """Rank 0: the bare model, the whole validation set, no gathering across ranks; the others skip validation."""
        if rank_distrib() != 0:
            raise CancelValidException()
        self.ddp, self.learn.model = self.learn.model, getattr(self.learn.model, "module", self.learn.model)
        if isinstance(self.learn.dl, DistributedDL):
            self.learn.dl = self.learn.dl.dl
        self.alone.enter_context(this_process_only())  # fastai gathers predictions across processes when WORLD_SIZE > 1
        self.learn.validating_alone = True

    def after_validate(self):
        """Rank 0's figures (and whether its validation met a non-finite loss) on every rank."""
        self._restore()
        box = [None]
        if rank_distrib() == 0:
            log, n = self.recorder.log, len(self.recorder._valid_mets)  # none when its validation was cancelled
            box = [(list(log[len(log) - n:]), getattr(self.learn, "diverged", False))]
        dist.broadcast_object_list(box, src=0)
        figures, diverged = box[0]
        if rank_distrib() != 0:  # the Recorder logged nothing for the validation this rank skipped
            self.recorder.cancel_valid = False
            self.recorder.log += figures
        if diverged:
            self.learn.diverged = True
            raise CancelFitException()  # on every rank together: StopOnNonFinite let rank 0 end its validation alone

    def after_fit(self):
        """A fit that stopped in rank 0's validation leaves data parallel as it was."""
        self._restore()

    def _restore(self) -> None:
        self.alone.close()
        self.learn.validating_alone = False
        if self.ddp is not None:
            self.learn.model, self.ddp = self.ddp, None


def accelerator_settings() -> dict:
    """The Accelerator's settings under data parallel: no mixed precision of its own, and DDP without buffer broadcasts.

    cvfast's --precision decides (fastai's MixedPrecision): an Accelerator set to fp16 by `accelerate launch` would
    autocast a second time, inside it, with a loss scaler of its own. BatchNorm statistics stay per process (the paper's
    batch of 2 per GPU; the body's are held): DDP's default would overwrite every rank's with rank 0's before each
    forward pass, and SyncBatchNorm would need CUDA and would stay in the exported model.
    """
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked != "no" and rank_distrib() == 0:
        log.warning("accelerate asks for %s mixed precision (accelerate config / launch --mixed_precision): cvfast's --precision "
                    "decides instead, through fastai's MixedPrecision; accelerate's is off", asked)
    return dict(mixed_precision="no", kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


@contextmanager
def data_parallel(learn: Learner) -> Iterator[Learner]:
    """Train data-parallel when launched by torchrun / `accelerate launch` (WORLD_SIZE > 1); a no-op otherwise."""
    if num_distrib() <= 1:
        yield learn
        return
    cbs = [DataParallel(sync_bn=False, cpu=learn.dls.device.type != "cuda", **accelerator_settings()), ValidateOnRank0()]
    learn.add_cbs(cbs)
    log.info("rank %d of %d: data-parallel training (%s)", rank_distrib(), num_distrib(), dist.get_backend())
    try:
        yield learn
    finally:
        learn.remove_cbs(cbs)
    distrib_barrier()  # not after a failure: a rank that raised must exit (torchrun then stops the others), not wait here
