"""The cross-validation report: pooled out-of-fold AUCs with patient-bootstrap CIs, baselines, diagnostics, Markdown + JSON.

Every held-out image is scored once, by the model of the fold that held it out; pooled AUCs are computed over all of
them, with 95% CIs from resampling patients (a patient's images move together). Breast = the max over a breast's
views, patient = the max over her images. The paired difference of two scores is taken over the same resamples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cvfast.crossval.scores import auc
from cvfast.data.manifest import write_csv
from cvfast.stats import patient_bootstrap_aucs, percentile_ci
from cvfast.util.files import atomic_write_bytes

log = logging.getLogger(__name__)

N_BOOT = 2000
# score column -> what it is, in the report's order
SCORES = {
    "p_top": "whole-image model (all-convolutional top, the paper's)",
    "p_max": "patch classifier, max over breast windows (no training beyond the patch step)",
    "p_probe": "frozen ImageNet linear probe, max over breast windows",
    "brightness": "mean brightness",
    "density_prior": "breast-density prior",
    "chance": "chance",
}
LESION_TYPES = ("mass", "calcification", "distortion/asymmetry")


def pooled_predictions(results: list[dict]) -> pd.DataFrame:
    """One row per held-out image (each scored by the model of the fold that held it out), with its fold; chance = 0.5."""
    df = pd.DataFrame([dict(p, fold=r["fold"]) for r in sorted(results, key=lambda r: r["fold"]) for p in r["predictions"]])
    if df["image_id"].duplicated().any():
        raise AssertionError("an image was held out by two folds")  # folds partition patients: this is a bug, not bad input
    return df.assign(chance=0.5)


def _units(df: pd.DataFrame, by: str, cols: list[str]) -> pd.DataFrame:
    """Images, breasts (patient + side) or patients, each scored by the max over its images."""
    if by == "image":
        return df
    keys = ["patient_id", "side"] if by == "breast" and "side" in df.columns else ["patient_id"]
    return df.groupby(keys, as_index=False).agg(label=("label", "max"), **{c: (c, "max") for c in cols})


def auc_table(df: pd.DataFrame, cols: list[str], label: str = "label", seed: int = 0) -> dict[str, dict]:
    """AUC and its patient-bootstrap 95% CI for each score column, at image, breast and patient level."""
    out: dict[str, dict] = {c: {} for c in cols}
    for by in ("image", "breast", "patient"):
        u = _units(df.rename(columns={label: "label"}) if label != "label" else df, by, cols)
        boots = patient_bootstrap_aucs(u["label"].to_numpy(), [u[c].to_numpy() for c in cols], u["patient_id"].to_numpy(), N_BOOT, seed)
        for j, c in enumerate(cols):
            out[c][by] = {"auc": auc(u["label"], u[c]), "ci95": percentile_ci(boots[:, j]), "n": int(len(u)),
                          "positives": int(u["label"].sum())}
    return out


def paired_difference(df: pd.DataFrame, a: str, b: str, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the pooled images, with its 95% CI over the same patient-bootstrap resamples."""
    y, pats = df["label"].to_numpy(), df["patient_id"].to_numpy()
    boots = patient_bootstrap_aucs(y, [df[a].to_numpy(), df[b].to_numpy()], pats, N_BOOT, seed)
    diff = boots[:, 0] - boots[:, 1]
    lo, hi = percentile_ci(diff)
    return {"a": a, "b": b, "difference": auc(y, df[a]) - auc(y, df[b]), "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


def by_lesion_type(df: pd.DataFrame, cols: list[str], seed: int = 0) -> dict[str, dict]:
    """Image AUC of each score for the cancers of one lesion type against every image without cancer, with its CI."""
    out = {}
    for t in LESION_TYPES:
        sub = df[(df["label"] == 0) | (df["lesion_type"] == t)]
        n = int((sub["label"] == 1).sum())
        if n == 0:
            continue
        boots = patient_bootstrap_aucs(sub["label"].to_numpy(), [sub[c].to_numpy() for c in cols], sub["patient_id"].to_numpy(), N_BOOT, seed)
        out[t] = {"cancers": n, **{c: {"auc": auc(sub["label"], sub[c]), "ci95": percentile_ci(boots[:, j])} for j, c in enumerate(cols)}}
    return out


def patch_diagnostics(results: list[dict]) -> dict:
    """Pooled out-of-fold patch metrics of the patch model (lesion vs background, malignant vs rest) and of the probe."""
    oof = [r["patch_oof"] for r in results if r.get("patch_oof")]
    if not oof:
        return {}
    labels = np.concatenate([o["labels"] for o in oof])
    malignant = np.isin(labels, ("calc_malignant", "mass_malignant"))
    return {"patches": int(len(labels)),
            "lesion_auc": auc(labels != "background", np.concatenate([o["p_lesion"] for o in oof])),
            "malignant_auc": auc(malignant, np.concatenate([o["p_malignant"] for o in oof])),
            "per_fold": [{"fold": r["fold"], **{k: r["patch_oof"][k] for k in ("lesion_auc", "malignant_auc", "accuracy")},
                          "probe_malignant_auc": r.get("probe", {}).get("patch_malignant_auc")} for r in results if r.get("patch_oof")]}


def pointing(results: list[dict]) -> dict:
    """The pointing game pooled over folds: the share of cancer images whose top window lies in a lesion, and chance's share."""
    games = [g for r in results for g in r.get("pointing", [])]
    if not games:
        return {}
    return {"images": len(games), "hit_rate": float(np.mean([g["hit"] for g in games])),
            "chance_rate": float(np.mean([g["chance"] for g in games]))}


def summarise(results: list[dict], spec, recipes: dict[str, dict]) -> tuple[dict, pd.DataFrame]:
    """The report as a dict (JSON-ready) and the pooled predictions."""
    preds = pooled_predictions(results)
    cols = [c for c in SCORES if c in preds.columns]
    models = [c for c in ("p_top", "p_max") if c in cols]
    report = {"spec": asdict(spec), "recipes": {k: r.get("name") for k, r in recipes.items()},
              "images": int(len(preds)), "patients": int(preds["patient_id"].nunique()), "cancer_images": int(preds["label"].sum()),
              "malignant_vs_rest": auc_table(preds, cols, seed=spec.seed),
              "abnormal_vs_normal": auc_table(preds.assign(label=preds["abnormal"]), cols, seed=spec.seed) if preds["abnormal"].nunique() > 1 else {},
              "by_lesion_type": by_lesion_type(preds, cols, spec.seed),
              "paired": [paired_difference(preds, m, b, spec.seed) for m in models for b in ("p_probe", "brightness") if b in cols]
                        + ([paired_difference(preds, "p_top", "p_max", spec.seed)] if len(models) == 2 else []),
              "per_fold": [{"fold": r["fold"], "counts": r["counts"], "auc": r["fold_auc"], "minutes": r["minutes"], "times": r.get("times", {})}
                           for r in sorted(results, key=lambda r: r["fold"])],
              "patch": patch_diagnostics(results), "pointing": pointing(results),
              "minutes": round(sum(r["minutes"] for r in results), 1)}
    return report, preds


def _f(v) -> str:
    return "--" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _ci(d: dict) -> str:
    return f"{_f(d['auc'])} [{_f(d['ci95'][0])}, {_f(d['ci95'][1])}]"


def markdown(report: dict) -> list[str]:
    """The report as Markdown lines."""
    s = report["spec"]
    cols = list(report["malignant_vs_rest"])
    lines = [f"{s['folds']}-fold patient-level cross-validation (seed {s['seed']}, stages {s['stages']}): {report['images']} images of "
             f"{report['patients']} patients, {report['cancer_images']} with cancer; {report['minutes']:.1f} minutes in all.", "",
             "Pooled out-of-fold AUC, malignant vs rest, with patient-bootstrap 95% CIs (breast and patient: max over their images):", "",
             "| score | image | breast | patient | abnormal vs normal (image) |", "|---|---:|---:|---:|---:|"]
    for c in cols:
        m, a = report["malignant_vs_rest"][c], report["abnormal_vs_normal"].get(c)
        lines.append(f"| {SCORES[c]} | {_ci(m['image'])} | {_ci(m['breast'])} | {_ci(m['patient'])} | {_ci(a['image']) if a else '--'} |")
    if report["paired"]:
        lines += ["", "Paired differences in pooled image AUC (same patient-bootstrap resamples):", ""]
        lines += [f"- {SCORES[p['a']]} minus {SCORES[p['b']]}: {p['difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                  f"{' (CI excludes 0)' if p['excludes_zero'] else ' (CI includes 0)'}" for p in report["paired"]]
    if report["by_lesion_type"]:
        lines += ["", "Image AUC by lesion type (the cancers of that type against every image without cancer):", "",
                  "| lesion type | cancers | " + " | ".join(SCORES[c] for c in cols if c != "chance") + " |",
                  "|---|---:|" + "---:|" * len([c for c in cols if c != "chance"])]
        for t, d in report["by_lesion_type"].items():
            lines.append(f"| {t} | {d['cancers']} | " + " | ".join(_ci(d[c]) for c in cols if c != "chance") + " |")
    p = report["patch"]
    if p:
        lines += ["", f"Patch classifier on the held-out folds' {p['patches']} patches: lesion vs background AUC {_f(p['lesion_auc'])}, "
                      f"malignant vs rest AUC {_f(p['malignant_auc'])}; per fold malignant-vs-rest "
                      + ", ".join(f"{_f(f['malignant_auc'])}" + (f" (probe {_f(f['probe_malignant_auc'])})" if f.get("probe_malignant_auc") else "")
                                  for f in p["per_fold"]) + "."]
    g = report["pointing"]
    if g:
        lines += ["", f"Pointing game: the patch model's highest breast window lies in a lesion on {g['hit_rate']:.0%} of {g['images']} "
                      f"held-out cancer images with lesion outlines; a uniformly drawn breast window would on {g['chance_rate']:.0%}."]
    lines += ["", "| fold | test images (cancer) | " + " | ".join(c for c in cols if c != "chance") + " | minutes |",
              "|---:|---:|" + "---:|" * len([c for c in cols if c != "chance"]) + "---:|"]
    for f in report["per_fold"]:
        t = f["counts"]["test"]
        lines.append(f"| {f['fold']} | {t['images']} ({t['cancer_images']}) | " + " | ".join(_f(f["auc"].get(c)) for c in cols if c != "chance")
                     + f" | {f['minutes']:.1f} |")
    return lines


def finite(obj):
    """NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_report(results: list[dict], df: pd.DataFrame, spec, recipes: dict[str, dict], out: Path) -> dict:
    """Write OUT/report.json, OUT/report.md and OUT/predictions.csv (the pooled out-of-fold predictions); return the report."""
    report, preds = summarise(results, spec, recipes)
    main = "p_top" if "p_top" in preds.columns else "p_max"
    write_csv(preds.assign(p_cancer=preds[main], split="test"), out / "predictions.csv")
    atomic_write_bytes(out / "report.json", json.dumps(finite(report), indent=1).encode())
    atomic_write_bytes(out / "report.md", ("# Cross-validation\n\n" + "\n".join(markdown(report)) + "\n").encode())
    log.info("report: %s", out / "report.md")
    return report
