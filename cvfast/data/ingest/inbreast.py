"""INbreast adapter (image-level labels from BI-RADS; no ROIs needed).

Dataset: Moreira, Amaral, Domingues et al., "INbreast: toward a full-field digital mammographic database",
Academic Radiology 19(2):236-248 (2012). Obtained from its authors (Universidade do Porto) under a signed
agreement. Point ``cvfast prepare inbreast`` at the folder holding ``AllDICOMs/`` (files named
``<File Name>_<patient hash>_MG_<L|R>_<CC|MLO>_ANON.dcm``) and ``INbreast.csv`` or ``INbreast.xls``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob
from cvfast.data.datasets import INBREAST_BIRADS
from cvfast.data.ingest.common import PrepareOptions, check_source, find_sheet, finish
from cvfast.data.manifest import abnormality
from cvfast.data.read import norm_side
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files

log = logging.getLogger(__name__)

POSITIVE_BIRADS, NEGATIVE_BIRADS = INBREAST_BIRADS
REQUIRED = ["File Name", "Bi-Rads", "Laterality", "View"]
SHEET_NAMES = ("INbreast.csv", "INbreast.xls", "INbreast.xlsx")


def read_sheet(path: Path) -> pd.DataFrame:
    """Read INbreast.csv (semicolon- or comma-separated) or .xls/.xlsx as strings; check its columns."""
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
        else:
            df = pd.read_excel(path, dtype=str).fillna("")
    except Exception as e:
        raise CvfastError(f"{path}: unreadable label sheet ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise CvfastError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    return df


def normalize_birads(value: str) -> str:
    """'4A' -> '4a', '2.0' -> '2' (spreadsheets turn numbers into floats)."""
    v = str(value).strip().lower()
    return v[:-2] if v.endswith(".0") else v


def prepare_inbreast(source: str | Path, opts: PrepareOptions, positive: tuple[str, ...] = POSITIVE_BIRADS,
                     negative: tuple[str, ...] = NEGATIVE_BIRADS) -> pd.DataFrame:
    """Ingest INbreast: label = BI-RADS mapping (others excluded, each listed in rejects); patient = file-name hash."""
    source = check_source(source, "INbreast folder")
    positive, negative = tuple(map(normalize_birads, positive)), tuple(map(normalize_birads, negative))
    if set(positive) & set(negative):
        raise CvfastError(f"BI-RADS {sorted(set(positive) & set(negative))} listed as both positive and negative")
    sheet_path = find_sheet(source, SHEET_NAMES, "label sheet")
    sheet = read_sheet(sheet_path)
    files: dict[str, Path] = {}
    rejects: list[dict] = []
    for f in walk_files(source, {".dcm"}):  # AllDICOMs is often a symlink on clusters
        parts = f.stem.split("_")
        if len(parts) < 2 or not parts[0].isdigit():
            rejects.append({"source": str(f), "row": "", "reason": "file name does not follow <File Name>_<hash>_MG_<side>_<view>_ANON.dcm"})
            continue
        if parts[0] in files:
            rejects.append({"source": str(f), "row": "", "reason": f"File Name {parts[0]} also names {files[parts[0]]}; kept that one"})
            continue
        files[parts[0]] = f
    images, jobs, used = {}, [], set()
    for i, row in sheet.iterrows():
        where = f"{sheet_path.name} row {i + 2}"
        name = str(row["File Name"]).strip().removesuffix(".0")
        if not name:
            continue  # the real sheet has blank trailer rows
        birads = normalize_birads(row["Bi-Rads"])
        f = files.get(name)
        if f is None:
            rejects.append({"source": str(sheet_path), "row": where, "reason": f"File Name {name} resolves to nothing: no {name}_*.dcm under {source}"})
            continue
        if name in used:
            rejects.append({"source": str(sheet_path), "row": where, "reason": f"File Name {name} listed again; the first row is used"})
            continue
        used.add(name)
        if birads in positive:
            label = 1
        elif birads in negative:
            label = 0
        else:
            rejects.append({"source": str(f), "row": where, "reason": f"BI-RADS {birads!r} excluded (neither in positive {positive} nor negative {negative})"})
            continue
        parts = f.stem.split("_")
        patient = str(row.get("Patient ID", "")).strip()
        patient = parts[1] if patient.lower() in ("", "removed") else patient
        side, view = norm_side(row["Laterality"]), str(row["View"]).strip().upper()
        if side is None:  # the first letter of anything else (X, B) would make a breast of its own in evaluate --by breast
            rejects.append({"source": str(sheet_path), "row": where, "reason": f"Laterality {row['Laterality']!r} is not L, R, LEFT or RIGHT"})
            continue
        # image-level labels only: an abnormality record says why the image is positive, with no ROI
        abns = [abnormality(1, "lesion", True, birads=birads)] if label else []
        images[name] = {"patient_id": patient, "side": side, "view": view, "label": label, "birads": birads, "abnormalities": abns}
        jobs.append(ImageJob(name, str(f)))
    for name in sorted(set(files) - used):
        rejects.append({"source": str(files[name]), "row": "", "reason": f"not in {sheet_path.name} (no label)"})
    return finish("inbreast", images, jobs, rejects, opts, inputs=[sheet_path])
