"""Which process speaks under data-parallel training (torchrun / accelerate launch): a floor every layer may ask."""

from __future__ import annotations

from fastai.torch_core import rank_distrib


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes checkpoints, exports and reports."""
    return rank_distrib() == 0
