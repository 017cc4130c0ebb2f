"""The paper's method, exactly (issue 11): one mean grey, L2 weight decay in Adam, the pretrained input scale, the
reference heatmap, the schedules and the behaviours they rely on -- each pinned so that a plausible regression fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from fastai.callback.core import Callback
from safetensors.torch import save_file
from torch import nn

from cvfast.data.blocks import paper_augmentation, patch_dataloaders, whole_image_dataloaders
from cvfast.data.classes import PATCH_CLASSES
from cvfast.data.read import read_png
from cvfast.data.sample import PATCH_SETS
from cvfast.models import PatchClassifier, create_body
from cvfast.models.artifact import export_model
from cvfast.train.callbacks import HoldBodyBatchNorm
from cvfast.train.learners import patch_learner, whole_image_learner
from cvfast.train.pipeline import _stage_cbs, finetune_learner_from_recipe, patch_learner_from_recipe, train_schedule, whole_learner_from_recipe
from cvfast.train.recipes import load_recipe, recipe_paths
from cvfast.train.schedule import begin_stage, fit_stage, stages_from


def _numpy_train_mean(data: Path) -> float:
    m = pd.read_csv(data / "manifest.csv")
    return float(np.stack([read_png(data / p) for p in m.loc[m["split"] == "train", "path"]]).astype(np.float64).mean() / 65535)


@pytest.fixture(scope="module")
def exported(s10, ddsm_data, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("fidelity_models")
    patch = patch_learner(patch_dataloaders(s10, bs=8), "test_resnet")
    export_model(patch, out / "patch")
    whole = whole_learner_from_recipe(load_recipe("demo-whole"), ddsm_data, out / "patch", out / "w")
    export_model(whole, out / "whole")
    return out / "patch", out / "whole"


def test_one_mean_grey_the_whole_image_training_sets(s10, ddsm_data, inbreast_data, exported, tmp_path):
    ddsm_mean = _numpy_train_mean(ddsm_data)
    patch_learn, _ = patch_learner_from_recipe(load_recipe("demo-patch"), s10, tmp_path)
    whole = json.loads((exported[1] / "model.json").read_text())
    assert patch_learn.model.info["mean_grey"] == pytest.approx(ddsm_mean, rel=1e-9)
    assert json.loads((exported[0] / "model.json").read_text())["mean_grey"] == pytest.approx(ddsm_mean, rel=1e-9)
    assert whole["mean_grey"] == pytest.approx(ddsm_mean, rel=1e-9) and "patch model" in whole["mean_grey_source"]
    tuned = finetune_learner_from_recipe(load_recipe("demo-finetune"), inbreast_data, exported[1], tmp_path / "f")
    assert tuned.model.info["mean_grey"] == pytest.approx(_numpy_train_mean(inbreast_data), rel=1e-9)  # the target's own
    assert "target dataset" in tuned.model.info["mean_grey_source"]
    assert abs(_numpy_train_mean(inbreast_data) - ddsm_mean) > 1e-3  # the two datasets' means differ, so the test can fail


def _zero_grad_step(learn):
    for p in learn.model.parameters():
        p.grad = torch.zeros_like(p)
    learn.opt.step()


def test_weight_decay_is_keras_l2_in_adam_on_the_new_layers_kernels_only(s10):
    learn = patch_learner(patch_dataloaders(s10, bs=8), "test_resnet")
    (stage,) = stages_from([{"epochs": 1, "lr": 1e-3, "wd": 1e-2, "train": "all"}])
    begin_stage(learn, stage)
    kernel, body_kernel = learn.model.head[-1].weight, learn.model.body.net.layer1[0].conv1.weight
    bn = [m for m in learn.model.body.modules() if isinstance(m, nn.BatchNorm2d)][0]
    before = {"kernel": kernel.detach().clone(), "body": body_kernel.detach().clone(), "bn": bn.weight.detach().clone(),
              "bias": learn.model.head[-1].bias.detach().clone()}
    _zero_grad_step(learn)
    g = 2 * 1e-2 * before["kernel"]  # d/dw of wd * sum(w^2)
    torch.testing.assert_close(kernel.detach(), before["kernel"] - 1e-3 * g / (g.abs() + 1e-8), atol=1e-8, rtol=0)
    assert torch.equal(body_kernel.detach(), before["body"])  # the reference regularises the layers it adds, not the body
    assert torch.equal(bn.weight.detach(), before["bn"]) and torch.equal(learn.model.head[-1].bias.detach(), before["bias"])
    hyper = learn.opt.hypers[0]
    assert (hyper["mom"], hyper["sqr_mom"], hyper["eps"]) == (0.9, 0.999, 1e-8)  # Keras 2.0's Adam


def test_decoupled_decay_stays_an_option(s10, tmp_path):
    recipe = load_recipe("demo-patch")
    recipe["train"]["weight_decay"] = "decoupled"
    learn, _ = patch_learner_from_recipe(recipe, s10, tmp_path)
    (stage,) = stages_from([{"epochs": 1, "lr": 1e-3, "wd": 0.5, "train": "all"}])
    begin_stage(learn, stage)
    w = learn.model.head[-1].weight
    before = w.detach().clone()
    _zero_grad_step(learn)
    torch.testing.assert_close(w.detach(), before * (1 - 1e-3 * 0.5), atol=1e-7, rtol=0)


def test_the_second_whole_image_stage_decay_is_the_one_in_effect(ddsm_data, exported, tmp_path):
    recipe = load_recipe("demo-whole")
    for s in recipe["stages"]:
        s["epochs"] = 1
    learn = whole_learner_from_recipe(recipe, ddsm_data, exported[0], tmp_path)
    kernel = learn.model.top[0].convs[0].weight  # a new layer's kernel, trained in both stages
    moved = []

    class CancelAtStageTwosDecay(Callback):
        """Give the kernel a data gradient of exactly -2 * 1e-2 * w: only an L2 decay of 1e-2 cancels it to a zero step."""

        order = 99

        def before_step(self):
            if self.opt.hypers[1]["lr"] == recipe["stages"][1]["lr"]:  # stage 2
                self.before = kernel.detach().clone()
                kernel.grad = -2 * 1e-2 * kernel.detach().clone()

        def after_step(self):
            if hasattr(self, "before"):
                moved.append(float((kernel.detach() - self.before).abs().max()))
                del self.before

    with learn.no_bar(), learn.no_logging():
        train_schedule(learn, stages_from(recipe["stages"]), tmp_path, recipe, cbs=lambda t: [CancelAtStageTwosDecay()])
    # stage 1's 1e-3, or decoupled decay, would leave a gradient Adam turns into a step of about the lr (1e-4); the right
    # decay leaves only rounding, a step of 1e-6 at most
    assert moved and moved[0] < 0.05 * recipe["stages"][1]["lr"], moved


def test_pretrained_inputs_are_scaled_as_the_weights_expect(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False, in_chans=3, features_only=True, out_indices=(-1,)).eval()
    full = timm.create_model("test_resnet", pretrained=False, in_chans=3)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(f))
    src.load_state_dict({k: v for k, v in full.state_dict().items() if k in src.state_dict()})
    body = create_body("test_resnet", weights=f).eval()
    std = torch.tensor(full.pretrained_cfg["std"])
    assert body.input_std == pytest.approx(std.tolist())
    grey = torch.rand(2, 1, 96, 80)
    mean = 0.31  # the dataset's mean grey (the paper's), not ImageNet's
    with torch.no_grad():
        ours = body(grey - mean)
        theirs = src((grey.expand(-1, 3, -1, -1) - mean) / std[None, :, None, None])[-1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert create_body("test_resnet").input_std is None  # random init: nothing to fold


def test_reference_heatmap_cells_are_the_patch_classifier_on_each_window():
    from cvfast.models.whole import whole_from_patch

    patch = PatchClassifier(create_body("test_resnet")).eval()
    window = 3
    whole = whole_from_patch(patch, heatmap=True, heatmap_window=window, heatmap_pool=5, widths=(8, 8, 16)).eval()
    x = torch.randn(1, 1, 512, 384)
    with torch.no_grad():
        feats = patch.body(x)
        cells = whole.heatmap.cells(feats)
        assert cells.shape[-2:] == (feats.shape[-2] - window + 1, feats.shape[-1] - window + 1)  # stride 1, no padding
        for i, j in [(0, 0), (2, 3), (cells.shape[-2] - 1, cells.shape[-1] - 1)]:
            own = torch.relu(patch.head(feats[..., i:i + window, j:j + window]))  # GAP over the window + the trained FC
            torch.testing.assert_close(cells[0, :, i, j], own[0], atol=1e-4, rtol=1e-4)
        pooled = whole.heatmap(feats)
        torch.testing.assert_close(pooled, torch.nn.functional.max_pool2d(cells, 5))  # Keras MaxPooling2D(5x5): stride 5
    assert whole.heatmap.window == window


@pytest.mark.parametrize("scale", [1, 2])
def test_heatmap_window_spans_one_patch(exported, ddsm_data, tmp_path, scale):
    """At the patches' source size and at twice it: a patch of CROP source pixels spans CROP * SCALE pixels of the whole image."""
    side = json.loads((exported[0] / "model.json").read_text())
    h, w = side["source_size"]
    recipe = load_recipe("whole-resnet-heatmap")
    recipe["data"] |= {"bs": 2, "size": None if scale == 1 else [h * scale, w * scale]}
    recipe["model"]["widths"] = [8, 8, 16]
    learn = whole_learner_from_recipe(recipe, ddsm_data, exported[0], tmp_path)
    reduction = learn.model.body.reduction
    assert (side["crop"], reduction) == (48, 32)  # so the window is round(1.5) = 2 cells at scale 1, 3 at scale 2
    assert learn.model.heatmap.window == {1: 2, 2: 3}[scale] == max(1, round(side["crop"] * scale / reduction))
    assert learn.model.spec["heatmap_window"] == learn.model.heatmap.window and learn.model.spec["heatmap_pool"] == 5


def test_the_schedules_and_their_settings():
    vgg, resnet = load_recipe("whole-vgg"), load_recipe("whole-resnet")
    assert [(s["epochs"], s["lr"], s["wd"], s["train"]) for s in vgg["stages"]] == [(30, 1e-4, 1e-3, "top"), (20, 1e-5, 1e-2, "all"),
                                                                                    (200, 1e-5, 1e-2, "all")]
    assert len(resnet["stages"]) == 2
    for name in recipe_paths():
        r = load_recipe(name)
        t = r["train"]
        assert (t["weight_decay"], t["adam_beta2"], t["adam_eps"]) == ("l2", 0.999, 1e-8), name
        assert t["keep_best"] and r["model"].get("dropout", 0.0) == 0.0, name
        if name.startswith("patch-"):
            assert r["stages"][0]["train"] == "head" and r["stages"][0]["train_bn"] is False, name
    inbreast = load_recipe("finetune-inbreast")
    assert inbreast["stages"][0]["lr"] == 1e-6 and inbreast["stages"][0]["epochs"] == 50 and inbreast["train"]["early_stopping_patience"] == 10


def test_patch_stage_one_trains_no_batchnorm_of_the_body(s10):
    learn = patch_learner(patch_dataloaders(s10, bs=16), "test_resnet")
    head_stage = stages_from(load_recipe("patch-s10-resnet50")["stages"])[0]
    bns = [m for m in learn.model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.weight.detach().clone(), m.running_mean.clone()) for m in bns]
    head_before = learn.model.head[-1].weight.detach().clone()
    begin_stage(learn, head_stage)
    with learn.no_bar(), learn.no_logging():
        fit_stage(learn, stages_from([{**head_stage.__dict__, "epochs": 1}])[0])
    assert all(torch.equal(m.weight, w) and torch.equal(m.running_mean, r) for m, (w, r) in zip(bns, before))
    assert not torch.equal(learn.model.head[-1].weight, head_before)  # the last layer did train


def test_augmentation_literals_and_every_image_rotated_and_zoomed():
    from fastai.vision.augment import AffineCoordTfm

    tfms = paper_augmentation()
    affine = [t for t in tfms if isinstance(t, AffineCoordTfm)][0]
    kinds = {type(f.func).__name__ if hasattr(f, "func") else getattr(f, "__name__", type(f).__name__): f for f in affine.aff_fs}
    assert len(affine.aff_fs) == 3  # flip, rotation, zoom
    ps = [getattr(f, "keywords", {}).get("p") for f in affine.aff_fs]
    assert ps == [0.5, 1.0, 1.0], kinds  # a 50% horizontal flip; rotation and zoom on every image
    assert [getattr(f, "keywords", {}).get(k) for f, k in zip(affine.aff_fs[1:], ("max_deg", "max_zoom"))] == [25.0, 1.2]
    assert affine.aff_fs[2].keywords["min_zoom"] == 0.8
    shift = tfms[-1]
    assert shift.max_shift == pytest.approx(20 / 255)
    assert PATCH_CLASSES == ["background", "calc_benign", "calc_malignant", "mass_benign", "mass_malignant"]
    assert PATCH_SETS["s10"].min_overlap == 0.75 and PATCH_SETS["s10"].n_roi == 10 and PATCH_SETS["s10"].n_background == 10
    assert PATCH_SETS["s1"].centred and PATCH_SETS["s1"].n_roi == 1


def _whole(dls, seed: int = 0):
    torch.manual_seed(seed)
    patch = PatchClassifier(create_body("test_resnet"))
    patch.spec = {"kind": "patch", "arch": "test_resnet", "head": "paper", "dropout": 0.0, "n_classes": 5}
    return whole_image_learner(dls, patch, widths=(8, 8, 16))


def test_whole_image_stage_one_freezes_the_body_and_stage_two_holds_its_statistics(ddsm_data):
    dls = whole_image_dataloaders(ddsm_data, bs=2, augment=False)
    learn = _whole(dls)
    top, all_ = stages_from(load_recipe("whole-resnet")["stages"])
    bns = [m for m in learn.model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    snap = lambda: [(m.weight.detach().clone(), m.running_mean.clone(), m.running_var.clone()) for m in bns]  # noqa: E731
    grads = []

    class OneStep(Callback):
        def after_backward(self):
            grads.append([p.grad for p in self.learn.model.body.parameters()])

        def after_step(self):
            from fastai.callback.core import CancelFitException

            raise CancelFitException()

    before = snap()
    begin_stage(learn, top)
    with learn.no_bar(), learn.no_logging():
        fit_stage(learn, stages_from([{**top.__dict__, "epochs": 1}])[0], cbs=[HoldBodyBatchNorm(), OneStep()])
    assert grads and all(g is None for g in grads[0])  # stage 1: no gradient reaches the body
    assert all(torch.equal(a, b) for x, y in zip(before, snap()) for a, b in zip(x, y))
    begin_stage(learn, all_)
    with learn.no_bar(), learn.no_logging():
        fit_stage(learn, stages_from([{**all_.__dict__, "epochs": 1, "lr": 1e-2}])[0], cbs=[HoldBodyBatchNorm(), OneStep()])
    after = snap()
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(before, after))  # BN weights train in stage 2
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(before, after))  # statistics held


def test_gradient_accumulation_of_two_batches_of_two_is_one_batch_of_four(ddsm_data):
    from fastai.callback.training import GradientAccumulation

    grads = {}
    for name, bs, cbs in (("acc", 2, [GradientAccumulation(n_acc=4)]), ("big", 4, [])):
        dls = whole_image_dataloaders(ddsm_data, bs=bs, augment=False, balance=False, seed=0)
        dls.train.shuffle = False
        learn = _whole(dls)
        learn.model.eval()  # BN held everywhere: batch statistics would differ between 2+2 and 4
        (stage,) = stages_from([{"epochs": 1, "lr": 1e-3, "train": "all"}])
        begin_stage(learn, stage)
        seen = []

        class Capture(Callback):
            order = 99

            def before_train(self):
                self.learn.model.eval()

            def before_step(self):
                seen.append([p.grad.detach().clone() if p.grad is not None else None for p in self.learn.model.parameters()])
                from fastai.callback.core import CancelFitException

                raise CancelFitException()

        with learn.no_bar(), learn.no_logging():
            learn.fit(1, lr=1e-3, cbs=[*cbs, Capture()])
        grads[name] = seen[0]
    for a, b in zip(grads["acc"], grads["big"]):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _finetune_run(recipe: dict, data: Path, source: Path, out: Path) -> tuple[list[dict], list[dict], dict]:
    """Fine-tune; return the epoch history, each epoch's weights and the final weights."""
    learn = finetune_learner_from_recipe(recipe, data, source, out)
    weights = []

    class Keep(Callback):
        order = 95

        def after_epoch(self):
            weights.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})

    with learn.no_bar(), learn.no_logging():
        train_schedule(learn, stages_from(recipe["stages"]), out, recipe, cbs=lambda t: _stage_cbs(recipe)(t) + [Keep()])
    history = json.loads((out / "checkpoints" / "progress.json").read_text())["history"]
    return history, weights, learn.model.state_dict()


def _resplit(data: Path, out: Path) -> Path:
    """DATA's cached images re-split (through `prepare csv`) so that validation holds both classes: the tiny session
    splits have one, and a validation AUC of NaN never improves."""
    from cvfast.data.ingest import prepare_csv
    from cvfast.data.ingest.common import PrepareOptions

    m = pd.read_csv(data / "manifest.csv", dtype={"patient_id": str})
    by_patient = m.groupby("patient_id")["label"].max()
    valid = set(by_patient[by_patient == 1].index[:2]) | set(by_patient[by_patient == 0].index[:2])
    pd.DataFrame({"path": [str(data / p) for p in m["path"]], "label": m["label"], "patient_id": m["patient_id"],
                  "split": ["valid" if p in valid else s if s != "valid" else "train" for p, s in zip(m["patient_id"], m["split"])]}
                 ).to_csv(out / "labels.csv", index=False)
    prepare_csv(out / "labels.csv", PrepareOptions(out=out / "data", size=(256, 192), workers=1))
    d = pd.read_csv(out / "data" / "manifest.csv")
    assert d.loc[d["split"] == "valid", "label"].nunique() == 2
    return out / "data"


@pytest.fixture(scope="module")
def two_class_valid(inbreast_data, tmp_path_factory) -> Path:
    return _resplit(inbreast_data, tmp_path_factory.mktemp("two_class"))


@pytest.fixture(scope="module")
def ddsm_two_class_valid(ddsm_data, tmp_path_factory) -> Path:
    return _resplit(ddsm_data, tmp_path_factory.mktemp("ddsm_two_class"))


def test_early_stopping_stops_and_the_best_epoch_is_kept(two_class_valid, exported, tmp_path):
    inbreast_data = two_class_valid
    recipe = load_recipe("demo-finetune")
    # nothing changes (lr 0, every BatchNorm held by train_bn = false): the validation AUC cannot improve after epoch 1
    recipe["stages"][0] |= {"epochs": 12, "lr": 0.0, "train": "head", "train_bn": False}
    recipe["train"]["early_stopping_patience"] = 3
    history, _, _ = _finetune_run(recipe, inbreast_data, exported[1], tmp_path / "flat")
    assert len(history) == 3 + 1  # patience + 1 epochs, not 12

    recipe["stages"][0] |= {"epochs": 6, "lr": 3e-3, "train": "all", "train_bn": True}
    recipe["train"]["early_stopping_patience"] = 0  # no early stop: the best epoch must still be the one kept
    history, weights, final = _finetune_run(recipe, inbreast_data, exported[1], tmp_path / "moving")
    aucs = [h["roc_auc_score"] for h in history]
    best = int(np.argmax(aucs))  # the first epoch with the highest validation AUC
    assert len(history) == 6 and len(set(np.round(aucs, 6))) > 1, aucs
    assert all(torch.equal(final[k], weights[best][k]) for k in final), (best, aucs)
    if best != len(aucs) - 1:
        assert not all(torch.equal(final[k], weights[-1][k]) for k in final)


def test_the_best_epoch_carries_across_stages_and_across_a_resume(ddsm_two_class_valid, exported, tmp_path):
    ddsm_data = ddsm_two_class_valid
    from cvfast.train.callbacks import BestModel

    recipe = load_recipe("demo-whole")
    recipe["stages"][0]["epochs"], recipe["stages"][1]["epochs"] = 2, 2
    seen: dict[str, list] = {}

    def run(out: Path, name: str, stop_at_stage_two: bool = False):
        learn = whole_learner_from_recipe(recipe, ddsm_data, exported[0], out)
        make = _stage_cbs(recipe)  # one per run, as train_whole has it: the best score carries from stage to stage

        class Watch(Callback):
            order = 99

            def before_epoch(self):
                best = [cb.best for cb in self.learn.cbs if isinstance(cb, BestModel)]
                seen.setdefault(name, []).append(best[0])
                if stop_at_stage_two and len(seen[name]) == 3:
                    raise KeyboardInterrupt("killed at the start of stage 2")

        with learn.no_bar(), learn.no_logging():
            train_schedule(learn, stages_from(recipe["stages"]), out, recipe, cbs=lambda t: make(t) + [Watch()])

    run(tmp_path / "a", "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", "killed", stop_at_stage_two=True)
    run(tmp_path / "b", "resumed")
    stage_one_best = seen["uninterrupted"][2]
    assert np.isfinite(stage_one_best)  # stage 2 starts from stage 1's best validation AUC, not from -inf
    assert seen["resumed"][0] == stage_one_best  # and so does a run resumed at the stage boundary


def test_the_fidelity_fixes_can_be_switched_back_off_for_ablations(s10, ddsm_data, tmp_path):
    """data.mean = 'reference' gives the reference code's two means; model.fold_input_std = false its unscaled input."""
    from cvfast.data.blocks import patch_set_train_mean

    recipe = load_recipe("demo-patch")
    recipe["model"] = {**recipe["model"], "arch": "test_resnet", "pretrained": False}
    recipe["data"] = {**recipe["data"], "mean": "reference"}
    learn, _ = patch_learner_from_recipe(recipe, s10, tmp_path / "p")
    patch_mean = patch_set_train_mean(s10)
    assert learn.model.info["mean_grey"] == pytest.approx(patch_mean) and "patch set's own" in learn.model.info["mean_grey_source"]
    assert abs(patch_mean - _numpy_train_mean(ddsm_data)) > 1e-3  # the patches' mean is not the whole images'
    export_model(learn, tmp_path / "patch")
    whole_recipe = load_recipe("demo-whole")
    paper = whole_learner_from_recipe(whole_recipe, ddsm_data, tmp_path / "patch", tmp_path / "w0")
    assert paper.model.info["mean_grey"] == pytest.approx(patch_mean)  # the paper's setting: the patch model's one value
    whole_recipe["data"] = {**whole_recipe["data"], "mean": "reference"}
    whole = whole_learner_from_recipe(whole_recipe, ddsm_data, tmp_path / "patch", tmp_path / "w")
    assert whole.model.info["mean_grey"] == pytest.approx(_numpy_train_mean(ddsm_data), rel=1e-9)  # its own, not the patch model's
    assert "reference" in whole.model.info["mean_grey_source"]
    scaled = create_body("tf_efficientnet_lite0", pretrained=True)
    unscaled = create_body("tf_efficientnet_lite0", pretrained=True, fold_std=False)
    w_scaled, w_unscaled = scaled.net.conv_stem.weight, unscaled.net.conv_stem.weight
    assert scaled.input_std == [0.5, 0.5, 0.5] and unscaled.input_std == [1.0, 1.0, 1.0]
    torch.testing.assert_close(w_scaled, 2 * w_unscaled)  # the 1/std (std 0.5) is the only difference
