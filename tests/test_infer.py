"""Inference: predict (mixed formats, TTA, ensembles, bad input), evaluate (AUC/CI, aggregation, DeLong), heatmaps, grids."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import PATCH, run_cli
from PIL import Image
from sklearn.metrics import roc_auc_score

from cvfast.data.blocks import patch_dataloaders, whole_image_dataloaders
from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png
from cvfast.errors import CvfastError
from cvfast.infer.evaluate import EvalSettings, aggregate, evaluate
from cvfast.infer.heatmap import heatmap, save_overlay
from cvfast.infer.predict import predict, write_predictions
from cvfast.infer.show import show
from cvfast.models.artifact import export_model
from cvfast.stats import delong_test, patient_bootstrap_aucs
from cvfast.train.heldout import predict_frame
from cvfast.train.learners import learner_for, patch_learner, whole_image_learner
from cvfast.util.files import WRITTEN_DIR


@pytest.fixture(scope="module")
def models(s10, ddsm_data, tmp_path_factory) -> dict[str, Path]:
    """Exported patch and whole-image models (one short epoch each: real weights, not a trained result)."""
    out = tmp_path_factory.mktemp("infer_models")
    patch = patch_learner(patch_dataloaders(s10, bs=32), "test_resnet")
    patch.fit(1, 1e-3)
    export_model(patch, out / "patch")
    whole = whole_image_learner(whole_image_dataloaders(ddsm_data, bs=4), patch.model, widths=(16, 16, 32))
    whole.fit(1, 1e-3)
    export_model(whole, out / "whole")
    whole2 = whole_image_learner(whole_image_dataloaders(ddsm_data, bs=4, size=(128, 96)), patch.model, widths=(8, 8, 16))
    export_model(whole2, out / "whole_small")
    return {"patch": out / "patch", "whole": out / "whole", "whole_small": out / "whole_small"}


def _learner_probs(model_dir: Path, data: Path, rows: pd.DataFrame) -> np.ndarray:
    """The trained learner's own get_preds on cached images (the reference predict must equal)."""
    from cvfast.models.artifact import load_model

    model, side = load_model(model_dir)
    learn = learner_for(whole_image_dataloaders(data, augment=False, mean=side["mean_grey"]), model)
    return predict_frame(learn, rows)[:, 1]


def test_predict_on_mixed_formats_equals_the_learners_get_preds(models, ddsm_data, tmp_path):
    rows = read_manifest(ddsm_data).iloc[:8].reset_index(drop=True)
    reference = _learner_probs(models["whole"], ddsm_data, rows)
    inputs = []
    for i, r in rows.iterrows():  # DICOM sources, cached PNGs, 16-bit TIFF and PGM copies of the cache
        if i % 4 == 0:
            inputs.append(r["source"])
        elif i % 4 == 1:
            inputs.append(r["path"])
        else:
            copy = tmp_path / f"{r['image_id']}.{'tif' if i % 4 == 2 else 'pgm'}"
            cv2.imwrite(str(copy), read_png(r["path"]))
            inputs.append(str(copy))
    result = predict([models["whole"]], inputs, bs=3, progress=False)
    assert result.rejects == [] and len(result.frame) == 8
    by_path = dict(zip(result.frame["path"], result.frame["p_cancer"]))
    got = np.array([by_path[str(Path(p).resolve())] for p in inputs])
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert np.isclose(result.frame["p_cancer"] + result.frame["p_no_cancer"], 1, atol=1e-5).all()
    dicom_row = result.frame[result.frame["path"] == str(Path(inputs[0]).resolve())].iloc[0]
    assert dicom_row["patient_id"] == pydicom.dcmread(inputs[0], stop_before_pixels=True).PatientID  # identity from the header


def test_manifest_input_carries_labels_and_pkl_gives_the_same_with_a_warning(models, ddsm_data):
    safe = predict([models["whole"]], [ddsm_data], split="test", progress=False).frame
    assert set(safe["split"]) == {"test"} and {"label", "patient_id", "side", "view"} <= set(safe.columns)
    test_rows = read_manifest(ddsm_data).query("split == 'test'")
    np.testing.assert_allclose(safe["p_cancer"], _learner_probs(models["whole"], ddsm_data, test_rows.reset_index(drop=True)), atol=1e-5)
    with pytest.warns(UserWarning, match="pickle runs code.*model.json"):
        pkl = predict([models["whole"] / "model.pkl"], [ddsm_data], split="test", progress=False).frame
    np.testing.assert_allclose(pkl["p_cancer"], safe["p_cancer"], atol=1e-6)


def test_tta_is_the_mean_over_the_four_flips(models, ddsm_data, tmp_path):
    png = read_manifest(ddsm_data)["path"].iloc[0]
    pixels = read_png(png)
    flips = []
    for k, arr in enumerate([pixels, pixels[:, ::-1], pixels[::-1], pixels[::-1, ::-1]]):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), np.ascontiguousarray(arr))
        flips.append(str(tmp_path / f"f{k}.png"))
    plain = predict([models["whole"]], flips, progress=False).frame["p_cancer"].to_numpy()
    assert np.ptp(plain) > 1e-4  # the flips are different inputs to the model
    tta = predict([models["whole"]], [png], tta=True, progress=False).frame["p_cancer"].iloc[0]
    assert tta == pytest.approx(plain.mean(), abs=1e-5)


def test_ensemble_averages_members_of_different_sizes(models, ddsm_data):
    paths = read_manifest(ddsm_data)["path"].iloc[:5].tolist()
    a = predict([models["whole"]], paths, progress=False).frame["p_cancer"].to_numpy()
    b = predict([models["whole_small"]], paths, progress=False).frame["p_cancer"].to_numpy()
    both = predict([models["whole"], models["whole_small"]], paths, progress=False)
    np.testing.assert_allclose(both.frame["p_cancer"], (a + b) / 2, atol=1e-5)
    assert [m["size"] for m in both.models] == [[256, 192], [128, 96]]
    with pytest.raises(CvfastError, match="one class order"):
        predict([models["whole"], models["patch"]], paths, progress=False)


def test_patch_model_gives_five_class_probabilities(models, s10):
    patches = pd.read_csv(s10 / "patches.csv").head(6)
    frame = predict([models["patch"]], [str(s10 / p) for p in patches["path"]], progress=False).frame
    cols = [f"p_{c}" for c in ("background", "calc_benign", "calc_malignant", "mass_benign", "mass_malignant")]
    assert np.allclose(frame[cols].sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(frame["p_cancer"], frame["p_calc_malignant"] + frame["p_mass_malignant"], atol=1e-6)


def test_unreadable_inputs_are_listed_and_skipped(models, ddsm_data, tmp_path):
    good = read_manifest(ddsm_data)["path"].iloc[0]
    (tmp_path / "notes.dcm").write_text("not a dicom")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    res = run_cli("predict", str(models["whole"]), good, str(tmp_path / "notes.dcm"), str(tmp_path / "broken.png"),
                  str(tmp_path / "missing.dcm"), "--out", str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1
    rejects = pd.read_csv(tmp_path / "p.rejects.csv")
    for name in ("notes.dcm", "broken.png", "missing.dcm"):  # each listed once, with its own reason
        assert rejects["reason"].str.contains(name).sum() == 1
    assert "3 inputs not predicted" in res.stderr and "Traceback" not in res.stderr
    nothing = run_cli("predict", str(models["whole"]), str(tmp_path / "notes.dcm"), "--out", str(tmp_path / "q.csv"))
    assert nothing.returncode == 1 and "nothing could be predicted" in nothing.stderr and not (tmp_path / "q.csv").exists()
    assert "notes.dcm" in (tmp_path / "q.rejects.csv").read_text()


def test_one_file_spelled_two_ways_is_predicted_once(models, ddsm_data, monkeypatch):
    monkeypatch.chdir(ddsm_data)
    one = read_manifest(ddsm_data)["path"].iloc[0]
    frame = predict([models["whole"]], [ddsm_data, Path("images") / Path(one).name], progress=False).frame
    assert len(frame) == len(read_manifest(ddsm_data)) and frame["image_id"].is_unique


def test_predict_reads_a_csv_of_paths_and_a_nested_folder_with_identity_from_dicom_headers(models, ddsm_data, tmp_path):
    from cvfast.data.synth.render import make_dicom

    rows = read_manifest(ddsm_data).iloc[:4].reset_index(drop=True)
    site = tmp_path / "site"
    headers = {"women/W1/2024/left_cc.dcm": ("W1", "L", "CC"), "women/W2/right_mlo.dcm": ("W2", "R", "MLO")}
    for (rel, (patient, side, view)), png in zip(headers.items(), rows["path"]):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        make_dicom(site / rel, read_png(png), patient_id=patient, laterality=side, view=view, uid_seed=patient)
    (site / "scans").mkdir()
    cv2.imwrite(str(site / "scans" / "extra.png"), read_png(rows["path"][2]))
    (site / "scans" / "readme.txt").write_text("not an image")
    frame = predict([models["whole"]], [site], progress=False).frame.set_index("image_id")
    assert sorted(frame.index) == ["scans/extra", "women/W1/2024/left_cc", "women/W2/right_mlo"]  # found at every depth, ids = relative paths
    for rel, (patient, side, view) in headers.items():
        ds = pydicom.dcmread(site / rel, stop_before_pixels=True)
        got = frame.loc[rel.removesuffix(".dcm")]
        assert (got["patient_id"], got["side"], got["view"], got["exam_id"]) == (patient, side, view, ds.StudyInstanceUID)
    direct = predict([models["whole"]], list(rows["path"][:3]), progress=False).frame["p_cancer"].to_numpy()
    assert np.ptp(direct) > 1e-4  # distinct images score apart, so matching scores means matching images
    np.testing.assert_allclose(frame.loc[["women/W1/2024/left_cc", "women/W2/right_mlo", "scans/extra"], "p_cancer"], direct, atol=1e-5)

    listing = tmp_path / "lists" / "inputs.csv"  # paths relative to the CSV, labels and identity carried to the predictions
    listing.parent.mkdir()
    pd.DataFrame({"path": ["../site/scans/extra.png", "../site/women/W2/right_mlo.dcm"], "patient_id": ["W3", "W2"],
                  "label": [0, 1], "side": ["L", "R"]}).to_csv(listing, index=False)
    res = run_cli("predict", str(models["whole"]), str(listing), "--out", str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr
    out = pd.read_csv(tmp_path / "p.csv").set_index("image_id")
    assert sorted(out.index) == ["extra", "right_mlo"] and list(out.loc[["extra", "right_mlo"], "label"]) == [0, 1]
    assert out.loc["extra", "patient_id"] == "W3" and out.loc["right_mlo", "side"] == "R"
    np.testing.assert_allclose(out.loc[["extra", "right_mlo"], "p_cancer"], frame.loc[["scans/extra", "women/W2/right_mlo"], "p_cancer"], atol=1e-5)


def test_a_file_that_is_not_a_model_is_refused(ddsm_data, tmp_path):
    (tmp_path / "model.json").write_text('{"hello": 1}')
    (tmp_path / "fake.pkl").write_bytes(b"not a pickle")
    png = read_manifest(ddsm_data)["path"].iloc[0]
    for model, message in [(tmp_path / "model.json", "not a cvfast model sidecar"), (tmp_path / "fake.pkl", "cannot load this learner pickle"),
                           (tmp_path / "nowhere", "no such model file")]:
        res = run_cli("predict", str(model), png, "--out", str(tmp_path / "p.csv"))
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr


def _crafted(seed: int = 0, patients: int = 60) -> pd.DataFrame:
    """Per patient 2 breasts x 2 views; one breast of 40% of the patients has cancer; scores carry some signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        sick = rng.random() < 0.4
        for side in "LR":
            label = int(sick and side == "L")
            for view in ("CC", "MLO"):
                rows.append({"image_id": f"P{p}_{side}_{view}", "patient_id": f"P{p}", "side": side, "view": view,
                             "label": label, "p_cancer": float(np.clip(0.35 + 0.3 * label + rng.normal(0, 0.2), 0, 1))})
    return pd.DataFrame(rows)


def test_evaluate_auc_is_sklearns_and_its_patient_ci_covers_it(tmp_path):
    df = _crafted()
    df.to_csv(tmp_path / "p.csv", index=False)
    report = evaluate(tmp_path / "p.csv", EvalSettings(n_boot=500))
    assert report["auc"] == pytest.approx(roc_auc_score(df["label"], df["p_cancer"]), abs=1e-12)
    lo, hi = report["auc_ci95"]
    assert lo < report["auc"] < hi and hi - lo < 0.3
    assert report["n"] == len(df) and report["n_patients"] == 60 and "optimistic" in report["thresholds_chosen_on"]


def test_no_test_rows_and_overlapping_threshold_rows_are_not_passed_off_as_held_out(tmp_path):
    df = _crafted(seed=4).assign(split=lambda d: np.where(d["patient_id"].str[1:].astype(int) < 30, "train", "valid"))
    df.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(CvfastError, match="no test rows"):
        evaluate(tmp_path / "p.csv", EvalSettings(n_boot=100))
    report = evaluate(tmp_path / "p.csv", EvalSettings(split=None, n_boot=100))  # --split all: valid rows are evaluated too
    assert report["rows"] == "all rows" and "optimistic: 30 of its patients are also evaluated" in report["thresholds_chosen_on"]


def test_saturated_scores_keep_the_specificity_target():
    from cvfast.stats import at_threshold, thresholds_at

    y = np.array([0] * 10 + [1] * 10)
    s = np.array([0.1] * 8 + [1.0, 1.0] + [1.0] * 10)  # 2 negatives as confident as the positives
    t = thresholds_at(y, s, (0.9,))["specificity_0.9"]
    assert at_threshold(y, s, t)["specificity"] >= 0.9
    # one negative saturated with half the positives: 0.9 is reachable below the top score, with every cancer found; a
    # threshold above every score (nothing called positive) would keep the specificity too, and must not be what is chosen
    s = np.array([0.1] * 9 + [1.0] + [1.0] * 5 + [0.9] * 5)
    t = thresholds_at(y, s, (0.9,))["specificity_0.9"]
    op = at_threshold(y, s, t)
    assert t == 0.9 and (op["specificity"], op["sensitivity"]) == (0.9, 1.0)


def test_bootstrap_resamples_patients_not_images():
    df = _crafted(seed=1)
    one = df.groupby("patient_id").head(1)  # one image per patient...
    copies = pd.concat([one] * 4).sort_values("patient_id")  # ...and 4 identical copies of it: no new information
    ci = lambda d: np.percentile(patient_bootstrap_aucs(d["label"].to_numpy(), [d["p_cancer"].to_numpy()], d["patient_id"].to_numpy(), 300, 0), [2.5, 97.5])  # noqa: E731
    np.testing.assert_allclose(ci(one), ci(copies))  # image-level resampling would narrow the interval 2x


def test_breast_and_exam_aggregation_on_a_crafted_case():
    df = pd.DataFrame({"image_id": list("abcdef"), "patient_id": ["p1"] * 4 + ["p2"] * 2, "side": list("LLRRLL"),
                       "view": ["CC", "MLO"] * 3, "label": [1, 0, 0, 0, 0, 0], "p_cancer": [0.9, 0.3, 0.2, 0.4, 0.1, 0.5]})
    mean = aggregate(df, "breast", "mean").set_index("unit")
    assert mean.loc["p1/p1/L", "p_cancer"] == pytest.approx(0.6) and mean.loc["p1/p1/L", "label"] == 1
    assert mean.loc["p1/p1/R", "p_cancer"] == pytest.approx(0.3) and mean.loc["p2/p2/L", "p_cancer"] == pytest.approx(0.3)
    assert aggregate(df, "breast", "max").set_index("unit").loc["p1/p1/R", "p_cancer"] == pytest.approx(0.4)
    exam = aggregate(df, "exam", "max").set_index("unit")
    assert list(exam["label"]) == [1, 0] and list(exam["p_cancer"]) == [0.9, 0.5] and list(exam["n_images"]) == [4, 2]
    with pytest.raises(CvfastError, match="side"):
        aggregate(df.assign(side=[None, "L", "R", "R", "L", "L"]), "breast")


def test_breast_and_exam_grouping_refuses_what_it_cannot_group(tmp_path):
    df = pd.DataFrame({"image_id": list("abcdef"), "patient_id": ["p1"] * 4 + ["p2"] * 2, "side": list("LLRRLL"),
                       "view": ["CC", "MLO"] * 3, "label": [1, 0, 0, 0, 0, 0], "p_cancer": [0.9, 0.3, 0.2, 0.4, 0.1, 0.5]})
    # side X would be a breast of its own; L on CC and LEFT on MLO two breasts instead of one
    with pytest.raises(CvfastError, match=r"p\.csv: --by breast needs side L or R on every image, not 'X': row 4 \(c\)"):
        aggregate(df.assign(side=list("LLXRLL")), "breast", source="p.csv")
    with pytest.raises(CvfastError, match=r"not 'LEFT': row 3 \(b\)"):
        aggregate(df.assign(side=["L", "LEFT", "R", "R", "L", "L"]), "breast", source="p.csv")
    partial = df.assign(exam_id=["e1", "e1", None, None, "e2", "e2"])  # p1's untagged images would be an exam apart
    for by in ("breast", "exam"):
        with pytest.raises(CvfastError, match=rf"p\.csv: --by {by}: exam_id is given on some rows only, missing on rows 4 \(c\), 5 \(d\)"):
            aggregate(partial, by, source="p.csv")
    assert len(aggregate(df.assign(exam_id=None), "exam")) == 2  # no exam_id anywhere: a patient's images are one exam
    preds = tmp_path / "p.csv"
    df.assign(side=list("LLXRLL"), split="test").to_csv(preds, index=False)
    with pytest.raises(CvfastError, match=r"p\.csv: --by breast needs side L or R"):
        evaluate(preds, EvalSettings(by="breast", n_boot=10))


def test_delong_matches_its_definition_and_thresholds_come_from_validation(tmp_path):
    df = _crafted(seed=2)
    rng = np.random.default_rng(0)
    other = np.clip(df["p_cancer"] + rng.normal(0, 0.3, len(df)), 0, 1)
    y, a = df["label"].to_numpy(), df["p_cancer"].to_numpy()
    d = delong_test(y, a, other)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, a)) and d["auc_b"] == pytest.approx(roc_auc_score(y, other))
    pos, neg = y == 1, y == 0  # DeLong's variance from the placement values, computed the slow way
    psi = lambda s: (s[pos][:, None] > s[neg][None]).astype(float) + 0.5 * (s[pos][:, None] == s[neg][None])  # noqa: E731
    pa, pb = psi(a), psi(np.asarray(other))
    v10, v01 = np.stack([pa.mean(1), pb.mean(1)]), np.stack([pa.mean(0), pb.mean(0)])
    s = np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()
    assert d["se"] == pytest.approx(np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1]), rel=1e-9)
    assert delong_test(y, a, a)["p_value"] == 1.0
    df = df.assign(split=np.where(df["patient_id"].str[1:].astype(int) < 30, "valid", "test"))
    df.to_csv(tmp_path / "p.csv", index=False)
    report = evaluate(tmp_path / "p.csv", EvalSettings(n_boot=200))
    assert report["rows"] == "split test" and report["thresholds_chosen_on"] == "split valid"
    valid = df[df["split"] == "valid"]
    spec90 = report["operating_points"]["specificity_0.9"]["threshold"]
    assert (valid.loc[valid["label"] == 0, "p_cancer"] < spec90).mean() >= 0.9  # the 90% specificity point holds where it was chosen


def test_evaluate_cli_report_plots_compare_and_refusals(tmp_path):
    df = _crafted(seed=3)
    df.to_csv(tmp_path / "a.csv", index=False)
    df.assign(p_cancer=1 - df["p_cancer"]).to_csv(tmp_path / "b.csv", index=False)
    res = run_cli("evaluate", str(tmp_path / "a.csv"), "--by", "breast", "--agg", "max", "--compare", str(tmp_path / "b.csv"),
                  "--n-boot", "200", "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["level"] == "breast" and report["n"] == 120
    assert report["comparison"]["delong"]["difference"] > 0 and report["comparison"]["delong"]["p_value"] < 0.01
    for png in ("roc.png", "pr.png", "calibration.png"):
        assert Image.open(tmp_path / "ev" / png).size[0] > 100
    assert "DeLong" in (tmp_path / "ev" / "report.md").read_text()
    df.drop(columns="label").to_csv(tmp_path / "nolabel.csv", index=False)
    res = run_cli("evaluate", str(tmp_path / "nolabel.csv"))
    assert res.returncode == 1 and "no 'label' column" in res.stderr and "Traceback" not in res.stderr
    df.assign(label=df["label"].astype(object).where(df.index != 5, None)).to_csv(tmp_path / "gap.csv", index=False)
    res = run_cli("evaluate", str(tmp_path / "gap.csv"))
    assert res.returncode == 1 and "1 rows have no label" in res.stderr


def test_heatmaps_keep_the_image_aspect(models, tmp_path):
    wide = (np.random.default_rng(0).random((150, 300)) * 65535).astype(np.uint16)  # 1:2, unlike the 4:3 working size
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    windows = heatmap(models["patch"], tmp_path / "wide.png", image_size=(96, 72), stride=12)
    assert windows.maps["lesion"].shape == (96, 72) and windows.info["windows"] == 5 * 3
    assert {"background", "malignant", "lesion"} <= set(windows.maps)
    paths = save_overlay(windows, tmp_path / "hm.png", "all")
    assert len(paths) == len(windows.maps)
    w, h = Image.open(tmp_path / "hm_malignant.png").size
    assert w / h == pytest.approx(2.0, rel=0.02)
    cam = heatmap(models["whole"], tmp_path / "wide.png")  # GAP then FC: the CAM's mean is the model's own logit
    assert cam.info["p_cancer"] == pytest.approx(predict([models["whole"]], [tmp_path / "wide.png"], progress=False).frame["p_cancer"][0], abs=1e-5)
    res = run_cli("heatmap", str(models["whole"]), str(tmp_path / "wide.png"), "--out", str(tmp_path / "cam.png"))
    assert res.returncode == 0, res.stderr
    w, h = Image.open(tmp_path / "cam.png").size
    assert w / h == pytest.approx(2.0, rel=0.02)
    with pytest.raises(CvfastError, match="smaller than"):
        heatmap(models["patch"], tmp_path / "wide.png", image_size=(PATCH - 1, 72))


def test_show_grids(models, ddsm_data, s10, tmp_path):
    for view in ("results", "top-losses", "confusion"):
        out = show(models["whole"], ddsm_data, tmp_path / f"{view}.png", view=view, split="test", n=4)
        assert Image.open(out).size[0] > 100
    res = run_cli("show", str(models["patch"]), "--data", str(s10), "--view", "top-losses", "--out", str(tmp_path / "p.png"))
    assert res.returncode == 0 and (tmp_path / "p.png").is_file(), res.stderr
    res = run_cli("show", str(models["patch"]), "--data", str(ddsm_data), "--out", str(tmp_path / "q.png"))
    assert res.returncode == 1 and "patch set" in res.stderr


def test_write_predictions_is_atomic_and_lists_rejects(models, ddsm_data, tmp_path):
    result = predict([models["whole"]], [read_manifest(ddsm_data)["path"].iloc[0], tmp_path / "gone.png"], progress=False)
    write_predictions(result, tmp_path / "p.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == [WRITTEN_DIR, "p.csv", "p.rejects.csv"]  # no temporaries left
    assert sorted(p.name for p in (tmp_path / WRITTEN_DIR).iterdir()) == ["p.csv.sha256", "p.rejects.csv.sha256"]
    assert pd.read_csv(tmp_path / "p.rejects.csv")["reason"].str.contains("gone.png: no such file").all()
