"""Bad input: each case gives a clear message naming the file or row, and nothing is dropped silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvfast.data.ingest import prepare_csv, prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.manifest import read_manifest
from cvfast.data.read import write_png
from cvfast.data.synth import make_dicom, synthesize
from cvfast.errors import CvfastError

from conftest import run_cli


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_synth")
    synthesize(out, patients=4, seed=11)
    return out


@pytest.fixture
def ddsm_copy(small_synth, tmp_path) -> Path:
    return Path(shutil.copytree(small_synth / "ddsm", tmp_path / "ddsm"))


def _opts(tmp_path, name="data") -> PrepareOptions:
    return PrepareOptions(out=tmp_path / name, size=(64, 48), workers=1)


def _rows(src: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False).assign(csv=p.name) for p in sorted(src.glob("*_set.csv"))])


def test_truncated_dicom_is_rejected_by_name(ddsm_copy, tmp_path):
    victim = sorted((ddsm_copy / "CBIS-DDSM").glob("*_CC"))[0]
    dcm = next(victim.rglob("*.dcm"))
    dcm.write_bytes(dcm.read_bytes()[: len(dcm.read_bytes()) // 2])
    df = prepare_ddsm(ddsm_copy, _opts(tmp_path))
    rejects = pd.read_csv(tmp_path / "data" / "rejects.csv")
    assert len(rejects) == 1 and rejects.loc[0, "source"] == str(dcm)
    assert "truncated" in rejects.loc[0, "reason"] and str(dcm) in rejects.loc[0, "reason"]
    image_id = victim.name.split("_", 1)[1]
    assert image_id not in set(df["image_id"]) and len(df) == len(_rows(ddsm_copy).groupby(["patient_id", "left or right breast", "image view"])) - 1


def test_csv_missing_column_names_file_and_column(ddsm_copy, tmp_path):
    csv = ddsm_copy / "mass_case_description_train_set.csv"
    pd.read_csv(csv).drop(columns=["pathology"]).to_csv(csv, index=False)
    with pytest.raises(CvfastError, match=r"mass_case_description_train_set\.csv: missing column\(s\) 'pathology'"):
        prepare_ddsm(ddsm_copy, _opts(tmp_path))
    r = run_cli("prepare", "ddsm", str(ddsm_copy), "--out", str(tmp_path / "cli"))
    assert r.returncode == 1 and "missing column(s) 'pathology'" in r.stderr and "Traceback" not in r.stderr


def test_path_resolving_to_nothing_is_rejected_with_row(ddsm_copy, tmp_path):
    csv = sorted(ddsm_copy.glob("*_set.csv"), key=lambda p: -len(pd.read_csv(p)))[0]
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[0, "image file path"] = "Mass-Training_P_99999_LEFT_CC/1.2.3/4.5.6/000000.dcm"
    df.to_csv(csv, index=False)
    prepare_ddsm(ddsm_copy, _opts(tmp_path))
    rejects = pd.read_csv(tmp_path / "data" / "rejects.csv")
    hit = rejects[rejects["row"] == f"{csv.name} row 2"]
    assert len(hit) == 1 and "resolves to nothing" in hit.iloc[0]["reason"] and "P_99999" in hit.iloc[0]["reason"]


def test_mask_of_wrong_size_is_rejected_image_kept(ddsm_copy, tmp_path):
    roi_dir = sorted((ddsm_copy / "CBIS-DDSM").glob("*_CC_1"))[0]
    import pydicom

    for f in roi_dir.rglob("*.dcm"):
        px = pydicom.dcmread(f).pixel_array
        if set(np.unique(px)) <= {0, 255} and px.shape[0] > 100:
            make_dicom(f, np.ascontiguousarray(px[: int(px.shape[0] * 0.8), : int(px.shape[1] * 0.8)]), patient_id="x")
            bad = f
    prepare_ddsm(ddsm_copy, _opts(tmp_path))
    rejects = pd.read_csv(tmp_path / "data" / "rejects.csv")
    assert len(rejects) == 1 and str(bad) in rejects.loc[0, "reason"] and "ROI mask is" in rejects.loc[0, "reason"]
    image_id = roi_dir.name.split("_", 1)[1].rsplit("_", 1)[0]
    row = read_manifest(tmp_path / "data").set_index("image_id").loc[image_id]
    assert row["abnormalities"][0]["mask"] == ""  # the image stays for whole-image work


def test_missing_roi_folder_is_reported_image_kept(ddsm_copy, tmp_path):
    roi_dir = sorted((ddsm_copy / "CBIS-DDSM").glob("*_MLO_1"))[0]
    shutil.rmtree(roi_dir)
    df = prepare_ddsm(ddsm_copy, _opts(tmp_path))
    rejects = pd.read_csv(tmp_path / "data" / "rejects.csv")
    assert len(rejects) == 1 and roi_dir.name in rejects.loc[0, "reason"] and "partial download" in rejects.loc[0, "reason"]
    assert roi_dir.name.split("_", 1)[1].rsplit("_", 1)[0] in set(df["image_id"])


def test_partial_download_missing_csvs_still_ingests(ddsm_copy, tmp_path, caplog):
    for p in ddsm_copy.glob("calc_*.csv"):
        p.unlink()
    df = prepare_ddsm(ddsm_copy, _opts(tmp_path))
    assert df["image_id"].size > 0 and all(a["kind"] == "mass" for abns in read_manifest(tmp_path / "data")["abnormalities"] for a in abns)
    assert "no calc_case_description_train_set.csv" in caplog.text


def test_non_image_and_bad_rows_in_csv_route(tmp_path):
    img = (np.random.default_rng(0).random((80, 60)) * 65535).astype(np.uint16)
    write_png(tmp_path / "a.png", img)
    write_png(tmp_path / "b.png", img)
    (tmp_path / "c.png").write_text("not an image at all")
    pd.DataFrame({"path": ["a.png", "b.png", "c.png", "missing.png", "a.png"], "label": ["1", "0", "1", "0", "maybe"],
                  "patient_id": ["p1", "p2", "p3", "p4", "p5"]}).to_csv(tmp_path / "labels.csv", index=False)
    df = prepare_csv(tmp_path / "labels.csv", PrepareOptions(out=tmp_path / "out", size=(64, 48), workers=1, valid_frac=0, test_frac=0))
    assert sorted(df["image_id"]) == ["a", "b"]
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv").sort_values("row")
    reasons = " | ".join(rejects["reason"])
    assert len(rejects) == 3
    assert "c.png: not an image file" in reasons and "'missing.png' resolves to nothing" in reasons and "'maybe' is not 0 or 1" in reasons
    assert set(rejects["row"]) >= {"labels.csv row 5", "labels.csv row 6"}


def test_nothing_usable_exits_nonzero(tmp_path):
    (tmp_path / "x.txt").write_text("junk")
    pd.DataFrame({"path": ["x.txt"], "label": ["1"]}).to_csv(tmp_path / "l.csv", index=False)
    r = run_cli("prepare", "csv", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "nothing usable remains" in r.stderr
    assert (tmp_path / "o" / "rejects.csv").is_file()


@pytest.mark.parametrize("args,message", [
    (["prepare", "ddsm", "/nonexistent/cbis", "--out", "{tmp}/o"], "CBIS-DDSM download folder not found"),
    (["prepare", "mias", "{tmp}", "--out", "{tmp}/o", "--size", "12x3"], "at least 32 pixels"),
    (["prepare", "inbreast", "{tmp}", "--out", "{tmp}/o", "--valid-frac", "1.5"], "--valid-frac 1.5"),
    (["prepare", "csv", "{tmp}/nothing.csv", "--out", "{tmp}/o"], "label CSV not found"),
    (["patches", "{tmp}", "--size", "4"], "at least 8 pixels"),
    (["patches", "{tmp}"], "no manifest here"),
])
def test_invalid_arguments_exit_nonzero_with_message(tmp_path, args, message):
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_inbreast_sheet_rows_without_files_and_unlabelled_files(small_synth, tmp_path):
    src = Path(shutil.copytree(small_synth / "inbreast", tmp_path / "inb"))
    files = sorted((src / "AllDICOMs").glob("*.dcm"))
    files[0].unlink()
    (src / "AllDICOMs" / "99999999_feedbeef_MG_L_CC_ANON.dcm").write_bytes(files[1].read_bytes())
    prepare_inbreast(src, _opts(tmp_path))
    reasons = " | ".join(pd.read_csv(tmp_path / "data" / "rejects.csv")["reason"])
    assert f"File Name {files[0].name.split('_')[0]} resolves to nothing" in reasons
    assert "not in INbreast.csv (no label)" in reasons


def test_restored_roi_folder_is_picked_up_on_rerun(ddsm_copy, tmp_path):
    roi_dir = sorted((ddsm_copy / "CBIS-DDSM").glob("*_MLO_1"))[0]
    moved = shutil.move(roi_dir, tmp_path / "aside")
    prepare_ddsm(ddsm_copy, _opts(tmp_path))
    assert len(pd.read_csv(tmp_path / "data" / "rejects.csv")) == 1
    shutil.move(moved, roi_dir)
    df = prepare_ddsm(ddsm_copy, _opts(tmp_path))
    assert len(pd.read_csv(tmp_path / "data" / "rejects.csv")) == 0
    assert all(a["mask"] for abns in read_manifest(tmp_path / "data")["abnormalities"] for a in abns)
    assert len(df) > 0


def test_out_that_is_a_file_is_a_clear_error(tmp_path, small_synth):
    (tmp_path / "f").write_text("x")
    r = run_cli("prepare", "inbreast", str(small_synth / "inbreast"), "--out", str(tmp_path / "f"))
    assert r.returncode == 1 and "cannot create the output folder" in r.stderr and "Traceback" not in r.stderr
