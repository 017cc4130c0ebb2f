#!/usr/bin/env bash
# The kit as a user installs it: build the sdist and the wheel (the wheel from the sdist, so both must be complete),
# install the wheel into a fresh venv outside the checkout, and from a temporary folder list every recipe and run a
# tiny synth -> prepare -> patches -> patch classifier -> whole-image chain. Usage: bash .ci/wheel.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip install -q -c constraints.txt build
"$python" -m build -q --outdir "$work/dist" . >/dev/null
ls "$work"/dist/cvfast-*.tar.gz "$work"/dist/cvfast-*.whl
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c constraints.txt "$work"/dist/cvfast-*.whl
cd "$work"  # nothing of the checkout is reachable from here
cvfast=$work/venv/bin/cvfast
"$cvfast" --version
shipped=$(ls "$OLDPWD"/cvfast/recipes/*.toml | wc -l)
listed=$("$cvfast" recipes list | grep -c '^│ [a-z]')
echo "recipes: $listed listed, $shipped in the checkout"
[ "$listed" -eq "$shipped" ]
"$cvfast" recipes show demo-patch > r.toml && "$work/venv/bin/python" -c "import tomllib; tomllib.load(open('r.toml', 'rb'))"
"$cvfast" synth raw --patients 12 --layouts ddsm
"$cvfast" prepare ddsm raw/ddsm --out data --size 128x96 --workers 1
"$cvfast" patches data --size 32 --workers 1
"$cvfast" patch --data data/patches_s10 --recipe demo-patch --epochs-scale 0.25 --out p
"$cvfast" whole --patch p --data data --recipe demo-whole --epochs-scale 0.05 --size 128x96 --out w
"$work/venv/bin/python" -W ignore -c "import sys; import cvfast.infer.predict; sys.exit('cvfast.infer pulled in cvfast.train' if any(m.startswith('cvfast.train') for m in sys.modules) else 0)"
echo "wheel install: ok"
