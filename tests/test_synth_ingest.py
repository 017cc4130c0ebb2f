"""Synthetic data -> prepare: manifests match the generator's ground truth exactly; splits are patient-level."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SIZE

from cvfast.data.manifest import MANIFEST_COLUMNS, read_manifest
from cvfast.data.read import read_png
from cvfast.data.synth import synthesize
from cvfast.data.synth.ddsm import CALC_COLUMNS, MASS_COLUMNS
from cvfast.errors import CvfastError


def _tree_digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, patients=3, seed=7)
    synthesize(b, patients=3, seed=7)
    synthesize(c, patients=3, seed=8)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)


def test_ddsm_layout_is_the_real_one(synth_dir, truth):
    ddsm = synth_dir / "ddsm"
    for name, cols in [("mass_case_description_train_set.csv", MASS_COLUMNS), ("calc_case_description_test_set.csv", CALC_COLUMNS)]:
        assert list(pd.read_csv(ddsm / name).columns) == cols
    rows = pd.concat([pd.read_csv(p, dtype=str) for p in ddsm.glob("*_case_description_*.csv")])
    assert len(rows) == truth["ddsm"]["rows"]
    for path in rows["image file path"]:
        folder, *_, fname = path.split("/")
        assert fname == "000000.dcm" and not (ddsm / "CBIS-DDSM" / path.strip()).exists()  # CSV paths never match files
        assert [p.name for p in (ddsm / "CBIS-DDSM" / folder).rglob("*.dcm")] == ["1-1.dcm"]
    assert any(p.endswith("\n") for p in rows["ROI mask file path"])
    assert set(rows["pathology"]) <= {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}


def test_lesions_are_small(truth):
    h, w = truth["ddsm"]["size"]
    fractions = [a["mask_pixels"] / (h * w) for im in truth["ddsm"]["images"].values() for a in im["abnormalities"]]
    assert max(fractions) < 0.03 and min(fractions) > 0.0005


def test_ddsm_manifest_matches_ground_truth(ddsm_data, truth):
    df = read_manifest(ddsm_data)
    gt = truth["ddsm"]["images"]
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert sorted(df["image_id"]) == sorted(gt)
    for row in df.itertuples():
        g = gt[row.image_id]
        assert (row.patient_id, row.side, row.view, row.label) == (g["patient_id"], g["side"], g["view"], g["label"])
        assert row.n_abnormalities == len(g["abnormalities"]) == len(row.abnormalities)
        assert [a["pathology"] == "MALIGNANT" for a in row.abnormalities] == [a["malignant"] for a in g["abnormalities"]]
        assert [a["patch_class"].split("_")[0] for a in row.abnormalities] == [a["kind"] for a in g["abnormalities"]]
        assert (row.split == "test") == (g["split"] == "test")  # the official split is kept
        for a, ga in zip(row.abnormalities, g["abnormalities"]):
            m = read_png(a["mask"]) > 0  # every ROI found, mask told from crop, even when a few px off in size
            assert m.shape == SIZE
            ys, xs = np.nonzero(m)
            cx, cy = ga["center"]
            assert abs(xs.mean() * truth["ddsm"]["size"][1] / SIZE[1] - cx) < 12
            assert abs(ys.mean() * truth["ddsm"]["size"][0] / SIZE[0] - cy) < 12
        assert read_png(row.path).shape == SIZE and read_png(row.path).dtype == np.uint16
    assert (df["split"] == "valid").any()
    assert len(pd.read_csv(ddsm_data / "rejects.csv")) == 0


def test_splits_are_patient_disjoint(ddsm_data, inbreast_data):
    for data in (ddsm_data, inbreast_data):
        df = read_manifest(data)
        assert df.groupby("patient_id")["split"].nunique().max() == 1
        assert set(df["split"]) == {"train", "valid", "test"}


def test_inbreast_manifest_matches_ground_truth(inbreast_data, truth):
    df = read_manifest(inbreast_data)
    gt = truth["inbreast"]["images"]
    kept = {k: v for k, v in gt.items() if v["label"] is not None}
    assert sorted(df["image_id"]) == sorted(kept)
    for row in df.itertuples():
        g = kept[row.image_id]
        assert (row.patient_id, row.side, row.view, row.label, row.birads) == (g["patient_id"], g["side"], g["view"], g["label"], g["birads"])
    rejects = pd.read_csv(inbreast_data / "rejects.csv")
    excluded = {k for k, v in gt.items() if v["birads"] == "3"}
    assert len(excluded) > 0 and len(rejects) == len(excluded)
    assert rejects["reason"].str.contains("BI-RADS '3' excluded").all()


def test_inbreast_birads3_can_be_included(synth_dir, truth, tmp_path):
    from cvfast.data.ingest import prepare_inbreast
    from cvfast.data.ingest.common import PrepareOptions

    df = prepare_inbreast(synth_dir / "inbreast", PrepareOptions(out=tmp_path, size=(64, 48), workers=1), negative=("1", "2", "3"))
    assert len(df) == len(truth["inbreast"]["images"])
    assert df.loc[df["birads"] == "3", "label"].eq(0).all()


def test_manifest_records_are_json(ddsm_data):
    raw = pd.read_csv(ddsm_data / "manifest.csv")
    assert all(isinstance(json.loads(s), list) for s in raw["abnormalities"])
    assert not raw["path"].str.startswith("/").any()  # relative: the DATA folder can move


def test_dicom_pixels_reach_the_batch_bit_exact(tmp_path):
    """At the source size nothing is resampled: the batch tensor must hold the DICOM's 16-bit values exactly."""
    from cvfast.data.blocks import whole_image_dataloaders
    from cvfast.data.ingest import prepare_ddsm
    from cvfast.data.ingest.common import PrepareOptions
    from cvfast.data.read import read_mammogram

    truth = synthesize(tmp_path / "s", patients=4, seed=21)
    prepare_ddsm(tmp_path / "s" / "ddsm", PrepareOptions(out=tmp_path / "d", size=tuple(truth["ddsm"]["size"]), workers=1))
    dls = whole_image_dataloaders(tmp_path / "d", bs=2, augment=False)
    xb, _ = dls.valid.one_batch()
    values = ((xb.double() + dls.info.mean_grey) * 65535).round().long().numpy()[:, 0]
    for got, source in zip(values, dls.valid_ds.items["source"]):
        np.testing.assert_array_equal(got, read_mammogram(source).pixels)


def test_same_image_in_mass_and_calc_folders_is_one_image(synth_dir, tmp_path):
    """CBIS-DDSM files an image with a mass and a calcification under two folders: ingest groups them."""
    import shutil

    from cvfast.data.ingest import prepare_ddsm
    from cvfast.data.ingest.common import PrepareOptions

    src = Path(shutil.copytree(synth_dir / "ddsm", tmp_path / "ddsm"))
    mass = pd.read_csv(src / "mass_case_description_train_set.csv", dtype=str, keep_default_na=False)
    row = mass.iloc[0]
    folder = row["image file path"].split("/")[0]
    twin = folder.replace("Mass-", "Calc-")
    shutil.copytree(src / "CBIS-DDSM" / folder, src / "CBIS-DDSM" / twin)
    shutil.copytree(src / "CBIS-DDSM" / f"{folder}_1", src / "CBIS-DDSM" / f"{twin}_1")
    calc_csv = src / "calc_case_description_train_set.csv"
    calc = pd.read_csv(calc_csv, dtype=str, keep_default_na=False)
    extra = {c: "" for c in calc.columns} | {
        "patient_id": row["patient_id"], "left or right breast": row["left or right breast"], "image view": row["image view"],
        "abnormality id": "1", "abnormality type": "calcification", "pathology": "MALIGNANT",
        "image file path": row["image file path"].replace("Mass-", "Calc-"), "ROI mask file path": row["ROI mask file path"].replace("Mass-", "Calc-"),
        "cropped image file path": row["cropped image file path"].replace("Mass-", "Calc-")}
    pd.concat([calc, pd.DataFrame([extra])]).to_csv(calc_csv, index=False)
    df = prepare_ddsm(src, PrepareOptions(out=tmp_path / "d", size=(64, 48), workers=1)).set_index("image_id")
    image_id = f"{row['patient_id']}_{row['left or right breast']}_{row['image view']}"
    kinds = [a["kind"] for a in json.loads(df.loc[image_id, "abnormalities"])]
    assert kinds.count("calc") == 1 and kinds.count("mass") == len(kinds) - 1 >= 1
    assert df.loc[image_id, "label"] == 1 and len(df) == len(json.loads((synth_dir / "ground_truth.json").read_text())["ddsm"]["images"])


def test_patient_in_official_train_and_test_goes_wholly_to_test():
    from cvfast.data.manifest import assign_splits

    df = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "d", "e", "f"], "label": [1, 0, 1, 0, 1, 0, 1],
                       "split": ["train", "test", "train", "train", "train", "train", "train"]})
    split = assign_splits(df, seed=0, valid_frac=0.4, test_frac=0.0)
    assert list(split[:2]) == ["test", "test"]
    assert set(split[2:]) == {"train", "valid"}
    assert df.assign(split=split).groupby("patient_id")["split"].nunique().max() == 1


def test_inbreast_xlsx_sheet_with_spreadsheet_numbers(synth_dir, truth, tmp_path):
    """The label sheet as a spreadsheet: numbers come back as floats ('22678622.0', '2.0') and must still match."""
    import shutil

    from cvfast.data.ingest import prepare_inbreast
    from cvfast.data.ingest.common import PrepareOptions

    src = Path(shutil.copytree(synth_dir / "inbreast" / "AllDICOMs", tmp_path / "inb" / "AllDICOMs")).parent
    sheet = pd.read_csv(synth_dir / "inbreast" / "INbreast.csv", sep=";", dtype=str)
    sheet["File Name"] = sheet["File Name"].astype(float)
    sheet["Bi-Rads"] = [float(v) if v.isdigit() else v.upper() for v in sheet["Bi-Rads"]]
    sheet.to_excel(src / "INbreast.xlsx", index=False)
    df = prepare_inbreast(src, PrepareOptions(out=tmp_path / "d", size=(64, 48), workers=1))
    kept = {k: v for k, v in truth["inbreast"]["images"].items() if v["label"] is not None}
    assert sorted(df["image_id"]) == sorted(kept)
    assert all(df.set_index("image_id").loc[k, "label"] == v["label"] for k, v in kept.items())


def test_given_splits_widen_to_the_whole_patient_and_small_sets_do_not_crash():
    from cvfast.data.manifest import assign_splits

    df = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c", "d"], "label": [1, 0, 0, 1, 0, 1],
                       "split": ["valid", "", "train", "test", "train", "train"]})
    split = assign_splits(df, seed=0, valid_frac=0.0, test_frac=0.0)
    assert list(split) == ["valid", "valid", "test", "test", "train", "train"]
    many = pd.DataFrame({"patient_id": [f"p{i}" for i in range(10)], "label": [0, 1] * 5, "split": ""})
    split = assign_splits(many, seed=0, valid_frac=0.9, test_frac=0.0)  # 9 of 10: too few left to stratify
    assert (split == "valid").sum() == 9


def test_hard_lesions_overlap_in_look_and_easy_ones_never_do():
    """The hard synthetic data has the ambiguity of real lesions; the easy data keeps the first data's clean separation."""
    import numpy as np

    from cvfast.data.synth.render import DIFFICULTIES, plan_lesion

    rng = np.random.default_rng(0)
    hard = DIFFICULTIES["hard"]
    malignant = [plan_lesion(rng, "mass", True, 0.05, hard) for _ in range(2000)]
    benign = [plan_lesion(rng, "mass", False, 0.05, hard) for _ in range(2000)]
    assert abs(np.mean([not m.irregular for m in malignant]) - hard.malignant_circumscribed) < 0.03  # circumscribed cancers
    assert abs(np.mean([b.irregular for b in benign]) - hard.benign_irregular) < 0.03  # irregular benign masses
    assert any(b.spiculated for b in benign) and not all(m.spiculated for m in malignant)
    assert min(m.contrast for m in malignant) < 0.7 < max(m.contrast for m in malignant) <= 1.0  # faint lesions too
    assert hard.benign_calcs[1] > hard.malignant_calcs[0] and hard.benign_calc_size[0] < hard.malignant_calc_size[1]  # counts/sizes overlap
    easy = DIFFICULTIES["easy"]
    assert easy.benign_calcs[1] <= easy.malignant_calcs[0] and easy.benign_calc_size[0] > easy.malignant_calc_size[1]
    drawn = plan_lesion(rng, "mass", True, 0.05, easy)
    assert drawn.irregular is None and drawn.contrast == 1.0  # drawn as its pathology, as the first data was


def test_difficulty_is_recorded_and_the_inbreast_negatives_mostly_carry_benign_findings(tmp_path):
    from cvfast.data.synth import synthesize

    truth = synthesize(tmp_path / "h", patients=30, seed=2, size="64x48")
    assert truth["difficulty"] == "hard"
    birads = [t["birads"] for t in truth["inbreast"]["images"].values()]
    assert birads.count("2") > birads.count("1") > 0  # INbreast: most negatives have a benign finding
    masses = [a for t in truth["ddsm"]["images"].values() for a in t["abnormalities"] if a["kind"] == "mass"]
    assert any(a["malignant"] and not a["irregular"] for a in masses) or any(not a["malignant"] and a["irregular"] for a in masses)
    with pytest.raises(CvfastError, match="difficulty"):
        synthesize(tmp_path / "x", patients=2, difficulty="medium")


def test_a_lesion_is_drawn_as_its_look_says():
    """Outline and contrast come from the lesion's look, not its pathology: a circumscribed cancer is convex, a faint one faint."""
    import cv2

    from cvfast.data.synth.render import LesionSpec, render_image

    def draw(irregular: bool, contrast: float) -> tuple[float, float]:
        signal, _, (mask,), _ = render_image(np.random.default_rng(5), 600, 450, "L", "CC",
                                             [LesionSpec("mass", True, 0.06, irregular, irregular, contrast)], 0.5)
        plain, _, _, _ = render_image(np.random.default_rng(5), 600, 450, "L", "CC", [LesionSpec("mass", True, 0.06, irregular, irregular, 0.0)], 0.5)
        (contour,), _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        return mask.sum() / cv2.contourArea(cv2.convexHull(contour)), float((signal - plain)[mask].mean())

    (round_solidity, full), (irregular_solidity, _), (_, faint) = draw(False, 1.0), draw(True, 1.0), draw(False, 0.6)
    assert round_solidity > 0.97 > irregular_solidity  # an oval outline vs a lobulated one
    assert faint == pytest.approx(0.6 * full, rel=0.02)
