"""Parameter groups for the paper's stages: [bottom layers | top layers | head]."""

from __future__ import annotations

from torch import nn

from cvfast.models.body import Body, top_start
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import WholeImageClassifier

GROUP_NAMES = ("bottom", "top", "head")


def split_body(body: Body) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Body parameters before and from the paper's "top layers" (see models.body.top_start)."""
    start = top_start(body)
    bottom, top, in_top = [], [], False
    for name, p in body.net.named_parameters():
        in_top = in_top or name == start or name.startswith(start + ".")
        (top if in_top else bottom).append(p)
    return bottom, top


def patch_splitter(model: PatchClassifier) -> list[list[nn.Parameter]]:
    """[bottom of the body | top layers of the body | head] for the 3-stage patch schedule."""
    bottom, top = split_body(model.body)
    return [bottom, top, list(model.head.parameters())]


def whole_splitter(model: WholeImageClassifier) -> list[list[nn.Parameter]]:
    """[patch body (+ heatmap conv) | new top blocks | head] for the 2-stage whole-image schedule."""
    body = list(model.body.parameters()) + (list(model.heatmap.parameters()) if model.heatmap is not None else [])
    return [body, list(model.top.parameters()), list(model.head.parameters())]
