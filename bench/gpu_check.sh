#!/usr/bin/env bash
# The first run on a lent GPU machine, in one call of at most 10 minutes: the carried wheels installed beside the
# machine's own torch (--target, no index), then bench/gpu_check.py's steps -- env, one training step of each model
# kind, eager / channels_last / compiled throughput with MFU, loader vs model, predict, one mini-MIAS fold -- each
# writing OUT/<step>.json the moment it ends (a step killed at its limit loses only itself; a second call skips the
# steps already done). Figures go into BENCHMARKS.md's gpu_check section; OUT also holds the log.
#
#     bash bench/gpu_wheels.sh                      # here, where pip reaches a registry: the wheels into .whl/
#     bash bench/gpu_check.sh                       # there, from the repository root, with .whl carried
#     bash bench/gpu_check.sh --dry-run             # the same steps at tiny sizes on this CPU (CI: tests/test_gpu_check.py)
#     PYTHON=python3 OUT=/tmp/out MIAS=mias-webp bash bench/gpu_check.sh   # another interpreter, output folder, mini-MIAS copy
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
out=${OUT:-bench/out/gpu_check}
site=${SITE:-.gpu-site}  # git-ignored: the carried wheels, unpacked once per machine
case $site in /*) ;; *) site=$PWD/$site ;; esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # cvfast from this tree, not installed
if ! $py -c "import fastai, pydicom, cvfast.cli" 2>/dev/null; then
  if ! PYTHONPATH="$site:$PYTHONPATH" $py -c "import fastai, pydicom, cvfast.cli" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: $py lacks fastai or pydicom and .whl/ holds no wheels (bash bench/gpu_wheels.sh where pip works, carry .whl)"; exit 1; }
    $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 1; }
  fi
  export PYTHONPATH="$site:$PYTHONPATH"
  $py -c "import fastai, pydicom, cvfast.cli" || { echo "gpu_check: cvfast does not import with the carried wheels"; exit 1; }
fi
mkdir -p "$out"
$py bench/gpu_check.py --out "$out" ${MIAS:+--mias "$MIAS"} "$@" 2>&1 | tee -a "$out/log.txt"
exit "${PIPESTATUS[0]}"
