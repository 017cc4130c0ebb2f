"""VinDr-Mammo adapter (image labels from breast-level BI-RADS; finding boxes become ROI masks; official split kept).

Dataset: Nguyen, Nguyen, Pham et al., "VinDr-Mammo: A large-scale benchmark dataset for computer-aided diagnosis in
full-field digital mammography", Scientific Data 10:277 (2023); 5,000 four-view exams (20,000 images) from two
Vietnamese hospitals, read by radiologists (BI-RADS per breast, boxes per finding), with no biopsy truth. Get it from
PhysioNet (physionet.org/content/vindr-mammo, credentialed access, signed data use agreement). Point
``cvfast prepare vindr`` at the folder holding ``breast-level_annotations.csv``, ``finding_annotations.csv`` and
``images/<study_id>/<image_id>.dicom``.

Labels: VinDr gives BI-RADS, not pathology. By default BI-RADS 4 and 5 (suspicious: biopsy recommended) are positive
and 1 and 2 (negative, benign) negative; BI-RADS 3 (probably benign, short-interval follow-up) is neither and is left
out, as Shen et al. did for INbreast. ``positive`` / ``negative`` change this. A finding's box is a mass or
calcification ROI whose patch class is malignant when its own BI-RADS is positive (suspicious), benign otherwise;
other finding categories (asymmetry, distortion, ...) count for the label only. VinDr has no patient id: each study
is one woman's exam, so the study is the patient.
"""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob, RoiSpec
from cvfast.data.datasets import VINDR_BIRADS
from cvfast.data.ingest.common import PrepareOptions, check_source, finish, read_table, repeated_rows, row_name
from cvfast.data.manifest import abnormality
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files

log = logging.getLogger(__name__)

POSITIVE_BIRADS, NEGATIVE_BIRADS = VINDR_BIRADS
BREAST_TABLE, FINDING_TABLE = "breast-level_annotations.csv", "finding_annotations.csv"
BREAST_REQUIRED = ["study_id", "image_id", "laterality", "view_position", "breast_birads", "split"]
FINDING_REQUIRED = ["image_id", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax"]
SPLITS = {"training": "train", "test": "test"}
KINDS = {"Mass": "mass", "Suspicious Calcification": "calc"}


def birads_value(text: str) -> str:
    """'BI-RADS 4' -> '4' (also '4', 'bi-rads 4')."""
    return text.strip().upper().removeprefix("BI-RADS").strip()


def prepare_vindr(source: str | Path, opts: PrepareOptions, positive: tuple[str, ...] = POSITIVE_BIRADS,
                  negative: tuple[str, ...] = NEGATIVE_BIRADS) -> pd.DataFrame:
    """Ingest VinDr-Mammo: label from breast BI-RADS, boxes as ROI masks, the official training/test split."""
    source = check_source(source, "VinDr-Mammo folder")
    positive, negative = tuple(map(birads_value, positive)), tuple(map(birads_value, negative))
    if set(positive) & set(negative):
        raise CvfastError(f"BI-RADS {sorted(set(positive) & set(negative))} listed as both positive and negative")
    breast_path, finding_path = source / BREAST_TABLE, source / FINDING_TABLE
    for p in (breast_path, finding_path):
        if not p.is_file():
            raise CvfastError(f"{source}: no {p.name} here (the VinDr-Mammo download has both annotation CSVs beside images/)")
    breasts = read_table(breast_path, BREAST_REQUIRED, "VinDr breast-level table")
    findings = read_table(finding_path, FINDING_REQUIRED, "VinDr finding table")
    skip, rejects = repeated_rows(breasts, "image_id", breast_path)
    images, jobs, listed = {}, [], set()
    for i, row in breasts.iterrows():
        where = row_name(breast_path, i)
        study, iid = row["study_id"], row["image_id"]
        if not (_plain_id(study) and _plain_id(iid)):  # hex ids in the release; anything else could name a path
            rejects.append({"source": str(breast_path), "row": where, "reason": f"study_id {study!r} / image_id {iid!r} are not plain ids"})
            continue
        f = source / "images" / study / f"{iid}.dicom"
        listed.add(f)  # its file has a row (rejected or not): not also reported as unlisted
        if i in skip:
            continue
        side, birads, split = row["laterality"].upper(), birads_value(row["breast_birads"]), SPLITS.get(row["split"].lower())
        reason = (f"laterality {row['laterality']!r} is not L or R" if side not in ("L", "R") else
                  f"split {row['split']!r} is not training or test" if split is None else None)
        if reason:
            rejects.append({"source": str(breast_path), "row": where, "reason": reason})
            continue
        if birads not in positive + negative:
            rejects.append({"source": str(f), "row": where, "reason": f"BI-RADS {birads!r} excluded (neither in positive {positive} nor negative {negative})"})
            continue
        if not f.is_file():
            rejects.append({"source": str(breast_path), "row": where, "reason": f"image {iid} resolves to nothing: no {f}"})
            continue
        images[iid] = {"patient_id": study, "side": side, "view": row["view_position"].upper() or None, "label": int(birads in positive),
                       "split": split, "birads": birads, "abnormalities": [],
                       **({"density": row["breast_density"].upper().removeprefix("DENSITY").strip()} if "breast_density" in breasts.columns else {})}
        jobs.append(ImageJob(iid, str(f)))
    rejects += _attach_findings(findings, finding_path, images, {j.image_id: j for j in jobs}, set(breasts["image_id"]), positive)
    for f in walk_files(source / "images", {".dicom", ".dcm"}) if (source / "images").is_dir() else ():
        if f not in listed:
            rejects.append({"source": str(f), "row": "", "reason": f"not in {BREAST_TABLE} (no label)"})
    return finish("vindr", images, jobs, rejects, opts, inputs=[breast_path, finding_path])


def _plain_id(text: str) -> bool:
    """An id that is one plain path component (letters, digits, '-', '_')."""
    return bool(text) and all(c.isalnum() or c in "-_" for c in text)


def _attach_findings(findings: pd.DataFrame, path: Path, images: dict[str, dict], jobs: dict[str, ImageJob], listed: set[str],
                     positive: tuple[str, ...]) -> list[dict]:
    """Add each finding row to its image: an abnormality record, and a box ROI for masses and calcifications."""
    rejects = []
    repeated = findings.duplicated(keep="first")  # the same finding listed twice would be two ROIs and twice the patches
    for i, row in findings.iterrows():
        where, iid = row_name(path, i), row["image_id"]
        if repeated[i]:
            rejects.append({"source": str(path), "row": where, "reason": "the same finding row as an earlier one; counted once"})
            continue
        try:
            categories = ast.literal_eval(row["finding_categories"])  # a Python list literal, e.g. "['Mass', 'Suspicious Calcification']"
            assert isinstance(categories, list) and all(isinstance(c, str) for c in categories)
        except (ValueError, SyntaxError, AssertionError):
            rejects.append({"source": str(path), "row": where, "reason": f"finding_categories {row['finding_categories'][:60]!r} is not a list of names"})
            continue
        if categories == ["No Finding"]:
            continue
        if iid not in images:
            if iid not in listed:  # an image rejected above has its reason there already
                rejects.append({"source": str(path), "row": where, "reason": f"image {iid} has findings but no usable row in {BREAST_TABLE}"})
            continue
        try:
            box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3]
        except (ValueError, AssertionError):
            rejects.append({"source": str(path), "row": where, "reason": f"box ({row['xmin']}, {row['ymin']}, {row['xmax']}, {row['ymax']}) is not "
                            "xmin < xmax, ymin < ymax; image kept without this finding's ROI"})
            box = None
        kind = next((KINDS[c] for c in categories if c in KINDS), "lesion")
        abns = images[iid]["abnormalities"]
        aid = len(abns) + 1
        abns.append(abnormality(aid, kind, birads_value(row["finding_birads"]) in positive, categories=categories,
                                birads=birads_value(row["finding_birads"])))
        if box and kind != "lesion":
            jobs[iid].rois.append(RoiSpec(aid, box=box))
    return rejects
