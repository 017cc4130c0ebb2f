"""The end-to-end demo on the built-in synthetic data (what `cvfast demo` runs)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from cvfast.data.ingest import prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.read import atomic_write_bytes
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import synthesize

log = logging.getLogger(__name__)

DEMO_SIZE = (256, 192)  # a CPU-sized working size; the paper's is 1152x896


def run_demo(out: str | Path, patients: int = 80, synth_size: str = "tiny", size: tuple[int, int] = DEMO_SIZE,
             patch_size: int = 48, seed: int = 0, train: bool = True, transfer: bool = True, epochs_scale: float | None = None) -> dict:
    """synth -> prepare -> S10 patches -> patch model -> whole-image model -> transfer (vs scratch) -> report.

    transfer=False stops after the whole-image model; epochs_scale multiplies every recipe's epochs (notebooks
    use it for quicker runs).
    """
    from cvfast.data.blocks import patch_dataloaders, save_batch_grid, whole_image_dataloaders

    out = Path(out)
    report: dict = {"settings": {"patients": patients, "synth_size": synth_size, "size": list(size), "patch_size": patch_size, "seed": seed}}
    timings: dict = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    synthesize(out / "synthetic", patients=patients, seed=seed, size=synth_size)
    lap("synth")
    ddsm_dir, inbreast_dir = out / "data" / "ddsm", out / "data" / "inbreast"
    ddsm = prepare_ddsm(out / "synthetic" / "ddsm", PrepareOptions(out=ddsm_dir, size=size, seed=seed))
    inbreast = prepare_inbreast(out / "synthetic" / "inbreast", PrepareOptions(out=inbreast_dir, size=size, seed=seed))
    report["data"] = {"ddsm_images": len(ddsm), "inbreast_images": len(inbreast)}
    lap("prepare")
    patches = make_patches(ddsm_dir, replace(PATCH_SETS["s10"], size=patch_size, seed=seed))
    report["data"]["patches"] = patches["label"].value_counts().to_dict()
    lap("patches")
    report["batch_grids"] = [str(save_batch_grid(patch_dataloaders(ddsm_dir / "patches_s10", bs=16, seed=seed), out / "patch_batch.png")),
                             str(save_batch_grid(whole_image_dataloaders(ddsm_dir, bs=4, seed=seed), out / "whole_batch.png", max_n=4))]
    lap("batch_grids")
    if train:
        report["models"] = train_chain(out, ddsm_dir, inbreast_dir, lap, transfer, epochs_scale)
    report["timings_s"] = timings
    report["total_s"] = round(sum(timings.values()), 1)
    write_report(report, out)
    return report


def train_chain(out: Path, ddsm_dir: Path, inbreast_dir: Path, lap, transfer: bool = True, epochs_scale: float | None = None) -> dict:
    """Patch model, whole-image model, transfer and its from-scratch control, with the demo recipes."""
    from cvfast.train.pipeline import finetune, train_patch, train_whole
    from cvfast.train.recipes import load_recipe, resolve

    def recipe(name: str) -> dict:
        return resolve(load_recipe(name), {}, epochs_scale=epochs_scale)

    models = out / "models"
    results = {"patch": train_patch(recipe("demo-patch"), ddsm_dir / "patches_s10", models / "patch")}
    lap("train_patch")
    results["whole"] = train_whole(recipe("demo-whole"), ddsm_dir, models / "patch", models / "whole")
    lap("train_whole")
    if transfer:
        results["finetune"] = finetune(recipe("demo-finetune"), inbreast_dir, models / "whole", models / "finetune")
        lap("finetune")
        results["scratch"] = finetune(recipe("demo-finetune"), inbreast_dir, models / "whole", models / "scratch", scratch=True)
        lap("scratch")
    return {name: {"path": str(r.out), **{k: v for k, v in r.metrics.items() if k != "classes"}} for name, r in results.items()}


def write_report(report: dict, out: Path) -> None:
    """report.json and report.md."""
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    lines = ["# cvfast demo report", "", f"Settings: {report['settings']}", "", f"Data: {report['data']}", ""]
    models = report.get("models", {})
    if models:
        lines += ["| model | held-out split | metric | value |", "|---|---|---|---|"]
        p = models["patch"]
        lines.append(f"| patch classifier (5 classes, chance 0.20) | DDSM-like test patches | accuracy | {p.get('test_accuracy', float('nan')):.3f} |")
        lines.append(f"| patch classifier | DDSM-like test patches | macro one-vs-rest AUC | {p.get('test_macro_auc', float('nan')):.3f} |")
        for name, label in [("whole", "whole-image classifier | DDSM-like test images"),
                            ("finetune", "transfer (image labels only) | INbreast-like test images"),
                            ("scratch", "same architecture from scratch, same budget | INbreast-like test images")]:
            if name in models:
                lines.append(f"| {label} | ROC AUC | {models[name].get('test_auc', float('nan')):.3f} |")
    lines += ["", f"Timings (s): {report['timings_s']}; total {report['total_s']} s."]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
