"""Benchmark: channels_last vs contiguous tensors for training, same model, same batches, same run (the Runtime's default).

For the demo's two models (the EfficientNet-Lite0 patch classifier on 48-pixel patches, batch 32; the whole-image
classifier on it at 256x192, batch 8, the demo's narrow ResNet top) one cvfast Learner is trained on in-memory
batches with `Runtime(channels_last=False)` -- the baseline -- and with `channels_last=True`, in turn, `--rounds`
times (best of each). This measurement decided the default: channels_last on CUDA GPUs and on CPUs.

    python bench/memory_format.py [--rounds 2] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import publish  # noqa: E402
from bench._train import OUT, Config, build_learner, device_line, fastai_rate, machine, memory_dataloaders, reproduce, synthetic_batches, today, training_setup  # noqa: E402
from cvfast.train.runtime import Runtime, apply_runtime  # noqa: E402

CONFIGS = [Config("patch", "patch", "tf_efficientnet_lite0", (48, 48), 32),
           Config("whole", "whole", "tf_efficientnet_lite0", (256, 192), 8, widths=(64, 64, 128), vgg_width=64)]


def rate(cfg: Config, channels_last: bool, device: str | None, warmup: int, steps: int) -> float:
    """Training images/s of a fresh cvfast Learner with the given memory format."""
    runtime = Runtime(device=device, precision="fp32", channels_last=channels_last)
    torch.manual_seed(0)
    batches = synthetic_batches(cfg, warmup + steps, runtime.torch_device)
    learn = apply_runtime(build_learner(cfg, memory_dataloaders(cfg, batches, runtime.torch_device), OUT / "memory_format"), runtime)
    stage, cbs = training_setup(cfg)
    return fastai_rate(learn, warmup, steps, stage, cbs)


def main() -> None:
    """Measure both formats for each configuration and write the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = Runtime(device=args.device).torch_device
    lines = [f"### memory format for training ({today()}, {machine()}, torch {torch.__version__}, {device_line(device)}, fp32)", "",
             f"Reproduce: `{reproduce('memory_format.py', sys.argv[1:])}`.", "",
             f"cvfast Learner on in-memory batches, {args.warmup} warm-up + {args.steps} timed batches, best of {args.rounds} rounds, "
             "the two formats alternating in the same run.", "",
             "| model | contiguous (baseline), images/s | channels_last, images/s | channels_last vs contiguous |", "|---|---:|---:|---:|"]
    for cfg in CONFIGS:
        best = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for fmt in (False, True):
                best[fmt] = max(best[fmt], rate(cfg, fmt, args.device, args.warmup, args.steps))
        lines.append(f"| {cfg.describe()} | {best[False]:.2f} | {best[True]:.2f} | {best[True] / best[False]:.2f}x |")
    lines += ["", "The Runtime's default (`channels_last=None`) is channels_last on CUDA and CPU devices, contiguous on MPS."]
    publish("memory_format", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
