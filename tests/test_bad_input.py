"""Bad input: each case gives a clear message naming the file or row, and nothing is dropped silently."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import PATCH, run_cli

from cvfast.data.ingest import prepare_csv, prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.manifest import read_manifest
from cvfast.data.read import write_png
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import LAYOUTS, synthesize
from cvfast.data.synth.render import make_dicom
from cvfast.errors import CvfastError


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_synth")
    synthesize(out, patients=4, seed=11, layouts=LAYOUTS)
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
    write_png(tmp_path / "b.png", img[::-1].copy())  # another image (identical pixels would be one image twice)
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


def _distinct_pngs(folder: Path, n: int) -> list[str]:
    """N small 16-bit PNGs with different pixels (identical pixels would be one image twice)."""
    rng = np.random.default_rng(5)
    for k in range(n):
        write_png(folder / f"i{k}.png", (rng.random((80, 60)) * 65535).astype(np.uint16))
    return [f"i{k}.png" for k in range(n)]


def test_csv_route_normalises_sides_and_rejects_other_sides_and_blank_patients(tmp_path):
    sides = ["L", " left ", "Right", "r", "", "X", "B", "L"]
    patients = ["p1", "p1", "p2", "p2", "p3", "p4", "p5", " "]
    pd.DataFrame({"path": _distinct_pngs(tmp_path, len(sides)), "label": ["1", "1", "0", "0", "0", "1", "0", "1"], "side": sides,
                  "patient_id": patients}).to_csv(tmp_path / "labels.csv", index=False)
    df = prepare_csv(tmp_path / "labels.csv", PrepareOptions(out=tmp_path / "out", size=(64, 48), workers=1, valid_frac=0, test_frac=0))
    m = read_manifest(tmp_path / "out").set_index("image_id")
    assert list(m.loc[["i0", "i1", "i2", "i3"], "side"]) == ["L", "L", "R", "R"] and sorted(df["image_id"]) == ["i0", "i1", "i2", "i3", "i4"]
    assert m.loc["i4", "side"] in ("", None) or pd.isna(m.loc["i4", "side"])  # no side given: none invented
    reason = dict(zip(pd.read_csv(tmp_path / "out" / "rejects.csv")["row"], pd.read_csv(tmp_path / "out" / "rejects.csv")["reason"]))
    assert reason == {"labels.csv row 7": "side 'X' is not L, R, LEFT or RIGHT", "labels.csv row 8": "side 'B' is not L, R, LEFT or RIGHT",
                      "labels.csv row 9": "blank patient_id: a patient-level split cannot place this image"}


def test_predict_inputs_normalise_sides_and_reject_other_sides(tmp_path):
    from cvfast.infer.inputs import collect_inputs

    names = _distinct_pngs(tmp_path, 4)
    pd.DataFrame({"path": names, "side": ["L", "LEFT", " r", "X"], "patient_id": ["a"] * 4}).to_csv(tmp_path / "in.csv", index=False)
    df, rejects = collect_inputs([tmp_path / "in.csv"])
    assert dict(zip(df["image_id"], df["side"])) == {"i0": "L", "i1": "L", "i2": "R"}
    assert [(r["row"], r["reason"]) for r in rejects] == [("i3", "side 'X' is not L, R, LEFT or RIGHT")]


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


# ---------------------------------------------------------------------------------------------------------------
# The catalogue: every kind of bad input the commands meet, each run through the CLI. Each must give a clear
# message naming the file or row and a non-zero exit, or (where the rest of the input is still usable) a rejects
# entry naming the file -- never a bare traceback, never a silently dropped image. The tests above check the
# ingest cases in more depth (what is kept, what is rejected).
# ---------------------------------------------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from cvfast.cli import app  # noqa: E402


@dataclass
class Ctx:
    """What the cases build their bad input from: a scratch folder, the synthetic sources, prepared data, models."""

    tmp: Path
    synth: Path
    data: Path
    patches: Path
    patch_model: Path
    whole_model: Path

    def data_copy(self) -> Path:
        """A DATA folder whose manifest a case may edit (the images are shared)."""
        out = self.tmp / "data_copy"
        out.mkdir()
        df = pd.read_csv(self.data / "manifest.csv", dtype=str, keep_default_na=False)
        df["path"] = [str(self.data / p) for p in df["path"]]
        df.to_csv(out / "manifest.csv", index=False)
        return out


@dataclass
class Bad:
    """One kind of bad input: how to make it (returns the CLI args and the text the message must contain)."""

    kind: str
    make: Callable[[Ctx], tuple[list[str], str]]
    rejects: str | None = None  # the rejects CSV (relative to ctx.tmp) that lists it, when the command goes on without it
    env: dict | None = None  # environment variables the command runs with


def _csv_site(ctx: Ctx, rows: dict) -> Path:
    img = (np.random.default_rng(0).random((80, 60)) * 65535).astype(np.uint16)
    write_png(ctx.tmp / "ok1.png", img)
    write_png(ctx.tmp / "ok2.png", img[::-1].copy())
    pd.DataFrame(rows).to_csv(ctx.tmp / "site.csv", index=False)
    return ctx.tmp / "site.csv"


def _ddsm_with(ctx: Ctx, edit: Callable[[Path], str]) -> tuple[list[str], str]:
    src = Path(shutil.copytree(ctx.synth / "ddsm", ctx.tmp / "ddsm"))
    return ["prepare", "ddsm", str(src), "--out", str(ctx.tmp / "out"), "--size", "64x48", "--workers", "1"], edit(src)


def _truncate_first_dicom(src: Path) -> str:
    dcm = next(sorted((src / "CBIS-DDSM").glob("*_CC"))[0].rglob("*.dcm"))
    dcm.write_bytes(dcm.read_bytes()[:5000])
    return str(dcm)


def _drop_column(src: Path) -> str:
    csv = src / "mass_case_description_train_set.csv"
    pd.read_csv(csv).drop(columns=["pathology"]).to_csv(csv, index=False)
    return "mass_case_description_train_set.csv: missing column(s) 'pathology'"


def _dangling_path(src: Path) -> str:
    csv = src / "mass_case_description_train_set.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[0, "image file path"] = "Mass-Training_P_99999_LEFT_CC/1.2.3/4.5.6/000000.dcm"
    df.to_csv(csv, index=False)
    return "P_99999_LEFT_CC/1.2.3/4.5.6/000000.dcm' resolves to nothing"


def _edited_manifest(ctx: Ctx, column: str, value: str) -> tuple[list[str], str]:
    data = ctx.data_copy()
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[3, column] = value
    df.to_csv(data / "manifest.csv", index=False)
    return ["whole", "--patch", str(ctx.patch_model), "--data", str(data), "--recipe", "demo-whole", "--out", str(ctx.tmp / "m")], "manifest.csv row 5"


def _leaky_manifest(ctx: Ctx) -> tuple[list[str], str]:
    data = ctx.data_copy()
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    patient = df.loc[df["split"] == "test", "patient_id"].iloc[0]
    df.loc[df.index[df["patient_id"] == patient][0], "split"] = "train"
    df.to_csv(data / "manifest.csv", index=False)
    return ["whole", "--patch", str(ctx.patch_model), "--data", str(data), "--recipe", "demo-whole", "--out", str(ctx.tmp / "m")], \
        f"patients in more than one split (train/test leakage): {patient}"


def _missing_cache_file(ctx: Ctx) -> tuple[list[str], str]:
    data = ctx.data_copy()
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[df.index[df["split"] == "train"][0], "path"] = str(ctx.tmp / "deleted.png")
    df.to_csv(data / "manifest.csv", index=False)
    return ["whole", "--patch", str(ctx.patch_model), "--data", str(data), "--recipe", "demo-whole", "--out", str(ctx.tmp / "m")], \
        str(ctx.tmp / "deleted.png")


def _recipe_file(ctx: Ctx, text: str) -> Path:
    (ctx.tmp / "r.toml").write_text(text)
    return ctx.tmp / "r.toml"


def _tampered(ctx: Ctx) -> tuple[list[str], str]:
    model = Path(shutil.copytree(ctx.patch_model, ctx.tmp / "model"))
    raw = bytearray((model / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (model / "model.safetensors").write_bytes(bytes(raw))
    return ["predict", str(model), str(ctx.tmp / "ok1.png"), "--out", str(ctx.tmp / "p.csv")], "model.safetensors: SHA-256 does not match"


def _predictions(ctx: Ctx, rows: dict) -> Path:
    pd.DataFrame(rows).to_csv(ctx.tmp / "preds.csv", index=False)
    return ctx.tmp / "preds.csv"


def _not_an_image(ctx: Ctx, name: str = "scan.dcm") -> Path:
    (ctx.tmp / name).write_bytes(b"this is a report, not a DICOM" * 10)
    return ctx.tmp / name


def _predict_with_unreadable(ctx: Ctx) -> tuple[list[str], str]:
    _csv_site(ctx, {"path": ["ok1.png"], "label": ["1"]})  # writes ok1.png
    bad = _not_an_image(ctx)
    return ["predict", str(ctx.whole_model), str(ctx.tmp / "ok1.png"), str(bad), "--out", str(ctx.tmp / "p.csv")], str(bad)


CATALOGUE = [
    # prepare: raw datasets
    Bad("truncated DICOM", lambda c: _ddsm_with(c, _truncate_first_dicom), rejects="out/rejects.csv"),
    Bad("dataset CSV missing a column", lambda c: _ddsm_with(c, _drop_column)),
    Bad("dataset row whose path resolves to nothing", lambda c: _ddsm_with(c, _dangling_path), rejects="out/rejects.csv"),
    Bad("dataset folder that does not exist", lambda c: (["prepare", "ddsm", str(c.tmp / "nope"), "--out", str(c.tmp / "o")], str(c.tmp / "nope"))),
    Bad("non-image file listed in a site CSV", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png", "ok2.png", _not_an_image(c, "x.png").name], "label": ["1", "0", "1"],
                                               "patient_id": ["a", "b", "c"]})), "--out", str(c.tmp / "out"), "--valid-frac", "0", "--test-frac", "0"],
         "x.png: not an image file"), rejects="out/rejects.csv"),
    Bad("label that is not 0 or 1", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png", "ok2.png"], "label": ["1", "maybe"], "patient_id": ["a", "b"]})),
         "--out", str(c.tmp / "out"), "--valid-frac", "0", "--test-frac", "0"], "site.csv row 3"), rejects="out/rejects.csv"),
    Bad("site CSV that is not a CSV", lambda c: (
        ["prepare", "csv", str(_not_an_image(c, "labels.csv")), "--out", str(c.tmp / "out")], "labels.csv: missing column(s) 'path', 'label'")),
    Bad("image size too small to work at", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png"], "label": ["1"]})), "--out", str(c.tmp / "o"), "--size", "12x3"],
        "size '12x3'")),
    # a prepared DATA folder edited by hand
    Bad("manifest with an unknown split", lambda c: _edited_manifest(c, "split", "tset")),
    Bad("manifest with a label that is not 0/1", lambda c: _edited_manifest(c, "label", "2")),
    Bad("manifest with unparsable abnormalities", lambda c: _edited_manifest(c, "abnormalities", "[{broken")),
    Bad("manifest with a patient in two splits", _leaky_manifest),
    Bad("cached image deleted after prepare", _missing_cache_file),
    Bad("patch set cut from a since re-split DATA folder", lambda c: (
        ["patch", "--data", str(_resplit_patch_set(c)), "--recipe", "demo-patch", "--out", str(c.tmp / "m")], "changed since these patches were cut")),
    # training inputs
    Bad("patch training on a folder that is not a patch set", lambda c: (
        ["patch", "--data", str(c.data), "--out", str(c.tmp / "m")], f"{c.data}: no patchset.json")),
    Bad("recipe with invalid TOML", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_file(c, "kind = 'patch'\n[model\n")), "--out", str(c.tmp / "m")],
        "r.toml: invalid TOML")),
    Bad("recipe without stages", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_file(c, "kind = 'patch'\n[model]\narch = 'test_resnet'\n[data]\n")),
         "--out", str(c.tmp / "m")], "r.toml: recipe lacks [stages]")),
    Bad("weights file that is not weights", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--weights", str(_not_an_image(c, "w.pth")), "--out", str(c.tmp / "m")],
        "w.pth")),
    Bad("whole-image step given a whole-image model as the patch model", lambda c: (
        ["whole", "--patch", str(c.whole_model), "--data", str(c.data), "--recipe", "demo-whole", "--out", str(c.tmp / "m")],
        f"{c.whole_model}: is a whole model")),
    Bad("fine-tuning from a patch model", lambda c: (
        ["finetune", "--from", str(c.patch_model), "--data", str(c.data), "--recipe", "demo-finetune", "--out", str(c.tmp / "m")],
        f"{c.patch_model}: is a patch model")),
    Bad("unknown precision", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--precision", "fp8", "--out", str(c.tmp / "m")], "precision 'fp8'")),
    # inference and evaluation
    Bad("model weights changed after export", _tampered),
    Bad("model path that is not a model", lambda c: (
        ["predict", str(_not_an_image(c, "model.json")), str(c.tmp), "--out", str(c.tmp / "p.csv")], "model.json: not a cvfast model sidecar")),
    Bad("unreadable image among the inputs", _predict_with_unreadable, rejects="p.rejects.csv"),
    Bad("heatmap of a file that is not an image", lambda c: (
        ["heatmap", str(c.patch_model), str(_not_an_image(c)), "--out", str(c.tmp / "h.png")], str(c.tmp / "scan.dcm"))),
    Bad("predictions without a label column", lambda c: (
        ["evaluate", str(_predictions(c, {"path": ["a", "b"], "image_id": ["a", "b"], "p_cancer": [0.1, 0.9]})), "--out", str(c.tmp / "r")],
        "preds.csv: no 'label' column")),
    Bad("prediction row without a label", lambda c: (
        ["evaluate", str(_predictions(c, {"path": ["a", "b", "c"], "image_id": ["a", "b", "c"], "patient_id": ["1", "2", "3"], "label": [0, None, 1],
                                          "p_cancer": [0.1, 0.5, 0.9]})), "--out", str(c.tmp / "r")],
        "preds.csv: 1 rows have no label (e.g. image_id b)")),
]


def _resplit_patch_set(ctx: Ctx) -> Path:
    data = Path(shutil.copytree(ctx.data, ctx.tmp / "data_resplit", ignore=shutil.ignore_patterns("patches_*")))
    make_patches(data, replace(PATCH_SETS["s10"], size=PATCH), workers=1)
    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    df.to_csv(data / "manifest.csv", index=False, lineterminator="\r\n")  # same content, new bytes: the manifest changed
    return data / "patches_s10"


# --- issue 10: what an adversarial user found (each reproduced on the code before the fix) and the siblings of each class

def _site_with_copies(ctx: Ctx, paths: list[str], patients: list[str], labels: list[str] | None = None) -> list[str]:
    """prepare csv over ok1/ok2 (and a byte copy of ok1 as copy.png) listed as PATHS under PATIENTS."""
    csv = _csv_site(ctx, {"path": paths, "label": labels or ["1", "0", "1", "0"][: len(paths)], "patient_id": patients,
                          "image_id": [f"img{i}" for i in range(len(paths))]})
    shutil.copy(ctx.tmp / "ok1.png", ctx.tmp / "copy.png")
    return ["prepare", "csv", str(csv), "--out", str(ctx.tmp / "out"), "--size", "64x48", "--valid-frac", "0", "--test-frac", "0"]


def _ddsm_repeated_row(src: Path) -> str:
    csv = src / "mass_case_description_train_set.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    pd.concat([df, df.iloc[[0]]]).to_csv(csv, index=False)
    return f"already listed at {csv.name} row 2; counted once"


def _mias_repeated_line(ctx: Ctx) -> tuple[list[str], str]:
    src = ctx.tmp / "mias"
    src.mkdir()
    rng = np.random.default_rng(1)
    for n in (1, 2):
        cv2.imwrite(str(src / f"mdb00{n}.png"), (rng.random((128, 128)) * 255).astype(np.uint8))
    (src / "Info.txt").write_text("mdb001 G CIRC B 60 60 10\nmdb001 G CIRC B 60 60 10\nmdb002 F NORM\n")
    return ["prepare", "mias", str(src), "--out", str(ctx.tmp / "out"), "--size", "64x64", "--valid-frac", "0", "--test-frac", "0"], "repeats line 1"


def _edited_sidecar(ctx: Ctx, edit: Callable[[dict], object], keep_digest: bool = False) -> Path:
    """A copy of the whole model whose model.json was edited: by hand (its digest left as it was), or by a writer that
    sealed meaningless content with a matching digest (then the field checks must refuse it)."""
    from cvfast.models.artifact import content_digest

    model = Path(shutil.copytree(ctx.whole_model, ctx.tmp / "edited_model"))
    side = json.loads((model / "model.json").read_text())
    new = edit(side)
    side = side if new is None else new
    if not keep_digest and isinstance(side, dict):
        side["content_sha256"] = content_digest(side)
    (model / "model.json").write_text(json.dumps(side))
    return model


def _predict_with(model: Path, ctx: Ctx) -> list[str]:
    _csv_site(ctx, {"path": ["ok1.png"], "label": ["1"]})
    return ["predict", str(model), str(ctx.tmp / "ok1.png"), "--out", str(ctx.tmp / "p.csv")]


def _swap_classes(side: dict) -> None:
    side["classes"] = side["classes"][::-1]


def _recipe_with(ctx: Ctx, old: str, new: str) -> Path:
    from cvfast.train.recipes import recipe_paths

    return _recipe_file(ctx, recipe_paths()["demo-patch"].read_text().replace(old, new, 1))


def _damaged_patch_set(ctx: Ctx, name: str, text: str) -> Path:
    folder = Path(shutil.copytree(ctx.patches, ctx.tmp / "patches"))
    (folder / name).write_text(text)
    return folder


def _damaged_progress(ctx: Ctx) -> Path:
    out = ctx.tmp / "m"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "progress.json").write_text('{"fingerprint": "abc", "stage": ')
    return out


def _decompression_bomb(ctx: Ctx) -> Path:
    """A valid PNG header claiming 30000 x 30000 pixels: PIL refuses it with its own DecompressionBombError."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + chunk(b"IEND", b"")
    (ctx.tmp / "bomb.png").write_bytes(png)
    return ctx.tmp / "bomb.png"


def _bad_rng(ctx: Ctx) -> Path:
    """A model folder of a real run interrupted after its first epoch, whose progress.json then lost most of its random state."""
    from fastai.callback.core import Callback
    from fastai.learner import defaults

    from cvfast.train.pipeline import train_patch
    from cvfast.train.recipes import load_recipe, resolve

    class Interrupted(Callback):
        order = 99

        def after_epoch(self):
            raise KeyboardInterrupt("stands for a kill after the first epoch")

    out, saved = ctx.tmp / "m", defaults.callbacks
    defaults.callbacks = [*saved, Interrupted]
    try:
        train_patch(resolve(load_recipe("demo-patch"), {}, epochs_scale=0.25), ctx.patches, out)
    except KeyboardInterrupt:
        pass
    finally:
        defaults.callbacks = saved
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    progress["rng"]["python"] = [3, [1, 2], None]
    (out / "checkpoints" / "progress.json").write_text(json.dumps(progress))
    return out


def _someones_data(ctx: Ctx) -> Path:
    (ctx.tmp / "dl" / "ddsm").mkdir(parents=True)
    (ctx.tmp / "dl" / "ddsm" / "mass_case_description_train_set.csv").write_text("patient_id\nP_00001\n")
    return ctx.tmp / "dl"


def _evaluate_labels(ctx: Ctx, labels: dict | str) -> list[str]:
    preds = _predictions(ctx, {"path": ["a", "b", "c"], "image_id": ["a", "b", "c"], "patient_id": ["1", "2", "3"], "p_cancer": [0.1, 0.5, 0.9]})
    lab = ctx.tmp / "labels.csv"
    lab.write_text(labels) if isinstance(labels, str) else pd.DataFrame(labels).to_csv(lab, index=False)
    return ["evaluate", str(preds), "--labels", str(lab), "--out", str(ctx.tmp / "r")]


def _site_in_its_own_folder(ctx: Ctx) -> tuple[list[str], str]:
    site = ctx.tmp / "site"
    (site / "images").mkdir(parents=True)
    img = (np.random.default_rng(0).random((80, 60)) * 65535).astype(np.uint16)
    write_png(site / "images" / "a.png", img)
    write_png(site / "images" / "b.png", img[::-1].copy())
    pd.DataFrame({"path": ["images/a.png", "images/b.png"], "label": ["1", "0"]}).to_csv(site / "labels.csv", index=False)
    return ["prepare", "csv", str(site / "labels.csv"), "--out", str(site)], f"would overwrite the input {site / 'images' / 'a.png'}"


CATALOGUE += [
    # inputs written over (issue 10.1)
    Bad("prepare csv with --out at the site folder, whose images/ holds the sources", _site_in_its_own_folder),
    Bad("patches with --out at the DATA folder (its rejects.csv)", lambda c: (
        ["patches", str(c.data), "--size", str(PATCH), "--out", str(c.data)], "would overwrite the input")),
    Bad("predict --out a DATA folder's manifest.csv", lambda c: (
        ["predict", str(c.whole_model), str(c.data), "--out", str(c.data / "manifest.csv")], "belongs to a DATA folder")),
    Bad("predict --out onto one of its input images", lambda c: (
        [*_predict_with(c.whole_model, c)[:-1], str(c.tmp / "ok1.png")], "would overwrite the input")),
    Bad("whole-image training into the patch model's own folder", lambda c: (
        ["whole", "--patch", str(c.patch_model), "--data", str(c.data), "--recipe", "demo-whole", "--out", str(c.patch_model)],
        "would overwrite the input")),
    Bad("heatmap --out onto the image it reads", lambda c: (
        ["heatmap", str(c.patch_model), str(_csv_site(c, {"path": ["ok1.png"], "label": ["1"]}).with_name("ok1.png")),
         "--out", str(c.tmp / "ok1.png")], "would overwrite the input")),
    # silent leakage and double counting (issue 10.3)
    Bad("one source file under two patients", lambda c: (
        _site_with_copies(c, ["ok1.png", "ok1.png", "ok2.png"], ["a", "b", "c"]), "the same source file"), rejects="out/rejects.csv"),
    Bad("one source file twice under one patient", lambda c: (
        _site_with_copies(c, ["ok1.png", "./ok1.png", "ok2.png"], ["a", "a", "c"], ["1", "1", "0"]), "counted once"), rejects="out/rejects.csv"),
    Bad("a byte copy of an image under another patient", lambda c: (
        _site_with_copies(c, ["ok1.png", "copy.png", "ok2.png"], ["a", "b", "c"]), "identical pixels"), rejects="out/rejects.csv"),
    Bad("a repeated abnormality row in a CBIS-DDSM CSV", lambda c: _ddsm_with(c, _ddsm_repeated_row), rejects="out/rejects.csv"),
    Bad("a repeated line in mini-MIAS Info.txt", _mias_repeated_line, rejects="out/rejects.csv"),
    Bad("predictions with a repeated image", lambda c: (
        ["evaluate", str(_predictions(c, {"path": ["a", "b", "b", "c"], "image_id": ["a", "b", "b", "c"], "patient_id": ["1", "2", "2", "3"],
                                          "label": [0, 1, 1, 1], "p_cancer": [0.1, 0.5, 0.5, 0.9]})), "--out", str(c.tmp / "r")],
        "repeat image_id b (rows 3, 4)")),
    Bad("--labels with a repeated id", lambda c: (_evaluate_labels(c, {"image_id": ["a", "b", "c", "c"], "label": [0, 1, 1, 1]}), "repeat image_id c")),
    Bad("--labels with conflicting labels for one id", lambda c: (_evaluate_labels(c, {"image_id": ["a", "b", "c", "c"], "label": [0, 1, 1, 0]}),
                                                                 "repeat image_id c")),
    Bad("--labels that is not a CSV", lambda c: (_evaluate_labels(c, 'image_id,label\n"a,0\n'), "labels.csv: not a readable CSV")),
    # model files checked whole (issue 10.4)
    Bad("model.json with the class order swapped", lambda c: (_predict_with(_edited_sidecar(c, _swap_classes, keep_digest=True), c),
                                                            "does not match its checksum")),
    Bad("model.json with the class order swapped and sealed again", lambda c: (_predict_with(_edited_sidecar(c, _swap_classes), c),
                                                                            "classes ['cancer', 'no_cancer']")),
    Bad("model.json whose checksum was removed", lambda c: (
        _predict_with(_edited_sidecar(c, lambda s: s.pop("content_sha256") and None, keep_digest=True), c), "has no content_sha256")),
    Bad("model.json with a NaN mean grey", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.update(mean_grey=float("nan"))), c),
                                                    "mean_grey nan")),
    Bad("model.json with a text mean grey", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.update(mean_grey="0.3")), c), "mean_grey '0.3'")),
    Bad("model.json without a size", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.pop("size") and None), c), "size None")),
    Bad("model.json with a negative size", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.update(size=[-4, 96])), c), "size [-4, 96]")),
    Bad("model.json without a spec", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.pop("spec") and None), c), "does not describe a 'whole' model")),
    Bad("model.json of an unknown kind", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.update(kind="detector")), c), "'detector'")),
    Bad("model.json naming weights outside its folder", lambda c: (_predict_with(_edited_sidecar(c, lambda s: s.update(weights="../x.safetensors")), c),
                                                                 "must be a file name")),
    Bad("model.json whose spec names another architecture", lambda c: (
        _predict_with(_edited_sidecar(c, lambda s: s["spec"]["patch"].update(arch="test_efficientnet")), c), "do not make a model")),
    Bad("model.json that is a JSON list", lambda c: (_predict_with(_edited_sidecar(c, lambda s: [s]), c), "not a cvfast model sidecar")),
    Bad("model.json edited in a field that changes the outputs", lambda c: (
        _predict_with(_edited_sidecar(c, lambda s: s.update(mean_grey=0.9), keep_digest=True), c), "does not match its checksum")),
    # the message says what is wrong (issue 10.5)
    Bad("a train split smaller than one batch", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--bs", "100000", "--out", str(c.tmp / "m")], "for a batch of 100000")),
    Bad("a negative seed to prepare", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png"], "label": ["1"]})), "--out", str(c.tmp / "o"), "--seed", "-1"], "--seed -1")),
    Bad("a negative seed to synth", lambda c: (["synth", str(c.tmp / "s"), "--seed", "-3"], "--seed -3")),
    Bad("a negative seed to patches", lambda c: (["patches", str(c.data), "--seed", "-1", "--out", str(c.tmp / "p")], "--seed -1")),
    Bad("--device cuda on predict without a GPU", lambda c: ([*_predict_with(c.whole_model, c), "--device", "cuda"], "no CUDA GPU")),
    Bad("--device cuda on heatmap without a GPU", lambda c: (
        ["heatmap", str(c.patch_model), str(_csv_site(c, {"path": ["ok1.png"], "label": ["1"]}).with_name("ok1.png")), "--device", "cuda",
         "--out", str(c.tmp / "h.png")], "no CUDA GPU")),
    Bad("a device name torch does not know", lambda c: ([*_predict_with(c.whole_model, c), "--device", "gpu7"], "device 'gpu7'")),
    Bad("a recipe value of the wrong type", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_with(c, "lr = 1e-3", 'lr = "fast"')), "--out", str(c.tmp / "m")],
        "lr = 'fast' is not valid (expected a number")),
    Bad("a recipe with a misspelt key", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_with(c, "epochs = 1", "epoch = 1")), "--out", str(c.tmp / "m")],
        "unknown key 'epoch'")),
    Bad("a recipe batch size of zero", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_with(c, "bs = 64", "bs = 0")), "--out", str(c.tmp / "m")], "bs = 0")),
    Bad("a truncated patchset.json", lambda c: (
        ["patch", "--data", str(_damaged_patch_set(c, "patchset.json", '{"classes": [')), "--recipe", "demo-patch", "--out", str(c.tmp / "m")],
        "patchset.json: patch set description is not valid JSON")),
    Bad("a patches.csv edited after the cut", lambda c: (
        ["patch", "--data", str(_damaged_patch_set(c, "patches.csv", "patch_id,path,label\n")), "--recipe", "demo-patch",
         "--out", str(c.tmp / "m")], "is not the patch list patchset.json describes")),
    Bad("a truncated progress.json in the model folder", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--out", str(_damaged_progress(c))], "progress.json: training progress")),
    Bad("a saved random state in progress.json that does not fit", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--epochs-scale", "0.25", "--out", str(_bad_rng(c))],
        "saved random state cannot be restored")),
    Bad("--labels with a label that is not 0 or 1", lambda c: (_evaluate_labels(c, {"image_id": ["a", "b", "c"], "label": [0, "yes", 1]}),
                                                              "labels.csv: row 3 (image_id b): label 'yes'")),
    Bad("--labels whose ids differ only by surrounding spaces", lambda c: (
        _evaluate_labels(c, {"image_id": ["a", "b", "c", " c"], "label": [0, 1, 1, 1]}), "repeat image_id c")),
    Bad("predict --split that no input has", lambda c: (["predict", str(c.whole_model), str(c.data), "--split", "tset", "--out", str(c.tmp / "p.csv")],
                                                       "--split tset: no input has that split")),
    # writers that read one thing and were pointed at another's files (siblings of issue 10.1)
    Bad("show --out onto one of the patches it reads", lambda c: (
        ["show", str(c.patch_model), "--data", str(c.patches), "--out", str(c.patches / pd.read_csv(c.patches / "patches.csv")["path"][0])],
        "lies in")),
    Bad("heatmap --out into a DATA folder's image cache", lambda c: (
        ["heatmap", str(c.patch_model), str(sorted((c.data / "images").glob("*.png"))[0]), "--out", str(c.data / "images" / "other.png")],
        "the cache of a cvfast DATA folder")),
    Bad("lr-find --out onto a patch it trains on", lambda c: (
        ["lr-find", "--recipe", "demo-patch", "--data", str(c.patches), "--out", str(c.tmp / "lr.png")][:-1] +
        [str(c.patches / pd.read_csv(c.patches / "patches.csv")["path"][0])], "refused")),
    Bad("patches --out another DATA folder", lambda c: (
        ["patches", str(c.data), "--size", str(PATCH), "--out", str(c.data_copy())], "is a prepared DATA folder")),
    Bad("synth into a folder that holds someone's dataset", lambda c: (["synth", str(_someones_data(c))], "not written by `cvfast synth`")),
    Bad("an image whose decoder raises its own error type", lambda c: (
        ["heatmap", str(c.patch_model), str(_decompression_bomb(c)), "--out", str(c.tmp / "h.png")], "bomb.png")),
]


def _screening_with(ctx: Ctx, name: str, edit: Callable[[Path], str], *extra: str) -> tuple[list[str], str]:
    """`prepare NAME` on a copy of a synthetic screening layout that EDIT spoiled; EDIT says what the message must name."""
    src = Path(shutil.copytree(ctx.synth / name, ctx.tmp / name))
    return ["prepare", name, str(src), "--out", str(ctx.tmp / "out"), "--size", "64x48", "--workers", "1", *extra], edit(src)


def _edit_table(path: Path, edit: Callable[[pd.DataFrame], None]) -> None:
    """Edit a CSV or XLSX label table in place, as a user's spreadsheet program would."""
    df = pd.read_excel(path, dtype=str) if path.suffix == ".xlsx" else pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df)
    df.to_excel(path, index=False) if path.suffix == ".xlsx" else df.to_csv(path, index=False)


def _set_cell(name: str, column: str, value: str, row: int = 0) -> Callable[[Path], None]:
    """An edit that sets one cell of table NAME."""
    return lambda src: _edit_table(src / name, lambda df: df.__setitem__(column, [value if i == row else v for i, v in enumerate(df[column])]))


def _first_finding_box_reversed(src: Path) -> str:
    def edit(df):
        i = df.index[df["xmin"] != ""][0]
        df.loc[i, ["xmin", "xmax"]] = df.loc[i, ["xmax", "xmin"]].to_numpy()
    _edit_table(src / "finding_annotations.csv", edit)
    return "is not xmin < xmax"


def _cmmd_dicom_without_laterality(src: Path) -> str:
    f = sorted(src.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    del ds.ImageLaterality
    ds.save_as(f)
    return "no ImageLaterality in the header"


def _cmmd_conflicting_rows(src: Path) -> str:
    sheet = src / "CMMD_clinicaldata_revision.xlsx"
    df = pd.read_excel(sheet, dtype=str)
    twin = df.iloc[[0]].assign(classification="Benign" if df.loc[0, "classification"] == "Malignant" else "Malignant")
    pd.concat([df, twin]).to_excel(sheet, index=False)
    return "with another classification"


CATALOGUE += [
    # the screening sets' layouts (issue 13.1)
    Bad("RSNA train.csv without its cancer column", lambda c: _screening_with(
        c, "rsna", lambda s: _edit_table(s / "train.csv", lambda df: df.pop("cancer")) or "train.csv: missing column(s) 'cancer'")),
    Bad("RSNA row whose image_id climbs out of train_images", lambda c: _screening_with(
        c, "rsna", lambda s: _set_cell("train.csv", "image_id", "../../../etc/passwd")(s) or "are not the integers RSNA uses"), rejects="out/rejects.csv"),
    Bad("RSNA row whose cancer is not 0 or 1", lambda c: _screening_with(
        c, "rsna", lambda s: _set_cell("train.csv", "cancer", "yes", row=1)(s) or "train.csv row 3"), rejects="out/rejects.csv"),
    Bad("RSNA --test-site that no row has", lambda c: _screening_with(c, "rsna", lambda s: "--test-site 9", "--test-site", "9")),
    Bad("VinDr finding box with xmin and xmax swapped", lambda c: _screening_with(c, "vindr", _first_finding_box_reversed), rejects="out/rejects.csv"),
    Bad("VinDr split that is neither training nor test", lambda c: _screening_with(
        c, "vindr", lambda s: _set_cell("breast-level_annotations.csv", "split", "validation")(s) or "split 'validation'"), rejects="out/rejects.csv"),
    Bad("VinDr folder without finding_annotations.csv", lambda c: _screening_with(
        c, "vindr", lambda s: (s / "finding_annotations.csv").unlink() or "no finding_annotations.csv")),
    Bad("CMMD DICOM without ImageLaterality", lambda c: _screening_with(c, "cmmd", _cmmd_dicom_without_laterality), rejects="out/rejects.csv"),
    Bad("CMMD sheet with two classifications for one breast", lambda c: _screening_with(c, "cmmd", _cmmd_conflicting_rows), rejects="out/rejects.csv"),
    Bad("CMMD classification that is neither Benign nor Malignant", lambda c: _screening_with(
        c, "cmmd", lambda s: _set_cell("CMMD_clinicaldata_revision.xlsx", "classification", "Unknown")(s) or "classification 'Unknown'"),
        rejects="out/rejects.csv"),
    Bad("CMMD folder without the clinical sheet", lambda c: _screening_with(
        c, "cmmd", lambda s: (s / "CMMD_clinicaldata_revision.xlsx").unlink() or "no clinical sheet")),
]


def _empty_manifest(ctx: Ctx) -> Path:
    folder = ctx.tmp / "empty_data"
    folder.mkdir()
    (folder / "manifest.csv").write_bytes(b"")
    return folder


def _train_patches(ctx: Ctx) -> int:
    """The train split's patch count: as the batch size, one batch per epoch."""
    return int((pd.read_csv(ctx.patches / "patches.csv")["split"] == "train").sum())


def _background_only(ctx: Ctx) -> Path:
    """A patch set whose every patch is background (as if cut with --n-roi 0 by an older cvfast)."""
    out = Path(shutil.copytree(ctx.patches, ctx.tmp / "bg_only"))
    df = pd.read_csv(out / "patches.csv")
    df[df["label"] == "background"].to_csv(out / "patches.csv", index=False)
    info = json.loads((out / "patchset.json").read_text())
    info["patches_sha256"] = __import__("hashlib").sha256((out / "patches.csv").read_bytes()).hexdigest()
    (out / "patchset.json").write_text(json.dumps(info))
    return out


CATALOGUE += [
    # degenerate sets and a stray environment (issue 23)
    Bad("patches with --n-roi 0 --n-background 0", lambda c: (
        ["patches", str(c.data), "--size", str(PATCH), "--n-roi", "0", "--n-background", "0", "--out", str(c.tmp / "p")], "that cuts no patches")),
    Bad("patches with --n-roi 0: background patches only", lambda c: (
        ["patches", str(c.data), "--size", str(PATCH), "--n-roi", "0", "--out", str(c.tmp / "p")], "a patch classifier needs at least two")),
    Bad("a patch set of background patches only", lambda c: (
        ["patch", "--data", str(_background_only(c)), "--recipe", "demo-patch", "--out", str(c.tmp / "m")], "the train split has only background")),
    Bad("a recipe whose stages all have epochs = 0", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_file(c, "\n".join(
            line if not line.strip().startswith("epochs") else "epochs = 0"
            for line in __import__("cvfast.train.recipes", fromlist=["x"]).recipe_paths()["demo-patch"].read_text().splitlines()))),
         "--out", str(c.tmp / "m")], "every stage has epochs = 0")),
    Bad("a recipe with lr = inf", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_with(c, "lr = 1e-3", "lr = inf")), "--out", str(c.tmp / "m")], "lr = inf")),
    Bad("a stray RANK=1 outside torchrun", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", "demo-patch", "--out", str(c.tmp / "m")], "half-set distributed environment"),
        env={"RANK": "1"}),
    Bad("a 0-byte manifest.csv", lambda c: (["patches", str(_empty_manifest(c)), "--size", str(PATCH), "--out", str(c.tmp / "p")],
                                             "manifest.csv: manifest is not a readable CSV")),
    Bad("a learning rate that makes the weights non-finite in one step", lambda c: (
        ["patch", "--data", str(c.patches), "--recipe", str(_recipe_with(c, "random_init_lr = 1e-3", "random_init_lr = 1e9")),
         "--arch", "test_resnet", "--no-pretrained", "--bs", str(_train_patches(c)), "--epochs-scale", "0.25", "--out", str(c.tmp / "m")],
        "training diverged (non-finite loss) in stage 1 before any epoch finished")),
    Bad("RANK=abc for a command that trains nothing", lambda c: (["recipes", "list"], "RANK='abc' in the environment is not a process number"),
        env={"RANK": "abc"}),
]


# --- issue 23: nothing silently wrong

def _float_tiff(ctx: Ctx, name: str, edit: Callable[[np.ndarray], None]) -> str:
    """A float32 TIFF beside ok1.png, edited by EDIT (a NaN pixel, every pixel equal, ...)."""
    from PIL import Image

    arr = np.random.default_rng(2).random((80, 60)).astype(np.float32)
    edit(arr)
    Image.fromarray(arr).save(ctx.tmp / name)
    return name


def _site_with_tiff(ctx: Ctx, edit: Callable[[np.ndarray], None]) -> list[str]:
    csv = _csv_site(ctx, {"path": ["ok1.png", "ok2.png", _float_tiff(ctx, "f.tif", edit)], "label": ["1", "0", "1"], "patient_id": ["a", "b", "c"]})
    return ["prepare", "csv", str(csv), "--out", str(ctx.tmp / "out"), "--size", "64x48", "--valid-frac", "0", "--test-frac", "0"]


def _inbreast_side_x(src: Path) -> str:
    sheet = src / "INbreast.csv"
    df = pd.read_csv(sheet, sep=";", dtype=str, keep_default_na=False)
    i = df.index[df["Bi-Rads"] != "3"][0]  # a row that is labelled (BI-RADS 3 rows are excluded before the side is read)
    df.loc[i, "Laterality"] = "X"
    df.to_csv(sheet, sep=";", index=False)
    return f"INbreast.csv row {i + 2} Laterality 'X' is not L, R, LEFT or RIGHT"


CATALOGUE += [
    Bad("an INbreast sheet row whose Laterality is neither L nor R", lambda c: _screening_with(c, "inbreast", _inbreast_side_x), rejects="out/rejects.csv"),
    Bad("a side that is not L or R in a site CSV", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png", "ok2.png"], "label": ["1", "0"], "patient_id": ["a", "b"], "side": ["X", "left"]})),
         "--out", str(c.tmp / "out"), "--valid-frac", "0", "--test-frac", "0"], "site.csv row 2 side 'X' is not L, R, LEFT or RIGHT"),
        rejects="out/rejects.csv"),
    Bad("a blank patient_id in a site CSV", lambda c: (
        ["prepare", "csv", str(_csv_site(c, {"path": ["ok1.png", "ok2.png"], "label": ["1", "0"], "patient_id": ["a", ""]})),
         "--out", str(c.tmp / "out"), "--valid-frac", "0", "--test-frac", "0"], "site.csv row 3 blank patient_id"), rejects="out/rejects.csv"),
    Bad("evaluate --by breast with a side that is not L or R", lambda c: (
        ["evaluate", str(_predictions(c, {"image_id": list("abcd"), "patient_id": ["1", "1", "2", "2"], "side": ["L", "X", "L", "R"],
                                          "label": [1, 1, 0, 0], "p_cancer": [0.9, 0.8, 0.1, 0.2]})), "--by", "breast", "--out", str(c.tmp / "r")],
        "preds.csv: --by breast needs side L or R on every image, not 'X': row 3 (b)")),
    Bad("evaluate --by exam with exam_id on some rows only", lambda c: (
        ["evaluate", str(_predictions(c, {"image_id": list("abcd"), "patient_id": ["1", "1", "2", "2"], "exam_id": ["e1", "", "e2", "e2"],
                                          "label": [1, 1, 0, 0], "p_cancer": [0.9, 0.8, 0.1, 0.2]})), "--by", "exam", "--out", str(c.tmp / "r")],
        "preds.csv: --by exam: exam_id is given on some rows only, missing on row 3 (b)")),
    # messages (item 12)
    Bad("predictions with a label 2.0 (shown plainly, not as np.float64(2.0))", lambda c: (
        ["evaluate", str(_predictions(c, {"image_id": list("abc"), "patient_id": ["1", "2", "3"], "label": [0, 2.0, 1],
                                          "p_cancer": [0.1, 0.5, 0.9]})), "--out", str(c.tmp / "r")], "preds.csv: row 3 (image_id b): label 2.0, expected")),
    Bad("predictions with a blank score (shown as nan)", lambda c: (
        ["evaluate", str(_predictions(c, {"image_id": list("abc"), "patient_id": ["1", "2", "3"], "label": [0, 1, 1],
                                          "p_cancer": [0.1, None, 0.9]})), "--out", str(c.tmp / "r")], "preds.csv: row 3: p_cancer nan is not")),
    Bad("predict --out inside a path that is a file", lambda c: (
        [*_predict_with(c.whole_model, c)[:-1], str(_not_an_image(c, "afile") / "x.csv")], "afile is a file, not a folder")),
    Bad("predict --ensemble with the model itself", lambda c: (
        [*_predict_with(c.whole_model, c), "--ensemble", str(c.whole_model / "model.json")], "the same model as")),
    Bad("predict --ensemble with a copy of the model", lambda c: (
        [*_predict_with(c.whole_model, c), "--ensemble", str(shutil.copytree(c.whole_model, c.tmp / "copy"))], "(same weights)")),
    Bad("heatmap --stride for a whole-image model", lambda c: (
        ["heatmap", str(c.whole_model), str(_csv_site(c, {"path": ["ok1.png"], "label": ["1"]}).with_name("ok1.png")), "--stride", "8",
         "--out", str(c.tmp / "h.png")], "--stride 8: ")),
    Bad("a float TIFF with one NaN pixel in a site CSV", lambda c: (
        _site_with_tiff(c, lambda a: a.__setitem__((3, 4), np.nan)), "f.tif: 1 pixel(s) are NaN or infinite"), rejects="out/rejects.csv"),
    Bad("a blank (constant) image in a site CSV", lambda c: (
        _site_with_tiff(c, lambda a: a.fill(0.5)), "f.tif: every pixel has the same value"), rejects="out/rejects.csv"),
    Bad("a float TIFF with an infinite pixel among the predict inputs", lambda c: (
        [*_predict_with(c.whole_model, c)[:-2], str(c.tmp / _float_tiff(c, "inf.tif", lambda a: a.__setitem__((0, 0), np.inf))),
         "--out", str(c.tmp / "p.csv")], "inf.tif: 1 pixel(s) are NaN or infinite"), rejects="p.rejects.csv"),
    Bad("heatmap of a blank image", lambda c: (
        ["heatmap", str(c.patch_model), str(c.tmp / _float_tiff(c, "blank.tif", lambda a: a.fill(0))), "--out", str(c.tmp / "h.png")],
        "blank.tif: every pixel has the same value")),
]


@pytest.fixture(scope="module")
def models(untrained_models) -> tuple[Path, Path]:
    return untrained_models


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.kind.replace(" ", "-"))
def test_bad_input_catalogue(case, small_synth, ddsm_data, s10, models, tmp_path):
    assert len(CATALOGUE) >= 15
    ctx = Ctx(tmp_path, small_synth, ddsm_data, s10, *models)
    args, says = case.make(ctx)
    r = CliRunner().invoke(app, args, env={"COLUMNS": "400", **(case.env or {})})
    assert r.exception is None or isinstance(r.exception, SystemExit), f"bare exception: {r.exception!r}"
    out = " ".join(r.output.split())
    if case.rejects:
        assert r.exit_code == 0, out
        rejects = pd.read_csv(tmp_path / case.rejects)
        assert says in " | ".join(rejects.fillna("").astype(str).agg(" ".join, axis=1)), rejects.to_string()
    else:
        assert r.exit_code != 0 and "error:" in out and says in out, out


def test_an_unforeseen_failure_is_one_line_and_verbose_shows_its_traceback(tmp_path, monkeypatch):
    import cvfast.infer.evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise ValueError("something cvfast did not foresee")

    monkeypatch.setattr(evaluate_module, "evaluate_to", broken)
    preds = tmp_path / "p.csv"
    pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["1", "2"], "label": [0, 1], "p_cancer": [0.2, 0.7]}).to_csv(preds, index=False)
    quiet = CliRunner().invoke(app, ["evaluate", str(preds)], env={"COLUMNS": "400"})
    assert quiet.exit_code == 1 and isinstance(quiet.exception, SystemExit)
    assert "error: ValueError: something cvfast did not foresee" in quiet.output and "--verbose" in quiet.output
    assert "Traceback" not in quiet.output
    loud = CliRunner().invoke(app, ["--verbose", "evaluate", str(preds)], env={"COLUMNS": "400"})
    assert loud.exit_code == 1 and "Traceback" in loud.output and "broken" in loud.output


def test_a_users_own_hidden_tmp_files_in_out_survive_a_rerun(tmp_path):
    img = (np.random.default_rng(0).random((80, 60)) * 65535).astype(np.uint16)
    write_png(tmp_path / "a.png", img)
    pd.DataFrame({"path": ["a.png"], "label": ["1"]}).to_csv(tmp_path / "l.csv", index=False)
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / ".my-notes.tmp").write_text("mine")
    prepare_csv(tmp_path / "l.csv", PrepareOptions(out=tmp_path / "out", size=(64, 48), workers=1, valid_frac=0, test_frac=0))
    assert (tmp_path / "out" / "images" / ".my-notes.tmp").read_text() == "mine"
