"""The patch classifier f: a timm body, global average pooling and one FC layer to the 5 patch classes."""

from __future__ import annotations

import torch
from fastai.vision.learner import create_head
from torch import nn

from cvfast.models.body import Body


def paper_head(n_features: int, n_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Shen et al.'s head: global average pooling + (dropout) + one fully connected layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_features, n_classes))


class PatchClassifier(nn.Module):
    """body -> head; head 'paper' (GAP + FC) or 'fastai' (fastai's concat-pool MLP head)."""

    def __init__(self, body: Body, n_classes: int = 5, head: str = "paper", dropout: float = 0.0):
        super().__init__()
        self.body, self.head_kind = body, head
        nf = body.out_channels
        self.head = paper_head(nf, n_classes, dropout) if head == "paper" else create_head(nf, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.body(x))
