"""Launched by torchrun from test_distributed.py: cvfast's data_parallel on a tiny model (2 CPU processes, gloo).

It trains the same BatchNorm + linear model from the same start twice, with fastai's GradientAccumulation and with
the one the recipes' grad_acc gives (AccumulateGradients), counting DDP's gradient all-reduces through a comm hook;
it follows each rank's BatchNorm statistics with a copy of the layer fed this rank's batches only; and it compares each
epoch's validation figures (an odd validation set of 9) with rank 0 validating the final weights in a single process.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.metrics import RocAucBinary, accuracy
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from cvfast.train.pipeline import whole_training_cbs
from cvfast.train.recipes import load_recipe, resolve
from cvfast.train.runtime import data_parallel, ensure_process_group, this_process_only

work = Path(sys.argv[1])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
ensure_process_group(torch.device("cpu"))


class Watch(Callback):
    """Count training batches and gradient all-reduces; feed a copy of the BatchNorm layer this rank's batches."""

    order = 12  # after fastai's DistributedTrainer (11) has wrapped the model in DDP

    def before_fit(self):
        self.batches, self.syncs = 0, []
        self.learn.model.register_comm_hook(None, self.hook)
        self.shadow = copy.deepcopy(self.learn.model.module[0]).train()
        self.precision = self.learn.data_parallel.accelerator.mixed_precision

    def hook(self, state, bucket):
        if bucket.is_last():  # the tiny model's gradients fit one bucket; count each backward's reduction once
            self.syncs.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    def before_batch(self):
        if self.training:
            self.batches += 1
            with torch.no_grad():
                self.shadow(self.learn.xb[0])


def train(accumulate) -> dict:
    set_seed(0)  # the same start and data order in both runs
    x = torch.randn(64, 3) * 2 + 1
    items = list(zip(x, (x.sum(1) > 3).long()))
    dls = DataLoaders(DataLoader(items, bs=4, shuffle=True), DataLoader(items[:9], bs=4), device=torch.device("cpu"))
    learn = Learner(dls, nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, lr=0.1,
                    metrics=[accuracy, RocAucBinary()])
    watch = Watch()
    with data_parallel(learn):
        learn.fit(2, cbs=[accumulate, watch])
    bn, figures = learn.model[0], [[float(v) for v in epoch] for epoch in learn.recorder.values]  # before validate() resets them
    if rank == 0:
        with this_process_only():
            single = [float(v) for v in learn.validate()]
    return {"params": [v.tolist() for v in learn.model.parameters()], "batches": watch.batches, "syncs": len(watch.syncs),
            "precision": watch.precision, "figures": figures,
            "single": single if rank == 0 else None, "running_mean": bn.running_mean.tolist(),
            "bn_own_shard": torch.allclose(bn.running_mean, watch.shadow.running_mean) and torch.allclose(bn.running_var, watch.shadow.running_var)}


recipe = resolve(load_recipe("demo-whole"), {"data": {"bs": 4, "grad_acc": 2}})
runs = {"fastai": train(GradientAccumulation(n_acc=8)), "recipe": train(whole_training_cbs(recipe, hold_body_bn=False)[-1])}
(work / f"rank{rank}.json").write_text(json.dumps(runs))
