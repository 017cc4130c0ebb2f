"""The uniform manifest every dataset adapter writes, so that everything downstream is dataset-agnostic.

One row per image. ``abnormalities`` is a JSON list; each item has ``abnormality_id``, ``kind``
('mass' | 'calc'), ``pathology`` ('BENIGN' | 'MALIGNANT'), ``patch_class`` (one of PATCH_CLASSES; '' for lesions
without a mass/calc type, e.g. INbreast's image-level positives) and
``mask`` (path of the working-size ROI mask PNG, relative to the manifest's folder, or '' when the
lesion has no usable ROI -- such lesions count for the image label but yield no patches). Paths in ``path`` are relative to the manifest's folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cvfast.errors import CvfastError
from cvfast.util.files import atomic_write_bytes, read_csv

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
REJECTS_NAME = "rejects.csv"
MANIFEST_COLUMNS = ["image_id", "patient_id", "dataset", "side", "view", "path", "label", "pathology",
                    "n_abnormalities", "abnormalities", "split", "source", "orig_height", "orig_width"]
REJECT_COLUMNS = ["source", "row", "reason"]
SPLITS = ("train", "valid", "test")


def write_csv(df: pd.DataFrame, path: str | Path) -> bytes:
    """Write a DataFrame as CSV atomically; return the bytes written (for a digest of them)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    data = buf.getvalue().encode()
    atomic_write_bytes(path, data)
    return data


def write_manifest(df: pd.DataFrame, data_dir: str | Path) -> Path:
    """Validate and write DATA/manifest.csv (atomically); return its path."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"manifest has unknown splits {bad}")
    assert_patient_disjoint(df)
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    path = Path(data_dir) / MANIFEST_NAME
    write_csv(df[MANIFEST_COLUMNS + extra].sort_values("image_id").reset_index(drop=True), path)
    return path


def manifest_digest(data_dir: str | Path) -> str:
    """SHA-256 of DATA/manifest.csv: what derived sets (patches) record to detect a re-split DATA folder."""
    return hashlib.sha256((Path(data_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


TEXT_COLUMNS = ("image_id", "patient_id", "side", "view", "split", "path", "birads", "tissue", "density", "subtype", "abnormality")


def read_manifest(data: str | Path) -> pd.DataFrame:
    """Read a manifest (a DATA folder or the CSV itself), with image and mask paths made absolute."""
    path = Path(data)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise CvfastError(f"{path}: no manifest here; run `cvfast prepare ...` first")
    # codes stay text whatever a dataset's values look like: BI-RADS "4a" and "2" alike (a column of only "1"/"2" would read as ints)
    df = read_csv(path, "manifest", dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise CvfastError(f"{path}: not a cvfast manifest, columns {missing} are missing")
    _parse_rows(df, path)
    root = path.parent
    df["path"] = [str(root / p) for p in df["path"]]
    df["abnormalities"] = [[{**a, "mask": str(root / a["mask"]) if a.get("mask") else ""} for a in abns] for abns in df["abnormalities"]]
    return df


def _parse_rows(df: pd.DataFrame, path: Path) -> None:
    """Parse labels and abnormalities in place; refuse a hand-edited manifest that would train wrongly (unknown split or
    label, unparsable ROIs, a patient in two splits), naming the row."""
    def row(i: int) -> str:
        return f"{path} row {i + 2} (image {df['image_id'].iloc[i]})"  # row 1 is the header

    for i, split in enumerate(df["split"]):
        if split not in SPLITS:
            raise CvfastError(f"{row(i)}: split {split!r}, expected one of {', '.join(SPLITS)}")
    labels = pd.to_numeric(df["label"], errors="coerce")
    for i in np.flatnonzero(~labels.isin([0, 1])):
        raise CvfastError(f"{row(i)}: label {str(df['label'].iloc[i])!r}, expected 0 (no cancer) or 1 (cancer)")
    df["label"] = labels.astype(int)
    parsed = []
    for i, cell in enumerate(df["abnormalities"]):
        try:
            abns = json.loads(cell or "[]")
            assert isinstance(abns, list) and all(isinstance(a, dict) for a in abns)
        except (json.JSONDecodeError, AssertionError):
            raise CvfastError(f"{row(i)}: abnormalities is not a JSON list of objects: {str(cell)[:60]!r}") from None
        parsed.append(abns)
    df["abnormalities"] = parsed
    assert_patient_disjoint(df, str(path))


def assert_patient_disjoint(df: pd.DataFrame, where: str = "manifest") -> None:
    """Raise if any patient appears in more than one split (medical-ML hygiene, checked on every write and read)."""
    spans = df.groupby("patient_id")["split"].nunique()
    leaky = spans[spans > 1]
    if len(leaky):
        raise CvfastError(f"{where}: patients in more than one split (train/test leakage): {', '.join(map(str, leaky.index[:5]))}; "
                          "keep each patient's images in one split")


def patient_split(patients: pd.DataFrame, frac: float, seed: int, name: str) -> set[str]:
    """Pick a fraction of patients (columns patient_id, label), stratified by label when possible."""
    if frac <= 0 or len(patients) < 2:
        return set()
    n = max(1, int(round(len(patients) * frac)))
    if n >= len(patients):
        raise CvfastError(f"{name} fraction {frac} leaves no patients for training ({len(patients)} patients)")
    counts = patients["label"].value_counts()
    # sklearn needs every class on both sides: at least 2 per class and as many picks (and leftovers) as classes
    can_stratify = len(counts) > 1 and counts.min() >= 2 and min(n, len(patients) - n) >= len(counts)
    if not can_stratify:
        log.warning("%s split: too few patients per class to stratify by malignancy; drawing at random", name)
    _, picked = train_test_split(patients["patient_id"].to_numpy(), test_size=n, random_state=seed,
                                 stratify=patients["label"] if can_stratify else None)
    return set(picked.tolist())


HELD_OUT_ORDER = {"train": 0, "valid": 1, "test": 2}


def assign_splits(df: pd.DataFrame, seed: int, valid_frac: float, test_frac: float) -> pd.Series:
    """Patient-level splits: keep given (official) splits, draw test where none is given, then valid from train.

    A patient whose images carry different given splits goes wholly to the most held-out one (test > valid >
    train), so no patient ever spans two splits.
    """
    split = df["split"] if "split" in df.columns else pd.Series("train", index=df.index)
    split = split.where(split.isin(SPLITS), "train")
    rank = split.map(HELD_OUT_ORDER).groupby(df["patient_id"]).transform("max")
    widened = rank != split.map(HELD_OUT_ORDER)
    if widened.any():
        log.warning("%d images of %d patients moved to the held-out split of their patient's other images",
                    int(widened.sum()), df.loc[widened, "patient_id"].nunique())
    split = rank.map({v: k for k, v in HELD_OUT_ORDER.items()})
    if test_frac > 0 and not (split == "test").any():
        patients = df[split == "train"].groupby("patient_id")["label"].max().reset_index()
        split[df["patient_id"].isin(patient_split(patients, test_frac, seed, "test"))] = "test"
        valid_frac = valid_frac / (1 - test_frac)  # valid_frac stays a fraction of all patients
    if valid_frac > 0 and not (split == "valid").any():
        patients = df[split == "train"].groupby("patient_id")["label"].max().reset_index()
        split[df["patient_id"].isin(patient_split(patients, valid_frac, seed + 1, "validation"))] = "valid"
    return split


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Images, patients and positives per split (for the CLI's summary table)."""
    g = df.groupby("split")
    out = pd.DataFrame({"images": g.size(), "patients": g["patient_id"].nunique(), "cancer": g["label"].sum()})
    return out.reindex([s for s in SPLITS if s in out.index])


def abnormality(abnormality_id: int, kind: str, malignant: bool, mask: str = "", **extra) -> dict:
    """One abnormality record as stored in the manifest."""
    pathology = "MALIGNANT" if malignant else "BENIGN"
    return {"abnormality_id": int(abnormality_id), "kind": kind, "pathology": pathology,
            "patch_class": f"{kind}_{pathology.lower()}" if kind in ("mass", "calc") else "", "mask": mask, **extra}


def rejects_frame(rejects: list[dict]) -> pd.DataFrame:
    """Rejects as a DataFrame with the standard columns."""
    return pd.DataFrame(rejects, columns=REJECT_COLUMNS)

