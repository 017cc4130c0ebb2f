"""Which process speaks under data-parallel training (torchrun / accelerate launch): a floor every layer may ask."""

from __future__ import annotations

import os
from typing import Mapping

from fastai.torch_core import rank_distrib

from cvfast.errors import CvfastError

# what torchrun (and `accelerate launch`, which runs it) sets for every rank; a process with some of these and not the
# others was not started by a launcher: a stray `RANK=1` in a shell would make it a silent non-writing rank
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
INTEGER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def check_distributed_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a half-set or malformed distributed environment (set outside torchrun / accelerate launch), naming what to unset."""
    env = os.environ if environ is None else environ
    present = [name for name in LAUNCHER_VARIABLES + ("LOCAL_WORLD_SIZE",) if name in env]
    if not present:
        return
    unset = "unset " + " ".join(present)
    for name in INTEGER_VARIABLES:
        if name in env and not env[name].strip().isdigit():
            raise CvfastError(f"{name}={env[name]!r} in the environment is not a process number; outside torchrun / accelerate launch, {unset}")
    world = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None
    if world == 1 and int(env.get("RANK", "0")) == 0 and int(env.get("LOCAL_RANK", "0")) == 0:
        return  # one process that says so (some schedulers do): the same as none
    missing = [name for name in LAUNCHER_VARIABLES if name not in env]
    if missing:
        raise CvfastError(f"{', '.join(f'{n}={env[n]}' for n in present)} set without {', '.join(missing)}: a half-set distributed environment "
                          f"(this process was not started by torchrun / accelerate launch, and as rank {env.get('RANK', '?')} it would write nothing); {unset}")
    if world < 1 or int(env["RANK"]) >= world:
        raise CvfastError(f"RANK={env['RANK']} with WORLD_SIZE={env['WORLD_SIZE']}: a rank must be below the world size; {unset}")


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes checkpoints, exports and reports."""
    return rank_distrib() == 0
