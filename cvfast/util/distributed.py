"""Which process speaks under data-parallel training (torchrun / accelerate launch): a floor every layer may ask."""

from __future__ import annotations

import os
from typing import Mapping

from cvfast.errors import CvfastError

# what a launcher sets for every rank and fastai reads (RANK decides who writes, WORLD_SIZE whether training is parallel)
INTEGER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def check_distributed_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a distributed environment no launcher would set -- a stray `RANK=1` in a shell would make this process a
    rank that writes nothing -- naming what to unset. MASTER_ADDR / MASTER_PORT alone (a scheduler's script) are fine."""
    env = os.environ if environ is None else environ
    for name in INTEGER_VARIABLES:
        if name in env and not env[name].strip().isdigit():
            raise CvfastError(f"{name}={env[name]!r} in the environment is not a process number; outside torchrun / accelerate launch, unset {name}")
    rank = int(env["RANK"]) if "RANK" in env else None
    world = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None
    if rank and (world or 1) <= 1:
        raise CvfastError(f"RANK={rank} without WORLD_SIZE > 1: a half-set distributed environment (this process was not started by "
                          f"torchrun / accelerate launch, and as rank {rank} it would write nothing); unset RANK")
    if (world or 1) > 1 and rank is None:
        raise CvfastError(f"WORLD_SIZE={world} without RANK: a half-set distributed environment (not started by torchrun / accelerate "
                          "launch); unset WORLD_SIZE")
    if rank is not None and world is not None and rank >= world:
        raise CvfastError(f"RANK={rank} with WORLD_SIZE={world}: a rank must be below the world size; unset RANK and WORLD_SIZE")


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes checkpoints, exports and reports."""
    from fastai.torch_core import rank_distrib  # here: checking the environment must not import fastai (every command does it)

    return rank_distrib() == 0
