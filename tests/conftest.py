"""Shared fixtures: one small synthetic dataset, prepared and cut into patches once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, no oversubscription
    torch.set_num_threads(1)
# Tests compare runs (GPU vs CPU, batch sizes, resumed vs uninterrupted) at 1e-5; TF32 matmuls and convolutions on
# Ampere and later GPUs round to ~1e-3, which would fail them for a reason that is not a bug: off in the suite.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from cvfast.data.ingest import prepare_ddsm, prepare_inbreast  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.sample import PATCH_SETS, make_patches  # noqa: E402
from cvfast.data.synth import synthesize  # noqa: E402

SIZE = (256, 192)  # working size for tests (the paper's 1152x896 scaled down)
PATCH = 48
# the real mini-MIAS (research licence, never committed): ../shared/data/mini-mias, or wherever CVFAST_MINI_MIAS points
MIAS = Path(os.environ.get("CVFAST_MINI_MIAS", Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, patients=10, seed=3, size="tiny")
    return out


@pytest.fixture(scope="session")
def truth(synth_dir) -> dict:
    return json.loads((synth_dir / "ground_truth.json").read_text())


@pytest.fixture(scope="session")
def ddsm_data(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddsm_data")
    prepare_ddsm(synth_dir / "ddsm", PrepareOptions(out=out, size=SIZE, workers=2, seed=0))
    return out


@pytest.fixture(scope="session")
def inbreast_data(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inbreast_data")
    prepare_inbreast(synth_dir / "inbreast", PrepareOptions(out=out, size=SIZE, workers=1, seed=0))
    return out


@pytest.fixture(scope="session")
def s10(ddsm_data) -> Path:
    make_patches(ddsm_data, replace(PATCH_SETS["s10"], size=PATCH), workers=2)
    return ddsm_data / "patches_s10"


@pytest.fixture(scope="session")
def untrained_models(s10, ddsm_data, tmp_path_factory) -> tuple[Path, Path]:
    """An untrained tiny patch model and the whole-image model built on it, exported as training would (tests copy
    them before editing them)."""
    from cvfast.data.blocks import patch_dataloaders, whole_image_dataloaders
    from cvfast.models.artifact import export_model
    from cvfast.train.learners import patch_learner, whole_image_learner

    out = tmp_path_factory.mktemp("untrained_models")
    patch = patch_learner(patch_dataloaders(s10, bs=8), "test_resnet")
    export_model(patch, out / "patch")
    whole = whole_image_learner(whole_image_dataloaders(ddsm_data, bs=2), patch.model, widths=(16, 16, 32))
    export_model(whole, out / "whole")
    return out / "patch", out / "whole"


def run_cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the installed `cvfast` entry point in a fresh process (the timeout only guards against a hang: a loaded 2-core
    machine takes over 10 minutes for the 1024x1024 VGG-heatmap run)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cvfast.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)
