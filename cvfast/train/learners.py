"""Learner factories: one per model kind, each returning a fastai Learner with the paper's parameter groups."""

from __future__ import annotations

from pathlib import Path

from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import BalancedAccuracy, RocAucBinary, accuracy
from fastai.optimizer import Adam

from cvfast.models.body import create_body
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import whole_from_patch
from cvfast.train.splitters import patch_splitter, whole_splitter


def patch_learner(dls: DataLoaders, arch: str = "resnet50", weights: str | Path | None = None, pretrained: bool = False,
                  head: str = "paper", dropout: float = 0.0, path: str | Path = ".") -> Learner:
    """The patch classifier f as a Learner: timm body (1 channel) + GAP + FC over dls' classes; Adam."""
    model = PatchClassifier(create_body(arch, weights=weights, pretrained=pretrained), len(dls.vocab), head, dropout)
    model.spec = {"kind": "patch", "arch": arch, "head": head, "dropout": dropout, "n_classes": len(dls.vocab)}
    return _learner(dls, model, patch_splitter, [accuracy, BalancedAccuracy()], path)


def whole_image_learner(dls: DataLoaders, patch_model: PatchClassifier, top: str = "resnet", heatmap: bool = False,
                        widths: tuple[int, int, int] = (512, 512, 1024), stages: int = 2, units: int = 2, vgg_width: int = 512,
                        vgg_convs: int = 3, dropout: float = 0.5, path: str | Path = ".") -> Learner:
    """The whole-image classifier h converted from a trained patch classifier, as a Learner; Adam, ROC AUC."""
    top_spec = {"top": top, "heatmap": heatmap, "widths": list(widths), "stages": stages, "units": units,
                "vgg_width": vgg_width, "vgg_convs": vgg_convs, "dropout": dropout}
    model = whole_from_patch(patch_model, n_classes=len(dls.vocab), **{**top_spec, "widths": tuple(widths)})
    model.spec = {"kind": "whole", "patch": dict(patch_model.spec), **top_spec, "n_classes": len(dls.vocab)}
    return _learner(dls, model, whole_splitter, [RocAucBinary(), accuracy], path)


def learner_for(dls: DataLoaders, model, path: str | Path = ".") -> Learner:
    """A Learner around an existing model (e.g. a whole-image model to fine-tune on another dataset)."""
    splitter, metrics = (patch_splitter, [accuracy, BalancedAccuracy()]) if model.spec["kind"] == "patch" else (whole_splitter, [RocAucBinary(), accuracy])
    return _learner(dls, model, splitter, metrics, path)


def _learner(dls: DataLoaders, model, splitter, metrics: list, path: str | Path) -> Learner:
    """Shared Learner construction; the data's preprocessing facts ride along on the model."""
    info = dls.info
    model.info = {"classes": list(dls.vocab), "mean_grey": info.mean_grey, "size": list(info.size)}
    if info.source_size:  # patch models: what a sliding-window heatmap needs
        model.info.update(source_size=list(info.source_size), crop=info.crop)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=splitter, metrics=metrics,
                   path=Path(path), model_dir="checkpoints")
