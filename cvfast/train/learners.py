"""Learner factories: one per model kind, each returning a fastai Learner with the paper's parameter groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import AccumMetric, ActivationType, BalancedAccuracy, RocAucBinary, accuracy
from sklearn.metrics import roc_auc_score

from cvfast.data.classes import MALIGNANT_PATCH_CLASSES
from cvfast.errors import CvfastError
from cvfast.models.body import create_body
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import whole_from_patch
from cvfast.train.optim import paper_adam
from cvfast.train.splitters import patch_splitter, whole_splitter


def patch_learner(dls: DataLoaders, arch: str = "resnet50", weights: str | Path | None = None, pretrained: bool = False,
                  head: str = "paper", dropout: float = 0.0, path: str | Path = ".", opt_func=paper_adam, fold_std: bool = True) -> Learner:
    """The patch classifier f as a Learner: timm body (1 channel) + GAP + FC over dls' classes; the paper's Adam."""
    body = create_body(arch, weights=weights, pretrained=pretrained, fold_std=fold_std)
    model = PatchClassifier(body, len(dls.vocab), head, dropout)
    model.spec = {"kind": "patch", "arch": arch, "head": head, "dropout": dropout, "n_classes": len(dls.vocab),
                  "input_std": body.input_std}  # the pretrained weights' std, folded into the first convolution
    return _learner(dls, model, patch_splitter, patch_metrics(dls.vocab), path, opt_func)


def whole_image_learner(dls: DataLoaders, patch_model: PatchClassifier, top: str = "resnet", heatmap: bool = False,
                        widths: tuple[int, int, int] = (512, 512, 1024), stages: int = 2, units: int = 2, vgg_width: int = 512,
                        vgg_convs: int = 3, dropout: float = 0.0, heatmap_pool: int = 5, path: str | Path = ".",
                        opt_func=paper_adam) -> Learner:
    """The whole-image classifier h converted from a trained patch classifier, as a Learner; the paper's Adam, ROC AUC."""
    window = heatmap_window(patch_model, dls.info.size) if heatmap else None
    top_spec = {"top": top, "heatmap": heatmap, "widths": list(widths), "stages": stages, "units": units,
                "vgg_width": vgg_width, "vgg_convs": vgg_convs, "dropout": dropout, "heatmap_window": window, "heatmap_pool": heatmap_pool}
    model = whole_from_patch(patch_model, n_classes=len(dls.vocab), **{**top_spec, "widths": tuple(widths)})
    model.spec = {"kind": "whole", "patch": dict(patch_model.spec), **top_spec, "n_classes": len(dls.vocab)}
    check_fits(model, tuple(dls.info.size))
    return _learner(dls, model, whole_splitter, [RocAucBinary(), accuracy], path, opt_func)


def learner_for(dls: DataLoaders, model, path: str | Path = ".", opt_func=paper_adam) -> Learner:
    """A Learner around an existing model (e.g. a whole-image model to fine-tune on another dataset)."""
    splitter, metrics = ((patch_splitter, patch_metrics(dls.vocab)) if model.spec["kind"] == "patch"
                         else (whole_splitter, [RocAucBinary(), accuracy]))
    return _learner(dls, model, splitter, metrics, path, opt_func)


def malignant_auc(vocab) -> AccumMetric:
    """Validation ROC AUC of malignant (calc or mass) vs every other patch class, scored by the summed malignant probability.

    What the whole-image step needs from a patch model; plain accuracy rewards the background class, ~75% of a validation
    split cut from screening images while training batches are class-balanced. NaN when one side is absent.
    """
    idx = [i for i, c in enumerate(vocab) if c in MALIGNANT_PATCH_CLASSES]

    def score(probs: torch.Tensor, targs: torch.Tensor) -> float:
        y = np.isin(targs.cpu().numpy(), idx)
        return float(roc_auc_score(y, probs[:, idx].sum(1).cpu().numpy())) if 0 < y.sum() < len(y) else float("nan")

    return AccumMetric(score, dim_argmax=-1, activation=ActivationType.Softmax, flatten=False, name="malignant_auc")


def patch_metrics(vocab) -> list:
    """A patch learner's validation metrics: accuracy, balanced accuracy, malignant-vs-rest AUC."""
    return [accuracy, BalancedAccuracy(), malignant_auc(vocab)]


def heatmap_window(patch_model: PatchClassifier, image_size: tuple[int, int]) -> int:
    """Feature cells of the body that one patch spans in the whole image (the reference: 224 px / 32 = 7): the heatmap's
    averaging window. A patch of `crop` pixels cut from `source_size` images spans crop * H / source_H pixels of an
    image of height H, whatever size the patches were resized to for training."""
    info = patch_model.info
    crop = int(info.get("crop") or info["size"][0])
    source = info.get("source_size") or image_size
    return max(1, round(crop * image_size[0] / source[0] / patch_model.body.reduction))


def check_fits(model, size: tuple[int, int]) -> None:
    """Refuse an image size too small for the model (heatmap window, max-pools, VGG's pools) with a clear message."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, *size))
    except RuntimeError as e:
        raise CvfastError(f"image size {size[0]}x{size[1]} is too small for this whole-image model (its heatmap window, "
                          f"pools and top blocks shrink the map to nothing): {str(e).splitlines()[0]}; train at a larger --size") from None
    finally:
        model.train()


class CvfastLearner(Learner):
    """fastai's Learner whose optimizer decays only the new layers' kernels, never the pretrained body's.

    The reference regularises the layers it builds (kernel_regularizer: the patch FC; the heatmap, top blocks and FC of
    the whole-image model) and not the keras.applications body; fastai's wd_bn_bias=False already spares BatchNorm
    weights and biases."""

    def create_opt(self):
        """fastai's create_opt, then no weight decay on the body's parameters."""
        super().create_opt()
        for p in self.model.body.parameters():
            self.opt.state[p]["do_wd"] = False


def _learner(dls: DataLoaders, model, splitter, metrics: list, path: str | Path, opt_func) -> Learner:
    """Shared Learner construction; the data's preprocessing facts ride along on the model."""
    info = dls.info
    model.info = {"classes": list(dls.vocab), "mean_grey": info.mean_grey, "size": list(info.size), "mean_grey_source": info.mean_source}
    if info.source_size:  # patch models: what a sliding-window heatmap needs
        model.info.update(source_size=list(info.source_size), crop=info.crop)
    if info.breast_crop:  # images were cropped to the breast before resizing: predict must do the same to new images
        model.info["breast_crop"] = info.breast_crop
    return CvfastLearner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, splitter=splitter, metrics=metrics,
                         path=Path(path), model_dir="checkpoints")
