#!/usr/bin/env bash
# The first run on a GPU machine, in one command (under 10 minutes on one H200):
#   1. the GPU tests (tests/test_runtime.py: device, mixed precision, channels_last, compile; TF32 off as in the suite);
#   2. bench/gpu_train.py without and with --compile (recompiles are logged: grep "Recompiling" in the log);
#   3. with 2 or more GPUs, a 2-GPU torchrun smoke of `cvfast patch` (NCCL);
#   4. the mini-MIAS chain at GPU scale for one fold (bench/mias_cv.py --only 0; needs ../shared/data/mini-mias).
# Figures go into BENCHMARKS.md (sections gpu_train and mias_cv; the compiled run's table beside the plain one in
# bench/out/gpu_check/), the full log into bench/out/gpu_check/log.txt.
#
#     bash bench/gpu_check.sh            # from the repository root, after the README's install (command 2)
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=bench/out/gpu_check
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
gpus=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: torch sees no CUDA GPU here; nothing to check (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
  exit 1
fi
nvidia-smi -L
status=0
step() { echo; echo "== $1 ($(date +%T))"; shift; "$@" || { echo "!! failed: $*"; status=1; }; }
step "GPU tests" $py -m pytest -q -rs tests/test_runtime.py
step "gpu_train, eager" timeout 240 $py bench/gpu_train.py --steps 50 --warmup 10 --rounds 1
step "gpu_train, compiled" timeout 300 env TORCH_LOGS=recompiles $py bench/gpu_train.py --steps 50 --warmup 20 --rounds 1 --compile \
  --no-write --md-out "$out/gpu_train_compiled.md"
if [ "$gpus" -ge 2 ]; then
  work=$(mktemp -d)
  step "2-GPU torchrun smoke" bash -c "$py -m cvfast synth $work/s --patients 16 && $py -m cvfast prepare ddsm $work/s/ddsm --out $work/d \
    && $py -m cvfast patches $work/d --set s10 --size 224 && timeout 300 $py -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m cvfast patch --data $work/d/patches_s10 --recipe demo-patch --epochs-scale 0.25 --out $work/m"
fi
if [ -d ../shared/data/mini-mias ]; then
  step "mini-MIAS, one fold at GPU scale" timeout 420 $py bench/mias_cv.py --only 0 --budget-s 400
else
  echo "gpu_check: no ../shared/data/mini-mias here; the mini-MIAS fold is skipped"
fi
echo; echo "gpu_check: done ($(date +%T)), status $status; log in $out/log.txt"
exit $status
