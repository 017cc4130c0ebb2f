"""Environment failures, stray state and users' own files: each ends in a clear stop, never a quiet, wrong result (issue 23)."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cvfast.cli import app
from cvfast.data.ingest import prepare_csv
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.read import write_png
from cvfast.data.synth import synthesize
from cvfast.errors import CvfastError, DiskFull
from cvfast.util.distributed import check_distributed_environment
from cvfast.util.files import atomic_write_bytes, written_by_cvfast


def _cli(*args: str, env: dict | None = None):
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "400", **(env or {})})
    assert r.exception is None or isinstance(r.exception, SystemExit), f"bare exception: {r.exception!r}"
    return r, " ".join(r.output.split())


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of SIZE at PATH (root, Linux); the test is skipped where no tmpfs can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _resize_disk(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


# --- users' own files at names cvfast writes (item 1) ------------------------------------------------------------


def test_synth_keeps_a_users_own_ground_truth_and_writes_nothing(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "ground_truth.json").write_text("REAL")
    r, out = _cli("synth", str(tmp_path / "u"), "--patients", "2")
    assert r.exit_code == 1 and "ground_truth.json: already exists and was not written by cvfast" in out, out
    assert (tmp_path / "u" / "ground_truth.json").read_text() == "REAL"
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["ground_truth.json"]


def test_a_rerun_replaces_cvfasts_own_output_but_not_a_file_edited_since(tmp_path):
    synthesize(tmp_path / "s", patients=2, layouts=("inbreast",))
    synthesize(tmp_path / "s", patients=2, seed=1, layouts=("inbreast",))  # its own earlier output: replaced
    truth = tmp_path / "s" / "ground_truth.json"
    assert written_by_cvfast(truth) and '"seed": 1' in truth.read_text()
    truth.write_text(truth.read_text() + " ")  # the user edited it
    with pytest.raises(CvfastError, match="was changed since"):
        synthesize(tmp_path / "s", patients=2, seed=2, layouts=("inbreast",))


@pytest.mark.parametrize("name", ["report.json", "report.md"])
def test_evaluate_keeps_a_users_report_of_the_same_name(tmp_path, name):
    preds = tmp_path / "p.csv"
    pd.DataFrame({"image_id": list("abcd"), "patient_id": list("1234"), "label": [0, 1, 0, 1], "p_cancer": [0.1, 0.9, 0.3, 0.6]}).to_csv(preds, index=False)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / name).write_text("my own notes")
    r, out = _cli("evaluate", str(preds), "--out", str(tmp_path / "r"))
    assert r.exit_code == 1 and f"{name}: already exists and was not written by cvfast" in out, out
    assert (tmp_path / "r" / name).read_text() == "my own notes"


# --- a full disk (items 2 and 11) ---------------------------------------------------------------------------------


def _site(folder: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        write_png(folder / f"im{i:02d}.png", (rng.random((120, 90)) * 65535).astype(np.uint16))
        rows.append({"path": f"im{i:02d}.png", "label": str(i % 2), "patient_id": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def test_a_disk_that_fills_during_prepare_stops_it_and_a_rerun_finishes_as_one_run_would(tmp_path):
    labels = _site(tmp_path / "site")
    opts = dict(size=(256, 192), workers=1)
    expected = prepare_csv(labels, PrepareOptions(out=tmp_path / "whole_run", **opts))
    with small_disk(tmp_path / "disk", "1m") as disk:
        r, out = _cli("prepare", "csv", str(labels), "--out", str(disk / "data"), "--size", "256x192", "--workers", "1")
        assert r.exit_code == 1 and "disk is full" in out and "run the same command again" in out, out
        assert not (disk / "data" / "manifest.csv").exists() and not (disk / "data" / "rejects.csv").exists()
        kept = len(list((disk / "data" / "images").glob("*.png")))
        assert 0 < kept < 24
        _resize_disk(disk, "16m")
        resumed = prepare_csv(labels, PrepareOptions(out=disk / "data", **opts))
        pd.testing.assert_frame_equal(resumed, expected)
        assert (disk / "data" / "manifest.csv").read_bytes() == (tmp_path / "whole_run" / "manifest.csv").read_bytes()
        assert pd.read_csv(disk / "data" / "rejects.csv").empty


def test_export_on_a_full_disk_is_all_or_nothing(untrained_models, tmp_path):
    from fastai.learner import load_learner

    from cvfast.models.artifact import export_model, load_model

    learn = load_learner(untrained_models[0] / "model.pkl")
    size = sum(p.stat().st_size for p in untrained_models[0].iterdir() if p.is_file())
    with small_disk(tmp_path / "disk", f"{size * 3 // 2}") as disk:  # room for the first export, not for a second beside it
        export_model(learn, disk / "m")
        before = {p.name: p.read_bytes() for p in (disk / "m").iterdir() if p.is_file()}
        with pytest.raises(DiskFull, match="the model could not be written"):
            export_model(learn, disk / "m", metrics={"note": "second"})
        assert {p.name: p.read_bytes() for p in (disk / "m").iterdir() if p.is_file()} == before  # the first export, whole
        assert load_model(disk / "m")[1]["metrics"] == {}
    with small_disk(tmp_path / "disk2", f"{size // 3}") as disk:  # no room for even the pickle
        with pytest.raises(DiskFull):
            export_model(learn, disk / "m")
        assert [p.name for p in (disk / "m").iterdir() if p.is_file()] == []  # no lone model.pkl for predict to pick up


def test_a_folder_with_a_model_pkl_and_no_model_json_is_an_unfinished_export(untrained_models, tmp_path):
    from cvfast.models.artifact import load_model

    folder = Path(shutil.copytree(untrained_models[1], tmp_path / "m"))
    (folder / "model.json").unlink()
    with pytest.raises(CvfastError, match="export did not finish"):
        load_model(folder)


def test_a_model_pkl_that_its_model_json_does_not_describe_is_refused(untrained_models, tmp_path):
    from cvfast.models.artifact import load_model

    folder = Path(shutil.copytree(untrained_models[1], tmp_path / "m"))
    shutil.copy(untrained_models[0] / "model.pkl", folder / "model.pkl")  # another export's pickle
    with pytest.raises(CvfastError, match="does not match model.json"):
        load_model(folder / "model.pkl")


def test_a_failed_write_removes_its_temporary_and_says_the_disk_is_full(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        with pytest.raises(DiskFull, match="the disk is full"):
            atomic_write_bytes(disk / "big.bin", b"x" * 200_000)
        assert list(disk.iterdir()) == []


# --- a stray distributed environment (item 3) ---------------------------------------------------------------------


@pytest.mark.parametrize("env,says", [
    ({"RANK": "1"}, "RANK=1 without WORLD_SIZE > 1"),
    ({"RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=1 without WORLD_SIZE > 1"),
    ({"RANK": "abc"}, "RANK='abc' in the environment is not a process number"),
    ({"RANK": ""}, "RANK='' in the environment is not a process number"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' in the environment is not a process number"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "must be below the world size"),
])
def test_a_half_set_distributed_environment_is_refused_with_what_to_unset(env, says, tmp_path):
    with pytest.raises(CvfastError, match="unset") as e:
        check_distributed_environment(env)
    assert says in str(e.value)
    r, out = _cli("recipes", "list", env=env)
    assert r.exit_code == 1 and says in out and "unset" in out, out


@pytest.mark.parametrize("env", [
    {}, {"WORLD_SIZE": "1", "RANK": "0"}, {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}, {"LOCAL_RANK": "0"},
    {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"},  # Kubeflow's PyTorchJob: no LOCAL_RANK
    {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"},
], ids=["none", "one-process", "scheduler-master-only", "local-rank-only", "kubeflow", "torchrun"])
def test_a_launcher_environment_or_none_is_accepted(env):
    check_distributed_environment(env)


def test_a_stray_rank_stops_training_before_it_starts(s10, tmp_path):
    r, out = _cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--epochs-scale", "0.25", "--out", str(tmp_path / "m"), env={"RANK": "1"})
    assert r.exit_code == 1 and "half-set distributed environment" in out and "unset RANK" in out, out
    assert not (tmp_path / "m").exists()


def test_a_full_disk_while_checkpointing_says_so_and_leaves_no_temporary(s10, tmp_path):
    with small_disk(tmp_path / "disk", "32k") as disk:
        r, out = _cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--arch", "test_resnet", "--no-pretrained", "--epochs-scale", "0.25",
                      "--out", str(disk / "m"))
        assert r.exit_code == 1 and "checkpoints: no space for the" in out and "unexpected" not in out, out
        assert not list((disk / "m").rglob("*.tmp*")) and not (disk / "m" / "model.pkl").exists()


# --- state that outlives its inputs (items 6 and 10) ---------------------------------------------------------------


def test_a_run_is_not_resumed_onto_a_re_split_data_folder(untrained_models, ddsm_data, synth_dir, tmp_path, monkeypatch):
    from conftest import SIZE

    from cvfast.data.ingest import prepare_ddsm
    from cvfast.train import callbacks
    from cvfast.train.pipeline import train_whole
    from cvfast.train.recipes import load_recipe, resolve

    data = Path(shutil.copytree(ddsm_data, tmp_path / "data", symlinks=True))
    recipe = resolve(load_recipe("demo-whole"), {}, epochs_scale=0.05)
    checkpoint = callbacks.EpochCheckpoint._checkpoint

    def killed_after_the_first_epoch(self, values, stopped):
        checkpoint(self, values, stopped)
        raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochCheckpoint, "_checkpoint", killed_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_whole(recipe, data, untrained_models[0], tmp_path / "m")
    monkeypatch.undo()
    assert (tmp_path / "m" / "checkpoints" / "progress.json").is_file()
    before = pd.read_csv(data / "manifest.csv")
    prepare_ddsm(synth_dir / "ddsm", PrepareOptions(out=data, size=SIZE, workers=1, seed=3, valid_frac=0.4))
    assert not before["split"].equals(pd.read_csv(data / "manifest.csv")["split"])  # patients moved between splits
    with pytest.raises(CvfastError, match="holds an unfinished run of a different recipe or data"):
        train_whole(recipe, data, untrained_models[0], tmp_path / "m")
    assert train_whole(recipe, data, untrained_models[0], tmp_path / "m", resume=False).metrics  # --no-resume starts over


def test_a_second_training_run_into_the_same_out_is_refused_while_the_first_holds_it(s10, tmp_path):
    import sys

    out = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cvfast.util.files import exclusive\n"
                               f"with exclusive({str(out)!r}, 'cvfast training run'):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r, said = _cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--arch", "test_resnet", "--no-pretrained", "--epochs-scale", "0.25",
                       "--out", str(out))
        assert r.exit_code == 1 and "another cvfast training run is writing into this folder now" in said, said
        assert not (out / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    r, said = _cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--arch", "test_resnet", "--no-pretrained", "--epochs-scale", "0.25",
                   "--out", str(out))
    assert r.exit_code == 0, said  # the holder is gone: its lock went with it
