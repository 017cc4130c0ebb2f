"""Benchmark: the cost of one training step through cvfast/fastai vs a bare PyTorch loop, same model, same batches, same run.

For each configuration (the patch classifier, and the whole-image classifier at a CPU-sized working size) one model
is built by cvfast's learner factory and trained four ways, in turn, `--rounds` times (best of each kept):
- bare PyTorch loop: forward, CrossEntropyLoss, backward, Adam step, zero_grad on in-memory batches -- the baseline;
- fastai Learner on in-memory tensors: the same model and batches through cvfast's Learner (patch_learner /
  whole_image_learner, Runtime callbacks, begin_stage + fit_stage = Learner.fit): isolates callback, recorder and
  fastai-optimizer overhead;
- cvfast full pipeline: the same Learner on cvfast's real DataLoaders over a prepared cache of synthetic 16-bit PNGs
  (S10 patches for the patch model): adds decoding and the paper's augmentation;
- loader alone: that DataLoader without a model, to show whether it keeps up.
Learning rate and weight decay are those of the recipe's all-layers stage (patch-s10-resnet50, whole-resnet); the
whole-image model holds its body's BatchNorm statistics as the recipe does. Runs on any device (CPU by default
when there is no GPU; see bench/gpu_train.py for the GPU benchmark with MFU). Results go into BENCHMARKS.md.

    python bench/train_step.py [--configs patch whole] [--arch resnet50] [--patch-size 224] [--patch-bs 8]
                               [--whole-size 576x448] [--whole-bs 2] [--steps 4] [--warmup 2] [--rounds 2]
    python bench/train_step.py --tiny --no-write        # smoke run: test_resnet, tiny sizes (seconds)

On 2 CPU cores the defaults take about 5 minutes (resnet50; first run also synthesises and prepares the data).
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
from bench._train import OUT, Config, device_line, machine, measure_config, reproduce, save_md, summary_line, table_lines, today  # noqa: E402
from cvfast.data.synth.render import parse_size  # noqa: E402
from cvfast.train.runtime import Runtime  # noqa: E402


def configs(args: argparse.Namespace) -> list[Config]:
    """The configurations asked for."""
    whole = parse_size(args.whole_size)
    narrow = dict(widths=(64, 64, 128), vgg_width=64) if args.tiny else {}
    out = []
    if "patch" in args.configs:
        out.append(Config("patch", "patch", args.arch, (args.patch_size, args.patch_size), args.patch_bs, source=whole))
    if "whole" in args.configs:
        out.append(Config("whole", "whole", args.arch, whole, args.whole_bs, top=args.top, **narrow))
    return out


def main() -> None:
    """Measure each configuration and write the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=["patch", "whole"], default=["patch", "whole"])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--top", choices=["resnet", "vgg"], default="resnet", help="top blocks of the whole-image model")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--patch-bs", type=int, default=None, help="patch batch size (default 32 on a GPU, 8 on CPU)")
    ap.add_argument("--whole-size", default="576x448", help="whole-image working size HxW (the paper's is 1152x896)")
    ap.add_argument("--whole-bs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed batches per way (default 30 on a GPU, 4 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 5 on a GPU, 2 on CPU)")
    ap.add_argument("--rounds", type=int, default=2, help="repeat all ways this often; the best of each is kept")
    ap.add_argument("--patients", type=int, default=None, help="synthetic patients for the full-pipeline data (default 8)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the full-pipeline and loader measurements (no data to prepare)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both loops share it)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the Runtime's choice)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: test_resnet, 32-pixel patches, 256x192 images, narrow top")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--md-out", default=None, help="also write the section's Markdown to this file")
    args = ap.parse_args()
    if args.tiny:
        args.arch, args.patch_size, args.whole_size = "test_resnet", 32, "256x192"
    runtime = Runtime(device=args.device, precision=args.precision, compile=args.compile, workers=args.workers)
    device = runtime.torch_device
    gpu = device.type == "cuda"
    args.patch_bs = args.patch_bs or (32 if gpu else 8)
    args.steps = args.steps or (30 if gpu else 3 if args.tiny else 4)
    args.warmup = args.warmup or (5 if gpu else 1 if args.tiny else 2)
    patients = args.patients or (6 if args.tiny else 8)
    amp = runtime.amp_mode
    lines = [f"### training step cost ({today()}, {machine()}, torch {torch.__version__}, {device_line(device)}, "
             f"{amp.value if amp else 'fp32'}{', compiled' if args.compile else ''})", "",
             f"Reproduce: `{reproduce('train_step.py', sys.argv[1:])}`.", "",
             f"Same model, same batches, same run: {args.warmup} warm-up + {args.steps} timed batches per way, best of {args.rounds} rounds; "
             "validation and per-epoch checkpoints excluded. Full-pipeline data: cvfast's synthetic DDSM-like set "
             f"({patients} patients) prepared at the working size"
             + (" (tiny smoke run: the figures are not a benchmark)." if args.tiny else "."), ""]
    for cfg in configs(args):
        m = measure_config(cfg, runtime, args.warmup, args.steps, args.rounds, OUT / "train_step", pipeline=not args.no_pipeline,
                           patients=patients, synth="tiny" if args.tiny else "small", prep_workers=args.workers or None, count_flops=True)
        lines += [f"{cfg.describe()}:", "", *table_lines(m, device), "", summary_line(m), ""]
    publish("train_step", lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
