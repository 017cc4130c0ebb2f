"""Persistent loader workers: started once, yet every epoch reads exactly what fastai's own loader reads."""

from __future__ import annotations

import os
import pickle
import random
import shutil

import pandas as pd
import pytest
import torch
from fastai.data.core import Datasets
from fasttransform import Transform

from cvfast.data.blocks import patch_dataloaders, whole_image_dataloaders
from cvfast.data.loader import PersistentTfmdDL, PersistentWorkers
from cvfast.errors import CvfastError


def _epochs(dls, n: int, stop_first_after: int | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """n training epochs of batches (augmented, on the device); the first cut short after `stop_first_after` batches."""
    torch.manual_seed(1)
    out = []
    for e in range(n):
        batches = []
        for x, y in dls.train:
            batches.append((x.clone(), y.clone()))
            if e == 0 and len(batches) == stop_first_after:
                break
        out.append(batches)
    return out


def _dls(make, path, workers: int, persistent: bool):
    random.seed(5)  # fastai's DataLoader seeds its shuffling RNG from Python's global one
    return make(path, num_workers=workers, persistent_workers=persistent, seed=0)


def _readers(dl) -> list[int]:
    return [w.pid for w in dl.job_loader()._iterator._workers]


@pytest.mark.parametrize("make", [whole_image_dataloaders, patch_dataloaders], ids=["whole", "patch (class-balanced)"])
def test_persistent_workers_start_once_and_read_what_fastai_reads(make, ddsm_data, s10):
    path = ddsm_data if make is whole_image_dataloaders else s10
    reference = _epochs(_dls(make, path, 0, False), 3)  # fastai reading in this process
    restarted = _epochs(_dls(make, path, 2, False), 3)  # fastai's workers, started anew each epoch
    dls = _dls(make, path, 2, True)
    assert isinstance(dls.train, PersistentWorkers) and isinstance(dls.valid, PersistentWorkers)
    torch.manual_seed(1)
    persistent, readers = [], []
    for _ in range(3):
        persistent.append([(x.clone(), y.clone()) for x, y in dls.train])
        readers.append(_readers(dls.train))
    assert len(readers[0]) == 2 and readers[0] == readers[1] == readers[2]  # the same two processes served all 3 epochs
    for run in (restarted, persistent):
        assert [len(e) for e in run] == [len(e) for e in reference] and len(reference[0]) >= 3
        for ours, theirs in zip(run, reference):
            assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(ours, theirs))  # pixels, labels, augmentation
    assert not torch.equal(reference[0][0][0], reference[1][0][0])  # epochs differ: no replay of the first epoch's order
    reference_valid = list(_dls(make, path, 0, False).valid)
    for _ in range(2):  # the valid loader's own persistent readers, twice
        valid = list(dls.valid)
        assert len(valid) == len(reference_valid) and _readers(dls.valid) != readers[0]
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(valid, reference_valid))
    assert dls.test_dl(pd.read_csv(path / ("manifest.csv" if make is whole_image_dataloaders else "patches.csv"))
                       .assign(path=lambda d: [str(path / p) for p in d["path"]])).job_loader() is None  # one pass: not kept
    assert pickle.loads(pickle.dumps(dls.train)).__dict__.get("_job_loader") is None  # pickles without its processes


def test_an_epoch_cut_short_leaves_nothing_for_the_next(ddsm_data):
    """lr_find and a non-finite stop leave an epoch early: the readers' prefetched batches must not reach the next one."""
    reference = _epochs(_dls(whole_image_dataloaders, ddsm_data, 0, False), 2, stop_first_after=1)
    dls = _dls(whole_image_dataloaders, ddsm_data, 2, True)
    ours = _epochs(dls, 2, stop_first_after=1)
    assert len(ours[1]) == len(reference[1]) == len(dls.train)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(ours[1], reference[1]))


def test_a_reader_error_names_the_file_and_close_stops_the_readers(ddsm_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ddsm_data, data)
    dls = whole_image_dataloaders(data, num_workers=1, seed=0)
    next(iter(dls.train))
    pids = _readers(dls.train)
    bad = pd.read_csv(data / "manifest.csv").query("split == 'train'")["path"].iloc[0]
    (data / bad).write_bytes(b"not a png")
    with pytest.raises(CvfastError, match=str(bad).replace(".", r"\.")):
        list(dls.train)
    dls.train.close()
    assert dls.train.__dict__.get("_job_loader") is None
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class Jitter(Transform):
    """A random item transform: it runs in the loader workers."""

    def encodes(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(())


def _as_tensor(i: int) -> torch.Tensor:
    return torch.tensor(float(i))


def _jittered(workers: int) -> list[torch.Tensor]:
    random.seed(5)
    dl = PersistentTfmdDL(Datasets(list(range(24)), [[_as_tensor]]), bs=4, shuffle=True, drop_last=True, num_workers=workers,
                          persistent_workers=True, after_item=Jitter())
    torch.manual_seed(1)
    return [torch.cat([b[0] for b in dl]) for _ in range(2)]


def test_random_item_transforms_do_not_depend_on_the_worker_count():
    """Each batch is seeded from the epoch's draw and its position, not by the worker that happens to read it."""
    one, two = _jittered(1), _jittered(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[0].sort().values, one[1].sort().values)  # each epoch draws anew
