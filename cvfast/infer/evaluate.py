"""Honest evaluation of a predictions file: AUC with a patient bootstrap CI, operating points, calibration, comparison."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from cvfast.errors import CvfastError, shown
from cvfast.stats import at_threshold, calibration, delong_test, patient_bootstrap_aucs, percentile_ci, probabilistic_f1, thresholds_at
from cvfast.util.files import atomic_write_bytes, claim_output, refuse_overwrite

log = logging.getLogger(__name__)

LEVELS = ("image", "breast", "exam")
REPORT_FILES = ("report.json", "report.md", "roc.png", "pr.png", "calibration.png")
AGGREGATIONS = ("mean", "max")


@dataclass
class EvalSettings:
    """How to evaluate: unit (image/breast/exam), how views are combined, which rows, where thresholds come from."""

    by: str = "image"
    agg: str = "mean"
    split: str | None = "auto"  # 'auto': the test rows when the file has a split column, else all rows
    thresholds_from: str | None = "auto"  # a split name, a predictions CSV, or 'auto': valid rows if present
    specificities: tuple[float, ...] = (0.8, 0.9)
    n_boot: int = 2000
    seed: int = 0
    score: str = "p_cancer"
    by_group: str | None = None  # a column (site_id, machine_id, density, ...): AUC with CI per value of it


def read_predictions(path: str | Path, labels: str | Path | None = None, score: str = "p_cancer") -> pd.DataFrame:
    """A predictions CSV (from `cvfast predict`) with checked 0/1 labels; labels may come from a second CSV by image_id."""
    path = Path(path)
    if not path.is_file():
        raise CvfastError(f"{path}: no such predictions file")
    try:
        df = pd.read_csv(path, dtype={c: str for c in ("image_id", "patient_id", "side", "view", "exam_id", "split")})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CvfastError(f"{path}: not a readable CSV ({e})") from None
    for col in ("image_id", score):
        if col not in df.columns:
            raise CvfastError(f"{path}: no {col!r} column; is this a `cvfast predict` output?")
    df["image_id"] = df["image_id"].str.strip()  # " P_1" and "P_1" are one image, not two
    _refuse_repeats(df, path, "prediction rows")
    if labels is not None:
        try:
            lab = pd.read_csv(labels, dtype={"image_id": str})
        except FileNotFoundError:
            raise CvfastError(f"{labels}: no such labels file") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise CvfastError(f"{labels}: not a readable CSV ({e})") from None
        if not {"image_id", "label"} <= set(lab.columns):
            raise CvfastError(f"{labels}: a labels file needs image_id and label columns")
        lab["image_id"] = lab["image_id"].str.strip()
        _refuse_repeats(lab, Path(labels), "labels")
        values = pd.to_numeric(lab["label"], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            row = lab.index[bad][0]
            raise CvfastError(f"{labels}: row {row + 2} (image_id {lab.at[row, 'image_id']}): label {shown(lab.at[row, 'label'])}, expected 0 or 1")
        lab["label"] = values.astype(int)
        df = df.drop(columns=["label"], errors="ignore").merge(lab[["image_id", "label"]], on="image_id", how="left")
    if "label" not in df.columns:
        raise CvfastError(f"{path}: no 'label' column, so there is nothing to evaluate against. Predict on a manifest or a CSV "
                          "with labels, or pass --labels CSV (image_id,label)")
    missing = df["label"].isna()
    if missing.any():
        raise CvfastError(f"{path}: {int(missing.sum())} rows have no label (e.g. image_id {', '.join(df.loc[missing, 'image_id'].head(3))}); "
                          "evaluate needs every row labelled")
    bad = ~df["label"].isin([0, 1])
    if bad.any():
        row = df.index[bad][0]
        raise CvfastError(f"{path}: row {row + 2} (image_id {df.at[row, 'image_id']}): label {shown(df.at[row, 'label'])}, expected 0 or 1")
    s = pd.to_numeric(df[score], errors="coerce")
    if s.isna().any() or (s < 0).any() or (s > 1).any():
        row = df.index[s.isna() | (s < 0) | (s > 1)][0]
        raise CvfastError(f"{path}: row {row + 2}: {score} {shown(df.at[row, score])} is not a probability in [0, 1]")
    return df.assign(label=df["label"].astype(int), **{score: s})


def _refuse_repeats(df: pd.DataFrame, path: Path, what: str) -> None:
    """Refuse a file that lists an image_id twice: a repeated row would change n and the AUC silently."""
    repeated = df["image_id"][df["image_id"].duplicated(keep=False)]
    if len(repeated):
        ids = sorted(repeated.astype(str).unique())
        rows = ", ".join(str(i + 2) for i in repeated.index[:6])
        raise CvfastError(f"{path}: {what} repeat image_id {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} (rows {rows}); "
                          "each image must appear once (de-duplicate the file, or give images distinct ids)")


def unit_of(df: pd.DataFrame, by: str = "image") -> pd.Series:
    """Each image row's evaluation unit: its image_id, or patient/exam[/side] (a patient's images are one exam without exam_id)."""
    if by == "image":
        return df["image_id"].astype(str)
    exam = df["exam_id"].fillna(df["patient_id"]) if "exam_id" in df.columns else df["patient_id"]
    parts = [df["patient_id"], exam] + ([df["side"]] if by == "breast" else [])
    return pd.concat(parts, axis=1).astype(str).agg("/".join, axis=1)


def _rows(df: pd.DataFrame, which: pd.Series) -> str:
    """The first few flagged rows as the CSV's line numbers (header = line 1) with their image ids."""
    idx = df.index[which.to_numpy()]
    shown = ", ".join(f"{i + 2} ({df.at[i, 'image_id']})" for i in idx[:5])
    return f"row{'s' if len(idx) > 1 else ''} {shown}{f' and {len(idx) - 5} more' if len(idx) > 5 else ''}"


def aggregate(df: pd.DataFrame, by: str = "image", agg: str = "mean", score: str = "p_cancer", keep: tuple[str, ...] = (),
              source: str | Path = "predictions") -> pd.DataFrame:
    """Predictions per image, per breast (patient, exam, side) or per exam (patient, exam): score mean|max, label max.

    Without an exam_id column, a patient's images are taken as one exam. `keep`: columns carried over (first value per unit).
    What cannot be grouped is refused, naming `source` and its rows: a side other than L/R, exam_id on some rows only.
    """
    if by not in LEVELS or agg not in AGGREGATIONS:
        raise CvfastError(f"--by {by} / --agg {agg}: expected one of {LEVELS} / {AGGREGATIONS}")
    if "patient_id" not in df.columns or df["patient_id"].isna().any():
        raise CvfastError(f"{source}: predictions lack patient_id for some rows; the patient bootstrap (and breast/exam levels) need it")
    if by == "image":
        return df.assign(unit=unit_of(df), n_images=1)
    if by == "breast":
        if "side" not in df.columns:
            raise CvfastError(f"{source}: --by breast needs the side (L/R) of every image; there is no side column")
        bad = ~df["side"].isin(["L", "R"])  # anything else (X, B, LEFT, blank) would make a breast of its own
        if bad.any():
            values = ", ".join(sorted({"(blank)" if pd.isna(v) else repr(v) for v in df.loc[bad, "side"]}))
            raise CvfastError(f"{source}: --by breast needs side L or R on every image, not {values}: {_rows(df, bad)} "
                              "(predict normalises LEFT/RIGHT; fix or drop these rows)")
    if "exam_id" in df.columns and df["exam_id"].isna().any() and df["exam_id"].notna().any():
        missing = df["exam_id"].isna()  # a patient's rows without exam_id would form an exam apart from her rows with one
        raise CvfastError(f"{source}: --by {by}: exam_id is given on some rows only, missing on {_rows(df, missing)} "
                          "(give every row its exam_id, or drop the column to take each patient's images as one exam)")
    df = df.assign(unit=unit_of(df, by))
    g = df.groupby("unit", sort=True)
    out = g.agg(patient_id=("patient_id", "first"), label=("label", "max"), n_images=("image_id", "size"), **{score: (score, agg)}).reset_index()
    if by == "breast":
        out["side"] = g["side"].first().to_numpy()
    for col in ("split", *keep):
        if col in df.columns:
            out[col] = g[col].first().to_numpy()
    return out


def _units(path: str | Path, st: EvalSettings, labels: str | Path | None = None) -> pd.DataFrame:
    """A predictions file read, checked and aggregated to the evaluation unit."""
    df = read_predictions(path, labels, st.score)
    if st.by_group is not None and st.by_group not in df.columns:
        raise CvfastError(f"--by-group {st.by_group}: {path} has no such column (columns: {', '.join(df.columns)})")
    return aggregate(df, st.by, st.agg, st.score, keep=(st.by_group,) if st.by_group else (), source=path)


def _other_units(path: str | Path, st: EvalSettings, labels: str | Path | None) -> pd.DataFrame:
    """A second predictions file (thresholds or comparison) aggregated: its own labels when it has them all, else --labels'."""
    try:
        head = pd.read_csv(path, usecols=lambda c: c == "label")
        own = "label" in head.columns and head["label"].notna().all()
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        own = False  # read_predictions names the problem
    return _units(path, st, None if own else labels)


def _select(df: pd.DataFrame, split: str | None) -> tuple[pd.DataFrame, str]:
    """The rows to evaluate and a description of them."""
    if split == "auto" and "split" in df.columns:
        if not (df["split"] == "test").any():
            raise CvfastError(f"the predictions have a split column but no test rows (splits: {sorted(df['split'].dropna().unique())}); "
                              "choose the rows with --split NAME, or --split all")
        split = "test"
    if split in (None, "auto"):
        return df, "all rows"
    if "split" not in df.columns:
        raise CvfastError(f"--split {split}: the predictions have no split column")
    sel = df[df["split"] == split]
    if sel.empty:
        raise CvfastError(f"--split {split}: no rows of that split (splits present: {sorted(df['split'].dropna().unique())})")
    return sel, f"split {split}"


def _threshold_rows(df: pd.DataFrame, evaluated: pd.DataFrame, source: str | None, settings: EvalSettings,
                    labels: str | Path | None) -> tuple[pd.DataFrame, str]:
    """Rows the operating points are chosen on, and how; flagged as optimistic when they share patients with the evaluated rows."""
    if source == "auto":
        source = "valid" if "split" in df.columns and (df["split"] == "valid").any() else None
    if source is None:
        return evaluated, "the evaluated rows themselves (optimistic: no separate validation predictions)"
    if Path(source).suffix == ".csv":
        rows, desc = _other_units(source, settings, labels), f"predictions in {source}"
        if "split" in rows.columns and (rows["split"] == "valid").any():
            rows, desc = rows[rows["split"] == "valid"], f"the valid rows of {source}"
    else:
        rows = df[df["split"] == source] if "split" in df.columns else df.iloc[:0]
        if rows.empty:
            raise CvfastError(f"--thresholds-from {source}: no rows of split {source!r} and not a .csv file")
        desc = f"split {source}"
    shared = set(rows["patient_id"]) & set(evaluated["patient_id"])
    if shared:
        desc += f" (optimistic: {len(shared)} of its patients are also evaluated)"
    return rows, desc


Curve = tuple[str, np.ndarray, np.ndarray]  # (model name, labels, scores) of the evaluated cases, for the plots


@dataclass
class Evaluation:
    """An evaluation: the report, the curves' data, and the evaluated cases (one row per unit) for a case review."""

    report: dict
    curves: list[Curve]
    cases: pd.DataFrame


def evaluate(preds: str | Path, settings: EvalSettings | None = None, compare: str | Path | None = None,
             labels: str | Path | None = None) -> dict:
    """The evaluation report (a dict) of a predictions CSV, optionally compared with a second model's predictions."""
    return run_evaluation(preds, settings, compare, labels).report


def run_evaluation(preds: str | Path, settings: EvalSettings | None = None, compare: str | Path | None = None,
                   labels: str | Path | None = None, one_class: bool = False) -> Evaluation:
    """The report, the ROC/PR curves' data and the evaluated cases (each file read and aggregated once).

    Evaluated rows of one class are refused, unless `one_class` (a case review still shows the cases): then AUC, its CI,
    average precision and probabilistic F1 are None, report["not_defined"] says why, and where the threshold rows are of one
    class too only the fixed 0.5 operating point is given.
    """
    st = settings or EvalSettings()
    units = _units(preds, st, labels)
    rows, rows_desc = _select(units, st.split)
    y, s = rows["label"].to_numpy(), rows[st.score].to_numpy(dtype=np.float64)
    single = bool(y.min() == y.max())
    if single and (not one_class or compare is not None):
        raise CvfastError(f"{preds}: the evaluated rows ({rows_desc}, {len(rows)} {st.by}s) are all label {y[0]}; ROC AUC needs both classes")
    ref, ref_desc = _threshold_rows(units, rows, st.thresholds_from, st, labels)
    yr, sr = ref["label"].to_numpy(), ref[st.score].to_numpy(dtype=np.float64)
    if yr.min() != yr.max():
        thresholds = thresholds_at(yr, sr, st.specificities)
    elif one_class:
        thresholds, ref_desc = {"fixed_0.5": 0.5}, f"none: {ref_desc} hold only label {yr[0]}, so only the fixed threshold 0.5 is used"
    else:
        raise CvfastError(f"operating points: {ref_desc} hold only label {yr[0]}; both classes are needed")
    report = {
        "predictions": str(preds), "level": st.by, "aggregation": st.agg if st.by != "image" else None, "rows": rows_desc,
        "n": int(len(rows)), "n_positive": int(y.sum()), "n_patients": int(rows["patient_id"].nunique()),
        "auc": None, "auc_ci95": None, "ci_method": None, "average_precision": None, "probabilistic_f1": None,
        "thresholds_chosen_on": ref_desc,
        "operating_points": {name: at_threshold(y, s, t) for name, t in thresholds.items()},
        "calibration": calibration(y, s),
    }
    if single:
        report["not_defined"] = f"one class (the evaluated rows are all label {y[0]})"  # AUC, its CI, AP and probabilistic F1
    else:
        boot = patient_bootstrap_aucs(y, [s], rows["patient_id"].to_numpy(), st.n_boot, st.seed)[:, 0]
        report |= {"auc": float(roc_auc_score(y, s)), "auc_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                   "ci_method": f"percentile bootstrap over patients, {len(boot)} valid resamples of {st.n_boot}, seed {st.seed}",
                   "average_precision": float(average_precision_score(y, s)), "probabilistic_f1": probabilistic_f1(y, s)}
    if st.by_group:
        report["groups"] = {"column": st.by_group, "values": _by_group(rows, st)}
    curves = [("this model", y, s)]
    if compare is not None:
        report["comparison"], other_curve = _compare(rows, compare, st, labels)
        curves.append(other_curve)
    return Evaluation(report, curves, rows.reset_index(drop=True))


MISSING_GROUP = "(missing)"


def group_labels(values: pd.Series) -> pd.Series:
    """A group column as text: whole numbers without '.0' (a CSV column with blanks reads as floats), blanks as MISSING_GROUP."""
    def text(v) -> str:
        if pd.isna(v) or not str(v).strip():
            return MISSING_GROUP
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()

    return values.map(text)


def _by_group(rows: pd.DataFrame, st: EvalSettings) -> list[dict]:
    """AUC (patient-bootstrap CI), probabilistic F1 and counts for each value of the group column, in sorted order."""
    out = []
    for value, g in rows.groupby(group_labels(rows[st.by_group]), sort=True):
        y, s = g["label"].to_numpy(), g[st.score].to_numpy(dtype=np.float64)
        entry = {"value": value, "n": int(len(g)), "n_positive": int(y.sum()), "n_patients": int(g["patient_id"].nunique()),
                 "probabilistic_f1": probabilistic_f1(y, s), "auc": None, "auc_ci95": None}
        if y.min() != y.max():
            boot = patient_bootstrap_aucs(y, [s], g["patient_id"].to_numpy(), st.n_boot, st.seed)[:, 0]
            entry |= {"auc": float(roc_auc_score(y, s)), "auc_ci95": percentile_ci(boot)}
        out.append(entry)
    return out


def _compare(rows: pd.DataFrame, other_path: str | Path, st: EvalSettings, labels: str | Path | None = None) -> tuple[dict, Curve]:
    """DeLong's test and a paired patient bootstrap of the AUC difference on the cases both files predict."""
    other = _other_units(other_path, st, labels)
    both = rows.merge(other[["unit", st.score, "label"]], on="unit", suffixes=("", "_b"))
    if len(both) < len(rows):
        log.warning("comparison: %d of %d %ss are not in %s and are left out of the comparison", len(rows) - len(both), len(rows), st.by, other_path)
    if both.empty:
        raise CvfastError(f"{other_path}: shares no {st.by}s with the evaluated predictions")
    if (both["label"] != both["label_b"]).any():
        raise CvfastError(f"{other_path}: labels differ from the evaluated file's on the same {st.by}s")
    y, a, b = both["label"].to_numpy(), both[st.score].to_numpy(float), both[f"{st.score}_b"].to_numpy(float)
    boot = patient_bootstrap_aucs(y, [a, b], both["patient_id"].to_numpy(), st.n_boot, st.seed)
    diff = boot[:, 0] - boot[:, 1]
    p_boot = float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    try:
        delong = delong_test(y, a, b)
    except CvfastError as e:  # too few cases of a class: the bootstrap still reports
        delong = {"error": str(e)}
    return ({"other": str(other_path), "n_common": int(len(both)), "n_left_out": int(len(rows) - len(both)),
             "delong": delong,
             "paired_bootstrap": {"difference": float(roc_auc_score(y, a) - roc_auc_score(y, b)),
                                  "difference_ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                                  "p_value": p_boot, "resamples": int(len(diff))}},
            (Path(other_path).name, y, b))


def write_report(report: dict, curves: list[Curve], out: str | Path) -> dict[str, Path]:
    """report.json, report.md, roc.png, pr.png and calibration.png in OUT (each written atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch in notebooks, no global figure state

    out = Path(out)
    by = report["level"]
    y = curves[0][1]
    paths = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        atomic_write_bytes(out / name, buf.getvalue())
        paths[name] = out / name

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    drawn = curves if report["auc"] is not None else []  # one class: no curve, the plots say why
    for k, (name, yy, ss) in enumerate(drawn):
        fpr, tpr, _ = roc_curve(yy, ss)
        extra = f" [{report['auc_ci95'][0]:.3f}, {report['auc_ci95'][1]:.3f}]" if k == 0 else ""
        ax.plot(fpr, tpr, label=f"{name}: AUC {roc_auc_score(yy, ss):.3f}{extra}")
    if not drawn:
        ax.text(0.5, 0.5, "not defined: one class", ha="center", va="center")
    for name, op in report["operating_points"].items():
        if op["specificity"] is not None and op["sensitivity"] is not None:
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", label=f"{name} (t={op['threshold']:.3g})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC per {by} ({report['rows']})")
    if ax.get_legend_handles_labels()[0]:  # one class: nothing to label
        ax.legend(fontsize=7, loc="lower right")
    save(fig, "roc.png")
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for name, yy, ss in drawn:
        prec, rec, _ = precision_recall_curve(yy, ss)
        ax.plot(rec, prec, label=f"{name}: AP {average_precision_score(yy, ss):.3f}")
    if not drawn:
        ax.text(0.5, 0.5, "not defined: one class", ha="center", va="center")
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"precision-recall per {by}")
    ax.legend(fontsize=7)
    save(fig, "pr.png")
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    bins = report["calibration"]["bins"]
    ax.plot([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins], "o-", label=f"ECE {report['calibration']['ece']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean predicted probability", ylabel="fraction with cancer", title="calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    save(fig, "calibration.png")
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", report_markdown(report).encode())
    paths.update({"report.json": out / "report.json", "report.md": out / "report.md"})
    return paths


def report_markdown(report: dict) -> str:
    """The report as Markdown tables."""
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"# Evaluation of {report['predictions']}", "",
             f"Per **{report['level']}**" + (f" ({report['aggregation']} over its images)" if report["aggregation"] else "") +
             f", {report['rows']}: {report['n']} cases ({report['n_positive']} with cancer) from {report['n_patients']} patients.", ""]
    if report["auc"] is None:
        lines.append(f"- ROC AUC, average precision, probabilistic F1: not defined: {report['not_defined']}")
    else:
        lo, hi = report["auc_ci95"]
        lines += [f"- ROC AUC **{report['auc']:.3f}** (95% CI {lo:.3f}-{hi:.3f}; {report['ci_method']})",
                  f"- average precision {report['average_precision']:.3f}; probabilistic F1 {report['probabilistic_f1']:.3f}"]
    lines += [f"- calibration: ECE {report['calibration']['ece']:.3f}, Brier {report['calibration']['brier']:.3f}", "",
              f"Operating points (thresholds chosen on {report['thresholds_chosen_on']}):", "",
              "| operating point | threshold | sensitivity | specificity | PPV | NPV | TP | FP | TN | FN |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, op in report["operating_points"].items():
        c = op["confusion"]
        lines.append(f"| {name} | {op['threshold']:.4g} | {f(op['sensitivity'])} | {f(op['specificity'])} | {f(op['ppv'])} | {f(op['npv'])} "
                     f"| {c['tp']} | {c['fp']} | {c['tn']} | {c['fn']} |")
    if "comparison" in report:
        c = report["comparison"]
        d, b = c["delong"], c["paired_bootstrap"]
        delong_row = (f"| DeLong (cases independent) | {d['difference']:+.3f} | {d['difference'] - 1.96 * d['se']:+.3f} to "
                      f"{d['difference'] + 1.96 * d['se']:+.3f} | {d['p_value']:.3g} |" if "error" not in d else f"| DeLong | {d['error']} | | |")
        lines += ["", f"## Comparison with {c['other']} ({c['n_common']} common cases, {c['n_left_out']} left out)", "",
                  "| test | AUC difference (this - other) | 95% CI | p |", "|---|---|---|---|", delong_row,
                  f"| paired bootstrap over patients | {b['difference']:+.3f} | {b['difference_ci95'][0]:+.3f} to {b['difference_ci95'][1]:+.3f} | {b['p_value']:.3g} |"]
    if "groups" in report:
        lines += ["", f"## By {report['groups']['column']}", "", "| value | cases | with cancer | patients | AUC (95% CI) | probabilistic F1 |",
                  "|---|---|---|---|---|---|"]
        for g in report["groups"]["values"]:
            auc = f"{g['auc']:.3f} ({g['auc_ci95'][0]:.3f}-{g['auc_ci95'][1]:.3f})" if g["auc"] is not None else "n/a (one class)"
            lines.append(f"| {g['value']} | {g['n']} | {g['n_positive']} | {g['n_patients']} | {auc} | {g['probabilistic_f1']:.3f} |")
    lines += ["", "Plots: roc.png, pr.png, calibration.png."]
    return "\n".join(lines) + "\n"


def evaluate_to(preds: str | Path, out: str | Path, settings: EvalSettings | None = None, compare: str | Path | None = None,
                labels: str | Path | None = None) -> dict:
    """evaluate() and write its report and plots to OUT; returns the report."""
    settings = settings or EvalSettings()
    read = [p for p in (preds, compare, labels, settings.thresholds_from) if p is not None and Path(p).is_file()]
    refuse_overwrite([Path(out) / name for name in REPORT_FILES], read, hint="choose another --out for the report")
    for name in REPORT_FILES:
        claim_output(Path(out) / name)  # all of them before any is written: a user's own report.md stops the command now
    ev = run_evaluation(preds, settings, compare, labels)
    write_report(ev.report, ev.curves, out)
    return ev.report

