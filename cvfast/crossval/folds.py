"""Patient-level folds: StratifiedGroupKFold over images grouped by patient, and each fold's DATA folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cvfast.data.manifest import MANIFEST_COLUMNS, patient_split, write_manifest
from cvfast.errors import CvfastError


def make_folds(df: pd.DataFrame, k: int, seed: int, valid_frac: float) -> list[dict[str, str]]:
    """For each fold, patient_id -> split: test = the fold's held-out patients, valid drawn (stratified) from the rest, train.

    Folds are stratified by image label and grouped by patient, so a patient's images (both breasts, every view)
    are held out together and never span training and test.
    """
    if k < 2:
        raise CvfastError(f"--folds {k}: at least 2")
    patients = df.groupby("patient_id")["label"].max()
    if patients.sum() < k or (len(patients) - patients.sum()) < k:
        raise CvfastError(f"{k} folds need at least {k} patients of each class; the data has {int(patients.sum())} with cancer "
                          f"and {int(len(patients) - patients.sum())} without")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for i, (_, test_idx) in enumerate(sgkf.split(df, df["label"], groups=df["patient_id"])):
        test = set(df["patient_id"].iloc[test_idx])
        rest = patients[~patients.index.isin(test)].reset_index()
        valid = patient_split(rest, valid_frac, seed + i, "validation") if valid_frac > 0 else set()
        folds.append({p: "test" if p in test else "valid" if p in valid else "train" for p in patients.index})
    return folds


def write_fold_data(df: pd.DataFrame, splits: dict[str, str], folder: Path) -> pd.DataFrame:
    """The fold's DATA folder: the manifest with the fold's splits, paths relative to it (into the shared cache, nothing copied)."""
    folder.mkdir(parents=True, exist_ok=True)

    def rel(p: str) -> str:
        return os.path.relpath(p, folder) if p else ""

    out = df.assign(split=df["patient_id"].map(splits), path=[rel(p) for p in df["path"]],
                    abnormalities=[json.dumps([{**a, "mask": rel(a.get("mask", ""))} for a in abns]) for abns in df["abnormalities"]])
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    write_manifest(out[MANIFEST_COLUMNS + extra], folder)
    return df.assign(split=df["patient_id"].map(splits))
