"""Evaluation checked against independent formulas: every number `cvfast evaluate` reports, recomputed here by hand.

The crafted predictions have valid and test rows from disjoint women, continuous scores (no ties, so each operating
point is unique) and two or four images per woman.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from sklearn.metrics import average_precision_score, roc_auc_score

from cvfast.infer.evaluate import EvalSettings, evaluate


def _predictions(seed: int = 0, women: int = 90, shift: float = 0.25) -> pd.DataFrame:
    """Image rows: women 0-29 valid, the rest test; a cancer raises its breast's scores by `shift` on average."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(women):
        cancer_side = rng.choice(["L", "R", None], p=[0.2, 0.2, 0.6])
        for side in ("L", "R") if rng.random() < 0.8 else ("L",):
            label = int(side == cancer_side)
            for view in ("CC", "MLO"):
                rows.append({"image_id": f"W{w:03d}_{side}_{view}", "patient_id": f"W{w:03d}", "exam_id": f"E{w:03d}", "side": side,
                             "view": view, "split": "valid" if w < 30 else "test", "label": label,
                             "p_cancer": float(np.clip(0.3 + shift * label + rng.normal(0, 0.18), 0.001, 0.999))})
    return pd.DataFrame(rows)


def _confusion(y: np.ndarray, s: np.ndarray, t: float) -> dict:
    """Counts and ratios when score >= t is called positive, plain numpy."""
    call = s >= t
    tp, fp = int(np.sum(call & (y == 1))), int(np.sum(call & (y == 0)))
    fn, tn = int(np.sum(~call & (y == 1))), int(np.sum(~call & (y == 0)))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None}


def _youden(y: np.ndarray, s: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 over every distinct score (the highest one on a tie)."""
    best, best_t = -np.inf, None
    for t in np.sort(np.unique(s))[::-1]:
        c = _confusion(y, s, t)
        j = c["sensitivity"] + c["specificity"] - 1
        if j > best:
            best, best_t = j, t
    return float(best_t)


def _assert_point(op: dict, expected: dict) -> None:
    assert op["confusion"] == {k: expected[k] for k in ("tn", "fp", "fn", "tp")}
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        assert op[k] == pytest.approx(expected[k], abs=1e-12), k


@pytest.fixture()
def preds_csv(tmp_path):
    df = _predictions()
    df.to_csv(tmp_path / "preds.csv", index=False)
    return df, tmp_path / "preds.csv"


def test_average_precision_is_sklearns_on_the_test_rows_only(preds_csv):
    df, path = preds_csv
    test = df[df["split"] == "test"]
    report = evaluate(path, EvalSettings(n_boot=200))
    assert report["n"] == len(test) and report["n_positive"] == int(test["label"].sum())
    assert report["average_precision"] == pytest.approx(average_precision_score(test["label"], test["p_cancer"]), abs=1e-12)
    assert report["average_precision"] != pytest.approx(average_precision_score(df["label"], df["p_cancer"]), abs=1e-6)


def test_operating_points_at_half_and_at_youden_chosen_on_valid_equal_numpy(preds_csv):
    df, path = preds_csv
    valid, test = df[df["split"] == "valid"], df[df["split"] == "test"]
    y, s = test["label"].to_numpy(), test["p_cancer"].to_numpy()
    report = evaluate(path, EvalSettings(n_boot=200))
    assert report["thresholds_chosen_on"] == "split valid"
    ops = report["operating_points"]
    _assert_point(ops["fixed_0.5"], _confusion(y, s, 0.5))
    t = _youden(valid["label"].to_numpy(), valid["p_cancer"].to_numpy())
    assert ops["youden"]["threshold"] == t
    assert t != _youden(y, s)  # chosen on valid, not on the rows it is scored on
    _assert_point(ops["youden"], _confusion(y, s, t))
    yv, sv = valid["label"].to_numpy(), valid["p_cancer"].to_numpy()  # 90% specificity on valid: the most sensitive such point
    best = max(c["sensitivity"] for c in map(lambda t: _confusion(yv, sv, t), np.unique(sv)) if c["specificity"] >= 0.9)
    at90 = _confusion(yv, sv, ops["specificity_0.9"]["threshold"])
    assert at90["specificity"] >= 0.9 and at90["sensitivity"] == best
    _assert_point(ops["specificity_0.9"], _confusion(y, s, ops["specificity_0.9"]["threshold"]))


def test_ece_and_brier_equal_their_formulas(preds_csv):
    df, path = preds_csv
    test = df[df["split"] == "test"]
    y, s = test["label"].to_numpy(), test["p_cancer"].to_numpy()
    cal = evaluate(path, EvalSettings(n_boot=200))["calibration"]
    assert cal["brier"] == pytest.approx(np.mean((s - y) ** 2), abs=1e-12)
    ece = 0.0
    for b in range(10):  # ten equal-width bins, each weighted by its share of cases
        sel = (s >= b / 10) & (s < (b + 1) / 10) if b < 9 else (s >= 0.9)
        if sel.any():
            ece += sel.mean() * abs(s[sel].mean() - y[sel].mean())
    assert cal["ece"] == pytest.approx(ece, abs=1e-12)
    assert sum(b["n"] for b in cal["bins"]) == len(test)


def test_thresholds_from_a_second_csv_and_labels_from_a_third(tmp_path):
    """The CLI: operating points chosen on another run's valid predictions, labels joined by image_id from a labels CSV."""
    df = _predictions(seed=1)
    test = df[df["split"] == "test"]
    test.drop(columns=["label", "split"]).to_csv(tmp_path / "site.csv", index=False)  # a site's predictions, no labels
    test[["image_id", "label"]].sample(frac=1, random_state=0).to_csv(tmp_path / "labels.csv", index=False)
    other = _predictions(seed=2)  # another run whose valid rows fix the thresholds
    other.to_csv(tmp_path / "other.csv", index=False)
    res = run_cli("evaluate", str(tmp_path / "site.csv"), "--labels", str(tmp_path / "labels.csv"), "--thresholds-from",
                  str(tmp_path / "other.csv"), "--n-boot", "200", "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["auc"] == pytest.approx(roc_auc_score(test["label"], test["p_cancer"]), abs=1e-12)
    assert report["thresholds_chosen_on"] == f"the valid rows of {tmp_path / 'other.csv'}"
    ov = other[other["split"] == "valid"]
    t = _youden(ov["label"].to_numpy(), ov["p_cancer"].to_numpy())
    assert report["operating_points"]["youden"]["threshold"] == t
    _assert_point(report["operating_points"]["youden"], _confusion(test["label"].to_numpy(), test["p_cancer"].to_numpy(), t))


def _delong_reference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988) from its definition: placement values, their covariance, a two-sided z test."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())

    def placements(s):
        kernel = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        return kernel.mean(axis=1), kernel.mean(axis=0), kernel.mean()

    (xa, ya, auc_a), (xb, yb, auc_b) = placements(a), placements(b)

    def cov(u, v):
        return float(np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1))

    var = (cov(xa, xa) + cov(xb, xb) - 2 * cov(xa, xb)) / m + (cov(ya, ya) + cov(yb, yb) - 2 * cov(ya, yb)) / n
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a - auc_b, math.erfc(abs(z) / math.sqrt(2))


def test_compare_on_partly_overlapping_files_uses_exactly_the_shared_cases(tmp_path):
    df = _predictions(seed=3, women=150)
    test = df[df["split"] == "test"].reset_index(drop=True)
    rng = np.random.default_rng(7)
    other = test.assign(p_cancer=np.clip(0.4 + 0.1 * test["label"] + rng.normal(0, 0.2, len(test)), 0.001, 0.999))
    kept_women = sorted(test["patient_id"].unique())[: int(0.7 * test["patient_id"].nunique())]
    other = other[other["patient_id"].isin(kept_women)]  # the second file covers 70% of the women...
    extra = _predictions(seed=4, women=20).assign(image_id=lambda d: "X" + d["image_id"], patient_id=lambda d: "X" + d["patient_id"], split="test")
    pd.concat([other, extra]).to_csv(tmp_path / "b.csv", index=False)  # ...and holds 20 women the first does not
    df.to_csv(tmp_path / "a.csv", index=False)
    res = run_cli("evaluate", str(tmp_path / "a.csv"), "--compare", str(tmp_path / "b.csv"), "--n-boot", "300", "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr
    c = json.loads((tmp_path / "ev" / "report.json").read_text())["comparison"]
    shared = test.merge(other[["image_id", "p_cancer"]], on="image_id", suffixes=("", "_b"))
    assert c["n_common"] == len(shared) == len(other) and c["n_left_out"] == len(test) - len(shared) > 0
    y, a, b = shared["label"].to_numpy(), shared["p_cancer"].to_numpy(), shared["p_cancer_b"].to_numpy()
    difference, p = _delong_reference(y, a, b)
    assert c["delong"]["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)  # A's AUC on the shared cases, not on all of A
    assert c["delong"]["difference"] == pytest.approx(difference, abs=1e-12)
    assert c["delong"]["p_value"] == pytest.approx(p, rel=1e-9) and 1e-6 < p < 0.5
    assert c["paired_bootstrap"]["difference"] == pytest.approx(difference, abs=1e-12)
    assert "left out of the comparison" in res.stderr
