"""What every adapter shares: run the conversion, attach masks, split by patient, write manifest + rejects."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from cvfast.data.convert import ImageJob, convert_all
from cvfast.data.manifest import MANIFEST_NAME, REJECTS_NAME, assign_splits, rejects_frame, write_csv, write_manifest
from cvfast.data.paths import file_identity, refuse_overwrite, unique_stems
from cvfast.data.read import WORKING_SIZE
from cvfast.errors import CvfastError

log = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    """Options every `prepare` shares."""

    out: Path
    size: tuple[int, int] = WORKING_SIZE
    workers: int | None = None
    seed: int = 0
    valid_frac: float = 0.15
    test_frac: float = 0.2  # used only where the dataset has no official test split


def check_source(source: str | Path, what: str) -> Path:
    """The source path, or a clear error when it does not exist."""
    p = Path(source).expanduser()
    if not p.exists():
        raise CvfastError(f"{p}: {what} not found")
    return p


def read_table(path: Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """A dataset's label table (CSV, or XLSX/XLS) as stripped strings; a clear error for an unreadable file or missing columns."""
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            df = pd.read_excel(path, dtype=str).fillna("")
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise CvfastError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CvfastError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} of the {what}")
    return df.apply(lambda col: col.str.strip())


def row_name(path: Path, index: int) -> str:
    """How a rejects entry names a table row: the file and its 1-based line, the header being line 1."""
    return f"{path.name} row {index + 2}"


def finish(dataset: str, images: dict[str, dict], jobs: list[ImageJob], rejects: list[dict], opts: PrepareOptions,
           inputs: Iterable[str | Path] = ()) -> pd.DataFrame:
    """Convert the jobs, build and write the manifest and rejects.csv; raise when nothing usable remains.

    `images` maps image_id -> patient_id, side, view, label, abnormalities (without masks), optional split
    and extra columns; side/view may be None and are then taken from the DICOM header. `inputs`: the label
    files read (CSVs, sheets), protected like the images from being written over.
    """
    stems = unique_stems(j.image_id for j in jobs)
    for j in jobs:
        j.stem = stems[j.image_id]
    sources = [f for j in jobs for f in (j.source, *(c for r in j.rois for c in r.candidates))]
    outputs = [opts.out / MANIFEST_NAME, opts.out / REJECTS_NAME, *(opts.out / rel for j in jobs for rel in j.outputs())]
    refuse_overwrite(outputs, [*inputs, *sources], hint="the cache would replace the source; choose an --out that holds no source files")
    source_of = {j.image_id: j.source for j in jobs}
    jobs, dup_rejects = _unique_sources(jobs, images, source_of)
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CvfastError(f"{opts.out}: cannot create the output folder ({e.strerror or e})") from None
    records, conv_rejects = convert_all(jobs, opts.out, opts.size, opts.workers)
    records, same_pixels = _unique_pixels(records, images, source_of)
    rejects = rejects + dup_rejects + conv_rejects + same_pixels
    rows = []
    for image_id, meta in images.items():
        rec = records.get(image_id)
        if rec is None:
            continue
        abns = [{**a, "mask": rec["masks"].get(str(a["abnormality_id"]), "")} for a in meta.pop("abnormalities")]
        rows.append({
            **meta, "image_id": image_id, "dataset": dataset,
            "side": meta.get("side") or rec["laterality"] or "", "view": meta.get("view") or rec["view"] or "",
            "path": rec["path"], "source": rec["source"], "orig_height": rec["orig_height"], "orig_width": rec["orig_width"],
            "pathology": "MALIGNANT" if any(a["pathology"] == "MALIGNANT" for a in abns) else ("BENIGN" if abns else "NORMAL"),
            "n_abnormalities": len(abns), "abnormalities": json.dumps(abns),
        })
    write_csv(rejects_frame(rejects), opts.out / REJECTS_NAME)
    if rejects:
        log.warning("%d files or rows could not be used; reasons in %s", len(rejects), opts.out / REJECTS_NAME)
    if not rows:
        raise CvfastError(f"nothing usable remains of {dataset} ({len(rejects)} rejects; see {opts.out / REJECTS_NAME})")
    df = pd.DataFrame(rows)
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = assign_splits(df, opts.seed, opts.valid_frac, opts.test_frac)
    write_manifest(df, opts.out)
    return df


def _keep_one(groups: dict, images: dict[str, dict], source_of: dict[str, str], what: str) -> tuple[set[str], list[dict]]:
    """For groups of image ids that are one image: keep the first listed when they agree on patient and label, none when not."""
    dropped, rejects = set(), []
    for ids in groups.values():
        if len(ids) < 2:
            continue
        patients = sorted({str(images[i]["patient_id"]) for i in ids})
        labels = {images[i]["label"] for i in ids}
        keep = ids[0] if len(patients) == 1 and len(labels) == 1 else None
        for i in ids:
            if i == keep:
                continue
            dropped.add(i)
            others = ", ".join(x for x in ids if x != i)
            reason = (f"{what} as image {keep} of the same patient; counted once" if keep else
                      f"{what} as {others}, with other patients or labels (patients {', '.join(patients)}; labels "
                      f"{', '.join(map(str, sorted(labels)))}): which is right is unknown, so none of them is used "
                      "(it would leak across splits or carry two labels)")
            rejects.append({"source": source_of[i], "row": i, "reason": reason})
    return dropped, rejects


def _unique_sources(jobs: list[ImageJob], images: dict[str, dict], source_of: dict[str, str]) -> tuple[list[ImageJob], list[dict]]:
    """Drop jobs whose source file is another job's (the same file listed twice, or under two patients)."""
    groups: dict[tuple, list[str]] = {}
    for j in jobs:
        groups.setdefault(file_identity(j.source), []).append(j.image_id)
    dropped, rejects = _keep_one(groups, images, source_of, "the same source file")
    for i in dropped:
        images.pop(i, None)
    return [j for j in jobs if j.image_id not in dropped], rejects


def _unique_pixels(records: dict[str, dict], images: dict[str, dict], source_of: dict[str, str]) -> tuple[dict[str, dict], list[dict]]:
    """Drop images whose working-size pixels equal another's (a copy of one file under another name)."""
    groups: dict[str, list[str]] = {}
    for i, rec in records.items():
        groups.setdefault(rec["pixels_sha256"], []).append(i)
    dropped, rejects = _keep_one(groups, images, source_of, "identical pixels")
    return {i: r for i, r in records.items() if i not in dropped}, rejects
