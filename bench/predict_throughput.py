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
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import write_section  # noqa: E402
from cvfast.data.blocks import whole_image_dataloaders  # noqa: E402
from cvfast.data.ingest import prepare_ddsm  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.manifest import read_manifest  # noqa: E402
from cvfast.data.read import read_png  # noqa: E402
from cvfast.data.synth import parse_size, synthesize  # noqa: E402
from cvfast.infer.predict import predict  # noqa: E402
from cvfast.models.body import create_body  # noqa: E402
from cvfast.models.patch import PatchClassifier  # noqa: E402
from cvfast.train.export import export_model, load_model  # noqa: E402
from cvfast.train.learners import whole_image_learner  # noqa: E402


def build(work: Path, arch: str, size: tuple[int, int], images: int) -> tuple[Path, list]:
    """A prepared DATA cache at `size` with at least `images` images, and an exported whole-image model on it."""
    data = work / "data"
    if not (data / "manifest.csv").is_file():
        synthesize(work / "synthetic", patients=max(4, images // 3), seed=0, size="small")
        prepare_ddsm(work / "synthetic" / "ddsm", PrepareOptions(out=data, size=size, seed=0))
    rows = read_manifest(data).head(images)
    patch = PatchClassifier(create_body(arch), 5)
    patch.spec = {"kind": "patch", "arch": arch, "head": "paper", "dropout": 0.0, "n_classes": 5}
    learn = whole_image_learner(whole_image_dataloaders(data, bs=2, augment=False), patch)
    export_model(learn, work / "model")
    return work / "model", [r for _, r in rows.iterrows()]


def rate(fn, n: int) -> float:
    """Images per second of fn() over n images (after fn ran once to warm up)."""
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    """Measure the three ways and write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", default="1152x896")
    ap.add_argument("--loop-images", type=int, default=8, help="images for the (slow) learn.predict loop")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = ROOT / "bench" / "out" / f"predict_{args.arch}_{size[0]}x{size[1]}"
    model_dir, rows = build(work, args.arch, size, args.images)
    paths = [r["path"] for r in rows]
    n = len(paths)
    model, sidecar = load_model(model_dir)
    mean = sidecar["mean_grey"]
    x = torch.stack([torch.from_numpy(read_png(p).astype(np.float32) / 65535)[None] for p in paths]) - mean

    def bare() -> None:
        with torch.inference_mode():
            for i in range(0, n, args.bs):
                torch.softmax(model(x[i:i + args.bs]), dim=1)

    def cvfast_predict(workers: int):
        return lambda: predict([model_dir], paths, bs=args.bs, num_workers=workers, progress=False)

    from fastai.learner import load_learner

    learn = load_learner(model_dir / "model.pkl")
    loop_rows = rows[: args.loop_images]

    def learn_predict_loop() -> None:
        with learn.no_bar():
            for r in loop_rows:
                learn.predict(r)

    with torch.inference_mode():  # warm-ups: allocator, kernels, file cache
        model(x[: args.bs])
    predict([model_dir], paths[:2], bs=2, progress=False)
    learn.predict(rows[0])
    rates = {"bare": rate(bare, n), "predict0": rate(cvfast_predict(0), n), "predict1": rate(cvfast_predict(1), n),
             "loop": rate(learn_predict_loop, len(loop_rows))}
    table = [("bare forward pass on preprocessed in-memory tensors (ceiling)", rates["bare"], n),
             ("cvfast predict, files read in the main process", rates["predict0"], n),
             ("cvfast predict, 1 DataLoader worker reading files", rates["predict1"], n),
             ("fastai learn.predict() loop, one image at a time", rates["loop"], len(loop_rows))]
    best = max(rates["predict0"], rates["predict1"])
    lines = [f"### predict throughput ({datetime.date.today()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)", "",
             f"Whole-image model: {args.arch} body + ResNet top [512-512-1024] at {size[0]}x{size[1]}, batch {args.bs}; {n} working-size 16-bit "
             f"PNGs (the prepared cache); one timed run after a warm-up. Reproduce: `python bench/predict_throughput.py`.", "",
             "| method | images | images/s | ceiling / this |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {k} | {r:.3f} | {rates['bare'] / r:.2f}x |" for name, r, k in table]
    lines += ["", f"Target: cvfast predict within 15% of the bare forward pass (measured overhead {100 * (rates['bare'] / best - 1):.1f}%); "
              f"{best / rates['loop']:.2f}x the learn.predict() loop."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("predict_throughput", text)


if __name__ == "__main__":
    main()
