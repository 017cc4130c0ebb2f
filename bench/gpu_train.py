"""Benchmark (GPU): training images/s and model FLOP utilisation (MFU) of the paper's models, fastai vs a bare PyTorch loop.

Configurations (the paper's): the whole-image classifier at 1152x896, batch 2 -- resnet50 body + ResNet top
[512-512-1024] x 2 (recipe whole-resnet) and resnet50 body + VGG top 512 x 3 twice (whole-vgg) -- and the resnet50
patch classifier at 224, batch 32 (patch-s10-resnet50). Each is one model from cvfast's learner factory on cvfast's
Runtime (bf16 autocast via fastai's MixedPrecision, channels_last, optional --compile), trained in the same run:
- bare PyTorch loop (same model, bf16 autocast, channels_last, Adam) on in-memory batches -- the baseline;
- the real fastai Learner (begin_stage + fit_stage) on the same in-memory batches;
- the same Learner through cvfast's real DataLoaders (16-bit PNGs of a synthetic set prepared at the working size,
  the paper's augmentation on the GPU, Runtime loader workers and pinned memory), and that loader alone, to show
  that it keeps up.
FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one forward + backward. MFU = achieved FLOP/s / the
GPU's datasheet dense bf16 peak (table below, or --peak-tflops); also given against a large bf16 matrix product timed
in the same run (the achievable ceiling). Learning rate and weight decay are the recipes' all-layers stage.

    python bench/gpu_train.py [--configs whole-resnet whole-vgg patch] [--steps 100] [--warmup 10] [--compile]
    python bench/gpu_train.py --allow-cpu --tiny --no-write     # smoke run of the same code on CPU (test_resnet, tiny sizes)

Without a GPU (and without --allow-cpu) it writes a section saying so, with this command, and exits 0.
On an H200 the defaults should take about 3-4 minutes, about half of it synthesising and preparing the data (first run only).
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
from bench._train import OUT, Config, device_line, machine, matmul_ceiling, measure_config, reproduce, save_md, summary_line, table_lines, today  # noqa: E402
from cvfast.data.synth.render import parse_size  # noqa: E402
from cvfast.train.runtime import Runtime  # noqa: E402

NAME = "gpu_train"
TITLE = "GPU training throughput and MFU"
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; longest matching name wins, so
# "NVIDIA H200 NVL" (the PCIe card, 600 W) is not read as the 700 W SXM module ("NVIDIA H200").
PEAK_BF16_TFLOPS = {
    "B200": 2250.0, "B100": 1750.0, "GH200": 989.4, "H200 NVL": 835.5, "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4,
    "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10": 125.0, "A30": 165.0,
    "RTX 6000 Ada": 364.2, "RTX A6000": 154.8, "RTX 4090": 165.2, "RTX 3090": 71.0,
}


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak FLOP/s and where the figure comes from."""
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "none (not a GPU; pass --peak-tflops)"
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak of a GPU by its CUDA device name (the longest matching table entry)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12, f"{PEAK_BF16_TFLOPS[key]:g} TFLOP/s dense bf16 ({key} datasheet)"
    return None, f"unknown for {name!r} (pass --peak-tflops)"


def configs(args: argparse.Namespace) -> list[Config]:
    """The configurations asked for."""
    whole = parse_size(args.whole_size)
    narrow = dict(widths=(64, 64, 128), vgg_width=64) if args.tiny else {}
    table = {"whole-resnet": Config("whole-resnet", "whole", args.arch, whole, args.whole_bs, top="resnet", **narrow),
             "whole-vgg": Config("whole-vgg", "whole", args.arch, whole, args.whole_bs, top="vgg", **narrow),
             "patch": Config("patch", "patch", args.arch, (args.patch_size, args.patch_size), args.patch_bs, source=whole)}
    return [table[c] for c in args.configs]


def no_gpu(args: argparse.Namespace) -> list[str]:
    """The section for a run on a machine without a GPU."""
    return [f"### {TITLE}", "",
            f"No GPU was available for this run ({today()}, {machine()}, torch {torch.__version__}, "
            f"torch.cuda.is_available() = False): nothing was measured.", "",
            f"Reproduce on a GPU machine: `{reproduce('gpu_train.py', sys.argv[1:])}` (about 3 minutes on an H200; "
            "`--compile` adds torch.compile). The same code path runs on CPU as a smoke test: "
            "`python bench/gpu_train.py --allow-cpu --tiny --no-write`.", "",
            "The real-scale training check (the mini-MIAS chain: patch classifier from its ROIs, whole-image model, "
            "patient-level 5-fold cross-validated AUC; `python bench/mias_cv.py --source ../shared/data/mini-mias`) needs a GPU "
            "too and was not run for the same reason; at CPU scale it is `python bench/mias_cv.py --cpu` (BENCHMARKS.md's mini-MIAS section)."]


def main() -> None:
    """Measure each configuration on the GPU and write the section (or the no-GPU section)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=["whole-resnet", "whole-vgg", "patch"], default=["whole-resnet", "whole-vgg", "patch"])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--whole-size", default="1152x896", help="whole-image size HxW (the paper's)")
    ap.add_argument("--whole-bs", type=int, default=2)
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--patch-bs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="timed batches per way")
    ap.add_argument("--warmup", type=int, default=10, help="untimed batches first (cudnn autotuning, compilation)")
    ap.add_argument("--rounds", type=int, default=2, help="repeat all ways this often; the best of each is kept")
    ap.add_argument("--patients", type=int, default=48, help="synthetic patients for the real-loader data (~70 training images)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the real-DataLoader and loader-alone measurements")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 where the GPU has it")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (the bare loop shares the compiled model)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the Runtime's, up to 8)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, when not in the table")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no GPU (for smoke tests)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: test_resnet, 256x192 images, 32-pixel patches, 3 steps")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--md-out", default=None, help="also write the section's Markdown to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        lines = no_gpu(args)
        publish(NAME, lines, write=not args.no_write)
        save_md(lines, args.md_out)
        return
    if args.tiny:
        args.arch, args.whole_size, args.patch_size, args.patch_bs = "test_resnet", "256x192", 32, 8
        args.steps, args.warmup, args.rounds, args.patients = min(args.steps, 3), 1, 1, 6
    runtime = Runtime(device="cuda" if torch.cuda.is_available() else "cpu", precision=args.precision, compile=args.compile,
                      workers=args.workers)
    device = runtime.torch_device
    peak, peak_source = peak_flops(device, args.peak_tflops)
    ceiling, ceiling_what = matmul_ceiling(device)
    amp = runtime.amp_mode
    lines = [f"### {TITLE} ({today()}, {machine()}, torch {torch.__version__}, {device_line(device)}, "
             f"{amp.value if amp else 'fp32'}, channels_last {'on' if device.type == 'cuda' else 'off'}"
             f"{', torch.compile' if args.compile else ''})", "",
             f"Reproduce: `{reproduce('gpu_train.py', sys.argv[1:])}`.", "",
             f"Same model, same batches, same run: {args.warmup} warm-up + {args.steps} timed batches per way, best of {args.rounds} rounds; "
             f"validation and per-epoch checkpoints excluded. Peak: {peak_source}. Measured ceiling in this run: {ceiling_what} at "
             f"{ceiling / 1e12:.1f} TFLOP/s. Real-loader data: cvfast's synthetic DDSM-like set ({args.patients} patients) prepared at "
             f"{args.whole_size} (patches: S10 cut from it)." + (" Tiny smoke run on CPU: the figures are not a benchmark." if args.tiny else ""), ""]
    for cfg in configs(args):
        print(f"measuring {cfg.describe()} ...", flush=True)
        m = measure_config(cfg, runtime, args.warmup, args.steps, args.rounds, OUT / "gpu_train", pipeline=not args.no_pipeline,
                           patients=args.patients, synth="tiny" if args.tiny else "small", count_flops=True)
        lines += [f"{cfg.describe()} (recipe {cfg.recipe}, all-layers stage):", "", *table_lines(m, device, peak, ceiling), "", summary_line(m), ""]
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
