"""A fastai callback drawing progress over batches: for training (cvfast.train) and prediction (cvfast.infer) alike."""

from __future__ import annotations

from fastai.callback.core import Callback

from cvfast.util.distributed import is_main_process
from cvfast.util.progress import progress_bar


class BatchProgress(Callback):
    """A rich bar with ETA over the batches of each training epoch and each validation or get_preds pass (rank 0 only)."""

    order = 60

    def __init__(self, description: str = "predicting", epoch_offset: int = 0, epochs: int | None = None):
        self.description, self.epoch_offset, self.epochs = description, epoch_offset, epochs
        self.bar = None

    def _start(self, phase: str) -> None:
        where = f" epoch {self.epoch_offset + self.epoch + 1}/{self.epochs}" if self.epochs else ""
        self.bar = progress_bar(enabled=is_main_process())
        self.bar.start()
        self.task = self.bar.add_task(f"{self.description}{where} {phase}".rstrip(), total=len(self.dl))

    def close(self) -> None:
        """Stop the bar (callers call it in a finally: fastai runs no after_* event on an exception or Ctrl-C)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def before_train(self):
        """A bar over the epoch's training batches."""
        self._start("train")

    def before_validate(self):
        """A bar over the validation (or prediction) batches."""
        self.close()
        self._start("valid" if self.epochs else "")

    def after_batch(self):
        """One batch done."""
        if self.bar is not None:
            self.bar.advance(self.task)

    def after_validate(self):
        """Close the bar."""
        self.close()

    def after_cancel_fit(self):
        """A stopped fit closes its bar too."""
        self.close()
