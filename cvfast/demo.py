"""The end-to-end demo on the built-in synthetic data (what `cvfast demo` runs)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cvfast.data.ingest import prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.read import WORKING_SIZE, atomic_write_bytes
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import synthesize

log = logging.getLogger(__name__)


def run_demo(out: str | Path, patients: int = 32, synth_size: str = "small", size: tuple[int, int] = WORKING_SIZE,
             patch_size: int = 224, seed: int = 0) -> dict:
    """Synthesize, prepare both layouts, cut the S10 patch set, save training-batch grids; return a report."""
    from cvfast.data.blocks import patch_dataloaders, save_batch_grid, whole_image_dataloaders

    out = Path(out)
    report: dict = {}
    t0 = time.perf_counter()
    synthesize(out / "synthetic", patients=patients, seed=seed, size=synth_size)
    report["synth_s"] = round(time.perf_counter() - t0, 1)
    ddsm = prepare_ddsm(out / "synthetic" / "ddsm", PrepareOptions(out=out / "data" / "ddsm", size=size, seed=seed))
    inbreast = prepare_inbreast(out / "synthetic" / "inbreast", PrepareOptions(out=out / "data" / "inbreast", size=size, seed=seed))
    report["prepare_s"] = round(time.perf_counter() - t0 - report["synth_s"], 1)
    report["ddsm_images"], report["inbreast_images"] = len(ddsm), len(inbreast)
    t1 = time.perf_counter()
    patches = make_patches(out / "data" / "ddsm", replace(PATCH_SETS["s10"], size=patch_size, seed=seed))
    report["patches_s"] = round(time.perf_counter() - t1, 1)
    report["patches"] = patches["label"].value_counts().to_dict()
    report["patch_batch_grid"] = str(save_batch_grid(patch_dataloaders(out / "data" / "ddsm" / "patches_s10", bs=16, seed=seed),
                                                    out / "patch_batch.png"))
    report["whole_batch_grid"] = str(save_batch_grid(whole_image_dataloaders(out / "data" / "ddsm", bs=4, seed=seed),
                                                    out / "whole_batch.png", max_n=4))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    return report
