"""`cvfast crossval`: train and score every fold of a prepared dataset, resumably, then pool and report.

Per fold (patients of the other folds train; a validation split is drawn from them): the fold's DATA folder (the
manifest with its splits, pointing into the shared cache) -> for `patch` and `chain`: the patch set cut from it, the
patch classifier (its epoch chosen on validation malignant-vs-rest AUC by the recipe), its max malignant probability
over each held-out image's breast windows (`p_max`), the out-of-fold patch metrics and the pointing game -> for
`chain`: the whole-image model trained end to end from it (`p_top`, the paper's score) -> for `finetune`: a given
whole-image model fine-tuned with image labels only (`p_top`). On the same folds: the frozen-ImageNet linear probe
(`p_probe`, when the data has ROIs), mean brightness and a density prior. A fold's result is written atomically once
done; a re-run skips finished folds whose settings, recipes and data are unchanged and resumes an interrupted training
from its last epoch checkpoint, so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cvfast.crossval.folds import make_folds, write_fold_data
from cvfast.crossval.report import finite, write_report
from cvfast.crossval.scores import (
    WindowScores,
    auc,
    brightness,
    class_probabilities_fn,
    density_prior,
    image_window_scores,
    lesion_type,
    malignant_fn,
    malignant_masks,
    pointing_game,
    working_image,
)
from cvfast.data.classes import MALIGNANT_PATCH_CLASSES, PATCH_CLASSES
from cvfast.data.crop import segment_breast
from cvfast.data.manifest import manifest_digest, read_manifest
from cvfast.data.sample import PATCH_SETS, check_patch_set, make_patches
from cvfast.errors import CvfastError
from cvfast.infer.evaluate import EvalSettings
from cvfast.infer.review import ReviewSettings, review
from cvfast.models.artifact import load_model
from cvfast.models.windows import breast_peak, score_tiles, window_heatmap
from cvfast.train.heldout import predict_frame
from cvfast.train.pipeline import finetune, train_patch, train_whole
from cvfast.train.probe import ProbeSpec, fit_probe, frozen_body, image_window_features, malignant_probability, patch_features
from cvfast.train.recipes import fingerprint, load_recipe, resolve, typed
from cvfast.train.runtime import Runtime
from cvfast.util.files import atomic_write_bytes, refuse_overwrite

log = logging.getLogger(__name__)

STAGES = ("patch", "chain", "finetune")
RESULTS = "results"


@dataclass
class CrossvalSpec:
    """What a cross-validation runs: folds, stage(s), recipes and the window scoring."""

    folds: int = 5
    seed: int = 0
    valid_frac: float = 0.2  # of each fold's training patients, for epoch selection
    stages: str = "chain"  # patch: the patch classifier (scored by its max over breast windows); chain: + the whole-image model; finetune
    patch_recipe: str = "mias-cpu-patch"
    whole_recipe: str = "mias-cpu-whole"
    finetune_recipe: str = "finetune-inbreast"
    model: str | None = None  # finetune: the whole-image model to start from
    patch_set: str = "s10"
    patch_size: int = 48  # cut patch side in working-size pixels (the window the patch model and probe read)
    edge_share: float = 0.0  # of the background patches, the share on the breast's edge (skin line, chest wall)
    epochs_scale: float = 1.0
    weights: str | None = None  # a local weights file for the patch recipe's arch (default: packaged ImageNet weights / hub)
    probe: bool = True  # the frozen-ImageNet linear probe on the same folds (needs ROIs)
    probe_c: float = 0.1
    stride: int | None = None  # window stride in working pixels (None: patch_size // 4)
    only: list[int] | None = field(default=None)  # run just these folds this time (the report waits for all)
    review: bool = True  # also the review page (cvfast review) of the pooled out-of-fold predictions

    def __post_init__(self):
        if self.stages not in STAGES:
            raise CvfastError(f"--stages {self.stages!r}: expected one of {', '.join(STAGES)}")
        if self.stages == "finetune" and not self.model:
            raise CvfastError("--stages finetune needs --model (a whole-image model to fine-tune)")
        if not 0 < self.valid_frac < 1:
            raise CvfastError(f"--valid-frac {self.valid_frac}: in (0, 1) -- every training stage chooses its epoch on validation patients")
        if self.patch_set not in PATCH_SETS:
            raise CvfastError(f"--patch-set {self.patch_set}: expected one of {', '.join(PATCH_SETS)}")
        if not 0 <= self.edge_share <= 1:
            raise CvfastError(f"--edge-share {self.edge_share}: a share of the background patches, in [0, 1]")
        if self.patch_size < 8 or (self.stride is not None and self.stride < 1) or self.epochs_scale <= 0:
            raise CvfastError("--patch-size must be at least 8, --stride at least 1, --epochs-scale above 0")


def _recipes(spec: CrossvalSpec) -> dict[str, dict]:
    """The resolved recipes of the stages that run."""
    out = {}
    if spec.stages in ("patch", "chain"):
        out["patch"] = resolve(load_recipe(spec.patch_recipe), {}, epochs_scale=spec.epochs_scale)
    if spec.stages == "chain":
        out["whole"] = resolve(load_recipe(spec.whole_recipe), {}, epochs_scale=spec.epochs_scale)
    if spec.stages == "finetune":
        out["finetune"] = resolve(load_recipe(spec.finetune_recipe), {}, epochs_scale=spec.epochs_scale)
    return out


def fold_key(spec: CrossvalSpec, recipes: dict[str, dict], data_digest: str, splits: dict[str, str]) -> str:
    """What a finished fold must match to be reused: the settings, the recipes' contents, the data and the fold's splits."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("only", "review")}
    if not settings["edge_share"]:  # the paper's sampler: keys of runs made before the option existed stay valid
        del settings["edge_share"]
    blob = json.dumps([settings, {k: fingerprint(r) for k, r in recipes.items()}, data_digest, sorted(splits.items())], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def crossval(data: str | Path, out: str | Path, spec: CrossvalSpec | None = None, runtime: Runtime | None = None) -> dict | None:
    """Cross-validate on a prepared DATA folder into OUT; returns the report (None while folds remain: re-run to continue)."""
    spec, runtime = spec or CrossvalSpec(), runtime or Runtime()
    data, out = Path(data), Path(out)
    df = read_manifest(data)
    refuse_overwrite([out / "report.md", out / "report.json", out / "predictions.csv"], [data / "manifest.csv", *df["path"]],
                     hint="choose another --out for the cross-validation")
    has_rois = any(a.get("mask") and a.get("patch_class") for abns in df["abnormalities"] for a in abns)
    if spec.stages in ("patch", "chain") and not has_rois:
        raise CvfastError(f"{data}: no image has an ROI mask, so no patch classifier can be trained; use --stages finetune --model M "
                          "(a whole-image model) for a dataset with image labels only")
    recipes = _recipes(spec)
    with_probe = has_rois and spec.probe and _probe_available(recipes["patch"], spec) if "patch" in recipes else False
    folds = make_folds(df, spec.folds, spec.seed, spec.valid_frac)
    digest = f"{manifest_digest(data)}:{working_image(df['path'].iloc[0]).shape}"  # re-prepared at another size: other images
    atomic_write_bytes(out / "folds.json", json.dumps({"spec": asdict(spec), "folds": folds}, indent=1).encode())
    todo = spec.only if spec.only is not None else range(spec.folds)
    for k in todo:
        if not 0 <= k < spec.folds:
            raise CvfastError(f"--only {k}: folds are 0..{spec.folds - 1}")
    paths = dict(zip(df["image_id"], df["path"]))
    means = {i: float(working_image(p).mean()) for i, p in paths.items()}  # for the brightness baseline, read once
    for k in todo:
        key = fold_key(spec, recipes, digest, folds[k])
        path = out / RESULTS / f"fold{k}.json"
        if _reusable(path, key):
            log.info("fold %d: done earlier (%s)", k, path)
            continue
        t = time.perf_counter()
        result = run_fold(k, df, folds[k], spec, recipes, out, runtime, paths, means, with_probe, key)
        result |= {"fold": k, "key": key, "minutes": round((time.perf_counter() - t) / 60, 2)}
        atomic_write_bytes(path, json.dumps(finite(result), indent=1).encode())
        log.info("fold %d: %s (%.1f min)", k, ", ".join(f"{c} AUC {v:.3f}" for c, v in result["fold_auc"].items()), result["minutes"])
    results = [json.loads(p.read_text()) for k in range(spec.folds)
               if _reusable(p := out / RESULTS / f"fold{k}.json", fold_key(spec, recipes, digest, folds[k]))]
    if len(results) < spec.folds:
        log.info("%d of %d folds done; re-run the same command to continue (finished folds are kept)", len(results), spec.folds)
        return None
    report = write_report(results, df, spec, recipes, out)
    if spec.review:  # the operating point of pooled out-of-fold scores is descriptive: no held-out split is left to choose it on
        review(out / "predictions.csv", out / "review", None, EvalSettings(split=None, thresholds_from=None, seed=spec.seed),
               ReviewSettings(errors=0))
    return report


def _probe_available(patch_recipe: dict, spec: CrossvalSpec) -> bool:
    """Whether the probe's pretrained body loads here (checked once, before any fold: no weights is a warning, not a failure)."""
    try:
        frozen_body(patch_recipe["model"]["arch"], spec.weights)
        return True
    except CvfastError as e:
        log.warning("no frozen linear probe on these folds: %s", e)
        return False


def _reusable(path: Path, key: str) -> bool:
    """Whether a fold result exists and was made with these settings, recipes, data and splits."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("key") == key
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged result: the fold runs again


def run_fold(k: int, df: pd.DataFrame, splits: dict[str, str], spec: CrossvalSpec, recipes: dict[str, dict], out: Path,
             runtime: Runtime, paths: dict[str, str], means: dict[str, float], with_probe: bool, key: str) -> dict:
    """Train and score fold k; return its result (predictions of the held-out images, diagnostics, counts, times)."""
    work = out / f"fold{k}"
    data = work / "data"
    # the fold's folder holds patch sets and checkpoints of one key only: resuming another split's training would let
    # patients now held out into it, and a patch set cut with other settings would pass as this one's
    stamp = work / "key.txt"
    if work.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != key):
        shutil.rmtree(work)
    atomic_write_bytes(stamp, key.encode())
    fold = write_fold_data(df, splits, data)
    test = fold[fold["split"] == "test"].reset_index(drop=True)
    ids = test["image_id"].tolist()
    scores: dict[str, np.ndarray] = {}
    extra: dict = {"times": {}}
    stride = spec.stride or max(1, spec.patch_size // 4)
    t = time.perf_counter()
    if spec.stages in ("patch", "chain"):
        images = {i: working_image(paths[i]) for i in ids}  # the held-out images only: a large dataset's cache never sits in memory
        patches = work / "patches"
        try:
            check_patch_set(patches)  # the fold's own (its folder holds one key's work only)
        except CvfastError:
            make_patches(data, replace(PATCH_SETS[spec.patch_set], size=spec.patch_size, seed=spec.seed, edge_share=spec.edge_share),
                         out=patches, workers=runtime.workers or None)
        extra["times"]["patches_s"] = round(time.perf_counter() - t, 1)
        plist = pd.read_csv(patches / "patches.csv")
        test_patches = plist[plist["split"] == "test"]
        if with_probe:
            t = time.perf_counter()
            scores["p_probe"], extra["probe"] = _probe(plist, patches, test, images, spec, recipes["patch"], stride)
            extra["times"]["probe_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        done = work / "patch" / "crossval-done.json"
        if not done.is_file():  # a kill during the whole-image step: the finished patch model is kept, not trained again
            patch = train_patch(recipes["patch"], patches, work / "patch", weights=spec.weights, runtime=runtime)
            atomic_write_bytes(done, json.dumps({"init": patch.metrics.get("init")}).encode())
            del patch
        extra["patch_init"] = json.loads(done.read_text())["init"]
        extra["times"]["patch_s"] = round(time.perf_counter() - t, 1)
        model = load_model(work / "patch")[0].float().eval()
        info = model.info
        mean, fed, window = float(info["mean_grey"]), int(info["size"][0]), int(info.get("crop") or info["size"][0])
        t = time.perf_counter()
        with torch.no_grad():
            windows = image_window_scores(malignant_fn(model, info["classes"]), images, ids, window, stride, mean, fed,
                                          f"fold {k}: patch model over breast windows")
            scores["p_max"] = np.array([windows[i].peak[0] for i in ids])
            extra["patch_oof"] = _patch_oof(model, info["classes"], test_patches, patches, mean, fed)
        extra["pointing"] = _pointing(test, windows)
        extra["times"]["patch_scoring_s"] = round(time.perf_counter() - t, 1)
    if spec.stages == "chain":
        t = time.perf_counter()
        whole = train_whole(recipes["whole"], data, work / "patch", work / "whole", runtime=runtime)
        extra["times"]["whole_s"] = round(time.perf_counter() - t, 1)
        with whole.learn.no_bar():
            scores["p_top"] = predict_frame(whole.learn, test)[:, 1]
        del whole
    if spec.stages == "finetune":
        t = time.perf_counter()
        tuned = finetune(recipes["finetune"], data, spec.model, work / "finetune", runtime=runtime)
        extra["times"]["finetune_s"] = round(time.perf_counter() - t, 1)
        with tuned.learn.no_bar():
            scores["p_top"] = predict_frame(tuned.learn, test)[:, 1]
        del tuned
    scores["brightness"] = brightness(fold, means)
    prior = density_prior(fold)
    if prior is not None:
        scores["density_prior"] = prior
    y = test["label"].to_numpy()
    counts = {s: {"images": int((fold["split"] == s).sum()), "cancer_images": int(fold.loc[fold["split"] == s, "label"].sum()),
                  "patients": int(fold.loc[fold["split"] == s, "patient_id"].nunique())} for s in ("train", "valid", "test")}
    keep = [c for c in ("patient_id", "side", "view", "label", "path") if c in test.columns]
    preds = [{"image_id": r["image_id"], **{c: (int(r[c]) if c == "label" else str(r[c])) for c in keep},
              "abnormal": int(len(r["abnormalities"]) > 0), "lesion_type": lesion_type(r["abnormalities"]) if r["label"] else "",
              **{name: float(s[j]) for name, s in scores.items()}} for j, r in test.iterrows()]
    return {"counts": counts, "fold_auc": {name: auc(y, s) for name, s in scores.items()}, "predictions": preds, **extra}


def _probe(plist: pd.DataFrame, patches: Path, test: pd.DataFrame, images: dict[str, np.ndarray], spec: CrossvalSpec, recipe: dict,
           stride: int) -> tuple[np.ndarray, dict]:
    """The frozen linear probe of the fold: fitted on the training folds' patches, the max over each held-out image's windows."""
    info = json.loads((patches / "patchset.json").read_text())
    cfg = typed(recipe, validate=False)  # resolved and checked by the fold already
    fed = cfg.data.size
    pspec = ProbeSpec(arch=cfg.model.arch, window=spec.patch_size, fed=int(fed) if fed else None, stride=stride, c=spec.probe_c,
                      mean_grey=float(info["mean_grey"]))
    body = frozen_body(pspec.arch, spec.weights)
    fit_rows = plist[plist["split"] != "test"]
    probe = fit_probe(patch_features(body, [patches / p for p in fit_rows["path"]], pspec), fit_rows["label"], pspec.c, spec.seed)
    held = plist[plist["split"] == "test"]
    p_held = malignant_probability(probe, patch_features(body, [patches / p for p in held["path"]], pspec))
    scores = []
    for i in test["image_id"]:
        features, centres = image_window_features(body, images[i], pspec)
        heat = window_heatmap(images[i].shape, centres, malignant_probability(probe, features), pspec.window)
        scores.append(breast_peak(heat, segment_breast(images[i]))[0])
    scores = np.array(scores)
    return scores, {"patch_malignant_auc": auc(held["label"].isin(MALIGNANT_PATCH_CLASSES), p_held), "arch": pspec.arch,
                    "fed": pspec.fed, "c": pspec.c}


def _patch_oof(model: torch.nn.Module, classes: list[str], held: pd.DataFrame, patches: Path, mean: float, fed: int) -> dict:
    """The patch model on the fold's held-out patches: lesion-vs-background and malignant-vs-rest AUC, accuracy."""
    if held.empty:
        return {}
    probs = score_tiles(class_probabilities_fn(model), np.stack([working_image(str(patches / p)) for p in held["path"]]), mean, fed)
    labels = held["label"].to_numpy()
    mal = [classes.index(c) for c in MALIGNANT_PATCH_CLASSES]
    return {"patches": int(len(held)), "lesion_auc": auc(labels != "background", 1 - probs[:, classes.index("background")]),
            "malignant_auc": auc(np.isin(labels, MALIGNANT_PATCH_CLASSES), probs[:, mal].sum(1)),
            "accuracy": float((np.array(classes)[probs.argmax(1)] == labels).mean()),
            "labels": labels.tolist(), "p_malignant": probs[:, mal].sum(1).round(5).tolist(),
            "p_lesion": (1 - probs[:, classes.index("background")]).round(5).tolist(), "classes": PATCH_CLASSES}


def _pointing(test: pd.DataFrame, windows: dict[str, WindowScores]) -> list[dict]:
    """The pointing game over the fold's held-out cancer images that have lesion masks."""
    out = []
    for _, r in test[test["label"] == 1].iterrows():
        g = pointing_game(windows[r["image_id"]], malignant_masks(r))
        if g is not None:
            out.append({"image_id": r["image_id"], **g})
    return out
