"""Launched by torchrun from test_distributed.py: rank 1's loss turns nan at the second batch of stage 2; every rank must stop."""

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

patches, out = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


class PoisonRank1(Callback):
    """On rank 1 only, make the predictions nan at the second training batch of the second fit (stage 2)."""

    fits = 0

    def before_fit(self):
        PoisonRank1.fits += 1

    def after_pred(self):
        if rank == 1 and self.training and PoisonRank1.fits == 2 and self.iter == 1:
            self.learn.pred = self.learn.pred * float("nan")
            (out.parent / "poisoned_at.txt").write_text(str(time.time()))


defaults.callbacks = [*defaults.callbacks, PoisonRank1]
try:
    train_patch(resolve(load_recipe("demo-patch"), {"train": {"keep_best": False}}, epochs_scale=0.25), patches, out, runtime=Runtime(device="cpu"))
    outcome = "finished"
except CvfastError as e:
    outcome = str(e)
(out.parent / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "ended": time.time()}))
sys.exit(0 if outcome == "finished" else 1)
