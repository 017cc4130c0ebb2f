"""Benchmark (real data): `cvfast crossval` on mini-MIAS -- the patient-level 5-fold cross-validation behind BENCHMARKS.md.

A thin caller of the library: `prepare mias` (breast crop, everything outside the breast blanked; the working-size
cache, once) -> `cvfast.crossval.crossval` (folds, patch sets, the frozen probe, patch classifier, whole-image model,
baselines, pooled AUCs with patient-bootstrap CIs, diagnostics) -> its Markdown report as the BENCHMARKS.md section.

    python bench/mias_cv.py --cpu                 # the 2-core benchmark: Lite0 from ImageNet, 256x208, 48-px patches fed at 96
    python bench/mias_cv.py --cpu --only 0 1      # some folds now, the rest (and the section) with the next command
    python bench/mias_cv.py --size 1024x800 --patch-size 224 --patch-recipe patch-s10-resnet50 --whole-recipe whole-resnet  # a GPU

Work (cache, fold folders, models, results) goes to bench/out/mias_cv/ (git-ignored); mini-MIAS itself is never copied
into the repository (research licence). Folds resume: a killed run continues with the same command, finished folds are
kept and an interrupted training resumes from its last epoch checkpoint. On a remote GPU machine whose tree limit is
below mini-MIAS's 67 MiB: `--pack bench/out/mias-webp` here (lossless WebP, ~56 MiB), carry that folder and pass it as
--source there.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import publish  # noqa: E402
from bench._train import OUT, device_line, machine, reproduce, save_md, today  # noqa: E402
from cvfast.crossval.report import markdown  # noqa: E402
from cvfast.crossval.run import CrossvalSpec, crossval  # noqa: E402
from cvfast.data.crop import CropSpec  # noqa: E402
from cvfast.data.ingest import prepare_mias  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.synth.render import parse_size  # noqa: E402
from cvfast.errors import CvfastError  # noqa: E402
from cvfast.train.runtime import Runtime  # noqa: E402

NAME = "mias_cv"
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "mini-mias"
log = logging.getLogger("mias_cv")


# ---------------------------------------------------------------- source (pack / unpack for remote machines)


def pack_source(source: Path, dest: Path) -> None:
    """Lossless WebP copy of a mini-MIAS folder (smaller than its PNGs), checked pixel for pixel; Info.txt alongside."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Info.txt", "Licence.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    total = 0
    for p in sorted(source.glob("mdb*")):
        if p.suffix.lower() not in (".png", ".pgm"):
            continue
        img = Image.open(p)
        if img.mode != "L":
            raise CvfastError(f"{p}: mode {img.mode}; --pack handles 8-bit grey images (mini-MIAS) only")
        out = dest / f"{p.stem}.webp"
        img.save(out, format="WEBP", lossless=True, quality=100, method=6)
        if not np.array_equal(np.asarray(Image.open(out).convert(img.mode)), np.asarray(img)):
            raise CvfastError(f"{p}: lossless WebP round trip differs")
        total += out.stat().st_size
    print(f"packed {source} into {dest} ({total / 2**20:.1f} MiB of images); pass --source {dest} on the other machine")


def usable_source(source: Path, work: Path) -> Path:
    """The source folder, or -- when it holds a --pack copy (.webp) -- a PNG copy of it under the work folder."""
    if not source.is_dir():
        raise CvfastError(f"{source}: mini-MIAS folder not found (--source)")
    webps = sorted(source.glob("mdb*.webp"))
    if not webps:
        return source
    from PIL import Image

    out = work / "source_png"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "Info.txt", out / "Info.txt")
    for p in webps:
        if not (out / f"{p.stem}.png").is_file():
            Image.open(p).convert("L").save(out / f".{p.stem}.tmp.png")  # WebP decodes to RGB; the pack held 8-bit grey
            os.replace(out / f".{p.stem}.tmp.png", out / f"{p.stem}.png")
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    """Prepare mini-MIAS, cross-validate (the folds asked for), and publish the report once all folds are done."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="mini-MIAS folder (Info.txt + mdbNNN.png|pgm, or a --pack copy)")
    ap.add_argument("--work", type=Path, default=OUT / "mias_cv", help="cache, fold folders, models and results (git-ignored)")
    ap.add_argument("--cpu", action="store_true", help="the 2-core benchmark's settings (256x208, 48-px patches, the mias-cpu-* recipes)")
    ap.add_argument("--size", default="256x208", help="working size HxW")
    ap.add_argument("--patch-size", type=int, default=48)
    ap.add_argument("--edge-share", type=float, default=0.0, help="share of background patches on the breast's edge")
    ap.add_argument("--patch-recipe", default="mias-cpu-patch")
    ap.add_argument("--whole-recipe", default="mias-cpu-whole")
    ap.add_argument("--stages", default="chain", choices=["patch", "chain"])
    ap.add_argument("--no-crop", action="store_true", help="prepare without the breast crop and blanking (the ablation)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, nargs="+", default=None, help="run only these folds (0-based) this time")
    ap.add_argument("--epochs-scale", type=float, default=1.0)
    ap.add_argument("--weights", default=None, help="local pretrained weights file for the patch recipe's arch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workers", type=int, default=None, help="preparation and loader worker processes")
    ap.add_argument("--pack", type=Path, default=None, help="write a lossless WebP copy of --source to this folder and exit")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--md-out", default=None, help="also write the section's Markdown to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except CvfastError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    """main() without the error handling."""
    if args.pack:
        pack_source(args.source, args.pack)
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    size = parse_size(args.size)
    crop = CropSpec() if args.no_crop else CropSpec(breast=True, blank=True)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    source = usable_source(args.source.expanduser(), args.work)
    data = args.work / f"data_{size[0]}x{size[1]}{'_uncropped' if args.no_crop else ''}"
    prepare_mias(source, PrepareOptions(out=data, size=size, seed=args.seed, workers=args.workers, crop=crop))  # resumable
    log.info("prepared in %.0f s", time.perf_counter() - t0)
    spec = CrossvalSpec(folds=args.folds, seed=args.seed, stages=args.stages, patch_recipe=args.patch_recipe, whole_recipe=args.whole_recipe,
                        patch_size=args.patch_size, edge_share=args.edge_share, epochs_scale=args.epochs_scale, weights=args.weights, only=args.only, review=False)
    runtime = Runtime(device=args.device, workers=args.workers)
    edge = f"-edge{args.edge_share:g}" if args.edge_share else ""
    tag = f"{data.name}-p{args.patch_size}{edge}-{args.patch_recipe}-{args.whole_recipe}-{args.stages}-e{args.epochs_scale:g}-k{args.folds}s{args.seed}"
    report = crossval(data, args.work / "runs" / tag, spec, runtime)
    if report is None:
        print(f"folds still to run; re-run the same command to continue ({args.work / 'runs' / tag})")
        return
    lines = [f"### mini-MIAS {args.folds}-fold patient-level cross-validation ({today()}, {device_line(runtime.torch_device)}, {machine()}, "
             f"torch {torch.__version__})", "",
             f"Reproduce: `{reproduce('mias_cv.py', sys.argv[1:])}` (mini-MIAS from its own source; research licence, not in the "
             "repository); the same with `cvfast prepare mias SRC --out D --size 256x208` then `cvfast crossval D --out CV`.", "",
             f"Real data: mini-MIAS prepared at {size[0]}x{size[1]}"
             + (" without crop" if args.no_crop else ", cropped to the breast and blanked outside it")
             + f"; S10 patches of {args.patch_size} px from the ROI circles; recipes {args.patch_recipe} -> {args.whole_recipe}; "
             f"epochs scale {args.epochs_scale:g}. Folds: StratifiedGroupKFold by woman, stratified by image label; validation = 20% of "
             "each fold's training women; patch set, mean grey, epoch selection and every baseline's fit from the training folds only.", "",
             *markdown(report)]
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
