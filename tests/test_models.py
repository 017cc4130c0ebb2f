"""Models, parameter groups and schedules: which layers train when, with which lr and weight decay."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from cvfast.data.blocks import patch_dataloaders
from cvfast.errors import CvfastError
from cvfast.models import PatchClassifier, create_body
from cvfast.models.whole import whole_from_patch
from cvfast.train.learners import patch_learner
from cvfast.train.recipes import load_recipe
from cvfast.train.schedule import TRAIN_FROM, begin_stage, fit_stage, random_init_schedule, stages_from
from cvfast.train.splitters import patch_splitter, whole_splitter


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g] for g in groups]


def _covers_all(model, groups):
    ids = [id(p) for g in groups for p in g]
    return len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_resnet50_groups_are_the_papers():
    model = PatchClassifier(create_body("resnet50"))
    bottom, top, head = _group_names(model, patch_splitter(model))
    assert _covers_all(model, patch_splitter(model))
    assert bottom[0].startswith("body.net.conv1") and bottom[-1].startswith("body.net.layer3.4.")
    assert top[0] == "body.net.layer3.5.conv1.weight" and top[-1].startswith("body.net.layer4.2.")
    assert all(n.startswith(("body.net.layer3.5.", "body.net.layer4.")) for n in top)
    assert head == ["head.3.weight", "head.3.bias"]
    # Keras counts 46 layers here: 10 (last conv4_x block) + 33 (conv5_x) + 3 (head); we group the same modules
    assert len({n.rsplit(".", 1)[0] for n in top if "conv" in n or "downsample.0" in n}) == 3 + 10


def test_vgg16_groups_are_the_papers():
    model = PatchClassifier(create_body("vgg16"))
    bottom, top, head = _group_names(model, patch_splitter(model))
    assert _covers_all(model, patch_splitter(model))
    convs = lambda names: sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda s: int(s.split("_")[-1]))  # noqa: E731
    assert convs(bottom) == [f"body.net.features_{i}" for i in (0, 2, 5, 7, 10, 12, 14)]  # conv blocks 1-3
    assert convs(top) == [f"body.net.features_{i}" for i in (17, 19, 21, 24, 26, 28)]  # conv blocks 4 and 5
    assert len(head) == 2


def test_any_timm_arch_gets_three_groups_from_its_stages():
    for arch in ("test_resnet", "test_efficientnet", "test_convnext"):
        model = PatchClassifier(create_body(arch))
        groups = patch_splitter(model)
        assert _covers_all(model, groups) and all(len(g) > 0 for g in groups), arch
    with pytest.raises(CvfastError, match="not a staged convolutional net"):
        patch_splitter(PatchClassifier(create_body("test_vit")))


def test_whole_image_shapes_and_heatmap():
    patch = PatchClassifier(create_body("resnet50"))
    whole = whole_from_patch(patch, top="resnet").eval()
    with torch.no_grad():
        assert whole(torch.zeros(1, 1, 1152, 896)).shape == (1, 2)  # the paper's working size
    small = PatchClassifier(create_body("test_resnet"))
    for top in ("resnet", "vgg"):
        for heatmap in (False, True):
            w = whole_from_patch(small, top=top, heatmap=heatmap, widths=(32, 32, 64), vgg_width=32, heatmap_window=2).eval()
            with torch.no_grad():  # the heatmap's 5x5 max-pool shrinks the map 5x: VGG's two 2x2 pools need room
                assert w(torch.randn(2, 1, *((1024, 768) if heatmap else (160, 128)))).shape == (2, 2)
            groups = whole_splitter(w)
            assert _covers_all(w, groups)
            assert len(groups[0]) == len(list(small.body.parameters())) + (2 if heatmap else 0)
    w = whole_from_patch(small, top="resnet", heatmap=True, widths=(32, 32, 64), heatmap_window=2)
    torch.testing.assert_close(w.heatmap.fc.weight[:, :, 0, 0], small.head[-1].weight)
    assert w.heatmap.out_channels == 5 and w.top[0].convs[0].in_channels == 5
    # the reference top: [512-512-1024] x 2 stages x 2 units, first unit of each stage strided with a projection
    ref = whole_from_patch(patch, top="resnet").top
    assert len(ref) == 4 and ref[0].convs[3].stride == (2, 2) and ref[1].convs[3].stride == (1, 1)
    assert ref[0].convs[0].out_channels == 512 and ref[-1].convs[6].out_channels == 1024


@pytest.fixture(scope="module")
def tiny_learner(s10):
    dls = patch_dataloaders(s10, bs=32, seed=0)
    return patch_learner(dls, "test_resnet")


def _is_bn(module_name: str, model) -> bool:
    return isinstance(model.get_submodule(module_name), nn.modules.batchnorm._BatchNorm)


def test_requires_grad_and_optimizer_hypers_per_stage(tiny_learner):
    learn = tiny_learner
    stages = stages_from(load_recipe("patch-s10-resnet50")["stages"])
    stages[1] = stages_from([{"epochs": 1, "lr": [1e-6, 2e-4, 3e-4], "wd": 0.05, "train": "top", "train_bn": False}])[0]
    groups = patch_splitter(learn.model)
    for stage in stages:
        stage = stages_from([{**stage.__dict__, "epochs": 1}])[0]
        begin_stage(learn, stage)
        fit_stage(learn, stage)
        first = TRAIN_FROM[stage.train]
        names = {id(p): n.rsplit(".", 1)[0] for n, p in learn.model.named_parameters()}
        for gi, group in enumerate(groups):
            for p in group:
                is_bn = _is_bn(names[id(p)], learn.model)
                assert p.requires_grad == (gi >= first or (is_bn and stage.train_bn)), (stage.name, gi, names[id(p)])
        lrs = stage.lr if isinstance(stage.lr, tuple) else (stage.lr,) * 3
        # what the optimizer holds after the stage ran: one lr per group, and this stage's weight decay
        assert [h["lr"] for h in learn.opt.hypers] == pytest.approx(list(lrs))
        assert [h["wd"] for h in learn.opt.hypers] == pytest.approx([stage.wd] * 3)


def test_weight_decay_really_changes_between_stages(tiny_learner):
    learn = tiny_learner
    a, b = stages_from([{"epochs": 1, "lr": 1e-3, "wd": 0.0, "train": "all"}, {"epochs": 1, "lr": 1e-3, "wd": 0.5, "train": "all"}])
    head_w = learn.model.head[-1].weight
    for stage in (a, b):
        begin_stage(learn, stage)
        fit_stage(learn, stage)
        assert all(h["wd"] == stage.wd for h in learn.opt.hypers)
    # the decay the second stage declares is the decay a step applies: with zero data gradients and a fresh Adam
    # state the gradient is Keras' L2 term 2 * wd * w, which Adam's first step normalises to lr * g / (|g| + eps)
    begin_stage(learn, b)
    before = head_w.detach().clone()
    learn.model.zero_grad()
    for p in learn.model.parameters():
        p.grad = torch.zeros_like(p)
    learn.opt.step()
    g = 2 * 0.5 * before
    torch.testing.assert_close(head_w.detach(), before - 1e-3 * g / (g.abs() + 1e-8), atol=1e-7, rtol=0)


def test_random_init_schedule_is_constant_lr_all_layers():
    stages = stages_from(load_recipe("patch-s10-resnet50")["stages"])
    (only,) = random_init_schedule(stages)
    assert (only.epochs, only.lr, only.train) == (50, 1e-3, "all")


def test_weights_from_a_local_file(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False, in_chans=3)  # what a hub download would hold
    f = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    body = create_body("test_resnet", weights=f)
    std = torch.tensor(src.pretrained_cfg["std"])[None, :, None, None]  # the weights' input std, folded into conv1
    torch.testing.assert_close(body.net.conv1[0].weight if isinstance(body.net.conv1, nn.Sequential) else body.net.conv1.weight,
                               ((src.conv1[0].weight if isinstance(src.conv1, nn.Sequential) else src.conv1.weight) / std).sum(1, keepdim=True))
    torch.testing.assert_close(body.net.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    with pytest.raises(CvfastError, match="no such file"):
        create_body("test_resnet", weights=tmp_path / "missing.pth")
    with pytest.raises(CvfastError, match="--arch no_such_net"):
        create_body("no_such_net")
    assert np.isfinite(body(torch.zeros(1, 1, 64, 64)).sum().item())


def test_fastai_head_option_and_its_groups():
    model = PatchClassifier(create_body("test_resnet"), head="fastai")
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    groups = patch_splitter(model)
    assert _covers_all(model, groups) and len(groups[2]) > 2  # fastai's head: BN + linear layers
    with pytest.raises(CvfastError, match="needs a patch model with the paper's head"):
        whole_from_patch(model, heatmap=True, heatmap_window=2)


def test_batch_of_two_trains_at_the_papers_size(ddsm_data):
    """A whole-image training step at 1152x896, batch 2, with the BN policy and gradient accumulation."""
    from fastai.callback.training import GradientAccumulation

    from cvfast.data.blocks import whole_image_dataloaders
    from cvfast.train.callbacks import HoldBodyBatchNorm
    from cvfast.train.learners import whole_image_learner

    dls = whole_image_dataloaders(ddsm_data, bs=2, size=(1152, 896))
    xb, _ = dls.one_batch()
    assert xb.shape == (2, 1, 1152, 896)
    patch = PatchClassifier(create_body("test_resnet"))
    patch.spec = {"kind": "patch", "arch": "test_resnet", "head": "paper", "dropout": 0.0, "n_classes": 5}
    learn = whole_image_learner(dls, patch, widths=(16, 16, 32))
    body_bn = [m for m in learn.model.body.modules() if isinstance(m, nn.BatchNorm2d)][0]
    stats = body_bn.running_mean.clone()
    (stage,) = stages_from([{"epochs": 1, "lr": 1e-4, "wd": 1e-2, "train": "all"}])
    begin_stage(learn, stage)
    with learn.no_bar():
        fit_stage(learn, stage, cbs=[HoldBodyBatchNorm(), GradientAccumulation(n_acc=4)])
    assert np.isfinite(learn.recorder.losses[-1].item())
    torch.testing.assert_close(body_bn.running_mean, stats)  # the body's BN statistics were held


def test_quick_and_scale_resolve_recipes():
    from cvfast.train.recipes import resolve

    r = load_recipe("whole-resnet")
    q = resolve(r, {"data": {"bs": 4, "size": None}}, quick=True)
    assert [s["epochs"] for s in q["stages"]] == [3, 2] and q["data"]["size"] == [288, 224] and q["data"]["bs"] == 4
    s = resolve(r, {}, epochs_scale=0.5)
    assert [st["epochs"] for st in s["stages"]] == [15, 10] and s["data"]["size"] == [1152, 896]
    assert r["stages"][0]["epochs"] == 30  # the loaded recipe is not modified
