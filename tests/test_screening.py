"""RSNA, VinDr-Mammo and CMMD: each synthetic layout through `cvfast prepare`, then `cvfast finetune --dataset`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from conftest import SIZE
from pydicom.pixels import apply_voi_lut
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cvfast.cli import app
from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_mammogram, read_png
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import synthesize

SCREENING = ("rsna", "vindr", "cmmd")


def cli(*args: str) -> str:
    """Run a cvfast command in this process; return its output, asserting success."""
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def screening(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("screening")
    return out, synthesize(out, patients=12, seed=5, layouts=SCREENING)


@pytest.fixture(scope="module")
def prepared(screening, tmp_path_factory) -> dict[str, Path]:
    src, _ = screening
    out = tmp_path_factory.mktemp("screening_data")
    for name in SCREENING:
        cli("prepare", name, src / name, "--out", out / name, "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1")
    return {name: out / name for name in SCREENING}


def _truth_frame(truth: dict, name: str) -> pd.DataFrame:
    return pd.DataFrame.from_dict(truth[name]["images"], orient="index").rename_axis("image_id").reset_index()


def _assert_patient_splits(m: pd.DataFrame) -> None:
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(m["split"]) == {"train", "valid", "test"}


def test_rsna_labels_views_sites_and_photometry(screening, prepared):
    src, truth = screening
    m, t = read_manifest(prepared["rsna"]), _truth_frame(truth, "rsna")
    assert sorted(m["image_id"]) == sorted(t["image_id"])  # every row of train.csv, no more
    merged = m.merge(t, on="image_id", suffixes=("", "_truth"))
    assert (merged["label"] == merged["label_truth"]).all() and (merged["side"] == merged["side_truth"]).all()
    assert (merged["view"] == merged["view_truth"]).all() and "ML" in set(m["view"])  # extra views kept by name
    csv = pd.read_csv(src / "rsna" / "train.csv")
    assert (merged["site_id"] == merged["site_id_truth"]).all() and set(m["machine_id"]) == set(csv["machine_id"])
    _assert_patient_splits(m)
    # MONOCHROME1 + sigmoid VOI LUT files come out in the same sense as the others: dark background, bright breast
    for photometric, rows in merged.groupby("photometric"):
        background = [read_png(p)[:, -8:].mean() / 65535 if s == "L" else read_png(p)[:, :8].mean() / 65535 for p, s in zip(rows["path"], rows["side"])]
        assert max(background) < 0.15, photometric
    assert {"MONOCHROME1", "MONOCHROME2"} <= set(merged["photometric"])
    # and their values are pydicom's sigmoid VOI LUT output, inverted
    f = next(src / "rsna" / "train_images" / str(r.patient_id) / f"{r.image_id}.dcm" for r in merged.itertuples() if r.photometric == "MONOCHROME1")
    ds = pydicom.dcmread(f)
    assert ds.VOILUTFunction == "SIGMOID" and ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    expected = 65535 - np.clip(apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / 4095 * 65535 + 0.5, 0, 65535).astype(np.int64)
    assert np.abs(read_mammogram(f).pixels.astype(np.int64) - expected).max() <= 1


def test_rsna_test_site_holds_out_a_whole_site(screening, tmp_path):
    src, truth = screening
    cli("prepare", "rsna", src / "rsna", "--out", tmp_path / "d", "--size", "64x48", "--workers", "1", "--test-site", "2")
    m = read_manifest(tmp_path / "d")
    assert set(m.loc[m["split"] == "test", "site_id"]) == {2} and set(m.loc[m["split"] != "test", "site_id"]) == {1}
    assert (m["split"] == "valid").any()
    r = CliRunner().invoke(app, ["prepare", "rsna", str(src / "rsna"), "--out", str(tmp_path / "e"), "--test-site", "7"])
    assert r.exit_code == 1 and "--test-site 7" in " ".join(r.output.split())


def test_vindr_birads_labels_official_split_and_boxes_as_masks(screening, prepared):
    src, truth = screening
    m, t = read_manifest(prepared["vindr"]), _truth_frame(truth, "vindr")
    kept = t[t["birads"] != 3]
    assert sorted(m["image_id"]) == sorted(kept["image_id"])  # BI-RADS 3 left out by default...
    rejects = pd.read_csv(prepared["vindr"] / "rejects.csv")
    assert len(rejects) == (t["birads"] == 3).sum() and rejects["reason"].str.contains("BI-RADS '3' excluded").all()  # ...each named
    merged = m.merge(t, on="image_id", suffixes=("", "_truth"))
    assert (merged["label"] == merged["label_truth"]).all()
    official = merged["split_truth"].map({"training": "train", "test": "test"})
    assert ((merged["split"] == "test") == (official == "test")).all()  # the official test split, untouched
    assert (merged["split"] == "valid").any()
    h, w = truth["vindr"]["size"]
    checked = 0
    for r in merged.itertuples():
        for a, box in zip(r.abnormalities, r.boxes):
            ys, xs = np.nonzero(read_png(a["mask"]))
            sx, sy = SIZE[1] / w, SIZE[0] / h  # the box, in working-size pixels
            assert abs(xs.min() - box[0] * sx) <= 1.5 and abs(xs.max() + 1 - box[2] * sx) <= 1.5
            assert abs(ys.min() - box[1] * sy) <= 1.5 and abs(ys.max() + 1 - box[3] * sy) <= 1.5
            assert a["patch_class"] == f"{a['kind']}_{'malignant' if r.label_truth else 'benign'}"
            checked += 1
    assert checked >= 4
    patches = make_patches(prepared["vindr"], replace(PATCH_SETS["s1"], size=32), out=prepared["vindr"].parent / "vindr_s1", workers=1)
    assert (patches["label"] != "background").sum() == checked  # one S1 patch per box


def test_vindr_positive_and_negative_sets_are_configurable(screening, tmp_path):
    src, truth = screening
    cli("prepare", "vindr", src / "vindr", "--out", tmp_path / "d", "--size", "64x48", "--workers", "1", "--positive", "3,4,5")
    m, t = read_manifest(tmp_path / "d"), _truth_frame(truth, "vindr")
    birads = t.set_index("image_id").loc[m["image_id"], "birads"].to_numpy()
    assert len(m) == len(t) and (m["label"].to_numpy() == (birads >= 3)).all() and (birads == 3).any()
    r = CliRunner().invoke(app, ["prepare", "vindr", str(src / "vindr"), "--out", str(tmp_path / "e"), "--positive", "2,4", "--negative", "1,2"])
    assert r.exit_code == 1 and "both positive and negative" in r.output


def test_cmmd_labels_per_breast_side_and_view_from_headers(screening, prepared):
    src, truth = screening
    m, t = read_manifest(prepared["cmmd"]), _truth_frame(truth, "cmmd")
    assert sorted(m["image_id"]) == sorted(t["image_id"])
    merged = m.merge(t, on="image_id", suffixes=("", "_truth"))
    for col in ("label", "side", "view", "patient_id"):
        assert (merged[col] == merged[f"{col}_truth"]).all(), col
    sheet = pd.read_excel(src / "cmmd" / "CMMD_clinicaldata_revision.xlsx")
    assert len(m) == 2 * len(sheet) and set(m["abnormality"]) == set(sheet["abnormality"])
    assert (m["pathology"] == m["label"].map({1: "MALIGNANT", 0: "BENIGN"})).all()  # every listed breast had a biopsied finding
    _assert_patient_splits(m)
    assert pd.read_csv(prepared["cmmd"] / "rejects.csv").empty


@pytest.mark.slow  # three short trainings
@pytest.mark.parametrize("name", SCREENING)
def test_finetune_runs_on_each_screening_set(name, prepared, untrained_models, tmp_path):
    out = cli("finetune", "--from", untrained_models[1], "--data", prepared[name], "--dataset", name, "--recipe", "demo-finetune",
              "--epochs-scale", "0.125", "--bs", "4", "--out", tmp_path / "f")
    assert json.loads((tmp_path / "f" / "recipe.json").read_text())["data"]["dataset"] == name
    metrics = json.loads((tmp_path / "f" / "model.json").read_text())["metrics"]
    n_test = (read_manifest(prepared[name])["split"] == "test").sum()
    assert metrics["test_images"] == n_test, out
    # the held-out AUC is the one `predict` reproduces from the exported model, and fine-tuning changed the weights
    cli("predict", tmp_path / "f", prepared[name], "--split", "test", "--out", tmp_path / "p.csv")
    preds = pd.read_csv(tmp_path / "p.csv")
    assert len(preds) == n_test and metrics["test_auc"] == pytest.approx(roc_auc_score(preds["label"], preds["p_cancer"]), abs=1e-6)
    before, after = load_file(untrained_models[1] / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_probabilistic_f1_is_the_rsna_formula():
    from cvfast.stats import probabilistic_f1

    y = np.array([1, 0, 1, 0, 0])
    p = np.array([0.9, 0.2, 0.4, 0.1, 0.6])
    # by hand: probabilistic TP 1.3, predicted 2.2, cancers 2 -> precision 1.3/2.2, recall 0.65
    precision, recall = 1.3 / 2.2, 1.3 / 2
    assert probabilistic_f1(y, p) == pytest.approx(2 * precision * recall / (precision + recall))
    assert probabilistic_f1(y, (y == 1).astype(float)) == pytest.approx(1.0)  # certain and right
    assert probabilistic_f1(y, np.zeros(5)) == 0.0


def test_predictions_carry_site_columns_and_evaluate_breaks_down_by_group(prepared, untrained_models, tmp_path):
    preds = tmp_path / "preds.csv"
    cli("predict", untrained_models[1], prepared["rsna"], "--out", preds)
    df = pd.read_csv(preds)
    assert {"site_id", "machine_id", "density"} <= set(df.columns)  # the dataset's own columns travel with the predictions
    out = cli("evaluate", preds, "--split", "all", "--thresholds-from", "self", "--by-group", "site_id", "--by", "breast", "--out", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    from sklearn.metrics import roc_auc_score

    from cvfast.infer.evaluate import aggregate
    from cvfast.stats import probabilistic_f1

    breasts = aggregate(df.astype({"patient_id": str}), "breast", keep=("site_id",))
    assert report["n"] == len(breasts) and report["probabilistic_f1"] == pytest.approx(probabilistic_f1(breasts["label"], breasts["p_cancer"]))
    groups = {g["value"]: g for g in report["groups"]["values"]}
    assert set(groups) == {"1", "2"} and sum(g["n"] for g in groups.values()) == len(breasts)
    for site, g in breasts.groupby("site_id"):
        entry = groups[str(site)]
        assert entry["n"] == len(g) and entry["n_positive"] == g["label"].sum()
        if g["label"].nunique() == 2:
            assert entry["auc"] == pytest.approx(roc_auc_score(g["label"], g["p_cancer"])) and entry["auc_ci95"][0] <= entry["auc"] <= entry["auc_ci95"][1]
        else:
            assert entry["auc"] is None
    assert "## By site_id" in out
    # blank group values are a group of their own, not dropped: the groups add up to every evaluated case
    gaps = df.assign(density=[v if k % 3 else "" for k, v in enumerate(df["density"].fillna(""))])
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    cli("evaluate", tmp_path / "gaps.csv", "--split", "all", "--thresholds-from", "self", "--by-group", "density", "--out", tmp_path / "g")
    groups = json.loads((tmp_path / "g" / "report.json").read_text())["groups"]["values"]
    assert sum(g["n"] for g in groups) == len(df) and "(missing)" in {g["value"] for g in groups}
    r = CliRunner().invoke(app, ["evaluate", str(preds), "--split", "all", "--by-group", "scanner", "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "--by-group scanner" in r.output


def test_breast_crop_keeps_the_breast_drops_label_and_background():
    from cvfast.data.crop import CropSpec, apply_crop, plan_crop

    img = np.full((200, 160), 1000, np.uint16)
    yy, xx = np.ogrid[:200, :160]
    img[((xx - 159) / 90.0) ** 2 + ((yy - 100) / 70.0) ** 2 < 1] = 30000  # a breast against the right edge
    img[5:20, 5:30] = 60000  # a film label in the far corner
    crop = plan_crop(img, CropSpec(breast=True, flip_to="left", margin=0.0))
    y0, x0, y1, x1 = crop.box
    assert abs(y0 - 30) <= 4 and abs(y1 - 170) <= 4 and abs(x0 - 69) <= 4 and x1 == 160  # the breast's box, not the label's
    assert crop.flipped  # the breast was on the right
    out = apply_crop(img, crop)
    assert out[:, : out.shape[1] // 4].mean() > out[:, -out.shape[1] // 4 :].mean()  # now on the left
    assert not plan_crop(img, CropSpec(flip_to="right")).flipped and plan_crop(img, CropSpec(flip_to="right")).box == (0, 0, 200, 160)


def test_cropped_vindr_masks_map_back_to_their_source_boxes(screening, tmp_path):
    from cvfast.data.crop import Crop, working_to_source

    src, truth = screening
    cli("prepare", "vindr", src / "vindr", "--out", tmp_path / "d", "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1",
        "--crop", "breast", "--flip-to", "left")
    m = read_manifest(tmp_path / "d")
    crops = [Crop.from_json(c) for c in m["breast_crop"]]
    h, w = truth["vindr"]["size"]
    assert all(c.box != (0, 0, h, w) for c in crops) and {c.flipped for c in crops} == {True, False}  # cut, and both sides met
    checked = 0
    for row, crop in zip(m.itertuples(), crops):
        for a, box in zip(row.abnormalities, truth["vindr"]["images"][row.image_id]["boxes"]):
            ys, xs = np.nonzero(read_png(a["mask"]))
            back = np.array([working_to_source(y, x, crop, SIZE) for y, x in zip(ys, xs)])
            scale = max((crop.box[2] - crop.box[0]) / SIZE[0], (crop.box[3] - crop.box[1]) / SIZE[1])  # one working pixel in source pixels
            xmin, ymin, xmax, ymax = box
            assert back[:, 1].min() >= xmin - scale and back[:, 1].max() <= xmax + scale, (row.image_id, crop)
            assert back[:, 0].min() >= ymin - scale and back[:, 0].max() <= ymax + scale
            assert back[:, 1].max() - back[:, 1].min() >= (xmax - xmin) - 2 * scale  # the whole box, not a corner of it
            checked += 1
    assert checked >= 4
    # the working image is the crop of the source, flipped as recorded
    row, crop = m.iloc[0], crops[0]
    f = src / "vindr" / "images" / row["patient_id"] / f"{row['image_id']}.dicom"
    from cvfast.data.crop import apply_crop
    from cvfast.data.read import resize
    np.testing.assert_array_equal(read_png(row["path"]), resize(apply_crop(read_mammogram(f).pixels, crop), SIZE))


def test_a_model_trained_on_cropped_images_crops_new_images_the_same_way(screening, untrained_models, tmp_path):
    from cvfast.data.blocks import whole_image_dataloaders
    from cvfast.models.artifact import export_model, load_model
    from cvfast.train.learners import whole_image_learner

    src, _ = screening
    cli("prepare", "cmmd", src / "cmmd", "--out", tmp_path / "d", "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", "1", "--crop", "breast")
    patch, _ = load_model(untrained_models[0])
    dls = whole_image_dataloaders(tmp_path / "d", bs=2)
    assert dls.info.breast_crop == {"breast": True, "flip_to": None, "margin": 0.01, "blank": False}  # the DATA folder's crop travels with the model
    export_model(whole_image_learner(dls, patch, widths=(16, 16, 32)), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["breast_crop"] == dls.info.breast_crop
    m = read_manifest(tmp_path / "d").head(4)
    cli("predict", tmp_path / "m", tmp_path / "d", "--out", tmp_path / "cached.csv")
    cli("predict", tmp_path / "m", *m["source"], "--out", tmp_path / "raw.csv")
    cached = pd.read_csv(tmp_path / "cached.csv").set_index("image_id").loc[m["image_id"], "p_cancer"].to_numpy()
    raw = pd.read_csv(tmp_path / "raw.csv").set_index("path")["p_cancer"]
    raw = raw.loc[[str(Path(s).resolve()) for s in m["source"]]].to_numpy()
    np.testing.assert_allclose(raw, cached, atol=1e-6)  # the raw DICOM is cropped exactly as prepare cropped it
    cli("predict", untrained_models[1], *m["source"], "--out", tmp_path / "uncropped.csv")
    assert not np.allclose(pd.read_csv(tmp_path / "uncropped.csv")["p_cancer"].to_numpy(), cached, atol=1e-6)
    # a model trained on uncropped images is not fed the cropped cache
    r = CliRunner().invoke(app, ["predict", str(untrained_models[1]), str(tmp_path / "d"), "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and "prepared with crop" in " ".join(r.output.split())


def test_repeated_rows_count_once_or_not_at_all(screening, tmp_path):
    import shutil

    src, truth = screening
    rsna = Path(shutil.copytree(src / "rsna", tmp_path / "rsna"))
    df = pd.read_csv(rsna / "train.csv", dtype=str, keep_default_na=False)
    twin, rival = df.iloc[[0]], df.iloc[[1]].assign(cancer="1" if df.loc[1, "cancer"] == "0" else "0")
    pd.concat([df, twin, rival]).to_csv(rsna / "train.csv", index=False)
    cli("prepare", "rsna", rsna, "--out", tmp_path / "d", "--size", "64x48", "--workers", "1")
    m, rejects = read_manifest(tmp_path / "d"), pd.read_csv(tmp_path / "d" / "rejects.csv", dtype=str)
    assert list(m["image_id"]).count(df.loc[0, "image_id"]) == 1 and df.loc[1, "image_id"] not in set(m["image_id"])
    assert len(m) == len(df) - 1  # the identical copy counted once, the disagreeing pair not at all
    assert rejects["reason"].str.contains("counted once").sum() == 1 and rejects["reason"].str.contains("different values").sum() == 2
    assert not rejects["reason"].str.contains("no label").any()  # a rejected row's file is not also called unlisted
