"""Benchmark (method): what each part of the method and each fidelity fix changes, on the hard synthetic data.

For each seed (data, splits and training all follow it): the demo's data stages (`hard` synthetic data, 256x192,
S10 patches of 48) and the demo's recipes, then one variant at a time against the paper's configuration
(EfficientNet-Lite0 patch classifier from ImageNet weights, no heatmap, ResNet top, every fix of the fidelity issue):

- random init: the patch classifier from random weights (the paper's random-init schedule);
- heatmap: the whole-image model on the patch classifier's heatmap (the reference's AvgPool -> FC + ReLU -> MaxPool);
- VGG top: two VGG blocks instead of the two ResNet bottleneck blocks;
- separate means (reference): patches normalised by the patch set's own mean, whole images by theirs (data.mean);
- decoupled weight decay: fastai's decoupled decay instead of Keras' L2 in the gradient (train.weight_decay);
- unscaled input (reference): the ImageNet filters summed to one channel without the weights' 1/std (model.fold_input_std);
- breast crop: the same recipes on images cropped to the breast before resizing (`prepare --crop breast`).

Each variant reuses every model its configuration shares with the others (a whole-image variant trains on the same
patch classifier), and is scored by whole-image test AUC (DDSM-like) and transfer test AUC (INbreast-like, image
labels only); the from-scratch control of the transfer is trained once per seed. Reported: mean and sd over seeds, and
the paired difference from the paper's configuration (mean, sd, and how many seeds moved the same way).

    python bench/ablations.py [--seeds 0 1 2] [--patients 80] [--epochs-scale 1.0] [--only heatmap vgg-top]

Resumable: every model trains into its own folder under bench/out/ablations/ (a killed run continues from its last
epoch), every finished (seed, variant) is a JSON file there, and a re-run does only what is missing; two processes
(one per core, e.g. `--seeds 1` and `--seeds 2`) can run at once: each (seed, variant) is claimed by a lock file; `--summary-only`
writes the table of what is done. Cost at the demo's scale, one thread each, measured beside other jobs: 19 min for the
random-init variant (patch, whole-image and transfer models retrained), 46 min for the heatmap variant while the test
suite also ran -- roughly 1.5 hours of an idle 2-core machine per seed. At 40 women and half the epochs the chain does
not learn (whole-image AUC 0.40), so such a table would only show noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import publish  # noqa: E402
from bench._train import OUT, finished, machine, reproduce, save_md, today  # noqa: E402
from cvfast.data.crop import CropSpec  # noqa: E402
from cvfast.data.ingest import prepare_ddsm, prepare_inbreast  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.sample import PATCH_SETS, make_patches  # noqa: E402
from cvfast.demo import demo_data  # noqa: E402
from cvfast.train.pipeline import finetune, train_patch, train_whole  # noqa: E402
from cvfast.train.recipes import fingerprint, load_recipe, resolve  # noqa: E402
from cvfast.util.files import atomic_write_bytes  # noqa: E402

NAME = "ablations"
log = logging.getLogger("ablations")

# variant -> overrides of the demo recipes, per step ({step: {section: {key: value}}})
# The table's scale, pinned here (not the demo's defaults) so the published results stay resumable and comparable.
SIZE, PATCH_SIZE = (256, 192), 48
VARIANTS: dict[str, dict[str, dict[str, dict]]] = {
    "paper": {},
    "random-init": {"patch": {"model": {"pretrained": False}}},
    "heatmap": {"whole": {"model": {"heatmap": True}}},
    "vgg-top": {"whole": {"model": {"top": "vgg"}}},
    "separate-means": {"patch": {"data": {"mean": "reference"}}, "whole": {"data": {"mean": "reference"}}},
    # the demo's patch stages decay nothing (wd 0), so only the whole-image and transfer steps change
    "decoupled-wd": {step: {"train": {"weight_decay": "decoupled"}} for step in ("whole", "finetune")},
    "unscaled-input": {"patch": {"model": {"fold_input_std": False}}},
    "breast-crop": {},  # the same recipes on images cropped to the breast before resizing (DATA_VARIANTS)
}
# variants that change the prepared data rather than a recipe: the crop applied by `prepare --crop breast`
DATA_VARIANTS = {"breast-crop": CropSpec(breast=True)}
LABELS = {"paper": "the paper's configuration (ImageNet init, no heatmap, ResNet top, all fixes)",
          "random-init": "patch classifier from random init", "heatmap": "with the heatmap", "vgg-top": "VGG top instead of ResNet",
          "separate-means": "fix off: separate patch and image means", "decoupled-wd": "fix off: decoupled weight decay",
          "unscaled-input": "fix off: unscaled input (no 1/std)", "breast-crop": "images cropped to the breast before resizing"}


def key(*parts: object) -> str:
    """Short stable name of a configuration (the folder its model trains in)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def recipe(name: str, overrides: dict, seed: int, scale: float) -> dict:
    """A demo recipe with a variant's overrides and the seed."""
    over = {section: dict(values) for section, values in overrides.items()}
    over.setdefault("train", {})["seed"] = seed
    return resolve(load_recipe(name), over, epochs_scale=scale)


def run_seed(seed: int, variants: list[str], args: argparse.Namespace) -> None:
    """Data stages once, then each variant's missing models; one JSON per finished variant."""
    work = args.work / f"seed{seed}"
    if not (work / "data" / "ddsm" / "patches_s10" / "patchset.json").is_file():
        if not (work / "synthetic" / "ground_truth.json").is_file():
            shutil.rmtree(work / "synthetic", ignore_errors=True)  # a kill inside synth: this run's own partial data, redone
        demo_data(work, patients=args.patients, size=SIZE, patch_size=PATCH_SIZE, seed=seed, difficulty="hard")
    models = work / "models"
    for name in variants:
        over = VARIANTS[name]
        ddsm, inbreast = _data(work, name, seed)
        recipes = {"patch": recipe("demo-patch", over.get("patch", {}), seed, args.epochs_scale),
                   "whole": recipe("demo-whole", over.get("whole", {}), seed, args.epochs_scale),
                   "finetune": recipe("demo-finetune", over.get("finetune", {}), seed, args.epochs_scale)}
        # a model folder is named by everything that trained it: its recipe and the folders of the models it starts from
        tag = (name,) if name in DATA_VARIANTS else ()  # other data, other models: never the paper's folders
        patch_dir = models / f"patch-{key(*tag, recipes['patch'])}"
        whole_dir = models / f"whole-{key(patch_dir.name, recipes['whole'])}"
        ft_dir = models / f"finetune-{key(whole_dir.name, recipes['finetune'])}"
        scratch_dir = models / f"scratch-{key(whole_dir.name, recipes['finetune'])}"
        done = work / f"{name}.json"
        fingerprints = {step: fingerprint(r) for step, r in recipes.items()}
        if done.is_file() and json.loads(done.read_text()).get("fingerprints") == fingerprints:
            continue
        if not _claim(done):
            log.info("seed %d %s: another ablations process is training it; skipped here", seed, name)
            continue
        t = time.perf_counter()
        patch = finished(patch_dir, recipes["patch"]) or train_patch(recipes["patch"], ddsm / "patches_s10", patch_dir).metrics
        whole = finished(whole_dir, recipes["whole"]) or train_whole(recipes["whole"], ddsm, patch_dir, whole_dir).metrics
        ft = finished(ft_dir, recipes["finetune"]) or finetune(recipes["finetune"], inbreast, whole_dir, ft_dir).metrics
        result = {"seed": seed, "variant": name, "fingerprints": fingerprints, "patch_init": patch.get("init"),
                  "patch_accuracy": patch.get("test_accuracy"), "whole_auc": whole.get("test_auc"), "transfer_auc": ft.get("test_auc"),
                  "minutes": (time.perf_counter() - t) / 60}
        if name == "paper":
            scratch = finished(scratch_dir, recipes["finetune"]) or finetune(recipes["finetune"], inbreast, whole_dir, scratch_dir, scratch=True).metrics
            result["scratch_auc"] = scratch.get("test_auc")
        atomic_write_bytes(done, json.dumps(result, indent=1).encode())
        done.with_suffix(".lock").unlink(missing_ok=True)
        log.info("seed %d %s: whole AUC %.3f, transfer AUC %.3f (%.1f min)", seed, name, result["whole_auc"], result["transfer_auc"], result["minutes"])


def _claim(done: Path) -> bool:
    """Take the (seed, variant) for this process, so that two processes (one per core) never train into one folder.

    A lock left by a killed process (its pid gone) is taken over.
    """
    lock = done.with_suffix(".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # its holder is alive
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # stale: try once more
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _data(work: Path, name: str, seed: int) -> tuple[Path, Path]:
    """The DDSM-like and INbreast-like DATA folders a variant trains on: the demo's, or prepared again with its crop."""
    if name not in DATA_VARIANTS:
        return work / "data" / "ddsm", work / "data" / "inbreast"
    data = work / f"data-{name}"
    opts = dict(size=SIZE, seed=seed, crop=DATA_VARIANTS[name])
    if not (data / "ddsm" / "patches_s10" / "patchset.json").is_file():  # each step resumes on its own
        prepare_ddsm(work / "synthetic" / "ddsm", PrepareOptions(out=data / "ddsm", **opts))
        prepare_inbreast(work / "synthetic" / "inbreast", PrepareOptions(out=data / "inbreast", **opts))
        make_patches(data / "ddsm", replace(PATCH_SETS["s10"], size=PATCH_SIZE, seed=seed))
    return data / "ddsm", data / "inbreast"


def stats(values: list[float]) -> str:
    """mean ± sd."""
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"  # one seed has no spread to show


def paired(values: dict[int, float], base: dict[int, float]) -> str:
    """Mean ± sd of the per-seed difference from the paper's configuration, and the seeds that moved each way."""
    d = np.asarray([values[k] - base[k] for k in sorted(values) if k in base], float)
    if len(d) < 2:
        return f"{d.mean():+.3f} (one seed)"
    return f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({int((d > 0).sum())} up, {int((d < 0).sum())} down)"


def summary(results: dict[str, dict[int, dict]], args: argparse.Namespace) -> list[str]:
    """The section: one row per variant, whole-image and transfer AUC over its seeds done, paired by seed with the paper's."""
    base = results["paper"]
    missing = sum(len(args.seeds) - len(rs) for rs in results.values())
    lines = [f"### ablations on the hard synthetic data ({today()}, {machine()}, torch {torch.__version__}, CPU)", "",
             f"Reproduce: `{reproduce('ablations.py', sys.argv[1:])}`.", "",
             (f"**Partial: {missing} of {len(args.seeds) * len(results)} (seed, variant) runs still to do** (re-run the same command to "
              "continue; the 'seeds' column says which are in each row). " if missing else "")
             + f"Seeds {', '.join(map(str, args.seeds))} (data, splits and training follow the seed); {args.patients} synthetic women per dataset, "
             f"`hard` difficulty, 256x192 images, S10 patches of 48; the demo recipes with epochs x{args.epochs_scale:g}. Test sets per seed: "
             f"~{int(args.patients * 0.2 * 2.6)} DDSM-like and ~{int(args.patients * 0.2 * 3.5)} INbreast-like images, so one seed's AUC "
             "moves by several points by chance: read the paired differences and their sd.", "",
             "| variant | seeds | patch test accuracy | whole-image test AUC | vs paper | transfer test AUC | vs paper |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, rs in results.items():
        if not rs:
            lines.append(f"| {LABELS[name]} | none yet | | | | | |")
            continue
        w, f = {k: r["whole_auc"] for k, r in rs.items()}, {k: r["transfer_auc"] for k, r in rs.items()}
        vs = name != "paper"
        lines.append(f"| {LABELS[name]} | {', '.join(map(str, sorted(rs)))} | {stats([r['patch_accuracy'] for r in rs.values()])} | "
                     f"{stats(list(w.values()))} | {paired(w, {k: r['whole_auc'] for k, r in base.items()}) if vs else '--'} | "
                     f"{stats(list(f.values()))} | {paired(f, {k: r['transfer_auc'] for k, r in base.items()}) if vs else '--'} |")
    scratch, transfer = {k: r["scratch_auc"] for k, r in base.items()}, {k: r["transfer_auc"] for k, r in base.items()}
    lines.append(f"| same architecture from scratch on the INbreast-like set (the transfer's control) | {', '.join(map(str, sorted(base)))} | | | | "
                 f"{stats(list(scratch.values()))} | {paired(scratch, transfer)} |")
    return lines


def main() -> None:
    """Run the missing (seed, variant) pairs, then write the table when all are done."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patients", type=int, default=80, help="synthetic women per dataset (the demo: 80)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply the demo recipes' epochs")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None, help="run only these variants this time")
    ap.add_argument("--summary-only", action="store_true", help="train nothing: write the table of what is done")
    ap.add_argument("--work", type=Path, default=OUT / "ablations")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--md-out", default=None, help="also write the section's Markdown to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work = args.work / f"p{args.patients}-e{args.epochs_scale:g}"
    variants = ["paper"] + [v for v in (args.only or VARIANTS) if v != "paper"]
    for seed in [] if args.summary_only else args.seeds:
        run_seed(seed, variants, args)
    results = {name: {s: json.loads((args.work / f"seed{s}" / f"{name}.json").read_text()) for s in args.seeds
                      if (args.work / f"seed{s}" / f"{name}.json").is_file()} for name in VARIANTS}
    if not results["paper"]:
        print(f"no seed of the paper's configuration done yet ({args.work}); re-run to continue")
        return
    lines = summary(results, args)
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)


if __name__ == "__main__":
    main()
