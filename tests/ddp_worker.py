"""Launched by torchrun from test_distributed.py: the library's real training path on 2 CPU processes (gloo).

Each rank gets its own --out folder so the test can see which rank wrote what (the check that every rank sees rank 0's
--out, which refuses that, is switched off here alone); a recording callback (added
through fastai's defaults.callbacks, the Learner's extension point) saves each epoch's shard and the final weights' hash.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import defaults

import cvfast.train.pipeline
from cvfast.train.pipeline import train_patch, train_whole
from cvfast.train.recipes import load_recipe, resolve
from cvfast.train.runtime import Runtime

patches, data, work = (Path(p) for p in sys.argv[1:4])
patch_only = "--patch-only" in sys.argv[4:]  # the re-run that checks each rank's augmentation is reproducible
workers = 1 if "--workers" in sys.argv[4:] else 0  # ... and that persistent loader workers read what the main process reads
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
shards: dict[str, list] = {"patch": [], "whole": []}
shifts: dict[str, list] = {"patch": [], "whole": []}  # each epoch's first batch: the intensity shift this rank drew per image
readers: list = []  # each epoch's loader worker processes (with --workers)
step = "patch"


class RecordShards(Callback):
    """Remember the item indices this rank trained on in each epoch (the dataloader is fastai's DistributedDL here)."""

    def after_train(self):
        shards[step].append(self.learn.dl.shard)
        if workers:
            readers.append([w.pid for w in self.learn.dl.job_loader()._iterator._workers])

    def after_batch(self):
        if self.training and self.iter == 0:
            dl = getattr(self.learn.dl, "dl", self.learn.dl)  # under data parallel fastai wraps it in a DistributedDL
            shift = next(t for t in dl.after_batch.fs if type(t).__name__ == "IntensityShift")
            shifts[step].append([round(v, 7) for v in shift.shift.tolist()])


defaults.callbacks = [*defaults.callbacks, RecordShards]
cvfast.train.pipeline.check_shared_out = lambda out, device: None  # one --out per rank, on purpose (test_distributed.py)
rt = Runtime(device="cpu", workers=workers)
# keep_best off: with one --out per rank (to see who writes what) only rank 0's folder gets best.pth, and loading it is a
# collective; with the shared --out of a real launch every rank loads it (test_the_cli_under_torchrun)
last_epoch = {"train": {"keep_best": False}}
train_patch(resolve(load_recipe("demo-patch"), last_epoch, epochs_scale=0.25), patches, work / f"patch_rank{rank}", runtime=rt)
dist.barrier()  # rank 0 exports after training: the whole-image step below needs its patch model
if patch_only:
    (work / f"rank{rank}.json").write_text(json.dumps({"shards": shards, "shifts": shifts, "readers": readers}))
    sys.exit(0)
step = "whole"
whole = train_whole(resolve(load_recipe("demo-whole"), last_epoch, epochs_scale=0.05), data, work / "patch_rank0", work / f"whole_rank{rank}",
                    runtime=rt)
# the learned weights (BatchNorm running statistics are each rank's own: DDP does not broadcast buffers)
weights = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in whole.learn.model.parameters())).hexdigest()
(work / f"rank{rank}.json").write_text(json.dumps({"shards": shards, "shifts": shifts, "weights": weights, "metrics": whole.metrics}))
