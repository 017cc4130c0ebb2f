"""The first run on a lent GPU machine: one step after another, each step's figures in OUT/<step>.json the moment it ends.

Steps, in order (a step killed at its time limit loses only itself; a second call skips the steps already done):
  env           GPU, driver, torch / CUDA / cuDNN versions, bf16, TF32, and the measured bf16 matmul ceiling (MFU's yardstick)
  train_step    one real training step of each model kind (patch classifier, whole image with ResNet top, with VGG top)
  eager         training images/s at the paper's sizes (whole image 1152x896 batch 2, patches 224 batch 32): the bare
                PyTorch loop and the fastai Learner on in-memory batches, contiguous memory, no compile; FLOPs and MFU
  channels_last the same in channels_last (cvfast's default on a GPU)
  compiled      the same, channels_last and torch.compile (recompiles logged)
  loader        cvfast's real DataLoaders (16-bit PNGs at 1152x896, GPU augmentation, workers, pinned memory) alone and
                feeding the Learner, against the model's in-memory rate: does the loader keep up?
  predict       `cvfast predict` images/s at 1152x896 against the bare forward pass on the GPU, batch 8
  mias_fold     one mini-MIAS fold at GPU scale (bench/mias_cv.py --only 0; MIAS=folder, or its `--pack` copy)

cudnn.benchmark is on in every timed step (fixed sizes). `--dry-run` runs every step at tiny sizes on the CPU (test_resnet,
256x192, 32-px patches, compile with the "eager" backend; the mini-MIAS fold only when --mias is given): CI runs it
(tests/test_gpu_check.py). `--publish OUT` turns a folder of step JSONs into BENCHMARKS.md's gpu_check section.

    python bench/gpu_check.py --out bench/out/gpu_check            # on the GPU machine (bench/gpu_check.sh installs first)
    python bench/gpu_check.py --dry-run --out /tmp/gc              # the same steps on CPU, in about two minutes
    python bench/gpu_check.py --publish bench/out/gpu_check        # the section from the JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import publish  # noqa: E402
from bench._train import Config, device_line, matmul_ceiling, measure_config, today  # noqa: E402

NAME = "gpu_check"
# seconds per step on the GPU: together under the 10 minutes of one device call, with a margin for the install
BUDGET_S = {"env": 30, "train_step": 75, "eager": 60, "channels_last": 60, "compiled": 150, "loader": 60, "predict": 40, "mias_fold": 60}
STEPS = tuple(BUDGET_S)
DRY_BUDGET_S = 300  # per step on the CPU


def settings(dry: bool) -> dict:
    """Sizes and counts of the run: the paper's on the GPU, tiny for the CPU dry run."""
    if dry:
        return dict(device="cpu", arch="test_resnet", whole=(256, 192), whole_bs=2, patch=32, patch_bs=8, steps=2, warmup=1,
                    patients=16, synth="tiny", backend="eager", widths=(64, 64, 128), vgg_width=64, predict_images=6)
    return dict(device="cuda", arch="resnet50", whole=(1152, 896), whole_bs=2, patch=224, patch_bs=32, steps=30, warmup=10,
                patients=16, synth="small", backend="inductor", widths=(512, 512, 1024), vgg_width=512, predict_images=32)


def configs(s: dict) -> dict[str, Config]:
    """The three model kinds at the run's sizes."""
    narrow = dict(widths=s["widths"], vgg_width=s["vgg_width"])
    return {"whole-resnet": Config("whole-resnet", "whole", s["arch"], s["whole"], s["whole_bs"], top="resnet", **narrow),
            "whole-vgg": Config("whole-vgg", "whole", s["arch"], s["whole"], s["whole_bs"], top="vgg", **narrow),
            "patch": Config("patch", "patch", s["arch"], (s["patch"], s["patch"]), s["patch_bs"], source=s["whole"])}


def runtime(s: dict, channels_last: bool, compile: bool = False):
    """cvfast's Runtime for one step (bf16 autocast where the GPU has it; fp32 on CPU)."""
    from cvfast.train.runtime import Runtime

    return Runtime(device=s["device"], channels_last=channels_last, compile=compile, compile_backend=s["backend"])


def ceiling(out: Path, device: torch.device) -> float:
    """The bf16 matmul ceiling env measured (measured again when env did not finish)."""
    env = out / "env.json"
    return json.loads(env.read_text())["matmul_tflops"] * 1e12 if env.is_file() else matmul_ceiling(device)[0]


# ---------------------------------------------------------------- steps


def step_env(s: dict, out: Path) -> dict:
    """What the machine is."""
    device = torch.device(s["device"])
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                            timeout=20).stdout.strip() if device.type == "cuda" else None
    flops, what = matmul_ceiling(device)
    return {"device": device_line(device), "gpus": torch.cuda.device_count(), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "matmul_tflops": round(flops / 1e12, 2), "matmul": what,
            "cpus": len(os.sched_getaffinity(0))}


def _peak_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def step_train_step(s: dict, out: Path) -> dict:
    """One training step of each model kind, through the Learner (loss, backward, optimiser step)."""
    result = {}
    for name, cfg in configs(s).items():
        rt = runtime(s, channels_last=s["device"] == "cuda")
        device = rt.torch_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        m = measure_config(cfg, rt, warmup=1, steps=1, rounds=1, work=out / "work" / "train_step", pipeline=False, count_flops=False)
        result[name] = {"ok": m.fastai_memory > 0, "seconds": round(time.perf_counter() - t, 1), "peak_gib": _peak_memory(device),
                        "describe": cfg.describe()}
    return result


def _throughput(s: dict, out: Path, channels_last: bool, compile: bool) -> dict:
    """Bare loop and Learner images/s with FLOPs and MFU for the whole-image (ResNet top) and patch models."""
    result = {}
    for name in ("whole-resnet", "patch"):
        cfg = configs(s)[name]
        rt = runtime(s, channels_last, compile)
        roof = ceiling(out, rt.torch_device)
        m = measure_config(cfg, rt, s["warmup"], s["steps"], rounds=1, work=out / "work" / name, pipeline=False, count_flops=True)
        result[name] = {"describe": cfg.describe(), "bare_per_s": round(m.bare, 2), "fastai_per_s": round(m.fastai_memory, 2),
                        "gflop_per_image": float(f"{m.flops / 1e9:.4g}") if m.flops else None,
                        "mfu_vs_matmul": float(f"{m.bare * m.flops / roof:.3g}") if m.flops else None, "peak_gib": _peak_memory(rt.torch_device)}
    return result


def step_eager(s: dict, out: Path) -> dict:
    """Contiguous memory, no compile."""
    return _throughput(s, out, channels_last=False, compile=False)


def step_channels_last(s: dict, out: Path) -> dict:
    """channels_last, no compile."""
    return _throughput(s, out, channels_last=True, compile=False)


def step_compiled(s: dict, out: Path) -> dict:
    """channels_last and torch.compile."""
    return _throughput(s, out, channels_last=True, compile=True)


def step_loader(s: dict, out: Path) -> dict:
    """The real DataLoaders alone and feeding the Learner, beside the model's in-memory rate."""
    cfg = configs(s)["whole-resnet"]
    rt = runtime(s, channels_last=s["device"] == "cuda")
    m = measure_config(cfg, rt, s["warmup"], s["steps"], rounds=1, work=out / "work" / "loader", pipeline=True, patients=s["patients"],
                       synth=s["synth"], count_flops=False)
    return {"describe": cfg.describe(), "model_in_memory_per_s": round(m.fastai_memory, 2), "learner_real_loader_per_s": round(m.pipeline, 2),
            "loader_alone_per_s": round(m.loader, 2), "loader_keeps_up": m.loader >= m.fastai_memory, "workers": m.workers,
            "train_images": m.train_images}


def step_predict(s: dict, out: Path) -> dict:
    """`cvfast predict` on working-size PNGs against the bare forward pass on the same device."""
    import numpy as np

    from bench.predict_throughput import build
    from cvfast.data.read import read_png
    from cvfast.infer.predict import predict
    from cvfast.models.artifact import load_model

    device = torch.device(s["device"])
    torch.set_float32_matmul_precision("high")
    model_dir, rows = build(out / "work" / "predict", s["arch"], s["whole"], s["predict_images"])
    paths = [r["path"] for r in rows]
    model, sidecar = load_model(model_dir)
    model = model.to(device).eval()
    x = torch.stack([torch.from_numpy(read_png(p).astype(np.float32) / 65535)[None] for p in paths]) - sidecar["mean_grey"]
    bs = 8

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, len(x), bs):
                torch.softmax(model(x[i:i + bs].to(device, non_blocking=True)), dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()  # warm-up: kernels, cudnn autotuning, file cache
        t = time.perf_counter()
        fn()
        return len(paths) / (time.perf_counter() - t)

    rate_bare = timed(bare)
    workers = min(8, max(0, len(os.sched_getaffinity(0)) - 1)) if device.type == "cuda" else 0
    rate_predict = timed(lambda: predict([model_dir], paths, bs=bs, num_workers=workers, device=s["device"], progress=False))
    return {"images": len(paths), "bs": bs, "workers": workers, "bare_forward_per_s": round(rate_bare, 2),
            "cvfast_predict_per_s": round(rate_predict, 2), "predict_vs_bare": round(rate_predict / rate_bare, 3),
            "note": "bare forward: bf16 autocast on in-memory tensors; cvfast predict: files read, cropped, fp32 (as exported)"}


def step_mias_fold(s: dict, out: Path, mias: str | None, dry: bool) -> dict:
    """Fold 0 of the mini-MIAS cross-validation at GPU scale (resumes across calls: the fold checkpoints every epoch)."""
    source = Path(mias) if mias else ROOT.parent / "shared" / "data" / "mini-mias"
    if dry and not mias:
        return {"skipped": "dry run without --mias (one real fold at tiny settings: tests/test_mias.py::test_real_data_crossval_one_fold)"}
    if not source.is_dir():
        return {"skipped": f"no mini-MIAS at {source} (MIAS=folder, or its lossless `bench/mias_cv.py --pack` copy)"}
    scale = (["--size", "256x208", "--patch-size", "48", "--epochs-scale", "0.05"] if dry else
             ["--size", "1024x800", "--patch-size", "224", "--patch-recipe", "patch-s10-resnet50", "--whole-recipe", "whole-resnet"])
    work = out / "work" / "mias"
    cmd = [sys.executable, str(ROOT / "bench" / "mias_cv.py"), "--source", str(source), "--work", str(work), "--only", "0", "--no-write",
           "--device", s["device"], *scale]
    r = subprocess.run(cmd, capture_output=True, text=True)  # killed with this step's whole process group at its limit
    if r.returncode != 0:
        raise RuntimeError(f"mias_cv.py failed:\n{r.stderr[-3000:]}")
    folds = sorted(work.glob("runs/*/results/fold0.json"))
    return {"command": " ".join(cmd[1:]), "fold0": json.loads(folds[-1].read_text()) if folds else None}


STEP_FUNCTIONS = {"env": step_env, "train_step": step_train_step, "eager": step_eager, "channels_last": step_channels_last,
                  "compiled": step_compiled, "loader": step_loader, "predict": step_predict}


def run_step(name: str, args: argparse.Namespace) -> None:
    """Run one step in this process and write OUT/<name>.json atomically (the child side of main)."""
    s = settings(args.dry_run)
    torch.backends.cudnn.benchmark = True  # fixed input sizes in every step: let cuDNN pick its fastest kernels once
    t = time.perf_counter()
    result = step_mias_fold(s, args.out, args.mias, args.dry_run) if name == "mias_fold" else STEP_FUNCTIONS[name](s, args.out)
    result = {"step": name, "dry_run": args.dry_run, "seconds": round(time.perf_counter() - t, 1), "date": today(), **result}
    tmp = args.out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.out / f"{name}.json")


def done_before(path: Path, dry_run: bool) -> bool:
    """Whether a step's JSON holds figures of this kind of run (a dry run's never pass for the GPU's; a skip is not done)."""
    if not path.is_file():
        return False
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return d.get("dry_run") == dry_run and "skipped" not in d


def run_limited(cmd: list[str], limit: float, env: dict | None) -> str:
    """Run a step's process in a session of its own; at its limit kill the whole group (a step's own children too,
    such as mias_cv.py, which would otherwise keep the GPU and race the next call in the same folder)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        return "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"killed at its {limit:g} s limit"


def main() -> None:
    """Every step not yet done, each in its own process under its time limit; then the summary (and, on a GPU, the section)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--mias", default=None, help="mini-MIAS folder (default ../shared/data/mini-mias; the dry run skips it without this)")
    ap.add_argument("--fresh", action="store_true", help="run steps whose JSON is already there again")
    ap.add_argument("--limit", nargs="+", default=[], metavar="STEP=SECONDS", help="another time limit for a step (e.g. mias_fold=400)")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # the child process of one step
    ap.add_argument("--publish", type=Path, default=None, help="write BENCHMARKS.md's gpu_check section from this folder's JSONs")
    args = ap.parse_args()
    if args.publish:
        publish(NAME, section(args.publish), write=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        run_step(args.step, args)
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU here (use --dry-run for the CPU rehearsal)")
    limits = {**({n: DRY_BUDGET_S for n in STEPS} if args.dry_run else BUDGET_S)}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
            sys.exit(f"gpu_check: --limit {item}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        limits[name] = float(seconds)
    status = {}
    for name in args.steps:
        if done_before(args.out / f"{name}.json", args.dry_run) and not args.fresh:
            status[name] = "done before"
            continue
        limit = limits[name]
        cmd = [sys.executable, __file__, "--step", name, "--out", str(args.out), *(["--dry-run"] if args.dry_run else []),
               *(["--mias", args.mias] if args.mias else [])]
        t = time.perf_counter()
        print(f"== {name} (limit {limit} s)", flush=True)
        env = {**os.environ, "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles")} if name == "compiled" else None
        status[name] = run_limited(cmd, limit, env)
        print(f"   {status[name]} in {time.perf_counter() - t:.0f} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(status, indent=1))
    if not args.dry_run:
        publish(NAME, section(args.out), write=True)
    sys.exit(0 if all(v in ("ok", "done before") for v in status.values()) else 1)


# ---------------------------------------------------------------- report


def section(folder: Path) -> list[str]:
    """BENCHMARKS.md's gpu_check section from the step JSONs in a folder (steps missing are named)."""
    got = {n: json.loads((folder / f"{n}.json").read_text()) for n in STEPS if (folder / f"{n}.json").is_file()}
    env = got.get("env", {})
    lines = [f"### GPU check ({env.get('date', today())}, {env.get('device', 'device unknown')}, torch {env.get('torch', '?')}, "
             f"driver {env.get('driver')}, cuDNN {env.get('cudnn')})", "",
             "Reproduce: `bash bench/gpu_check.sh` on the GPU machine (one call; the wheels from `bash bench/gpu_wheels.sh` carried). "
             f"bf16 matmul ceiling measured in the run: {env.get('matmul_tflops')} TFLOP/s ({env.get('matmul')}); MFU below is against it.", ""]
    if missing := [n for n in STEPS if n not in got]:
        lines += [f"Steps without figures (killed at their limit or failed): {', '.join(missing)}.", ""]
    rows = [(mode, name, d) for mode in ("eager", "channels_last", "compiled") for name, d in got.get(mode, {}).items() if isinstance(d, dict)
            and "bare_per_s" in d]
    if rows:
        lines += ["| way | model | bare loop /s | fastai Learner /s | GFLOP per item (fwd+bwd) | MFU vs matmul | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {mode} | {d['describe']} | {d['bare_per_s']} | {d['fastai_per_s']} | {d['gflop_per_image']} | {d['mfu_vs_matmul']} | "
                  f"{d['peak_gib']} |" for mode, _, d in rows]
        lines.append("")
    if "loader" in got:
        d = got["loader"]
        lines.append(f"Loader: {d['loader_alone_per_s']} images/s alone with {d['workers']} workers, the Learner through it "
                     f"{d['learner_real_loader_per_s']}/s, in memory {d['model_in_memory_per_s']}/s ({d['describe']}).")
    if "predict" in got:
        d = got["predict"]
        lines.append(f"Predict: cvfast predict {d['cvfast_predict_per_s']} images/s vs the bare bf16 forward pass {d['bare_forward_per_s']}/s "
                     f"(batch {d['bs']}, {d['workers']} workers, {d['images']} images).")
    if "mias_fold" in got:
        d = got["mias_fold"]
        lines.append(f"mini-MIAS fold 0 at GPU scale: {json.dumps(d.get('fold0') or d.get('skipped'))[:600]}")
    return lines


if __name__ == "__main__":
    main()
