"""The paper's optimizer: Adam as in Keras 2.0 (beta2 0.999, eps 1e-8) with weight decay as Keras' L2 kernel regulariser."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from fastai.optimizer import Optimizer, adam_step, average_grad, average_sqr_grad, step_stat, weight_decay

if TYPE_CHECKING:  # for the annotation only: unpickling an old learner (paper_adam) must not pull in the recipe schema
    from cvfast.train.recipes import TrainSection

WEIGHT_DECAY_MODES = ("l2", "decoupled")


def keras_l2(p, lr, wd, do_wd=True, **kwargs) -> None:
    """Keras' kernel_regularizer=l2(wd): the loss gains wd * sum(w^2), so 2 * wd * w joins the gradient before Adam
    normalises it. fastai's own l2_reg adds wd * w (the factor 2 differs), and its default, decoupled decay, shrinks
    weights by lr * wd per step -- at the paper's lr 1e-5 practically nothing. BatchNorm weights and biases are left out
    by fastai's wd_bn_bias=False (do_wd), as the reference regularises kernels only."""
    if do_wd and wd != 0:
        p.grad.data.add_(p.data, alpha=2 * wd)


def paper_adam(params, lr: float, mom: float = 0.9, sqr_mom: float = 0.999, eps: float = 1e-8, wd: float = 0.0,
               decay: str = "l2") -> Optimizer:
    """fastai's Adam steps with Keras 2.0's defaults; `decay` 'l2' (the paper's meaning of wd) or 'decoupled' (fastai's)."""
    if decay not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight decay {decay!r}: expected one of {WEIGHT_DECAY_MODES}")
    first = keras_l2 if decay == "l2" else weight_decay
    cbs = [first, partial(average_grad, dampening=True), average_sqr_grad, step_stat, adam_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)


def optimizer_from(train: TrainSection):
    """The opt_func a recipe's [train] table asks for (defaults: the paper's)."""
    return partial(paper_adam, mom=train.adam_beta1, sqr_mom=train.adam_beta2, eps=train.adam_eps, decay=train.weight_decay)


def optimizer_settings(train: TrainSection) -> dict:
    """What optimizer_from builds, as plain data (recorded in the resolved recipe and model.json)."""
    return {"name": "adam", "beta1": train.adam_beta1, "beta2": train.adam_beta2, "eps": train.adam_eps, "weight_decay": train.weight_decay}
