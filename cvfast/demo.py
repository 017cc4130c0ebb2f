"""The end-to-end demo on the built-in synthetic data (what `cvfast demo` runs)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from sklearn.metrics import roc_auc_score

from cvfast.data.ingest import prepare_ddsm, prepare_inbreast
from cvfast.data.ingest.common import PrepareOptions
from cvfast.data.sample import PATCH_SETS, make_patches
from cvfast.data.synth import synthesize
from cvfast.stats import patient_bootstrap_aucs, percentile_ci
from cvfast.util.files import atomic_write_bytes

log = logging.getLogger(__name__)

DEMO_SIZE = (256, 192)  # a CPU-sized working size; the paper's is 1152x896


def run_demo(out: str | Path, patients: int = 80, synth_size: str = "tiny", size: tuple[int, int] = DEMO_SIZE,
             patch_size: int = 48, seed: int = 0, difficulty: str = "hard", train: bool = True, transfer: bool = True,
             epochs_scale: float | None = None) -> dict:
    """synth -> prepare -> S10 patches -> patch model -> whole-image model -> transfer (vs scratch) -> report.

    transfer=False stops after the whole-image model; epochs_scale multiplies every recipe's epochs (notebooks
    use it for quicker runs).
    """
    from cvfast.data.blocks import patch_dataloaders, save_batch_grid, whole_image_dataloaders

    out = Path(out)
    report: dict = {"settings": {"patients": patients, "synth_size": synth_size, "size": list(size), "patch_size": patch_size, "seed": seed,
                                 "difficulty": difficulty}}
    timings: dict = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    ddsm_dir, inbreast_dir, report["data"] = demo_data(out, patients, synth_size, size, patch_size, seed, difficulty, lap)
    report["batch_grids"] = [str(save_batch_grid(patch_dataloaders(ddsm_dir / "patches_s10", bs=16, seed=seed), out / "patch_batch.png")),
                             str(save_batch_grid(whole_image_dataloaders(ddsm_dir, bs=4, seed=seed), out / "whole_batch.png", max_n=4))]
    lap("batch_grids")
    if train:
        report["models"] = train_chain(out, ddsm_dir, inbreast_dir, lap, transfer, epochs_scale)
    report["timings_s"] = timings
    report["total_s"] = round(sum(timings.values()), 1)
    write_report(report, out)
    return report


def demo_data(out: Path, patients: int = 80, synth_size: str = "tiny", size: tuple[int, int] = DEMO_SIZE, patch_size: int = 48,
              seed: int = 0, difficulty: str = "hard", lap=lambda name: None) -> tuple[Path, Path, dict]:
    """The demo's data stages: synthetic data -> prepared DDSM-like and INbreast-like DATA folders -> the S10 patch set."""
    synthesize(out / "synthetic", patients=patients, seed=seed, size=synth_size, difficulty=difficulty)
    lap("synth")
    ddsm_dir, inbreast_dir = out / "data" / "ddsm", out / "data" / "inbreast"
    ddsm = prepare_ddsm(out / "synthetic" / "ddsm", PrepareOptions(out=ddsm_dir, size=size, seed=seed))
    inbreast = prepare_inbreast(out / "synthetic" / "inbreast", PrepareOptions(out=inbreast_dir, size=size, seed=seed))
    lap("prepare")
    patches = make_patches(ddsm_dir, replace(PATCH_SETS["s10"], size=patch_size, seed=seed))
    lap("patches")
    return ddsm_dir, inbreast_dir, {"ddsm_images": len(ddsm), "inbreast_images": len(inbreast), "patches": patches["label"].value_counts().to_dict()}


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
    report = {name: {"path": str(r.out), **{k: v for k, v in r.metrics.items() if k != "classes"}} for name, r in results.items()}
    if transfer:
        report["transfer_vs_scratch"] = paired_difference(results["finetune"].learn, results["scratch"].learn, inbreast_dir)
    return report


def paired_difference(a, b, data: Path, n_boot: int = 2000) -> dict:
    """Test AUC of learner a minus learner b on the same images, with a patient-bootstrap 95% CI (paired resamples)."""
    from cvfast.train.heldout import heldout_scores

    both = heldout_scores(a, data).merge(heldout_scores(b, data)[["image_id", "p_cancer"]], on="image_id", suffixes=("_a", "_b"),
                                         validate="one_to_one")
    y, scores = both["label"].to_numpy(), [both["p_cancer_a"].to_numpy(), both["p_cancer_b"].to_numpy()]
    if len(set(y)) < 2:
        return {}  # a test split with one class has no AUC (heldout_whole_metrics warns)
    boots = patient_bootstrap_aucs(y, scores, both["patient_id"].to_numpy(), n_boot=n_boot)
    return {"difference": float(roc_auc_score(y, scores[0]) - roc_auc_score(y, scores[1])),
            "ci95": percentile_ci(boots[:, 0] - boots[:, 1]),
            "images": int(len(both)), "patients": int(both["patient_id"].nunique())}


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
                lo, hi = models[name].get("test_auc_ci95", (float("nan"), float("nan")))
                lines.append(f"| {label} | ROC AUC [patient-bootstrap 95% CI] | {models[name].get('test_auc', float('nan')):.3f} [{lo:.3f}, {hi:.3f}] |")
        if models.get("transfer_vs_scratch"):
            d = models["transfer_vs_scratch"]
            lines.append(f"| transfer minus scratch | the same {d['images']} INbreast-like test images ({d['patients']} women) | "
                         f"AUC difference [paired 95% CI] | {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
    lines += ["", f"Timings (s): {report['timings_s']}; total {report['total_s']} s."]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
