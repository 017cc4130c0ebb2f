"""The command line end to end: synth -> prepare -> patches, the training commands, and the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from cvfast.train.recipes import load_recipe, recipe_paths


def test_synth_prepare_patches_chain(tmp_path):
    r = run_cli("synth", str(tmp_path / "s"), "--patients", "3", "--seed", "2")
    assert r.returncode == 0, r.stderr
    truth = json.loads((tmp_path / "s" / "ground_truth.json").read_text())
    r = run_cli("prepare", "ddsm", str(tmp_path / "s" / "ddsm"), "--out", str(tmp_path / "d"), "--size", "128x96")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "test" in r.stdout
    assert len(pd.read_csv(tmp_path / "d" / "manifest.csv")) == len(truth["ddsm"]["images"])
    r = run_cli("prepare", "inbreast", str(tmp_path / "s" / "inbreast"), "--out", str(tmp_path / "i"), "--size", "128x96")
    assert r.returncode == 0, r.stderr
    r = run_cli("patches", str(tmp_path / "d"), "--set", "s10", "--size", "32", "--n-roi", "3", "--n-background", "2")
    assert r.returncode == 0, r.stderr
    p = pd.read_csv(tmp_path / "d" / "patches_s10" / "patches.csv")
    n_abn = sum(len(im["abnormalities"]) for im in truth["ddsm"]["images"].values())
    assert len(p) == 3 * n_abn + 2 * len(truth["ddsm"]["images"])


def test_demo_data_stages_only(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"), "--patients", "4", "--no-train")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["data"]["ddsm_images"] > 0 and report["data"]["inbreast_images"] > 0 and report["data"]["patches"]["background"] > 0
    assert "models" not in report
    for grid in report["batch_grids"]:
        assert (tmp_path / "demo" / grid.split("/")[-1]).stat().st_size > 5000


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("synth", "prepare", "patches", "demo"))


def test_recipes_list_and_show():
    r = run_cli("recipes", "list")
    assert r.returncode == 0
    for name in ("patch-s1-resnet50", "patch-s1-vgg16", "patch-s10-resnet50", "patch-s10-vgg16", "whole-resnet",
                 "whole-resnet-heatmap", "whole-vgg", "whole-vgg-heatmap", "finetune-inbreast"):
        assert name in r.stdout
    r = run_cli("recipes", "show", "whole-vgg-heatmap")
    assert r.returncode == 0 and 'top = "vgg"' in r.stdout and "heatmap = true" in r.stdout
    r = run_cli("recipes", "show", "nope")
    assert r.returncode == 1 and "not found" in r.stderr


@pytest.mark.slow  # three trainings, lr_find and a 1024x1024 VGG-heatmap run
def test_training_commands_chain_and_lr_find(ddsm_data, inbreast_data, s10, tmp_path):
    r = run_cli("patch", "--data", str(s10), "--recipe", "demo-patch", "--epochs-scale", "0.25", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "test_accuracy" in r.stdout and (tmp_path / "p" / "model.safetensors").is_file()
    r = run_cli("whole", "--patch", str(tmp_path / "p"), "--data", str(ddsm_data), "--recipe", "demo-whole",
                "--epochs-scale", "0.05", "--out", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    r = run_cli("finetune", "--from", str(tmp_path / "w" / "model.json"), "--data", str(inbreast_data), "--dataset", "inbreast",
                "--recipe", "demo-finetune", "--epochs-scale", "0.1", "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "f" / "recipe.json").read_text())["data"]["dataset"] == "inbreast"
    r = run_cli("lr-find", "--recipe", "demo-whole", "--data", str(ddsm_data), "--model", str(tmp_path / "p"),
                "--out", str(tmp_path / "lr.png"))
    assert r.returncode == 0, r.stderr
    assert "valley" in r.stdout or "steep" in r.stdout
    assert not re.search(r"\d+\.\d+% \[\d+/\d+", r.stdout + r.stderr), r.stderr  # no fastai bar frames in a log or a pipe
    r = run_cli("whole", "--patch", str(tmp_path / "w"), "--data", str(ddsm_data), "--recipe", "demo-whole", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "needs a patch classifier" in r.stderr
    # a paper recipe's top and heatmap are kept unless a flag says otherwise; --size wins over --quick. The heatmap's
    # 5x5 max-pool and VGG's two 2x2 pools need a map of 20+ cells: too small a size is refused, not a traceback
    r = run_cli("whole", "--patch", str(tmp_path / "p"), "--data", str(ddsm_data), "--recipe", "whole-vgg-heatmap",
                "--size", "256x192", "--bs", "8", "--quick", "--out", str(tmp_path / "v"))
    assert r.returncode == 1 and "image size 256x192 is too small for this whole-image model" in " ".join(r.stderr.split())
    r = run_cli("whole", "--patch", str(tmp_path / "p"), "--data", str(ddsm_data), "--recipe", "whole-vgg-heatmap",
                "--size", "1024x1024", "--bs", "8", "--quick", "--epochs-scale", "0.005", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr
    resolved = json.loads((tmp_path / "v" / "recipe.json").read_text())
    assert (resolved["model"]["top"], resolved["model"]["heatmap"], resolved["data"]["size"]) == ("vgg", True, [1024, 1024])


def _plain_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI with its output to pipes and no COLUMNS hint: what `cvfast ... > log` or `| less` gets."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "cvfast.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_version():
    from cvfast import __version__

    r = _plain_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cvfast {__version__}"


@pytest.mark.parametrize("name", sorted(recipe_paths()))
def test_recipes_show_round_trips_through_a_file(name, tmp_path):
    """`cvfast recipes show NAME > mine.toml` is the recipe's TOML, comments included, and loads as the same recipe."""
    r = _plain_cli("recipes", "show", name)
    assert r.returncode == 0, r.stderr
    (tmp_path / "mine.toml").write_text(r.stdout)
    assert r.stdout == recipe_paths()[name].read_text()
    assert {k: v for k, v in load_recipe(tmp_path / "mine.toml").items() if k != "name"} == \
        {k: v for k, v in load_recipe(name).items() if k != "name"}


def test_output_to_a_pipe_is_never_wrapped(tmp_path):
    """Tables keep one row per line and log records are one plain line each (timestamp, level, logger, message)."""
    r = _plain_cli("recipes", "list")
    assert r.returncode == 0, r.stderr
    for name in recipe_paths():
        description = load_recipe(name).get("description", "")
        assert any(name in line and description in line for line in r.stdout.splitlines()), f"{name}: its row was wrapped"
    out = tmp_path / "a-folder-name-long-enough-that-an-80-column-console-would-have-to-break-the-line-it-is-logged-on"
    r = _plain_cli("synth", str(out), "--patients", "2")
    assert r.returncode == 0, r.stderr
    logged = [line for line in r.stderr.splitlines() if "cvfast.data.synth" in line]
    assert logged and all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO cvfast\.data\.synth: synthetic data: .+", x) for x in logged), r.stderr
    assert str(out) in logged[0] and "\x1b[" not in r.stderr + r.stdout  # no colour codes in a file either


def test_commands_and_docs_follow_the_dataset_registry():
    """One registry: `prepare` has a command per dataset, `finetune --dataset` the transfer ones, `synth` the synthetic ones,
    and the README's heading lists them all."""
    from cvfast.data.datasets import DATASETS
    from cvfast.data.synth import LAYOUTS

    r = _plain_cli("prepare", "--help")
    assert all(f" {name} " in r.stdout for name in DATASETS), r.stdout
    transfer = "|".join(n for n, d in DATASETS.items() if d.transfer)
    assert f"<{transfer}>" in re.sub(r"[\s│]", "", run_cli("finetune", "--help").stdout)  # COLUMNS=200: help is not cut
    assert LAYOUTS == tuple(n for n, d in DATASETS.items() if d.synthetic) and {"ddsm", "inbreast", "rsna", "vindr", "cmmd"} <= set(LAYOUTS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"### `cvfast prepare {'|'.join(DATASETS)} SOURCE --out DATA`" in readme
