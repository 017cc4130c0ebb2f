#!/usr/bin/env bash
# The first run on a GPU machine, in one command (under 10 minutes: the time limits of the steps add up to 8.5, 9.5 with two GPUs):
#   1. the GPU tests (tests/test_runtime.py: device, mixed precision, channels_last, compile; TF32 off as in the suite);
#   2. bench/gpu_train.py without and with --compile (recompiles are logged: grep "Recompiling" in the log);
#   3. with 2 or more GPUs, a 2-GPU torchrun smoke of `cvfast patch` (NCCL);
#   4. the mini-MIAS chain at GPU scale for one fold (bench/mias_cv.py --only 0; MIAS=folder, default ../shared/data/mini-mias,
#      or its lossless WebP copy from `python bench/mias_cv.py --pack DIR`, small enough to carry to a device machine).
# Figures go into BENCHMARKS.md (sections gpu_train and mias_cv); the log, the compiled run's table and a copy of
# BENCHMARKS.md into $OUT (default bench/out/gpu_check).
#
#     bash bench/gpu_check.sh            # from the repository root, after the README's install (command 2)
#     PYTHON=python3 MIAS=mias-webp OUT=/tmp/out bash bench/gpu_check.sh   # another interpreter, data and output folder
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-bench/out/gpu_check}
mias=${MIAS:-../shared/data/mini-mias}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
gpus=$($py -c "import torch, cvfast; print(torch.cuda.device_count())") || { echo "gpu_check: $py cannot import torch and cvfast"; exit 1; }
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: torch sees no CUDA GPU here; nothing to check (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
  exit 1
fi
nvidia-smi -L
status=0
step() { echo; echo "== $1 ($(date +%T))"; shift; "$@" || { echo "!! failed: $*"; status=1; }; }
step "GPU tests" timeout 120 $py -m pytest -q -rs tests/test_runtime.py
step "gpu_train, eager" timeout 90 $py bench/gpu_train.py --steps 30 --warmup 10 --rounds 1
step "gpu_train, compiled" timeout 150 env TORCH_LOGS=recompiles $py bench/gpu_train.py --steps 30 --warmup 20 --rounds 1 --compile \
  --no-write --md-out "$out/gpu_train_compiled.md"
if [ "$gpus" -ge 2 ]; then
  work=$(mktemp -d)
  step "2-GPU torchrun smoke" bash -c "$py -m cvfast synth $work/s --patients 16 && $py -m cvfast prepare ddsm $work/s/ddsm --out $work/d \
    && $py -m cvfast patches $work/d --set s10 --size 224 && timeout 60 $py -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m cvfast patch --data $work/d/patches_s10 --recipe demo-patch --epochs-scale 0.25 --out $work/m"
fi
if [ -d "$mias" ]; then  # a fold killed at its limit resumes on the next run of this script
  step "mini-MIAS, one fold at GPU scale" timeout 150 $py bench/mias_cv.py --source "$mias" --only 0
else
  echo "gpu_check: no mini-MIAS at $mias (set MIAS=folder); the mini-MIAS fold is skipped"
fi
cp BENCHMARKS.md "$out/"
echo; echo "gpu_check: done ($(date +%T)), status $status; log in $out/log.txt"
exit $status
