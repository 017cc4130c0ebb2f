"""Benchmark: `cvfast predict` throughput at the working size vs the bare forward pass and vs a learn.predict() loop.

One whole-image model (the paper's: resnet50 body + ResNet top blocks [512-512-1024], untrained weights -- speed
does not depend on them) and the same working-size 16-bit PNGs (a prepared DATA cache) for all three, same run:
- bare forward: the images already decoded and normalised in memory, `model(x)` + softmax in batches -- the ceiling;
- cvfast predict: `cvfast.infer.predict.predict` (reads and preprocesses the files, fastai get_preds, batched);
- learn.predict loop: fastai's per-image `learn.predict` on the exported model.pkl.
Results (images/s and ratios) are written into BENCHMARKS.md between this benchmark's markers.

    python bench/predict_throughput.py [--images 16] [--bs 4] [--arch resnet50] [--size 1152x896]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import best_rate, publish  # noqa: E402
from cvfast.data.blocks import whole_image_dataloaders  # noqa: E402
from cvfast.data.ingest import prepare_ddsm  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.manifest import read_manifest  # noqa: E402
from cvfast.data.read import read_png  # noqa: E402
from cvfast.data.synth import synthesize  # noqa: E402
from cvfast.data.synth.render import parse_size  # noqa: E402
from cvfast.infer.predict import predict  # noqa: E402
from cvfast.models.artifact import export_model, load_model  # noqa: E402
from cvfast.models.body import create_body  # noqa: E402
from cvfast.models.patch import PatchClassifier  # noqa: E402
from cvfast.train.learners import whole_image_learner  # noqa: E402


def build(work: Path, arch: str, size: tuple[int, int], images: int) -> tuple[Path, list]:
    """A prepared DATA cache at `size` with at least `images` images, and an exported whole-image model on it."""
    data = work / "data"
    if not (data / "manifest.csv").is_file():
        synthesize(work / "synthetic", patients=max(4, images // 2), seed=0, size="small")
        prepare_ddsm(work / "synthetic" / "ddsm", PrepareOptions(out=data, size=size, seed=0))
    rows = read_manifest(data).head(images)
    patch = PatchClassifier(create_body(arch), 5)
    patch.spec = {"kind": "patch", "arch": arch, "head": "paper", "dropout": 0.0, "n_classes": 5}
    learn = whole_image_learner(whole_image_dataloaders(data, bs=2, augment=False), patch)
    export_model(learn, work / "model")
    return work / "model", [r for _, r in rows.iterrows()]


def measure(args: argparse.Namespace, size: tuple[int, int]) -> list[str]:
    """The three ways at one image size; returns the Markdown lines of its table."""
    work = ROOT / "bench" / "out" / f"predict_{args.arch}_{size[0]}x{size[1]}"
    model_dir, rows = build(work, args.arch, size, args.images)
    # small images: enough of them (hard links to the files, under other names) that per-call costs such as
    # loading the model amortise; predict drops repeated paths, so each copy needs its own name
    repeat = 1 if size[0] >= 1024 else max(1, args.small_images // len(rows))
    paths = [r["path"] for r in rows]
    if repeat > 1:
        links = work / "links"
        links.mkdir(exist_ok=True)
        copies = [links / f"{k}_{Path(p).name}" for k in range(1, repeat) for p in paths]
        for k, dst in enumerate(copies):
            if not dst.exists():
                os.link(paths[k % len(paths)], dst)
        paths += [str(c) for c in copies]
    n = len(paths)
    model, sidecar = load_model(model_dir)
    mean = sidecar["mean_grey"]
    x = torch.stack([torch.from_numpy(read_png(p).astype(np.float32) / 65535)[None] for p in paths]) - mean

    def bare(bs: int):
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, n, bs):
                    torch.softmax(model(x[i:i + bs]), dim=1)
        return run

    def cvfast_predict(bs: int, workers: int):
        return lambda: predict([model_dir], paths, bs=bs, num_workers=workers, progress=False)

    from fastai.learner import load_learner

    learn = load_learner(model_dir / "model.pkl")
    loop_rows = (rows * repeat)[: args.loop_images * (1 if repeat == 1 else 8)]

    def learn_predict_loop() -> None:
        with learn.no_bar():
            for r in loop_rows:
                learn.predict(r)

    with torch.inference_mode():  # warm-ups: allocator, kernels, file cache
        model(x[:1])
    predict([model_dir], paths[:2], bs=2, progress=False)
    learn.predict(rows[0])
    repeats = 2 if size[0] >= 1024 else 3
    table, overheads = [], []
    for bs in args.bs:
        ceiling = best_rate(bare(bs), n, repeats)
        table.append((f"bare forward pass, batch {bs}, on preprocessed in-memory tensors (ceiling)", ceiling, n, ceiling))
        for workers in (0, 1):
            r = best_rate(cvfast_predict(bs, workers), n, repeats)
            where = "files read in the main process" if workers == 0 else "1 DataLoader worker reading files"
            table.append((f"cvfast predict, batch {bs}, {where}", r, n, ceiling))
            overheads.append((ceiling / r - 1, bs, workers, r))
    loop = best_rate(learn_predict_loop, len(loop_rows), repeats)
    table.append(("fastai learn.predict() loop, one image at a time", loop, len(loop_rows), None))
    worst = max(overheads)
    best = max(o[3] for o in overheads)
    lines = [f"Whole-image model: {args.arch} body + ResNet top [512-512-1024] at {size[0]}x{size[1]}; {n} working-size 16-bit PNGs "
             f"(the prepared cache{f', {len(rows)} files repeated' if repeat > 1 else ''}); best of {repeats} timed runs of each after a warm-up, model loading included.", "",
             "| method | images | images/s | ceiling at that batch size / this |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {k} | {r:.3f} | {f'{c / r:.2f}x' if c else '--'} |" for name, r, k, c in table]
    cpu_note = (" On a CPU, batches of 1152x896 images gain little: the convolutions are already compute-bound at batch 1; "
                "batching pays off on a GPU." if size[0] >= 1024 else "")
    lines += ["", f"Target: cvfast predict within 15% of the bare forward pass at the same batch size (largest measured overhead "
              f"{100 * worst[0]:.1f}%, batch {worst[1]}, {worst[2]} workers); best cvfast predict {best / loop:.2f}x the learn.predict() loop."
              + cpu_note]
    return lines


def main() -> None:
    """Measure at each size and write the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--bs", type=int, nargs="+", default=[1, 4], help="batch sizes to measure")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--sizes", nargs="+", default=["1152x896", "288x224"], help="working sizes (the paper's and a small one)")
    ap.add_argument("--small-images", type=int, default=128, help="images per run below 1024 px")
    ap.add_argument("--loop-images", type=int, default=8, help="images for the (slow) learn.predict loop")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    lines = [f"### predict throughput ({datetime.date.today()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)", "",
             "Reproduce: `python bench/predict_throughput.py`.", ""]
    for size in args.sizes:
        lines += measure(args, parse_size(size)) + [""]
    publish("predict_throughput", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
