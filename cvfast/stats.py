"""ROC statistics for clustered data: patient bootstrap CIs, DeLong's test, operating points, calibration."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from cvfast.errors import CvfastError


def patient_bootstrap_aucs(y: np.ndarray, scores: Sequence[np.ndarray], patients: np.ndarray, n_boot: int = 2000,
                           seed: int = 0) -> np.ndarray:
    """ROC AUCs of each score column over bootstrap resamples of patients (not images): shape (n_valid, n_scores).

    Resampling whole patients keeps the correlation between a patient's images (both views, both breasts),
    which image-level resampling ignores and so gives too narrow intervals. Resamples with one class are dropped.
    """
    rng = np.random.default_rng(seed)
    codes, uniques = _codes(patients)
    members = [np.flatnonzero(codes == k) for k in range(len(uniques))]
    out = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        out.append([roc_auc_score(yb, s[idx]) for s in scores])
    return np.asarray(out).reshape(-1, len(scores))


def percentile_ci(boots: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values ([nan, nan] when no resample was valid)."""
    return [float(v) for v in np.percentile(boots, [2.5, 97.5])] if len(boots) else [float("nan")] * 2


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the distinct values."""
    uniques, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes, uniques


def delong_test(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> dict:
    """DeLong's test for two correlated ROC AUCs on the same cases (fast version of Sun & Xu 2014).

    Written here because scikit-learn and scipy have no DeLong test. It treats cases as independent; the
    patient bootstrap is the check that respects patients with several cases.
    """
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise CvfastError(f"DeLong's test needs at least 2 cases of each class (got {m} positive, {n} negative)")
    scores = np.vstack([s1, s2]).astype(np.float64)
    pos, neg = scores[:, y], scores[:, ~y]
    tx = np.vstack([rankdata(p) for p in pos])
    ty = np.vstack([rankdata(q) for q in neg])
    tz = np.vstack([rankdata(np.concatenate([p, q])) for p, q in zip(pos, neg)])
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negatives
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = float((aucs[0] - aucs[1]) / np.sqrt(var)) if var > 0 else 0.0
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": float(aucs[0] - aucs[1]),
            "se": float(np.sqrt(max(var, 0.0))), "z": z, "p_value": float(2 * norm.sf(abs(z)))}


def thresholds_at(y: np.ndarray, s: np.ndarray, specificities: Sequence[float] = (0.8, 0.9)) -> dict[str, float]:
    """Decision thresholds (positive when score >= threshold): Youden's J optimum and the highest sensitivity at each specificity."""
    fpr, tpr, thr = roc_curve(y, s)
    out = {"youden": float(thr[np.argmax(tpr - fpr)])}
    for spec in specificities:
        ok = np.flatnonzero(fpr <= 1 - spec + 1e-12)
        out[f"specificity_{spec:g}"] = float(thr[ok[np.argmax(tpr[ok])]])
    out["fixed_0.5"] = 0.5
    above_all = float(np.nextafter(np.max(s), np.inf))  # roc_curve's first threshold, +inf: "no case positive"
    return {k: above_all if np.isinf(v) else v for k, v in out.items()}


def at_threshold(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV and the confusion matrix when calling score >= threshold positive."""
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp}}


def calibration(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability bins (equal width), expected calibration error and Brier score.

    Binned here because sklearn's calibration_curve drops the per-bin counts that the ECE weights by.
    """
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            mean_p, frac = float(s[sel].mean()), float(y[sel].mean())
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(sel.sum()), "mean_predicted": mean_p, "fraction_positive": frac})
            ece += sel.mean() * abs(mean_p - frac)
    return {"bins": bins, "ece": float(ece), "brier": float(brier_score_loss(y, s))}


def probabilistic_f1(y: np.ndarray, s: np.ndarray) -> float:
    """The RSNA Screening Mammography metric: F1 with each case counted by its probability instead of a 0/1 call.

    Written here because no library has it: precision = sum(p over cancers) / sum(p), recall = sum(p over cancers) /
    number of cancers (the challenge's published definition; 0 when nothing is predicted).
    """
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    tp, predicted, positives = float(s[y == 1].sum()), float(s.sum()), int((y == 1).sum())
    if tp == 0 or positives == 0:
        return 0.0
    precision, recall = tp / predicted, tp / positives
    return 2 * precision * recall / (precision + recall)
