"""Benchmark: whole-image training input pipeline vs what the model consumes, and the PNG vs .npy cache.

All measured in the same run on the same working-size 16-bit images (a DATA folder made by cvfast's own
`prepare csv` from a few distinct synthetic mammograms, copied to N sources with one pixel changed, so the cache is the
real one):
- model consumption: training images/s of the whole-image model (resnet50 body + ResNet top [512-512-1024], the
  paper's), forward + backward + fastai Adam step on in-memory tensors -- the baseline every other row is divided by;
- decode in one process: the 16-bit PNG cache as the training DataLoader reads it (cvfast.data.blocks.open_mammo16:
  read_png, OpenCV, int32), the same files through PIL mode 'I' (fastai's PILImageBW path, int32; what the loader
  used before this benchmark), and a uint16 .npy cache (np.load(mmap_mode='r') + copy);
- the real training input pipeline: `whole_image_dataloaders(DATA, num_workers=w)`, one epoch of its train
  DataLoader, w = 0, 1, 2: as on CPU (decode + collate + the paper's augmentation and normalisation as batch
  transforms in the main process) and reader only (batch transforms off: on a GPU they run on the GPU);
- worker start-up per epoch: the reader-only epoch with cvfast's persistent workers against fastai's own loader,
  whose workers restart every epoch (the baseline of that table).
Results are written into BENCHMARKS.md between this benchmark's markers.

    python bench/loader_throughput.py [--images 64] [--unique 8] [--size 1152x896] [--bs 2] [--workers 0 1 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from fastai.vision.core import PILImageBW, image2tensor  # noqa: E402
from fasttransform import Pipeline  # noqa: E402

from bench._results import best_rate, publish  # noqa: E402
from cvfast.data.blocks import open_mammo16, whole_image_dataloaders  # noqa: E402
from cvfast.data.ingest import prepare_csv  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.manifest import read_manifest  # noqa: E402
from cvfast.data.read import read_png, write_png  # noqa: E402
from cvfast.data.synth.render import (  # noqa: E402
    LesionSpec,
    _rng,
    parse_size,
    render_image,
    to_ddsm_pixels,
)
from cvfast.models.body import create_body  # noqa: E402
from cvfast.models.patch import PatchClassifier  # noqa: E402
from cvfast.train.learners import whole_image_learner  # noqa: E402


class PILMode16(PILImageBW):
    """fastai's PIL path for 16-bit PNGs (mode 'I', int32): the comparison for the loader's OpenCV reader."""

    _open_args = {"mode": "I"}


def gpu_rate_estimate(size: tuple[int, int]) -> float:
    """Estimated training images/s of this model on one H200 at `size` -- NOT measured here.

    timm's benchmark gives resnet50 ~2,600 images/s at 224x224 on an A100 with AMP + channels_last
    (huggingface/pytorch-image-models#1491); x1.5 assumed for an H100/H200-class GPU; divided by the pixel count
    relative to 224x224 (20.6 at 1152x896) and by 1.04 for the ResNet top blocks (+4% multiply-adds at 1152x896).
    """
    return 2600 * 1.5 / (size[0] * size[1] / 224**2) / 1.04


def build(work: Path, n: int, unique: int, size: tuple[int, int], valid: int = 2) -> tuple[Path, list[str], list[str]]:
    """DATA folder from `prepare csv` with n train (+ valid) images rendered from `unique` mammograms; and a .npy copy.

    Returns the DATA folder, the train PNG paths and the matching .npy paths.
    """
    h, w = size
    data, src, npy = work / "data", work / "src", work / "npy"
    marker = work / f"done-{n}-{unique}-{h}x{w}"
    if not marker.is_file():
        shutil.rmtree(work, ignore_errors=True)
        src.mkdir(parents=True)
        rows = []
        for i in range(n + valid):
            f = src / f"{i:03d}.png"
            if i < unique:
                rng = _rng(0, "loader-bench", i)
                lesion = LesionSpec("mass" if i % 2 else "calc", bool(i % 3 == 0), 0.045)
                signal, *_ = render_image(rng, h, w, "LR"[i % 2], ("CC", "MLO")[i % 2], [lesion], 0.5)
                write_png(f, to_ddsm_pixels(rng, signal, with_label=True))
            else:  # rendering is the slow part: a copy with one pixel changed decodes at the same cost (prepare drops
                # files that are one file, or one image, as duplicates)
                pixels = read_png(src / f"{i % unique:03d}.png").copy()
                pixels[0, i] += 1
                write_png(f, pixels)
            rows.append({"path": f.name, "label": i % 2, "patient_id": f"L{i:03d}", "split": "train" if i < n else "valid"})
        pd.DataFrame(rows).to_csv(src / "labels.csv", index=False)
        # the real cache: cvfast's own prepare (working-size sources, so the resize is the identity)
        prepare_csv(src / "labels.csv", PrepareOptions(out=data, size=size, workers=1, valid_frac=0.0, test_frac=0.0))
        npy.mkdir()
        for _, r in read_manifest(data).iterrows():
            np.save(npy / f"{r['image_id']}.npy", read_png(r["path"]))
        marker.touch()
    df = read_manifest(data)
    train = df[df["split"] == "train"].sort_values("image_id")
    return data, train["path"].tolist(), [str(npy / f"{i}.npy") for i in train["image_id"]]


def plural(k: int) -> str:
    """'s' unless k is 1."""
    return "" if k == 1 else "s"


def times(x: float) -> str:
    """A ratio with sensible precision: 2.35x, 23.5x, 235x."""
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def loader_rate(data: Path, bs: int, workers: int, batch_tfms: bool, repeats: int, persistent: bool = True) -> tuple[float, float, float, int]:
    """Steady images/s of the training DataLoader over an epoch (best of `repeats` after a warm-up epoch), the time
    from the start of an epoch to its first batch (median), the epoch's wall-clock time (median), and the images per epoch.

    persistent=True is cvfast's loader (its workers start once and serve every epoch); False is fastai's own, whose
    workers start anew every epoch. The steady rate is timed from the arrival of batch max(1, workers) to the last one,
    so that the start of an epoch (worker start-up, the pipeline filling) does not count against a benchmark's short
    epochs; the first-batch and epoch times show that start.
    """
    dls = whole_image_dataloaders(data, bs=bs, num_workers=workers, seed=0, persistent_workers=persistent)
    dl = dls.train
    if not batch_tfms:
        dl.after_batch = Pipeline([])  # what the workers deliver: int tensors, collated
    n, skip = len(dl) * bs, max(1, workers)
    if len(dl) <= skip:
        raise SystemExit(f"--images: {len(dl)} batches per epoch, need more than {skip} to time {workers} workers")

    def epoch() -> tuple[float, float, float]:
        t0, stamps = time.perf_counter(), []
        for _ in dl:
            stamps.append(time.perf_counter())
        return (len(stamps) - skip) * bs / (stamps[-1] - stamps[skip - 1]), stamps[0] - t0, stamps[-1] - t0

    epoch()  # warm-up: allocator, first resample kernels, file cache (and cvfast's workers' start)
    runs = [epoch() for _ in range(repeats)]
    dl.close()
    return max(r for r, _, _ in runs), statistics.median(s for _, s, _ in runs), statistics.median(e for _, _, e in runs), n


def model_rate(data: Path, paths: list[str], arch: str, bs: int, steps: int, warmup: int) -> float:
    """Training images/s of the whole-image model: forward + loss + backward + Adam step on an in-memory batch."""
    dls = whole_image_dataloaders(data, bs=bs, augment=False)
    patch = PatchClassifier(create_body(arch), 5)
    patch.spec = {"kind": "patch", "arch": arch, "head": "paper", "dropout": 0.0, "n_classes": 5}
    learn = whole_image_learner(dls, patch)
    learn.create_opt()  # fastai's Adam over the paper's parameter groups, all layers trainable
    model = learn.model.train()
    x = torch.stack([torch.from_numpy(read_png(paths[i % len(paths)]).astype(np.float32) / 65535)[None] for i in range(bs)])
    x = x - dls.info.mean_grey
    y = torch.arange(bs) % 2

    def step() -> None:
        loss = learn.loss_func(model(x), y)
        loss.backward()
        learn.opt.step()
        learn.opt.zero_grad()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for k in range(steps):
        step()
        print(f"  model step {k + 1}/{steps}: {time.perf_counter() - t:.1f} s", end="\r", flush=True)
    return bs * steps / (time.perf_counter() - t)


def conclusion(r: dict, args: argparse.Namespace) -> str:
    """The cache-format verdict, reasoned from the measured per-worker rates and the GPU estimate."""
    gpu = args.gpu_rate or gpu_rate_estimate(args.size_hw)
    pixels = args.size_hw[0] * args.size_hw[1] / 224**2
    gpu_src = ("an estimate, not measured here: resnet50 at 224x224 ~2,600 images/s on an A100 with AMP + channels_last, "
               f"x1.5 for an H200, /{pixels:.1f} for the pixels, /1.04 for the top blocks" if args.gpu_rate is None
               else "given with --gpu-rate, not measured here")
    per_worker = r["reader_w1"]  # one worker, no contention for the cores: the cleanest per-worker figure
    need_png = math.ceil(gpu / per_worker)
    # the same worker with the PNG decode (as the loader does it) swapped for the .npy read: derived, not measured
    t_npy = 1 / per_worker - 1 / r["decode_png"] + 1 / r["decode_npy"]
    per_worker_npy = 1 / t_npy if t_npy > 0 else float("inf")
    need_npy = math.ceil(gpu / per_worker_npy)
    decode_share = (1 / r["decode_png"]) / (1 / per_worker)
    cpu = (f"cvfast's CPU setting (0 workers, augmentation in the main process) reads {r['full_w0']:.1f} images/s, "
           f"{times(r['full_w0'] / r['model'])} what the model trains on" if "full_w0" in r
           else f"one reader worker delivers {times(per_worker / r['model'])} what the model trains on")
    head = (f"On this CPU the loader is never the bottleneck: {cpu}. On a GPU the batch transforms run on the GPU and only the "
            f"reader work stays on the CPU: one worker reads {per_worker:.1f} images/s, {100 * decode_share:.0f}% of its time in "
            f"the PNG decode. An H200 would train this model at about {gpu:.0f} images/s ({gpu_src}), so it needs "
            f"{gpu:.0f} / {per_worker:.1f} = {need_png} PNG reader worker{plural(need_png)}")
    npy = (f"With a .npy cache a worker would read an estimated {per_worker_npy:.1f} images/s (this worker's time with the "
           f"PNG decode swapped for the .npy read; derived, not run), {need_npy} worker{plural(need_npy)}")
    if need_png <= args.gpu_workers:
        return (head + f", within the {args.gpu_workers} loader workers per GPU that cvfast starts by default on a machine with the "
                f"cores (--gpu-workers). {npy}: it would save CPU time, not GPU time, since the PNG cache already outpaces the "
                f"GPU. The measurement supports keeping the 16-bit PNG cache (the same size on disk as .npy, uncompressed; "
                f"viewable with any image tool); .npy is not needed.")
    if need_npy <= args.gpu_workers:
        return (head + f", more than the {args.gpu_workers} loader workers per GPU that cvfast starts by default (--gpu-workers). "
                f"{npy}, which fits: the measurement supports a .npy (or other raw) cache for GPU training at this rate, or "
                f"more loader workers per GPU.")
    return (head + f", more than the {args.gpu_workers} loader workers per GPU that cvfast starts by default (--gpu-workers). "
            f"{npy}, which does not fit either: the decode is not what limits the reader, so the cache format does not "
            f"decide it; the per-image work after the decode does.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="training images (a multiple of --bs)")
    ap.add_argument("--unique", type=int, default=8, help="distinct rendered mammograms among them (near-copies beyond)")
    ap.add_argument("--size", default="1152x896", help="working size of the cache and the model input")
    ap.add_argument("--bs", type=int, default=2, help="batch size (the paper's whole-image batch is 2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to measure")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps of the model (slow on CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (best kept) of each decode and loader epoch")
    ap.add_argument("--gpu-rate", type=float, default=None, help="GPU training images/s to reason against (default: an estimate for an H200 at --size)")
    ap.add_argument("--gpu-workers", type=int, default=8, help="loader workers available per GPU (cvfast's default cap is 8)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "loader")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    size = args.size_hw = parse_size(args.size)
    if args.images % args.bs:
        ap.error(f"--images {args.images} must be a multiple of --bs {args.bs} (the train loader drops a last partial batch)")
    print(f"preparing {args.images} working-size images of {size[0]}x{size[1]} ...")
    data, pngs, npys = build(args.out, args.images, args.unique, size)
    n = len(pngs)
    for f in pngs + npys:  # warm the page cache: every method reads from memory
        Path(f).read_bytes()
    png_mb = sum(Path(f).stat().st_size for f in pngs) / n / 1e6
    npy_mb = sum(Path(f).stat().st_size for f in npys) / n / 1e6

    r: dict[str, float] = {}
    print("decoding ...")
    r["decode_png"] = best_rate(lambda: [open_mammo16(p) for p in pngs], n, args.repeats)
    r["decode_pil"] = best_rate(lambda: [image2tensor(PILMode16.create(p)) for p in pngs], n, args.repeats)
    r["decode_npy"] = best_rate(lambda: [np.array(np.load(p, mmap_mode="r")) for p in npys], n, args.repeats)
    rows = [(f"decode, 16-bit PNG cache as the DataLoader reads it (OpenCV -> int32 tensor), 1 process ({png_mb:.1f} MB/image)",
             r["decode_png"]),
            ("decode, same PNGs through PIL mode 'I' (fastai's PILImageBW path -> int32 tensor), 1 process", r["decode_pil"]),
            (f"decode, uint16 .npy cache, np.load(mmap) + copy, 1 process ({npy_mb:.1f} MB/image)", r["decode_npy"])]
    startup, epoch_s = {}, {}
    for w in args.workers:
        for tfms in (True, False):
            print(f"loader, {w} workers, batch transforms {'on' if tfms else 'off'} ...")
            rate, startup[w, tfms], epoch_s[w, tfms], _ = loader_rate(data, args.bs, w, tfms, args.repeats)
            r[f"{'full' if tfms else 'reader'}_w{w}"] = rate
            where = "in the main process" if w == 0 else f"{w} worker process{'es' if w > 1 else ''}"
            what = "decode + collate + augmentation/normalise on CPU" if tfms else "reader only: decode + collate, batch transforms off"
            rows.append((f"training DataLoader, batch {args.bs}, {where}: {what}", rate))
    restart = {}  # fastai's own loader, whose workers start anew every epoch: what cvfast's persistent workers save
    for w in (w for w in args.workers if w > 0):
        print(f"loader, {w} workers restarted every epoch (fastai's), reader only ...")
        _, first, seconds, _ = loader_rate(data, args.bs, w, False, args.repeats, persistent=False)
        restart[w] = first, seconds
    print(f"model: {args.steps} training steps at batch {args.bs} after {args.warmup} warm-up ...")
    r["model"] = model_rate(data, pngs, args.arch, args.bs, args.steps, args.warmup)
    print()

    lines = [f"### loader throughput vs model consumption ({datetime.date.today()}, {os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)", "",
             f"Whole-image training at {size[0]}x{size[1]}, batch {args.bs}: {n} working-size 16-bit images ({args.unique} distinct "
             f"synthetic mammograms, copied with one pixel changed) prepared by `cvfast prepare csv` into the PNG cache, and the same pixels as uint16 "
             f".npy; page cache warm. Model: {args.arch} body + ResNet top [512-512-1024], all layers trained, forward + backward + "
             f"Adam step on an in-memory batch, {args.steps} steps after {args.warmup} warm-up. Decode and loader: best of "
             f"{args.repeats} runs (loader: an epoch of the train DataLoader after a warm-up epoch, timed from its "
             f"max(1, workers)-th batch to its last: the steady rate of a long epoch). Reproduce: `python bench/loader_throughput.py`.", "",
             "| method | images/s | vs model consumption |", "|---|---:|---:|",
             f"| model consumption: {args.arch} whole-image training step, batch {args.bs} (baseline) | {r['model']:.3f} | 1.00x |"]
    lines += [f"| {name} | {rate:.1f} | {times(rate / r['model'])} |" for name, rate in rows]
    per_worker = [f"{w} worker{plural(w)}: {r[f'reader_w{w}'] / w:.1f} reader only, {r[f'full_w{w}'] / w:.1f} with the "
                  f"batch transforms on CPU" for w in args.workers if w > 0]
    lines += ["", f"Per worker (images/s per worker process): {'; '.join(per_worker) or 'no worker counts measured'}. "
              f"Decode: .npy {r['decode_npy'] / r['decode_png']:.1f}x the PNG cache as the DataLoader reads it; PIL's mode 'I' "
              f"path is {r['decode_png'] / r['decode_pil']:.2f}x slower than OpenCV (why the loader reads with OpenCV)."]
    if restart:
        lines += ["", f"Worker start-up, paid per epoch by fastai's loader (it builds a torch iterator per epoch, so its workers "
                  f"restart and torch's persistent_workers does not apply) and once by cvfast's (`cvfast.data.loader`: the same "
                  f"batches, read by workers that serve every epoch). Reader only, an epoch of {n} images, median of "
                  f"{args.repeats} epochs after a warm-up one:", "",
                  "| workers | first batch, restarted (baseline) | first batch, persistent | epoch, restarted (baseline) | "
                  "epoch, persistent | epoch time saved |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {w} | {first:.3f} s | {startup[w, False]:.3f} s | {seconds:.3f} s | {epoch_s[w, False]:.3f} s | "
                  f"{seconds - epoch_s[w, False]:.3f} s ({100 * (1 - epoch_s[w, False] / seconds):.0f}%) |"
                  for w, (first, seconds) in restart.items()]
    if 1 in args.workers:
        lines += ["", "Conclusion: " + conclusion(r, args)]
    publish("loader_throughput", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
