"""The all-convolutional whole-image classifier h: patch body, two new top blocks, GAP, FC (Shen et al. 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvfast.errors import CvfastError
from cvfast.models.body import Body
from cvfast.models.patch import PatchClassifier, paper_head


class Bottleneck(nn.Module):
    """ResNet bottleneck unit [mid-mid-out] with a projection shortcut when shape changes.

    Written here because timm's and torchvision's Bottleneck fix the expansion at 4, while the reference
    top blocks are [512-512-1024] (expansion 2).
    """

    def __init__(self, in_ch: int, mid: int, out: int, stride: int = 1):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out))
        nn.init.zeros_(self.convs[-1].weight)  # each new unit starts close to its shortcut: stabler at batch size 2
        self.shortcut = (nn.Identity() if stride == 1 and in_ch == out else
                         nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual unit."""
        return self.act(self.convs(x) + self.shortcut(x))


def resnet_top(in_ch: int, widths: tuple[int, int, int] = (512, 512, 1024), stages: int = 2, units: int = 2) -> nn.Sequential:
    """ResNet top blocks: `stages` stages of `units` bottlenecks, first unit of each stage with stride 2."""
    layers, ch = [], in_ch
    mid, _, out = widths
    for _ in range(stages):
        for u in range(units):
            layers.append(Bottleneck(ch, mid, out, stride=2 if u == 0 else 1))
            ch = out
    return _with_channels(nn.Sequential(*layers), ch)


def vgg_top(in_ch: int, width: int = 512, convs: int = 3, blocks: int = 2) -> nn.Sequential:
    """VGG top blocks: `blocks` x (`convs` x conv3x3-BN-ReLU, then 2x2 max-pool)."""
    layers, ch = [], in_ch
    for _ in range(blocks):
        for _ in range(convs):
            layers += [nn.Conv2d(ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            ch = width
        layers.append(nn.MaxPool2d(2))
    return _with_channels(nn.Sequential(*layers), ch)


def _with_channels(top: nn.Sequential, channels: int) -> nn.Sequential:
    """Record a top's output channels on it (the head needs them)."""
    top.out_channels = channels
    return top


class WholeImageClassifier(nn.Module):
    """patch body -> [heatmap: the patch classifier over every patch-sized window] -> new top blocks -> GAP -> FC."""

    def __init__(self, body: Body, top: nn.Sequential, n_classes: int = 2, heatmap: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.body, self.heatmap, self.top = body, heatmap, top
        self.head = paper_head(top.out_channels, n_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for whole images of any size."""
        f = self.body(x)
        if self.heatmap is not None:
            if not isinstance(self.heatmap, PatchHeatmap):  # a pickle of a model exported before the reference heatmap
                raise CvfastError("this heatmap model was exported before cvfast used the reference heatmap (window average, "
                                  "patch FC + ReLU, 5x5 max-pool); its outputs would be wrong: retrain it with `cvfast whole --heatmap`")
            f = self.heatmap(f)
        return self.head(self.top(f))


class PatchHeatmap(nn.Module):
    """The reference's heatmap (dm_resnet.py add_top_layers): AveragePooling2D(window, stride 1) over the body's features
    -- the patch classifier's global average pool over one patch-sized window --, the patch FC with its trained weights
    as a 1x1 convolution, ReLU (not softmax), then MaxPooling2D(pool) (Keras: stride = pool, no padding)."""

    def __init__(self, fc: nn.Linear, window: int, pool: int = 5):
        super().__init__()
        self.window, self.pool_size = int(window), int(pool)
        self.avg = nn.AvgPool2d(self.window, stride=1)
        self.fc = nn.Conv2d(fc.in_features, fc.out_features, 1)
        with torch.no_grad():
            self.fc.weight.copy_(fc.weight[:, :, None, None])
            self.fc.bias.copy_(fc.bias)
        self.out_channels = fc.out_features

    def cells(self, features: torch.Tensor) -> torch.Tensor:
        """The heatmap before the max-pool: ReLU(patch logits) of every window of the feature map."""
        return torch.relu(self.fc(self.avg(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Max-pooled heatmap (a map smaller than the pool, as at toy sizes, is pooled by its own size)."""
        h = self.cells(features)
        k = min(self.pool_size, h.shape[-2], h.shape[-1])
        return F.max_pool2d(h, k)


def heatmap_from_patch_head(patch: PatchClassifier, window: int, pool: int = 5) -> PatchHeatmap:
    """The patch classifier turned into the reference's heatmap layer over the whole image."""
    fc = patch.head[-1] if patch.head_kind == "paper" else None
    if not isinstance(fc, nn.Linear):
        raise CvfastError("the heatmap variant needs a patch model with the paper's head (GAP + one FC layer)")
    return PatchHeatmap(fc, window, pool)


def whole_from_patch(patch: PatchClassifier, top: str = "resnet", heatmap: bool = False, n_classes: int = 2,
                     widths: tuple[int, int, int] = (512, 512, 1024), stages: int = 2, units: int = 2,
                     vgg_width: int = 512, vgg_convs: int = 3, dropout: float = 0.0, heatmap_window: int | None = None,
                     heatmap_pool: int = 5) -> WholeImageClassifier:
    """Convert a patch classifier into the whole-image model (new top blocks randomly initialised)."""
    if heatmap and not heatmap_window:
        raise CvfastError("the heatmap variant needs heatmap_window: the feature cells one patch spans")
    hm = heatmap_from_patch_head(patch, heatmap_window, heatmap_pool) if heatmap else None
    in_ch = hm.out_channels if hm is not None else patch.body.out_channels
    if top == "resnet":
        top_net = resnet_top(in_ch, tuple(widths), stages, units)
    elif top == "vgg":
        top_net = vgg_top(in_ch, vgg_width, vgg_convs, stages)
    else:
        raise CvfastError(f"--top {top}: expected resnet or vgg")
    return WholeImageClassifier(patch.body, top_net, n_classes, hm, dropout)
