"""Training schedules as data: each stage says epochs, lr (or one per group), weight decay, what trains, BN policy."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from cvfast.errors import CvfastError

log = logging.getLogger(__name__)

# which parameter groups train in a stage: freeze_to index over [bottom | top | head]
TRAIN_FROM = {"head": 2, "top": 1, "all": 0}


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule."""

    epochs: int
    lr: float | tuple[float, ...]  # one lr for every group, or one per group [bottom, top, head]
    wd: float = 0.0
    train: str = "all"  # 'head' | 'top' | 'all'
    train_bn: bool = True  # frozen groups' BatchNorm layers still train (fastai's default) or hold still
    name: str = ""

    def __post_init__(self):
        if self.train not in TRAIN_FROM:
            raise CvfastError(f"stage {self.name or '?'}: train = {self.train!r}, expected one of {list(TRAIN_FROM)}")
        if self.epochs < 0:
            raise CvfastError(f"stage {self.name or '?'}: epochs must be >= 0")
        if isinstance(self.lr, tuple) and len(self.lr) != 3:
            raise CvfastError(f"stage {self.name or '?'}: lr list needs one value per group [bottom, top, head]")


def stages_from(items: list[dict]) -> list[Stage]:
    """Stages from recipe data (lists of lr become tuples)."""
    out = []
    for i, d in enumerate(items):
        d = dict(d)
        if isinstance(d.get("lr"), list):
            d["lr"] = tuple(float(v) for v in d["lr"])
        try:
            out.append(Stage(**d))
        except TypeError as e:
            raise CvfastError(f"stage {i + 1}: {e}") from None
    return out


def scale_epochs(stages: list[Stage], scale: float) -> list[Stage]:
    """Multiply every stage's epochs by scale (at least 1 epoch for stages that had any)."""
    return [replace(s, epochs=max(1, math.ceil(s.epochs * scale)) if s.epochs else 0) for s in stages]


def random_init_schedule(stages: list[Stage], lr: float = 1e-3) -> list[Stage]:
    """Randomly initialised nets: one stage, all layers, constant lr (the paper), as many epochs as the schedule."""
    return [Stage(epochs=sum(s.epochs for s in stages), lr=lr, wd=stages[0].wd if stages else 0.0, train="all", name="random-init")]


def begin_stage(learn: Learner, stage: Stage) -> None:
    """Set up the optimizer for a stage: train_bn policy, freeze_to, per-group lr and weight decay."""
    learn.train_bn = stage.train_bn
    learn.create_opt()  # fastai applies train_bn when it builds the optimizer
    learn.freeze_to(TRAIN_FROM[stage.train])
    learn.opt.set_hypers(lr=list(stage.lr) if isinstance(stage.lr, tuple) else stage.lr, wd=stage.wd)


def fit_stage(learn: Learner, stage: Stage, cbs: list | None = None) -> None:
    """Run a stage's epochs with a constant lr (the paper's); a resumed stage is fitted for its remaining epochs."""
    cbs = list(cbs or [])
    if not stage.train_bn:
        cbs.append(BnFreeze())  # frozen layers' BatchNorm statistics stay put
    lr = list(stage.lr) if isinstance(stage.lr, tuple) else stage.lr
    # fit() re-applies lr and wd to every group on each call: the stage's values are what the optimizer holds
    learn.fit(stage.epochs, lr=lr, wd=stage.wd, cbs=cbs)


def describe(stages: list[Stage]) -> list[dict]:
    """Stages as plain data (for the resolved recipe)."""
    return [asdict(s) for s in stages]
