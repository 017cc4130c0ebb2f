"""Launched by torchrun from test_distributed.py: a fault on rank 1 only.

- nan: rank 1's loss turns nan at the second batch of stage 2; every rank must stop with cvfast's message.
- nan-valid: rank 0's validation loss turns nan in stage 2 (rank 0 validates alone); every rank must stop alike.
- weights: rank 1 cannot get the ImageNet weights (no package, no hub); every rank must follow rank 0's decision.
- unshared: each rank its own --out (OUT_rank0, OUT_rank1), as disks local to each machine; every rank must be refused.
- unwritable: OUT is a file; every rank must stop with rank 0's reason.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.learner import defaults

from cvfast.errors import CvfastError
from cvfast.train.pipeline import train_patch
from cvfast.train.recipes import load_recipe, resolve
from cvfast.train.runtime import Runtime

patches, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rank = int(os.environ["RANK"])
if mode == "unshared":
    out = out.with_name(f"{out.name}_rank{rank}")
torch.set_num_threads(1)


class PoisonRank1(Callback):
    """On one rank only, make the predictions nan in the second fit (stage 2): rank 1's second training batch (nan), or
    rank 0's validation (nan-valid)."""

    stages = 0  # training stages begun (fastai's get_preds and validate send before_fit too, so fits are not counted)

    def before_train(self):
        if self.epoch == 0:
            PoisonRank1.stages += 1

    def after_pred(self):
        if PoisonRank1.stages == 2 and ((mode == "nan" and rank == 1 and self.training and self.iter == 1)
                                        or (mode == "nan-valid" and rank == 0 and not self.training)):
            self.learn.pred = self.learn.pred * float("nan")
            (out.parent / "poisoned_at.txt").write_text(str(time.time()))


defaults.callbacks = [*defaults.callbacks, PoisonRank1]
if mode == "weights" and rank == 1:
    import cvfast.models.body

    cvfast.models.body.packaged_weights = lambda arch: None  # and no hub here: this rank falls back to random init
try:
    result = train_patch(resolve(load_recipe("demo-patch"), {"train": {"keep_best": False}}, epochs_scale=0.25), patches, out,
                         runtime=Runtime(device="cpu"))
    outcome = "finished"
except CvfastError as e:
    outcome = str(e)
stages = json.loads((out / "recipe.json").read_text())["resolved_stages"] if rank == 0 and outcome == "finished" else None
(out.parent / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "ended": time.time(), "stages_run": PoisonRank1.stages,
                                                          "stages": stages}))
sys.exit(0 if outcome == "finished" else 1)
