"""The `cvfast` command line: a thin typer shell over the library (every command is a function you can import)."""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from cvfast.data.datasets import DATASETS, Dataset
from cvfast.errors import CvfastError

app = typer.Typer(help="Breast cancer detection on mammograms, the end-to-end all-convolutional way (Shen et al. 2019).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
prepare_app = typer.Typer(help="Turn a dataset's raw files into a manifest + working-size 16-bit PNG cache.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
console = Console(stderr=True)  # messages and logs
stdout = Console()  # results: tables, reports
# what goes to a file or a pipe is never wrapped: a log line, a TOML line or a table row broken at 80 columns is damage
UNWRAPPED_WIDTH = 240
# fastai's import calls torch.jit.script, which the torch release we pin deprecates loudly; nothing for users to act on
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)


VERBOSE = {"on": False}  # set by --verbose: unexpected failures then print their traceback


def handles_errors(fn: Callable) -> Callable:
    """One line and exit code 1 for every failure of a command (a traceback only with --verbose), never a bare traceback.

    CvfastError and OSError carry their own wording (the file or row); CUDA running out of memory gets the settings that
    need less; any other exception is a failure cvfast did not foresee: it is named with its type, and --verbose shows
    where it came from.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        """Call the command; report failures and exit 1."""
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except CvfastError as e:
            _error(_unprefixed(str(e)))
        except OSError as e:  # disk full, read-only or unwritable output, ...: the file and the reason, not a traceback
            _error(f"{f'{e.filename}: ' if e.filename else ''}{e.strerror or e}")
        except Exception as e:
            if _out_of_gpu_memory(e):
                said = ". ".join(_unprefixed(" ".join(str(e).split())).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB"
                _error(f"the GPU ran out of memory ({said}). Lower --bs (per process), train at a "
                       "smaller --size, or keep the batch and take smaller steps with --grad-acc (whole, finetune; grad_acc in a "
                       "recipe); --precision auto, bf16 or fp16 (not fp32) holds activations in half the memory; and check with nvidia-smi that "
                       "no other process holds this GPU")
            if VERBOSE["on"]:
                console.print_exception()
            text = " ".join(str(e).split())  # one line, whatever the library put in its message
            _error(f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''} (unexpected; run `cvfast --verbose ...` for the traceback)")
        finally:
            _leave_process_group()

    return wrapper


def _unprefixed(message: str) -> str:
    """MESSAGE without the prefix fastai puts on an error raised in a callback: the user needs only what it says."""
    return re.sub(r"^Exception occured in `\w+` when calling event `\w+`:\s*", "", message)


def _out_of_gpu_memory(e: BaseException) -> bool:
    """Whether E is torch's CUDA out-of-memory error (without importing torch for a command that never did)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the process ends (torch warns, and NCCL may hang, otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _error(message: str) -> None:
    """Print one error line (as text: "[stages]" is not markup) and exit 1."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _at_least(minimum: float, **options) -> None:
    """Refuse option values below a minimum, naming the option (--seed -1 would reach numpy as a traceback)."""
    for name, value in options.items():
        if value is not None and value < minimum:
            raise CvfastError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")


def _version(value: bool) -> None:
    """--version: print the installed version and stop."""
    if value:
        from cvfast import __version__

        typer.echo(f"cvfast {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, and tracebacks of unexpected failures.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False) -> None:
    """Set up logging for every command."""
    import os

    from cvfast.allocator import current
    from cvfast.util.distributed import check_distributed_environment

    VERBOSE["on"] = verbose
    try:
        check_distributed_environment()
    except CvfastError as e:
        _error(str(e))
    # data parallel (torchrun / accelerate launch): rank 0 tells the story, the others only warn
    level = logging.DEBUG if verbose else logging.WARNING if quiet or int(os.environ.get("RANK", 0)) else logging.INFO
    for c in (console, stdout):
        if not c.is_terminal:
            c.width, c.soft_wrap = UNWRAPPED_WIDTH, True
    handler = RichHandler(console=console, show_path=False) if console.is_terminal else logging.StreamHandler()
    if not console.is_terminal:  # a file or a pipe: one plain line per record (timestamp, level, logger, message)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger(__name__).debug("memory allocator: %s (CVFAST_ALLOCATOR=system for the system's)", current())


def _size(text: str) -> tuple[int, int]:
    from cvfast.data.synth.render import parse_size

    return parse_size(text)


def _print_summary(df, title: str) -> None:
    from cvfast.data.manifest import summarize

    if "shard" in df.columns:  # one shard of a sharded preparation: no splits until the merge
        console.print(f"{title}: shard {df['shard'].iloc[0] if len(df) else ''} converted {len(df)} images; merge when every shard is done")
        return

    table = Table(title=title)
    s = summarize(df)
    for col in ["split", *s.columns]:
        table.add_column(col)
    for split, row in s.iterrows():
        table.add_row(split, *(str(v) for v in row))
    stdout.print(table)


DIFFICULTY = typer.Option(help="hard: benign and malignant lesions overlap in look, as real ones do; easy: they never do.")


@app.command()
@handles_errors
def synth(out: Annotated[Path, typer.Argument(help="Output folder (gets ddsm/, inbreast/, ground_truth.json).")],
          patients: Annotated[int, typer.Option(help="Patients (women) per dataset.")] = 24,
          seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
          size: Annotated[str, typer.Option(help="tiny | small | realistic | HxW of the DDSM-like images.")] = "tiny",
          difficulty: Annotated[str, DIFFICULTY] = "hard",
          layouts: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(n for n, d in DATASETS.items() if d.synthetic)}, or all.")] = "ddsm,inbreast") -> None:
    """Generate synthetic mammograms in the layouts of the public datasets (CBIS-DDSM, INbreast, RSNA, VinDr-Mammo, CMMD)."""
    from cvfast.data.synth import LAYOUTS, synthesize

    _at_least(0, seed=seed)
    _at_least(1, patients=patients)
    names = LAYOUTS if layouts.strip() == "all" else tuple(v.strip() for v in layouts.split(",") if v.strip())
    truth = synthesize(out, patients=patients, seed=seed, size=size, difficulty=difficulty, layouts=names)
    counts = ", ".join(f"{len(truth[name]['images'])} {name}" for name in names)
    console.print(f"wrote {counts} images to {out}")


OUT = Annotated[Path, typer.Option("--out", "-o", help="DATA folder for manifest.csv, rejects.csv and the cache.")]
SIZE = Annotated[str, typer.Option("--size", help="Working size HxW (the paper: 1152x896).")]
WORKERS = Annotated[Optional[int], typer.Option(help="Worker processes (default: one per core).")]
SEED = Annotated[int, typer.Option(help="Seed of the patient-level splits.")]
VALID = Annotated[float, typer.Option(help="Fraction of patients for validation (drawn from train).")]
TEST = Annotated[float, typer.Option(help="Fraction of patients for test where the dataset has no official split.")]


SHARD = Annotated[Optional[str], typer.Option(help="K/N: convert only the K-th of N shards (a job array); then `cvfast prepare merge OUT`.")]


def _shard(text: str | None) -> tuple[int, int] | None:
    """'2/8' -> (2, 8)."""
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CvfastError(f"--shard {text!r}: expected K/N, e.g. 2/8") from None
    if not 1 <= k <= n:
        raise CvfastError(f"--shard {text}: K must be between 1 and N")
    return k, n


CROP = Annotated[str, typer.Option(help="breast: crop each image to the breast's bounding box before resizing; none: keep it whole.")]
FLIP = Annotated[Optional[str], typer.Option(help="left|right: flip every breast to this side of the image.")]
BLANK = Annotated[bool, typer.Option("--blank/--no-blank", help="Set everything outside the breast (film labels, markers, edge strips) to "
                                     "the background value before resizing.")]


def _opts(out: Path, size: str, workers: int | None, seed: int, valid_frac: float, test_frac: float, shard: str | None = None,
          crop: str = "none", flip_to: str | None = None, blank: bool = False):
    from cvfast.data.crop import CropSpec
    from cvfast.data.ingest.common import PrepareOptions

    if not 0 <= valid_frac < 1 or not 0 <= test_frac < 1 or valid_frac + test_frac >= 1:
        raise CvfastError(f"--valid-frac {valid_frac} / --test-frac {test_frac}: each in [0, 1) and together below 1")
    if workers is not None and workers < 1:
        raise CvfastError(f"--workers {workers}: must be at least 1")
    _at_least(0, seed=seed)
    if crop not in ("none", "breast"):
        raise CvfastError(f"--crop {crop!r}: expected breast or none")
    return PrepareOptions(out=out, size=_size(size), workers=workers, seed=seed, valid_frac=valid_frac, test_frac=test_frac, shard=_shard(shard),
                          crop=CropSpec(breast=crop == "breast", flip_to=flip_to, blank=blank))


def _prepare_command(ds: Dataset) -> Callable:
    """`cvfast prepare NAME`: the registry entry's adapter behind the options every dataset shares and its own."""

    def command(source: Path, out: Path, size: str, workers: int | None, seed: int, valid_frac: float, shard: str | None, crop: str,
                flip_to: str | None, blank: bool, test_frac: float = 0.0, **own: str | None) -> None:
        opts = _opts(out, size, workers, seed, valid_frac, test_frac, shard, crop, flip_to, blank)
        df = ds.prepare(source, opts, **{o.name: o.parse(own[o.name]) for o in ds.options})
        _print_summary(df, f"{ds.title if ds.name != 'csv' else source.name} -> {out}")

    def option(name: str, annotation, default) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    params = [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(help=ds.source_help)]),
              option("out", OUT, inspect.Parameter.empty), option("size", SIZE, "1152x896"), option("workers", WORKERS, None),
              option("seed", SEED, 0), option("valid_frac", VALID, 0.15), option("shard", SHARD, None), option("crop", CROP, ds.crop),
              option("flip_to", FLIP, None), option("blank", BLANK, ds.blank)]
    if not ds.official_test:
        params.append(option("test_frac", TEST, 0.2))
    params += [option(o.name, Annotated[Optional[str], typer.Option(help=o.help)], o.default) for o in ds.options]
    command.__signature__ = inspect.Signature(params)
    command.__name__, command.__doc__ = f"prepare_{ds.name}", ds.summary
    return handles_errors(command)


for _dataset in DATASETS.values():
    prepare_app.command(_dataset.name)(_prepare_command(_dataset))


@prepare_app.command("merge")
@handles_errors
def prepare_merge_cmd(out: Annotated[Path, typer.Argument(help="The DATA folder every shard wrote into.")]) -> None:
    """Merge the shards of `prepare ... --shard K/N` into one manifest; the patient-level splits are drawn once over all."""
    from cvfast.data.ingest.common import merge_shards

    _print_summary(merge_shards(out), f"merged -> {out}")


class PatchSet(str, Enum):
    """The paper's patch sets."""

    s1 = "s1"
    s10 = "s10"


@app.command()
@handles_errors
def patches(data: Annotated[Path, typer.Argument(help="A prepared DATA folder (with ROI masks).")],
            set_: Annotated[PatchSet, typer.Option("--set", help="s1: one centred patch per ROI; s10: ten around it.")] = PatchSet.s10,
            size: Annotated[int, typer.Option(help="Patch side in pixels of the working-size image.")] = 224,
            out: Annotated[Optional[Path], typer.Option(help="Output folder (default DATA/patches_<set>).")] = None,
            n_roi: Annotated[Optional[int], typer.Option(help="Patches per ROI (default from the set).")] = None,
            n_background: Annotated[Optional[int], typer.Option(help="Background patches per image (default from the set).")] = None,
            edge_share: Annotated[float, typer.Option(help="Share of the background patches on the breast's edge (skin line, chest "
                                                           "wall) instead of inner tissue; 0 is the paper's sampler.")] = 0.0,
            seed: Annotated[int, typer.Option(help="Sampling seed; same seed, same patches.")] = 0,
            workers: WORKERS = None) -> None:
    """Cut the paper's S1/S10 patch sets (5 classes, stored order) with the patient-level split carried over."""
    from dataclasses import replace

    from cvfast.data.sample import PATCH_SETS, make_patches

    _at_least(0, seed=seed, n_roi=n_roi, n_background=n_background)
    _at_least(1, workers=workers)
    spec = replace(PATCH_SETS[set_.value], size=size, seed=seed, edge_share=edge_share)
    if n_roi is not None:
        spec = replace(spec, n_roi=n_roi)
    if n_background is not None:
        spec = replace(spec, n_background=n_background)
    df = make_patches(data, spec, out=out, workers=workers)
    table = Table(title=f"patch set {spec.name} ({len(df)} patches)")
    counts = df.groupby(["label", "split"]).size().unstack(fill_value=0)
    table.add_column("class")
    for c in counts.columns:
        table.add_column(c)
    for cls, row in counts.iterrows():
        table.add_row(cls, *(str(v) for v in row))
    stdout.print(table)


recipes_app = typer.Typer(help="The paper's configurations as TOML recipes (shipped in cvfast/recipes/).", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RECIPE = Annotated[Optional[str], typer.Option(help="Recipe name (cvfast recipes list) or TOML path.")]
BS = Annotated[Optional[int], typer.Option(help="Batch size (overrides the recipe).")]
EPOCHS_SCALE = Annotated[Optional[float], typer.Option(help="Multiply every stage's epochs by this.")]
QUICK = Annotated[bool, typer.Option(help="Smoke run on a CPU: 1/10 of the epochs, 1/4 of the image size.")]
RESUME = Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last epoch.")]
TRAIN_SIZE = Annotated[Optional[str], typer.Option(help="Train at HxW (default: the recipe's, else the cache's).")]
GRAD_ACC = Annotated[Optional[int], typer.Option(help="Accumulate gradients over this many batches.")]
MODEL_OUT = Annotated[Path, typer.Option("--out", "-o", help="Model folder: model.pkl, model.safetensors, model.json, recipe.json.")]
DEVICE = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, mps (default: the best available; under torchrun each rank's GPU).",
                                               rich_help_panel="Runtime")]
PRECISION = Annotated[str, typer.Option(help="auto (bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPU), bf16, fp16, fp32.",
                                        rich_help_panel="Runtime")]
LOG = Annotated[Optional[str], typer.Option(help="Also log to tensorboard (OUT/tensorboard; `tensorboard --logdir OUT`). "
                                             "Every run writes OUT/checkpoints/history.csv.", rich_help_panel="Runtime")]
CHANNELS_LAST = Annotated[Optional[bool], typer.Option(help="channels_last memory format (default: on CUDA GPUs and CPUs, where it is faster; off on MPS).",
                                                       rich_help_panel="Runtime")]
COMPILE = Annotated[bool, typer.Option("--compile", help="torch.compile the model (first batches are slow while it compiles).",
                                       rich_help_panel="Runtime")]
LOADER_WORKERS = Annotated[Optional[int], typer.Option("--workers", help="DataLoader reader processes (default: up to 8 on a GPU, 0 on CPU).",
                                                       rich_help_panel="Runtime")]


def _runtime(device: str | None, precision: str, channels_last: bool | None, compile: bool, workers: int | None, log: str | None = None):
    """The Runtime of a training command from its options."""
    from cvfast.train.runtime import Runtime

    return Runtime(device=device, precision=precision, channels_last=channels_last, compile=compile, workers=workers, log=log)


def _resolve(default: str, recipe: str | None, overrides: dict, epochs_scale: float | None, quick: bool) -> dict:
    """Load the recipe (given or default) and apply CLI overrides."""
    from cvfast.train.recipes import load_recipe, resolve

    if overrides.get("data", {}).get("bs") is not None and overrides["data"]["bs"] < 1:
        raise CvfastError(f"--bs {overrides['data']['bs']}: must be at least 1")
    if epochs_scale is not None and epochs_scale <= 0:
        raise CvfastError(f"--epochs-scale {epochs_scale}: must be positive")
    return resolve(load_recipe(recipe or default), overrides, epochs_scale=epochs_scale, quick=quick)


def _print_metrics(result, title: str) -> None:
    from cvfast.util.distributed import is_main_process

    if not is_main_process():  # data parallel: rank 0 reports
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for k, v in result.metrics.items():
        if k != "classes":
            text = ", ".join(f"{n} {x:.3f}" for n, x in v.items()) if isinstance(v, dict) else f"{v:.4f}" if isinstance(v, float) else str(v)
            table.add_row(k, text)
    stdout.print(table)
    console.print(f"model written to {result.out} (model.pkl, model.safetensors + model.json)")


@app.command()
@handles_errors
def patch(data: Annotated[Path, typer.Option("--data", help="Patch set folder from `cvfast patches`.")],
          out: MODEL_OUT = Path("models/patch"),
          arch: Annotated[Optional[str], typer.Option(help="resnet50, vgg16, vgg16_bn or any timm name.")] = None,
          weights: Annotated[Optional[Path], typer.Option(help="Local pretrained weights file for --arch.")] = None,
          pretrained: Annotated[Optional[bool], typer.Option(help="ImageNet weights from the hub (random init if unreachable).")] = None,
          head: Annotated[Optional[str], typer.Option(help="paper (GAP + FC) or fastai.")] = None,
          recipe: RECIPE = None, bs: BS = None,
          size: Annotated[Optional[int], typer.Option(help="Resize patches to this side on the fly.")] = None,
          epochs_scale: EPOCHS_SCALE = None, quick: QUICK = False, resume: RESUME = True,
          device: DEVICE = None, precision: PRECISION = "auto", channels_last: CHANNELS_LAST = None, compile: COMPILE = False,
          workers: LOADER_WORKERS = None, log: LOG = None) -> None:
    """Step 1: train the patch classifier (5 classes) with the paper's 3-stage schedule."""
    from cvfast.data.sample import check_patch_set
    from cvfast.train.pipeline import train_patch
    from cvfast.train.recipes import recipe_paths

    patch_set = check_patch_set(data)["spec"]["name"]
    default = f"patch-{patch_set}-{arch}" if f"patch-{patch_set}-{arch}" in recipe_paths() else f"patch-{patch_set}-resnet50"
    r = _resolve(default, recipe, {"model": {"arch": arch, "pretrained": pretrained, "head": head}, "data": {"bs": bs, "size": size}}, epochs_scale, quick)
    runtime = _runtime(device, precision, channels_last, compile, workers, log)
    _print_metrics(train_patch(r, data, out, weights=weights, resume=resume, runtime=runtime), "patch classifier")


class Top(str, Enum):
    """Top blocks of the whole-image model."""

    resnet = "resnet"
    vgg = "vgg"


@app.command()
@handles_errors
def whole(patch: Annotated[Path, typer.Option("--patch", help="Patch model: folder, model.json or model.pkl.")],
          data: Annotated[Path, typer.Option("--data", help="Prepared DATA folder (whole images).")],
          out: MODEL_OUT = Path("models/whole"),
          top: Annotated[Optional[Top], typer.Option(help="New top blocks (default: the recipe's, else resnet).")] = None,
          heatmap: Annotated[Optional[bool], typer.Option(help="Keep the patch head as a 1x1-conv heatmap before the top (default: the recipe's).")] = None,
          recipe: RECIPE = None, bs: BS = None,
          size: TRAIN_SIZE = None, grad_acc: GRAD_ACC = None,
          epochs_scale: EPOCHS_SCALE = None, quick: QUICK = False, resume: RESUME = True,
          device: DEVICE = None, precision: PRECISION = "auto", channels_last: CHANNELS_LAST = None, compile: COMPILE = False,
          workers: LOADER_WORKERS = None, log: LOG = None) -> None:
    """Step 2: convert the patch classifier into the all-convolutional whole-image classifier and train it."""
    from cvfast.train.pipeline import train_whole

    default = f"whole-{top.value if top else 'resnet'}{'-heatmap' if heatmap else ''}"
    r = _resolve(default, recipe, {"model": {"top": top.value if top else None, "heatmap": heatmap},
                                   "data": {"bs": bs, "size": list(_size(size)) if size else None, "grad_acc": grad_acc}}, epochs_scale, quick)
    runtime = _runtime(device, precision, channels_last, compile, workers, log)
    _print_metrics(train_whole(r, data, patch, out, resume=resume, runtime=runtime), "whole-image classifier")


# datasets a whole-image model is transferred to (image-level labels only): the registry's
TransferDataset = Enum("TransferDataset", {name: name for name, d in DATASETS.items() if d.transfer}, type=str)


@app.command()
@handles_errors
def finetune(source: Annotated[Path, typer.Option("--from", help="Whole-image model: folder, model.json or model.pkl.")],
             data: Annotated[Path, typer.Option("--data", help="Prepared DATA folder of the target dataset.")],
             dataset: Annotated[TransferDataset, typer.Option(help="What DATA holds (recorded with the model).")] = TransferDataset.inbreast,
             out: MODEL_OUT = Path("models/finetune"),
             scratch: Annotated[bool, typer.Option(help="Control: same architecture from random init, same budget.")] = False,
             recipe: RECIPE = None, bs: BS = None,
             size: TRAIN_SIZE = None, grad_acc: GRAD_ACC = None,
             epochs_scale: EPOCHS_SCALE = None, quick: QUICK = False, resume: RESUME = True,
             device: DEVICE = None, precision: PRECISION = "auto", channels_last: CHANNELS_LAST = None, compile: COMPILE = False,
             workers: LOADER_WORKERS = None, log: LOG = None) -> None:
    """Transfer: fine-tune a whole-image model on a dataset with image-level labels only (early stopping on AUC)."""
    from cvfast.train.pipeline import finetune as run_finetune

    r = _resolve("finetune-inbreast", recipe, {"data": {"bs": bs, "size": list(_size(size)) if size else None, "grad_acc": grad_acc,
                                                        "dataset": dataset.value}}, epochs_scale, quick)
    runtime = _runtime(device, precision, channels_last, compile, workers, log)
    _print_metrics(run_finetune(r, data, source, out, scratch=scratch, resume=resume, runtime=runtime), f"fine-tuned on {dataset.value}")


@app.command("lr-find")
@handles_errors
def lr_find(recipe: Annotated[str, typer.Option(help="Recipe name or path (its kind says which learner).")],
            data: Annotated[Path, typer.Option("--data", help="Patch set (patch recipes) or DATA folder (whole/finetune).")],
            model: Annotated[Optional[Path], typer.Option(help="Patch model (whole recipes) or whole model (finetune recipes).")] = None,
            stage: Annotated[int, typer.Option(help="Use this stage's freeze state and groups (1-based).")] = 1,
            num_it: Annotated[int, typer.Option(help="Iterations (at least 50).")] = 100,
            out: Annotated[Path, typer.Option("--out", "-o", help="PNG of the loss vs learning-rate curve.")] = Path("lr_find.png"),
            device: DEVICE = None, precision: PRECISION = "auto", channels_last: CHANNELS_LAST = None, compile: COMPILE = False,
            workers: LOADER_WORKERS = None) -> None:
    """Run fastai's lr_find on the learner a recipe builds; save the plot and print the suggestions."""
    import tempfile

    from cvfast.data.blocks import data_files
    from cvfast.models.artifact import model_files
    from cvfast.train.lr import find_lr
    from cvfast.train.pipeline import learner_from_recipe
    from cvfast.train.recipes import load_recipe
    from cvfast.train.schedule import stages_from
    from cvfast.util.files import refuse_overwrite

    r = load_recipe(recipe)
    stages = stages_from(r["stages"])
    if not 1 <= stage <= len(stages):
        raise CvfastError(f"--stage {stage}: the recipe has {len(stages)} stages")
    if r["kind"] != "patch" and model is None:
        raise CvfastError(f"--model is required for a {r['kind']} recipe")
    runtime = _runtime(device, precision, channels_last, compile, workers)
    refuse_overwrite([out], [*data_files(data), *(model_files(model) if model else [])], hint="choose another --out for the plot")
    with tempfile.TemporaryDirectory() as tmp:
        learn, cbs = learner_from_recipe(r, data, model, tmp, runtime)
        suggestions = find_lr(learn, stages[stage - 1], num_it=num_it, plot=out, cbs=cbs)
    for name, value in suggestions.items():
        stdout.print(f"{name}: {value:.2e}")
    console.print(f"plot written to {out}")


@recipes_app.command("list")
@handles_errors
def recipes_list() -> None:
    """List the recipes with their kind and description."""
    from cvfast.train.recipes import load_recipe, recipe_paths

    table = Table(title="recipes")
    for col in ("name", "kind", "epochs", "description"):
        table.add_column(col)
    for name in recipe_paths():
        r = load_recipe(name)
        table.add_row(name, r["kind"], "+".join(str(s["epochs"]) for s in r["stages"]), r.get("description", ""))
    stdout.print(table)


@recipes_app.command("show")
@handles_errors
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or path.")],
                 resolved: Annotated[bool, typer.Option("--resolved", help="The typed recipe with every default written out.")] = False) -> None:
    """Print a recipe's TOML (as written, comments included; --resolved: every key with its value)."""
    from cvfast.train.recipes import as_toml, load_recipe, recipe_paths, typed

    recipe = load_recipe(name)  # validates, and gives the clear error for unknown names
    path = recipe_paths().get(name, Path(name))
    # plain text, never re-wrapped: `cvfast recipes show NAME > mine.toml` is valid TOML that loads back as the same recipe
    typer.echo(as_toml(typed(recipe)) if resolved else path.read_text(), nl=False)


class Level(str, Enum):
    """Evaluation unit."""

    image = "image"
    breast = "breast"
    exam = "exam"


class Aggregation(str, Enum):
    """How a breast's or exam's images are combined."""

    mean = "mean"
    max = "max"


class View(str, Enum):
    """Result grids of `cvfast show`."""

    batch = "batch"
    results = "results"
    top_losses = "top-losses"
    confusion = "confusion"


def _rejects_table(rejects: list[dict], title: str) -> None:
    table = Table(title=title)
    table.add_column("input")
    table.add_column("reason")
    for r in rejects:
        table.add_row(str(r["row"] or r["source"]), r["reason"])
    console.print(table)


@app.command()
@handles_errors
def predict(model: Annotated[Path, typer.Argument(help="Model: folder, model.json or model.pkl.")],
            inputs: Annotated[list[Path], typer.Argument(help="Image files (DICOM/PNG/TIFF/PGM), folders, a prepared DATA folder or a CSV with a path column.")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Predictions CSV (rejected inputs go to OUT.rejects.csv).")] = Path("preds.csv"),
            ensemble: Annotated[Optional[list[Path]], typer.Option(help="More models to average with MODEL (repeat the option).")] = None,
            tta: Annotated[bool, typer.Option(help="Test-time augmentation: average over the 4 flips.")] = False,
            split: Annotated[Optional[str], typer.Option(help="Only this split of a manifest/CSV input (e.g. test).")] = None,
            bs: Annotated[int, typer.Option(help="Batch size.")] = 8,
            workers: Annotated[int, typer.Option(help="DataLoader worker processes reading the images.")] = 0,
            device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, mps (default: the best available).")] = None) -> None:
    """Predict the cancer probability (and patch-class probabilities) per image, batched, with the model's own preprocessing."""
    from cvfast.infer.predict import predict as run_predict
    from cvfast.infer.predict import write_predictions, write_rejects

    if bs < 1 or workers < 0:
        raise CvfastError(f"--bs {bs} / --workers {workers}: batch size at least 1, workers at least 0")
    device = str(_runtime(device, "fp32", None, False, None).torch_device)  # a clear error for --device cuda without a GPU
    result = run_predict([model, *(ensemble or [])], inputs, tta=tta, bs=bs, num_workers=workers, device=device, split=split)
    if result.rejects:
        _rejects_table(result.rejects, f"{len(result.rejects)} inputs not predicted")
    if result.frame.empty:
        raise CvfastError("nothing could be predicted" + (f"; reasons above and in {write_rejects(result, out)}" if result.rejects else ": no inputs"))
    write_predictions(result, out)
    console.print(f"{len(result.frame)} images predicted with {len(result.models)} model(s){' and 4-flip TTA' if tta else ''} -> {out}")


@app.command()
@handles_errors
def evaluate(preds: Annotated[Path, typer.Argument(help="Predictions CSV from `cvfast predict` (with labels).")],
             by: Annotated[Level, typer.Option(help="Evaluation unit: image, breast (patient+side) or exam (patient).")] = Level.image,
             agg: Annotated[Aggregation, typer.Option(help="Combine a breast's/exam's images by mean or max.")] = Aggregation.mean,
             out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default: PREDS name + _eval).")] = None,
             compare: Annotated[Optional[Path], typer.Option(help="A second model's predictions on the same cases: DeLong + paired bootstrap.")] = None,
             labels: Annotated[Optional[Path], typer.Option(help="CSV image_id,label for PREDS (and for --compare or --thresholds-from files without a label column).")] = None,
             split: Annotated[str, typer.Option(help="Rows to evaluate: a split name, 'all', or 'auto' (test when present).")] = "auto",
             thresholds_from: Annotated[str, typer.Option(help="Operating points chosen on: a split, a predictions CSV, 'auto' (valid when present) or 'self'.")] = "auto",
             specificity: Annotated[Optional[list[float]], typer.Option(help="Operating points at these specificities (repeat; default 0.8 and 0.9).")] = None,
             n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of patients.")] = 2000,
             seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
             by_group: Annotated[Optional[str], typer.Option(help="Also AUC (95% CI) per value of this column: site_id, machine_id, density, ...")] = None) -> None:
    """ROC AUC with a patient-bootstrap 95% CI, probabilistic F1, operating points, calibration, plots; by group; vs a second model."""
    from cvfast.infer.evaluate import EvalSettings, evaluate_to, report_markdown

    specs = tuple(specificity or (0.8, 0.9))
    _at_least(0, seed=seed)
    if n_boot < 100 or not all(0 < v < 1 for v in specs):
        raise CvfastError(f"--n-boot {n_boot} / --specificity {specs}: at least 100 resamples, specificities strictly between 0 and 1")
    settings = EvalSettings(by=by.value, agg=agg.value, split=None if split == "all" else split,
                            thresholds_from=None if thresholds_from == "self" else thresholds_from, specificities=specs, n_boot=n_boot, seed=seed,
                            by_group=by_group)
    out = out or preds.with_name(f"{preds.stem}_eval")
    report = evaluate_to(preds, out, settings, compare=compare, labels=labels)
    typer.echo(report_markdown(report))  # plain: Markdown tables must not be re-wrapped
    console.print(f"report and plots written to {out}")


@app.command()
@handles_errors
def review(preds: Annotated[Path, typer.Argument(help="Predictions CSV from `cvfast predict` (with labels and a path column).")],
           out: Annotated[Path, typer.Option("--out", "-o", help="Folder for index.html, its plots, thumbnails and error overlays.")],
           model: Annotated[Optional[Path], typer.Option(help="The model that made PREDS: the worst errors get its heatmap (CAM or sliding window).")] = None,
           by: Annotated[Level, typer.Option(help="Review unit: image, breast or exam.")] = Level.image,
           agg: Annotated[Aggregation, typer.Option(help="Combine a breast's/exam's images by mean or max.")] = Aggregation.mean,
           labels: Annotated[Optional[Path], typer.Option(help="CSV image_id,label when PREDS has no labels.")] = None,
           split: Annotated[str, typer.Option(help="Rows to review: a split name, 'all', or 'auto' (test when present).")] = "auto",
           thresholds_from: Annotated[str, typer.Option(help="Operating point chosen on: a split, a predictions CSV, 'auto' (valid when present) or 'self'.")] = "auto",
           point: Annotated[str, typer.Option(help="Operating point: youden, specificity_0.8, specificity_0.9 or fixed_0.5.")] = "youden",
           errors: Annotated[int, typer.Option(help="False negatives and false positives each shown large with the heatmap.")] = 6,
           page_size: Annotated[int, typer.Option(help="Cases per page (JavaScript pagination).")] = 100,
           workers: WORKERS = None, n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of patients.")] = 2000) -> None:
    """An HTML case review: metrics with CIs, plots, every case (sortable, filterable by outcome), the worst errors with heatmaps."""
    from cvfast.infer.evaluate import EvalSettings
    from cvfast.infer.review import ReviewSettings
    from cvfast.infer.review import review as make_review
    from cvfast.util.parallel import default_workers

    _at_least(0, errors=errors)
    _at_least(1, page_size=page_size)
    if n_boot < 100:
        raise CvfastError(f"--n-boot {n_boot}: at least 100 resamples")
    settings = EvalSettings(by=by.value, agg=agg.value, split=None if split == "all" else split,
                            thresholds_from=None if thresholds_from == "self" else thresholds_from, n_boot=n_boot)
    options = ReviewSettings(point=point, errors=errors, page_size=page_size, workers=default_workers() if workers is None else workers)
    page = make_review(preds, out, model, settings, options, labels)
    console.print(f"review written to {page} (open it in a browser)")


class CrossvalStages(str, Enum):
    """What each fold trains."""

    patch = "patch"
    chain = "chain"
    finetune = "finetune"


@app.command()
@handles_errors
def crossval(data: Annotated[Path, typer.Argument(help="A prepared DATA folder (any dataset: mias, ddsm, inbreast, csv, rsna, vindr, cmmd).")],
             out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the folds' models, results, report.md/json, predictions.csv, review/.")],
             folds: Annotated[int, typer.Option(help="Number of patient-level folds.")] = 5,
             seed: Annotated[int, typer.Option(help="Seed of the folds, their validation splits and the patch sampling (training seeds are the recipes').")] = 0,
             valid_frac: Annotated[float, typer.Option(help="Fraction of each fold's training patients used for epoch selection.")] = 0.2,
             stages: Annotated[CrossvalStages, typer.Option(help="patch: the patch classifier, scored by its max over breast windows; "
                                                            "chain: + the whole-image model (the paper); finetune: a --model fine-tuned "
                                                            "with image labels only.")] = CrossvalStages.chain,
             patch_recipe: Annotated[str, typer.Option(help="Patch classifier recipe.")] = "mias-cpu-patch",
             whole_recipe: Annotated[str, typer.Option(help="Whole-image recipe.")] = "mias-cpu-whole",
             finetune_recipe: Annotated[str, typer.Option(help="Fine-tuning recipe (--stages finetune).")] = "finetune-inbreast",
             model: Annotated[Optional[Path], typer.Option(help="--stages finetune: the whole-image model to start from.")] = None,
             patch_size: Annotated[int, typer.Option(help="Patch (and window) side in working-size pixels.")] = 48,
             patch_set: Annotated[str, typer.Option(help="s10 or s1.")] = "s10",
             edge_share: Annotated[float, typer.Option(help="Share of the background patches on the breast's edge (skin line, "
                                                            "chest wall); 0 is the paper's sampler.")] = 0.0,
             stride: Annotated[Optional[int], typer.Option(help="Window stride for the max over breast windows (default patch/4).")] = None,
             weights: Annotated[Optional[Path], typer.Option(help="Local pretrained weights for the patch recipe's arch.")] = None,
             probe: Annotated[bool, typer.Option("--probe/--no-probe", help="The frozen-ImageNet linear probe on the same folds.")] = True,
             only: Annotated[Optional[list[int]], typer.Option(help="Run only this fold now (repeatable); the report waits for all.")] = None,
             review_page: Annotated[bool, typer.Option("--review/--no-review", help="Also write the review page of the pooled predictions.")] = True,
             epochs_scale: EPOCHS_SCALE = None,
             device: DEVICE = None, precision: PRECISION = "auto", channels_last: CHANNELS_LAST = None, compile: COMPILE = False,
             workers: LOADER_WORKERS = None) -> None:
    """k-fold patient-level cross-validation: per-fold and pooled AUCs with patient-bootstrap CIs, baselines and diagnostics."""
    from cvfast.crossval.report import SCORES
    from cvfast.crossval.run import CrossvalSpec
    from cvfast.crossval.run import crossval as run_crossval

    spec = CrossvalSpec(folds=folds, seed=seed, valid_frac=valid_frac, stages=stages.value, patch_recipe=patch_recipe,
                        whole_recipe=whole_recipe, finetune_recipe=finetune_recipe, model=str(model) if model else None,
                        patch_set=patch_set, patch_size=patch_size, edge_share=edge_share, epochs_scale=1.0 if epochs_scale is None else epochs_scale,
                        weights=str(weights) if weights else None, probe=probe, stride=stride, only=only, review=review_page)
    report = run_crossval(data, out, spec, _runtime(device, precision, channels_last, compile, workers))
    if report is None:
        console.print(f"folds still to run; re-run the same command to continue (results in {out / 'results'})")
        return
    table = Table(title=f"{folds}-fold cross-validation: pooled out-of-fold AUC [95% CI]")
    for col in ("score", "image", "breast", "patient"):
        table.add_column(col)
    for c, d in report["malignant_vs_rest"].items():
        table.add_row(SCORES[c], *(f"{d[b]['auc']:.3f} [{d[b]['ci95'][0]:.3f}, {d[b]['ci95'][1]:.3f}]" for b in ("image", "breast", "patient")))
    stdout.print(table)
    console.print(f"report written to {out / 'report.md'} and {out / 'report.json'}" + (f"; review page {out / 'review' / 'index.html'}" if review_page else ""))


@app.command()
@handles_errors
def heatmap(model: Annotated[Path, typer.Argument(help="Patch model (sliding windows) or whole-image model (class activation map).")],
            image: Annotated[Path, typer.Argument(help="A mammogram: DICOM, PNG, TIFF or PGM.")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Overlay PNG (with --map all: OUT_<map>.png per map).")] = Path("overlay.png"),
            map_: Annotated[Optional[str], typer.Option("--map", help="Map to draw: malignant (default), lesion, a class name, cancer (CAM) or all.")] = None,
            size: Annotated[Optional[str], typer.Option(help="Patch models: working size HxW to slide over (default: the one its patches were cut from).")] = None,
            stride: Annotated[Optional[int], typer.Option(help="Sliding-window stride in pixels (default: patch/4).")] = None,
            bs: Annotated[int, typer.Option(help="Windows per batch.")] = 64,
            alpha: Annotated[float, typer.Option(help="Opacity of the heatmap over the image.")] = 0.45,
            device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: the best available).")] = None) -> None:
    """Draw where a model looks, over the mammogram (the overlay keeps the image's aspect)."""
    from cvfast.infer.heatmap import heatmap as make_heatmap
    from cvfast.infer.heatmap import save_overlay

    if not 0 <= alpha <= 1 or bs < 1:
        raise CvfastError(f"--alpha {alpha} / --bs {bs}: alpha in [0, 1], batch size at least 1")
    hm = make_heatmap(model, image, _size(size) if size else None, stride, bs, _runtime(device, "fp32", None, False, None).torch_device)
    paths = save_overlay(hm, out, map_, alpha)
    console.print(f"{hm.kind} heatmap ({', '.join(hm.maps)}) -> {', '.join(map(str, paths))}")


@app.command()
@handles_errors
def show(model: Annotated[Path, typer.Argument(help="Model: folder, model.json or model.pkl.")],
         data: Annotated[Path, typer.Option("--data", help="Patch set (patch models) or prepared DATA folder (whole-image models).")],
         view: Annotated[View, typer.Option(help="batch, results, top-losses or confusion.")] = View.results,
         split: Annotated[str, typer.Option(help="valid or test.")] = "valid",
         n: Annotated[int, typer.Option(help="Images in the grid.")] = 9,
         out: Annotated[Path, typer.Option("--out", "-o", help="PNG of the grid.")] = Path("show.png")) -> None:
    """fastai's show_batch / show_results / top losses / confusion matrix of a trained model, as a PNG."""
    from cvfast.infer.show import show as run_show

    if n < 1:
        raise CvfastError(f"--n {n}: must be at least 1")
    console.print(f"written {run_show(model, data, out, view=view.value, split=split, n=n)}")


@app.command()
@handles_errors
def demo(out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo-out"),
         patients: Annotated[int, typer.Option(help="Synthetic patients per dataset.")] = 80,
         synth_size: Annotated[str, typer.Option(help="Synthetic image size preset or HxW.")] = "tiny",
         size: SIZE = "256x192",
         patch_size: Annotated[int, typer.Option(help="Patch side.")] = 48,
         seed: Annotated[int, typer.Option(help="Seed for data, splits, sampling and training.")] = 0,
         difficulty: Annotated[str, DIFFICULTY] = "hard",
         train: Annotated[bool, typer.Option(help="Train the models (--no-train: data stages only).")] = True) -> None:
    """End-to-end demo on built-in synthetic data: data stages, patch -> whole -> transfer, held-out AUCs."""
    from cvfast.demo import run_demo

    _at_least(0, seed=seed)
    _at_least(8, patch_size=patch_size)

    run_demo(out, patients=patients, synth_size=synth_size, size=_size(size), patch_size=patch_size, seed=seed, difficulty=difficulty,
             train=train)
    stdout.print((out / "report.md").read_text())


@app.command()
@handles_errors
def adopt(folder: Annotated[Path, typer.Argument(help="A folder an older cvfast wrote (DATA, patch set, model, crossval, report).")]) -> None:
    """Mark every file in FOLDER as cvfast's own, once, for a folder written before cvfast kept records of what it wrote
    (0.1): re-runs and resumes into it may then replace those files. Only for folders you know cvfast wrote."""
    from cvfast.util.files import adopt as adopt_folder

    if not folder.is_dir():
        raise CvfastError(f"{folder}: not a folder")
    console.print(f"{adopt_folder(folder)} files in {folder} recorded as cvfast's")


def run() -> None:
    """The `cvfast` program: re-executed once under the measured-fastest memory allocator when installed, then the app.

    (Only as a program: `app` called in-process -- typer's CliRunner, a notebook -- never replaces its process.)"""
    import sys

    from cvfast.allocator import reexec_with_allocator

    reexec_with_allocator(sys.argv[1:])
    app()


if __name__ == "__main__":
    run()
