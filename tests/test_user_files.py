"""Users' files are sacred, their inputs untrusted (issue 10): no command writes onto an input or outside --out, symlinked
folders are read, re-runs end where uninterrupted runs would, heatmaps have no holes."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PATCH
from typer.testing import CliRunner

from cvfast.cli import app
from cvfast.data.ingest import prepare_csv, prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.manifest import read_manifest
from cvfast.data.read import read_png, write_png
from cvfast.data.sample import PATCH_SETS, check_patch_set, make_patches
from cvfast.infer.heatmap import heatmap
from cvfast.infer.predict import predict
from cvfast.train.pipeline import patch_learner_from_recipe, train_schedule
from cvfast.train.recipes import load_recipe
from cvfast.train.schedule import Stage


def _checksums(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under the roots (or of the files themselves)."""
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cli(*args: str):
    r = CliRunner().invoke(app, list(map(str, args)), env={"COLUMNS": "400"})
    assert r.exception is None or isinstance(r.exception, SystemExit), f"bare exception: {r.exception!r}"
    return r


@pytest.fixture(scope="module")
def tiny_models(untrained_models) -> tuple[Path, Path]:
    return untrained_models


def _site(root: Path, n: int = 6) -> Path:
    """A site folder as users keep one: images/*.png (distinct images, 3 patients) and labels.csv."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for k in range(n):
        write_png(root / "images" / f"s{k}.png", (rng.random((90, 70)) * 65535).astype(np.uint16))
    pd.DataFrame({"path": [f"images/s{k}.png" for k in range(n)], "label": [k % 2 for k in range(n)],
                  "patient_id": [f"w{k // 2}" for k in range(n)]}).to_csv(root / "labels.csv", index=False)
    return root


def test_prepare_csv_with_out_at_the_site_folder_leaves_the_originals(tmp_path):
    site = _site(tmp_path / "site")
    before = _checksums(site)
    r = _cli("prepare", "csv", site / "labels.csv", "--out", site, "--size", "64x48")
    assert r.exit_code == 1 and "would overwrite the input" in r.output and "images/s0.png" in " ".join(r.output.split())
    assert _checksums(site) == before
    # the cache beside the sources, in a folder of its own inside the site: fine, and the sources stay as they were
    df = prepare_csv(site / "labels.csv", PrepareOptions(out=site / "cvfast", size=(64, 48), workers=1, valid_frac=0, test_frac=0.3))
    assert len(df) == 6 and {k: v for k, v in _checksums(site).items() if "/cvfast/" not in k} == before


@pytest.mark.parametrize("command", ["prepare-ddsm", "prepare-inbreast", "patches", "predict", "evaluate", "heatmap", "show", "whole"])
def test_no_command_changes_an_input_even_with_out_at_its_folder(command, synth_dir, ddsm_data, s10, tiny_models, tmp_path):
    patch_model, whole_model = tiny_models
    src = Path(shutil.copytree(synth_dir, tmp_path / "src"))
    data = Path(shutil.copytree(ddsm_data, tmp_path / "data", ignore=shutil.ignore_patterns("patches_*")))
    models = Path(shutil.copytree(patch_model.parent, tmp_path / "models"))
    image = sorted((data / "images").glob("*.png"))[0]
    preds = tmp_path / "preds" / "preds.csv"
    runs = {
        "prepare-ddsm": [["prepare", "ddsm", src / "ddsm", "--out", src / "ddsm", "--size", "64x48", "--workers", "1"]],
        "prepare-inbreast": [["prepare", "inbreast", src / "inbreast", "--out", src / "inbreast", "--size", "64x48", "--workers", "1"],
                             ["prepare", "inbreast", src / "inbreast", "--out", src / "inbreast" / "AllDICOMs", "--size", "64x48"]],
        "patches": [["patches", data, "--size", PATCH, "--out", data], ["patches", data, "--size", PATCH, "--out", data / "images"]],
        "predict": [["predict", models / "whole", data, "--out", data / "manifest.csv"], ["predict", models / "whole", image, "--out", image],
                    ["predict", models / "whole", data, "--out", models / "whole" / "model.json"]],
        "evaluate": [["evaluate", preds, "--split", "all", "--out", preds.parent]],
        "heatmap": [["heatmap", models / "patch", image, "--out", image], ["heatmap", models / "patch", image, "--map", "all", "--out", data / "images" / "x.png"]],
        "show": [["show", models / "whole", "--data", data, "--split", "valid", "--out", models / "whole" / "model.json"]],
        "whole": [["whole", "--patch", models / "patch", "--data", data, "--recipe", "demo-whole", "--epochs-scale", "0.01", "--out", models / "patch"]],
    }
    (data / "rejects.csv").write_text("source,row,reason\nx.dcm,row 7,what prepare found\n")  # prepare's report, to be kept
    if command == "evaluate":
        assert _cli("predict", models / "whole", data, "--out", preds).exit_code == 0
    inputs = [src, data, models, *([preds] if command == "evaluate" else [])]
    before = _checksums(*inputs)
    for args in runs[command]:
        _cli(*args)
        after = _checksums(*inputs)
        assert {k: v for k, v in after.items() if k in before} == before, f"{args} changed an input"


HOSTILE = ["../../../x", "/tmp/abs_x", "a/b", "a\\b", "..", ".hidden", "nul\x00byte", "L" * 400, "P1", "p1", "con", "ok.id"]


def test_safe_stems_are_plain_distinct_and_case_distinct():
    from cvfast.util.files import safe_stem, unique_stems

    stems = unique_stems(HOSTILE)
    assert len(set(stems.values())) == len(HOSTILE)
    assert len({s.casefold() for s in stems.values()}) == len(HOSTILE)  # P1 / p1 would be one file on macOS
    for original, stem in stems.items():
        assert "/" not in stem and "\\" not in stem and "\x00" not in stem and not stem.startswith(".") and len(stem) <= 120, stem
    assert safe_stem("Mass-Training_P_00001_LEFT_CC") == "Mass-Training_P_00001_LEFT_CC"  # plain ids stay readable


def _files_outside(root: Path, keep: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and keep not in p.parents)


def test_hostile_image_ids_write_only_inside_out(tmp_path):
    work = tmp_path / "a" / "b" / "c" / "d"
    work.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(len(HOSTILE)):
        write_png(work / f"i{k}.png", (rng.random((60, 50)) * 65535).astype(np.uint16))
    pd.DataFrame({"path": [f"i{k}.png" for k in range(len(HOSTILE))], "label": [k % 2 for k in range(len(HOSTILE))],
                  "image_id": HOSTILE, "patient_id": [f"w{k}" for k in range(len(HOSTILE))]}).to_csv(work / "site.csv", index=False)
    before = set(_files_outside(tmp_path, work / "out"))
    df = prepare_csv(work / "site.csv", PrepareOptions(out=work / "out", size=(48, 40), workers=1, valid_frac=0, test_frac=0))
    assert set(_files_outside(tmp_path, work / "out")) == before  # nothing three folders up, nothing in /tmp/abs_x
    assert not Path("/tmp/abs_x.png").exists()
    assert sorted(df["image_id"]) == sorted(HOSTILE)  # every image kept, under its own id
    cache = [p for p in (work / "out" / "images").iterdir()]
    assert len(cache) == len(HOSTILE) and len({p.name.casefold() for p in cache}) == len(HOSTILE)
    m = read_manifest(work / "out")
    assert all(Path(p).parent == work / "out" / "images" for p in m["path"])


def test_hostile_ddsm_patient_id_writes_only_inside_out(synth_dir, tmp_path):
    src = Path(shutil.copytree(synth_dir / "ddsm", tmp_path / "x" / "y" / "z" / "ddsm"))
    for csv in src.glob("*_set.csv"):
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        df["patient_id"] = "../../../" + df["patient_id"]
        df.to_csv(csv, index=False)
    before = set(_files_outside(tmp_path, src.parent / "out"))
    out = src.parent / "out"
    df = prepare_ddsm(src, PrepareOptions(out=out, size=(64, 48), workers=1))
    assert set(_files_outside(tmp_path, out)) == before
    assert df["patient_id"].str.startswith("../../../").all()  # ids kept as data, only file names made safe
    make_patches(out, replace(PATCH_SETS["s1"], size=16), workers=1)
    assert set(_files_outside(tmp_path, out)) == before


def test_duplicate_sources_pixels_and_rows_are_counted_once_or_refused(synth_dir, tmp_path):
    site = _site(tmp_path / "site")
    shutil.copy(site / "images" / "s2.png", site / "images" / "copy_of_s2.png")
    rows = pd.read_csv(site / "labels.csv", dtype=str)
    extra = pd.DataFrame({"path": ["images/s0.png", "images/../images/s1.png", "images/copy_of_s2.png"], "label": ["0", "1", "0"],
                          "patient_id": ["w9", "w0", "w9"], "image_id": ["again0", "again1", "copy2"]})
    pd.concat([rows.assign(image_id=[f"s{k}" for k in range(6)]), extra]).to_csv(site / "labels.csv", index=False)
    df = prepare_csv(site / "labels.csv", PrepareOptions(out=tmp_path / "out", size=(64, 48), workers=1, valid_frac=0, test_frac=0.4))
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    reason = dict(zip(rejects["row"], rejects["reason"]))
    # s0 under a second patient: neither copy is used; s1 twice under its own patient: kept once; a byte copy of s2
    # under another patient: neither
    assert set(df["image_id"]) == {"s1", "s3", "s4", "s5"}
    assert "the same source file" in reason["again0"] and "the same source file" in reason["s0"]
    assert "counted once" in reason["again1"]
    assert "identical pixels" in reason["copy2"] and "identical pixels" in reason["s2"]

    ddsm = Path(shutil.copytree(synth_dir / "ddsm", tmp_path / "ddsm"))
    ref = prepare_ddsm(ddsm, PrepareOptions(out=tmp_path / "ref", size=(64, 48), workers=1))
    for csv in ddsm.glob("*_set.csv"):
        d = pd.read_csv(csv, dtype=str, keep_default_na=False)
        pd.concat([d, d]).to_csv(csv, index=False)  # every abnormality listed twice
    doubled = prepare_ddsm(ddsm, PrepareOptions(out=tmp_path / "doubled", size=(64, 48), workers=1))
    key = ["image_id", "n_abnormalities", "label", "split"]
    pd.testing.assert_frame_equal(ref[key].sort_values("image_id").reset_index(drop=True), doubled[key].sort_values("image_id").reset_index(drop=True))


def test_evaluate_refuses_repeated_rows_instead_of_changing_the_auc(tmp_path):
    preds = pd.DataFrame({"image_id": list("abcdef"), "patient_id": list("123456"), "label": [0, 0, 0, 1, 1, 1],
                          "p_cancer": [0.1, 0.6, 0.3, 0.5, 0.8, 0.9]})
    pd.concat([preds, preds.iloc[[1, 1, 1]]]).to_csv(tmp_path / "p.csv", index=False)
    r = _cli("evaluate", tmp_path / "p.csv", "--out", tmp_path / "r")
    assert r.exit_code == 1 and "repeat image_id b" in r.output
    assert not (tmp_path / "r" / "report.json").exists()


def test_symlinked_folders_are_read_and_loops_end(synth_dir, ddsm_data, tiny_models, tmp_path):
    src = Path(shutil.copytree(synth_dir / "inbreast", tmp_path / "store" / "inbreast"))
    linked = tmp_path / "inb"
    linked.mkdir()
    (linked / "AllDICOMs").symlink_to(src / "AllDICOMs", target_is_directory=True)  # the cluster layout
    shutil.copy(src / "INbreast.csv", linked / "INbreast.csv")
    (src / "AllDICOMs" / "loop").symlink_to(src / "AllDICOMs", target_is_directory=True)
    ref = prepare_inbreast(src, PrepareOptions(out=tmp_path / "ref", size=(64, 48), workers=1))
    via_link = prepare_inbreast(linked, PrepareOptions(out=tmp_path / "out", size=(64, 48), workers=1))
    assert sorted(via_link["image_id"]) == sorted(ref["image_id"]) and len(ref) > 0

    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "site_a").symlink_to(ddsm_data / "images", target_is_directory=True)
    (scans / "site_a_again").symlink_to(ddsm_data / "images", target_is_directory=True)  # one folder linked twice: read once
    result = predict([tiny_models[1]], [scans], progress=False)
    assert len(result.frame) == len(list((ddsm_data / "images").glob("*.png")))
    from cvfast.util.files import walk_files

    assert len(list(walk_files(src / "AllDICOMs"))) == len(list((src / "AllDICOMs").glob("*.dcm")))


class Interrupt(Exception):
    """Stands for a kill between two epochs."""


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar over every event file of a run (one per stage, and per resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resumed_training_ends_with_the_weights_and_logs_of_an_uninterrupted_one(s10, tmp_path):
    """Weights, the per-epoch CSV log and the TensorBoard curve (one step axis over stages and the resume) all match."""
    from fastai.callback.core import Callback

    epochs_seen = []

    class KillAfter(Callback):
        order = 99  # after the epoch checkpoint

        def after_epoch(self):
            epochs_seen.append(1)
            if len(epochs_seen) in (2, 3):  # first at the stage boundary, then (after a resume) in the middle of stage 2
                raise Interrupt("killed between two epochs")

    recipe = load_recipe("demo-patch")
    stages = [Stage(epochs=2, lr=1e-3, train="head", name="head"), Stage(epochs=3, lr=1e-3, train="all", name="all")]

    def run(out: Path, cbs=None) -> dict:
        learn, _ = patch_learner_from_recipe(recipe, s10, out)
        with learn.no_bar(), learn.no_logging():
            train_schedule(learn, stages, out, recipe, cbs=cbs, logger="tensorboard")
        return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}

    reference = run(tmp_path / "ref")
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", cbs=lambda trackers: [KillAfter()])
    progress = json.loads((tmp_path / "resumed" / "checkpoints" / "progress.json").read_text())
    assert (progress["stage"], progress["epochs_done"]) == (0, 2)  # killed at the stage boundary
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", cbs=lambda trackers: [KillAfter()])
    progress = json.loads((tmp_path / "resumed" / "checkpoints" / "progress.json").read_text())
    assert (progress["stage"], progress["epochs_done"]) == (1, 1)  # killed inside stage 2
    torch.manual_seed(12345)  # whatever ran in between: the resumed run must not depend on it
    np.random.seed(999)
    resumed = run(tmp_path / "resumed")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), "resumed weights differ from the uninterrupted run"
    log = pd.read_csv(tmp_path / "ref" / "checkpoints" / "history.csv")
    assert list(log[["stage", "epoch"]].itertuples(index=False, name=None)) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]  # epoch within its stage
    assert {"train_loss", "valid_loss", "accuracy"} <= set(log.columns) and log["valid_loss"].notna().all()
    assert (tmp_path / "resumed" / "checkpoints" / "history.csv").read_bytes() == (tmp_path / "ref" / "checkpoints" / "history.csv").read_bytes()
    curve = _tensorboard_scalars(tmp_path / "ref" / "tensorboard", "valid_loss")
    steps = [s for s, _ in curve]
    assert len(steps) == 5 and steps == sorted(steps) and len(set(steps)) == 5  # fastai alone restarts at 0 in stage 2
    np.testing.assert_allclose([v for _, v in curve], log["valid_loss"], rtol=1e-6)
    assert [s for s, _ in _tensorboard_scalars(tmp_path / "resumed" / "tensorboard", "valid_loss")] == steps
    train_steps = [s for s, _ in _tensorboard_scalars(tmp_path / "ref" / "tensorboard", "train_loss")]
    assert train_steps == sorted(set(train_steps))  # one point per training batch, none from validation batches


def test_an_interrupted_recut_leaves_the_old_set_whole(ddsm_data, tmp_path, monkeypatch):
    data = Path(shutil.copytree(ddsm_data, tmp_path / "data", ignore=shutil.ignore_patterns("patches_*")))
    make_patches(data, replace(PATCH_SETS["s10"], size=PATCH), workers=1)
    folder = data / "patches_s10"
    old_csv = (folder / "patches.csv").read_bytes()

    import cvfast.data.sample as sample

    real, written = sample.write_png, [0]

    def dies_midway(path, pixels, *args, **kwargs):
        written[0] += 1
        if written[0] > 15:
            raise Interrupt("killed midway")
        real(path, pixels, *args, **kwargs)

    monkeypatch.setattr(sample, "write_png", dies_midway)
    with pytest.raises(Interrupt):
        make_patches(data, replace(PATCH_SETS["s10"], size=32), workers=1)  # a re-cut at another size, killed midway
    monkeypatch.setattr(sample, "write_png", real)
    assert (folder / "patches.csv").read_bytes() == old_csv
    check_patch_set(folder)
    listed = pd.read_csv(folder / "patches.csv")
    assert all(read_png(folder / p).shape == (PATCH, PATCH) for p in listed["path"])  # every file still of the old size

    make_patches(data, replace(PATCH_SETS["s10"], size=32), workers=1)  # the re-cut re-run: now the new set, whole
    listed = pd.read_csv(folder / "patches.csv")
    assert all(read_png(folder / p).shape == (32, 32) for p in listed["path"])
    assert len([p for p in folder.rglob("*.png")]) == len(listed)  # the old cut's files are gone


def test_a_stride_beyond_the_window_leaves_no_uncovered_pixel(tiny_models, ddsm_data):
    image = sorted((ddsm_data / "images").glob("*.png"))[0]
    wide = heatmap(tiny_models[0], image, stride=3 * PATCH)
    flush = heatmap(tiny_models[0], image, stride=PATCH)
    for name, m in wide.maps.items():
        assert np.isfinite(m).all() and m.max() > 0, name
        np.testing.assert_array_equal(m, flush.maps[name])


def test_a_data_folder_whose_cache_folder_is_a_symlink_works(tmp_path):
    site = _site(tmp_path / "site")
    (tmp_path / "big_disk" / "images").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(tmp_path / "big_disk" / "images", target_is_directory=True)
    df = prepare_csv(site / "labels.csv", PrepareOptions(out=tmp_path / "data", size=(64, 48), workers=1, valid_frac=0, test_frac=0.3))
    assert len(df) == 6 and len(list((tmp_path / "big_disk" / "images").glob("*.png"))) == 6


def test_a_cache_of_an_older_cvfast_is_resumed_not_converted_again(tmp_path):
    site = _site(tmp_path / "site")
    opts = PrepareOptions(out=tmp_path / "data", size=(64, 48), workers=1, valid_frac=0, test_frac=0.3)
    prepare_csv(site / "labels.csv", opts)
    for record in (tmp_path / "data" / ".records").glob("*.json"):  # records as written before they carried a pixel digest
        r = json.loads(record.read_text())
        r.pop("pixels_sha256")
        record.write_text(json.dumps(r))
    cached = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "images").glob("*.png")}
    prepare_csv(site / "labels.csv", opts)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "images").glob("*.png")} == cached
    assert all("pixels_sha256" in json.loads(r.read_text()) for r in (tmp_path / "data" / ".records").glob("*.json"))
