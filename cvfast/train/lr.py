"""lr_find that works on every cvfast learner, small datasets included, and saves its plot."""

from __future__ import annotations

import io
import logging
from contextlib import nullcontext
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from fastai.callback.schedule import minimum, slide, steep, valley  # noqa: F401  (also patches Learner.lr_find)
from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from cvfast.errors import CvfastError
from cvfast.train.schedule import Stage, begin_stage
from cvfast.util.files import atomic_write_bytes, check_output_name
from cvfast.util.progress import bars_wanted

log = logging.getLogger(__name__)

MIN_ITERATIONS = 50  # fewer recorded points make fastai's `valley` fail with an IndexError


def find_lr(learn: Learner, stage: Stage | None = None, num_it: int = 100, plot: str | Path | None = None,
            cbs: list | None = None) -> dict[str, float]:
    """Run lr_find (in a stage's freeze state and BN policy, with the training callbacks `cbs`); return the
    suggestions and optionally save the plot."""
    if plot is not None:
        check_output_name(plot)  # before the run, not after it
    if num_it < MIN_ITERATIONS:
        log.warning("lr_find with num_it=%d records too few points; using %d", num_it, MIN_ITERATIONS)
        num_it = MIN_ITERATIONS
    cbs = list(cbs or [])
    if stage is not None:
        begin_stage(learn, stage)
        if not stage.train_bn:
            cbs.append(BnFreeze())
    # fastai's own bar prints a line per update into a log or a pipe
    with learn.added_cbs(cbs), (nullcontext() if bars_wanted() else learn.no_bar()):
        try:
            result = learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=(minimum, steep, valley, slide))
        except IndexError:  # diverged early: too few points for valley/slide; the robust suggestions still work
            result = learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=(minimum, steep))
    suggestions = {k: float(v) for k, v in result._asdict().items()}
    if not suggestions:
        raise CvfastError("lr_find recorded no usable points (the loss diverged at once); check the data and model")
    if plot is not None:
        import matplotlib.pyplot as plt  # the current backend: Agg when headless, inline in notebooks

        learn.recorder.plot_lr_find()
        fig = plt.gcf()
        ax = fig.axes[0]
        for name, value in suggestions.items():
            ax.axvline(value, linestyle=":", label=f"{name} {value:.1e}")
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close("all")
        atomic_write_bytes(plot, buf.getvalue())
    return suggestions
