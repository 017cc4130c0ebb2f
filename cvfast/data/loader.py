"""fastai DataLoaders whose reader processes live for the whole training run instead of restarting every epoch."""

from __future__ import annotations

import gc

import torch
from fastai.callback.data import WeightedDL
from fastai.data.core import TfmdDL
from fastai.torch_core import set_seed, to_device
from fastcore.basics import chunked
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, Sampler, get_worker_info

PREFETCH = 2  # batches each loader worker keeps ready (torch's default prefetch_factor)


def _as_is(batch):
    """collate_fn for jobs that are whole batches already (torch's default_convert would turn tuples into lists)."""
    return batch


def _start_reader(worker_id: int) -> None:
    """Worker start-up, as fastai's own: one thread per reader, the worker's id on its copy of the DataLoader."""
    # the fork copied the parent's uncollected objects, other loaders' iterators among them: a collection here would run
    # their __del__ in this child ("can only test a child process")
    gc.freeze()
    torch.set_num_threads(1)
    info = get_worker_info()
    dl = info.dataset.dl
    dl.num_workers, dl.offs = info.num_workers, info.id
    dl.wif()


class _BatchJobs(Dataset):
    """What a reader process does with a job (seed, indices): seed, read and collate that batch with the DataLoader's
    own item and batch steps. Seeding per batch makes any random item transform a function of the epoch's seed and the
    batch's position -- not of the worker count, or of how many epochs the worker lived through (a resumed run reads
    what an uninterrupted one would)."""

    def __init__(self, dl):
        self.dl = dl

    def __getitem__(self, job: tuple[int, list[int]]):
        seed, idxs = job
        set_seed(seed)
        return self.dl.do_batch([item for item in map(self.dl.do_item, idxs) if item is not None])


class _EpochJobs(Sampler):
    """The jobs of the current epoch, set by the main process before each pass; torch's index queue carries them."""

    def __init__(self):
        self.jobs: list = []

    def __iter__(self):
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


class PersistentWorkers:
    """Mixin for a fastai DataLoader: with num_workers > 0 and persistent_workers=True, the reader processes start
    once and serve every epoch.

    Written here because fastai cannot: it hands torch an iterable dataset and builds a torch iterator per epoch, so
    its workers restart each epoch and torch's persistent_workers would replay the first epoch's order. Here the main
    process makes the epoch's order exactly as fastai does (randomize, get_idxs, fastai's chunking) and sends the batches'
    indices to long-lived workers through torch's index queue (a map-style job dataset). Batch transforms still run in
    the main process, on the device.

    - The workers hold a copy of the DataLoader made when they start (its first epoch): a later change to its item or
      batch steps, dataset or wif is not seen by them -- close() first, and the next epoch starts readers anew.
    - Loaders derived with new() (test_dl, get_preds) read one pass, so they do not persist unless asked to.
    - Unbatched (bs=None) and non-indexed loaders read the fastai way.
    - An item that raises SkipItemException shortens its batch, where fastai would fill it from the next items.
    - As with torch's persistent workers, one pass at a time: a second iterator restarts the first's epoch.
    """

    def job_loader(self) -> TorchDataLoader | None:
        """The torch DataLoader of this DataLoader's persistent readers (started on first use); None when it reads in
        this process or through fastai's restarting workers (no workers, persistent_workers off, bs=None, an iterable
        dataset, or inside fastai's no_multiproc())."""
        fake = self.fake_l
        if not fake.num_workers or not fake.persistent_workers or self.bs is None or not self.indexed:
            return None
        loader = self.__dict__.get("_job_loader")  # not getattr: fastai delegates unknown attributes to the dataset
        if loader is None:
            loader = TorchDataLoader(_BatchJobs(self), batch_size=None, sampler=_EpochJobs(), num_workers=fake.num_workers,
                                     collate_fn=_as_is, pin_memory=fake.pin_memory, timeout=fake.timeout, worker_init_fn=_start_reader,
                                     persistent_workers=True, prefetch_factor=PREFETCH,
                                     generator=torch.Generator())  # its own seed draw stays off the global stream: jobs carry the seeds
            self.__dict__["_job_loader"] = loader
        return loader

    def __iter__(self):
        loader = self.job_loader()
        if loader is None:
            yield from super().__iter__()
            return
        self.randomize()
        self.before_iter()
        batches = list(chunked(self.get_idxs(), self.bs, self.drop_last))
        # then one draw from torch's global generator, as fastai's per-epoch torch iterator takes for its worker seeds
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        loader.sampler.jobs = [(seed + j, idxs) for j, idxs in enumerate(batches)]
        for b in loader:
            if self.pin_memory and type(b) is list:  # pin_memory turns tuples into lists (as in fastai's own loop)
                b = tuple(b)
            if self.device is not None:
                b = to_device(b, self.device, non_blocking=self.pin_memory)  # pinned: the copy overlaps the GPU's work
            yield self.after_batch(b)
        self.after_iter()

    def close(self) -> None:
        """Stop the reader processes now (they also stop when this DataLoader is garbage-collected)."""
        loader = self.__dict__.pop("_job_loader", None)
        if loader is not None and loader._iterator is not None:
            loader._iterator._shutdown_workers()  # torch's own shutdown, which its iterator runs on garbage collection

    def __getstate__(self) -> dict:
        """Pickle without the reader processes (an exported learner, a spawned worker's copy)."""
        return {k: v for k, v in self.__dict__.items() if k != "_job_loader"}


class PersistentTfmdDL(PersistentWorkers, TfmdDL):
    """fastai's TfmdDL with reader processes that live across epochs."""


class PersistentWeightedDL(PersistentWorkers, WeightedDL):
    """fastai's WeightedDL (class-balanced sampling) with reader processes that live across epochs."""


def close_readers(dls) -> None:
    """Stop the persistent readers of every DataLoader of a DataLoaders (a later epoch starts new ones)."""
    for dl in dls.loaders:
        if isinstance(dl, PersistentWorkers):
            dl.close()
