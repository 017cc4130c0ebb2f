"""`cvfast crossval`: patient-level folds, pooled out-of-fold predictions, resumption, the report's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from sklearn.metrics import roc_auc_score

from cvfast.crossval.folds import make_folds
from cvfast.crossval.report import auc_table, by_lesion_type, paired_difference
from cvfast.crossval.run import CrossvalSpec, crossval
from cvfast.data.classes import PATCH_CLASSES
from cvfast.data.ingest import prepare_ddsm
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.manifest import read_manifest
from cvfast.data.synth import synthesize
from cvfast.train.recipes import recipe_paths


def tiny_recipes(folder: Path) -> tuple[str, str]:
    """The mini-MIAS CPU recipes at one epoch per stage, patches fed as cut, a narrow top: the same code paths, seconds of work."""
    folder.mkdir(parents=True, exist_ok=True)
    patch = recipe_paths()["mias-cpu-patch"].read_text()
    patch = patch.replace("size = 96\n", "").replace("epochs = 2", "epochs = 1").replace("epochs = 5", "epochs = 1")
    whole = recipe_paths()["mias-cpu-whole"].read_text()
    whole = whole.replace("epochs = 8", "epochs = 1").replace("epochs = 3", "epochs = 1").replace("[64, 64, 128]", "[8, 8, 16]")
    whole = whole.replace("size = [512, 416]\n", "")
    (folder / "p.toml").write_text(patch)
    (folder / "w.toml").write_text(whole)
    return str(folder / "p.toml"), str(folder / "w.toml")


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv")
    synthesize(out / "synth", patients=16, seed=3, size="tiny")
    prepare_ddsm(out / "synth" / "ddsm", PrepareOptions(out=out / "data", size=(128, 96), workers=1, seed=0))
    return out


@pytest.fixture(scope="module")
def cv_run(cv_data) -> tuple[Path, CrossvalSpec, dict]:
    p, w = tiny_recipes(cv_data / "recipes")
    spec = CrossvalSpec(folds=3, stages="patch", patch_recipe=p, whole_recipe=w, patch_size=32, edge_share=0.2)
    report = crossval(cv_data / "data", cv_data / "cv", spec)
    return cv_data / "cv", spec, report


def test_folds_hold_each_patient_out_exactly_once_and_never_beside_training():
    df = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)], "label": [int(i % 8 < 2) for i in range(40)]})
    folds = make_folds(df, 4, seed=1, valid_frac=0.25)
    patients = set(df["patient_id"])
    assert all(set(f) == patients for f in folds)
    held = [{p for p, s in f.items() if s == "test"} for f in folds]
    assert sum(len(h) for h in held) == len(patients) and set().union(*held) == patients  # a partition
    assert all(any(s == "valid" for s in f.values()) for f in folds)
    for f in folds:  # stratified: every fold holds out both classes
        labels = df[df["patient_id"].map(f) == "test"]["label"]
        assert labels.nunique() == 2


@pytest.mark.slow
def test_pooled_predictions_are_one_per_image_scored_by_the_fold_that_held_it_out(cv_run, cv_data):
    out, spec, report = cv_run
    manifest = read_manifest(cv_data / "data")
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert sorted(preds["image_id"]) == sorted(manifest["image_id"])  # every image once: none dropped, none twice
    folds = json.loads((out / "folds.json").read_text())["folds"]
    for _, r in preds.iterrows():
        assert folds[r["fold"]][r["patient_id"]] == "test"
    for k in range(3):  # each fold's patch set: no held-out patient's patch among its training patches
        patches = pd.read_csv(out / f"fold{k}" / "patches" / "patches.csv", dtype={"patient_id": str})
        held = {p for p, s in folds[k].items() if s == "test"}
        assert not set(patches.loc[patches["split"] != "test", "patient_id"]) & held
    assert {"p_max", "p_probe", "brightness", "chance"} <= set(preds.columns)
    assert preds["p_max"].between(0, 1).all() and preds["p_max"].nunique() > 3  # real window scores, not a constant
    pooled = report["malignant_vs_rest"]["p_max"]["image"]
    assert pooled["auc"] == pytest.approx(roc_auc_score(preds["label"], preds["p_max"]))
    assert 0 <= pooled["ci95"][0] <= pooled["ci95"][1] <= 1
    assert report["malignant_vs_rest"]["p_max"]["patient"]["n"] == manifest["patient_id"].nunique()
    assert report["patch"]["patches"] > 0 and 0 <= report["patch"]["malignant_auc"] <= 1
    assert {p["a"] + "-" + p["b"] for p in report["paired"]} >= {"p_max-p_probe", "p_max-brightness"}
    md = (out / "report.md").read_text()
    assert "frozen ImageNet linear probe" in md and "Pointing game" in md and (out / "review" / "index.html").is_file()


@pytest.mark.slow
def test_a_resumed_crossval_ends_where_an_uninterrupted_one_does(cv_run, cv_data, caplog):
    out, spec, _ = cv_run
    again = cv_data / "cv-resumed"
    from dataclasses import replace

    assert crossval(cv_data / "data", again, replace(spec, only=[1])) is None  # one fold now: no report yet
    assert not (again / "report.json").exists() and (again / "results" / "fold1.json").is_file()
    crossval(cv_data / "data", again, spec)  # the rest
    a = pd.read_csv(out / "predictions.csv").sort_values("image_id").reset_index(drop=True)
    b = pd.read_csv(again / "predictions.csv").sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6)
    caplog.clear()
    with caplog.at_level("INFO"):
        crossval(cv_data / "data", again, spec)  # nothing left to train
    assert sum("done earlier" in m for m in caplog.messages) == 3


@pytest.mark.slow
def test_a_fold_folder_of_other_settings_is_cleared_before_the_fold_runs(cv_run, cv_data):
    """A stale patch set or checkpoint (another split, patch size or seed) must never be reused: it could hold patients
    that this fold holds out."""
    from dataclasses import replace

    _, spec, _ = cv_run
    out = cv_data / "cv-stale"
    (out / "fold0" / "patches").mkdir(parents=True)
    (out / "fold0" / "key.txt").write_text("another split")
    (out / "fold0" / "patches" / "patches.csv").write_text("patch_id,path,label\nstale,x.png,background\n")
    (out / "fold0" / "patch" / "checkpoints").mkdir(parents=True)
    (out / "fold0" / "patch" / "checkpoints" / "progress.json").write_text("{}")
    crossval(cv_data / "data", out, replace(spec, only=[0]))
    assert "stale" not in (out / "fold0" / "patches" / "patches.csv").read_text()
    assert (out / "fold0" / "key.txt").read_text() == json.loads((out / "results" / "fold0.json").read_text())["key"]
    assert not (out / "fold0" / "patch" / "checkpoints" / "progress.json").exists()


def test_a_resplit_dataset_invalidates_finished_folds(cv_data):
    from cvfast.crossval.run import _recipes, fold_key

    p, w = tiny_recipes(cv_data / "recipes")
    spec = CrossvalSpec(folds=3, stages="patch", patch_recipe=p, whole_recipe=w, patch_size=32)
    df = read_manifest(cv_data / "data")
    folds = make_folds(df, 3, 0, 0.2)
    recipes = _recipes(spec)
    assert fold_key(spec, recipes, "digest-a", folds[0]) != fold_key(spec, recipes, "digest-b", folds[0])
    moved = dict(folds[0], **{next(iter(folds[0])): "train" if folds[0][next(iter(folds[0]))] != "train" else "valid"})
    assert fold_key(spec, recipes, "digest-a", folds[0]) != fold_key(spec, recipes, "digest-a", moved)


def test_report_statistics_against_hand_computed_values():
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c", "c", "d", "d"], "side": ["L", "R"] * 4,
                       "label": [1, 0, 0, 0, 1, 0, 0, 0], "lesion_type": ["mass", "", "", "", "calcification", "", "", ""],
                       "s": [0.9, 0.1, 0.2, 0.3, 0.4, 0.8, 0.05, 0.6], "t": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]})
    table = auc_table(df, ["s", "t"])
    assert table["s"]["image"]["auc"] == pytest.approx(roc_auc_score(df["label"], df["s"]))
    # patient level: max over her images -> a: (1, 0.9), b: (0, 0.3), c: (1, 0.8), d: (0, 0.6)
    assert table["s"]["patient"]["auc"] == pytest.approx(1.0) and table["s"]["patient"]["n"] == 4
    assert table["s"]["breast"]["n"] == 8
    diff = paired_difference(df, "s", "t")
    assert diff["difference"] == pytest.approx(roc_auc_score(df["label"], df["s"]) - roc_auc_score(df["label"], df["t"]))
    types = by_lesion_type(df, ["s"])
    assert types["mass"]["cancers"] == 1 and types["mass"]["s"]["auc"] == pytest.approx(1.0)  # 0.9 above all six negatives
    assert types["calcification"]["s"]["auc"] == pytest.approx(4 / 6)  # 0.4 above 0.1, 0.2, 0.3, 0.05


def test_malignant_auc_metric_matches_sklearn():
    from cvfast.train.learners import malignant_auc

    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(60, 5)), dtype=torch.float32)
    targs = torch.tensor(rng.integers(0, 5, 60))
    metric = malignant_auc(PATCH_CLASSES)
    probs = torch.softmax(logits, 1).numpy()
    mal = [PATCH_CLASSES.index("calc_malignant"), PATCH_CLASSES.index("mass_malignant")]
    expected = roc_auc_score(np.isin(targs.numpy(), mal), probs[:, mal].sum(1))
    assert metric.func(torch.softmax(logits, 1), targs) == pytest.approx(expected)
    assert np.isnan(metric.func(torch.softmax(logits, 1), torch.zeros(60, dtype=torch.long)))  # one class: undefined


@pytest.mark.slow
def test_each_folds_patch_set_takes_the_edge_share(cv_run):
    for k in range(3):
        patches = pd.read_csv(cv_run[0] / f"fold{k}" / "patches" / "patches.csv")
        background = patches[patches["label"] == "background"]
        assert json.loads((cv_run[0] / f"fold{k}" / "patches" / "patchset.json").read_text())["spec"]["edge_share"] == 0.2
        assert background["patch_id"].str.contains("_edge_").sum() == 2 * background["image_id"].nunique()  # 2 of 10 per image


def test_cli_refuses_what_it_cannot_cross_validate(cv_data, tmp_path):
    r = run_cli("crossval", str(cv_data / "data"), "--out", str(tmp_path / "o"), "--edge-share", "1.5")
    assert r.returncode == 1 and "--edge-share 1.5" in r.stderr
    r = run_cli("crossval", str(cv_data / "data"), "--out", str(tmp_path / "o"), "--stages", "finetune")
    assert r.returncode == 1 and "--model" in r.stderr
    r = run_cli("crossval", str(cv_data / "data"), "--out", str(tmp_path / "o"), "--folds", "40")
    assert r.returncode == 1 and "40 folds need at least 40 patients" in r.stderr


def test_fold_keys_and_cut_names_of_runs_made_before_the_edge_share_option_stay_valid():
    """A finished fold's key (and a patch cut's folder) must not change for settings that already existed: a changed key
    re-runs every finished fold and clears its folder. The formula before the option: the settings without edge_share."""
    import hashlib
    from dataclasses import asdict

    from cvfast.crossval.run import fold_key
    from cvfast.data.sample import MASK_VERSION, PatchSetSpec, _cut_name

    spec, splits = CrossvalSpec(), {"a": "train", "b": "test"}
    before = {k: v for k, v in asdict(spec).items() if k not in ("only", "review", "edge_share")}
    blob = json.dumps([before, {}, "digest", sorted(splits.items())], sort_keys=True)
    assert fold_key(spec, {}, "digest", splits) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert fold_key(CrossvalSpec(edge_share=0.3), {}, "digest", splits) != fold_key(spec, {}, "digest", splits)
    cut = {k: v for k, v in asdict(PatchSetSpec()).items() if k != "edge_share"}
    assert _cut_name(PatchSetSpec(), "m") == "cut-" + hashlib.sha256(json.dumps([cut, "m", MASK_VERSION], sort_keys=True).encode()).hexdigest()[:10]
