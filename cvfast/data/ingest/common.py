"""What every adapter shares: run the conversion, attach masks, split by patient, write manifest + rejects."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob, convert_all
from cvfast.data.manifest import REJECTS_NAME, assign_splits, rejects_frame, write_csv, write_manifest
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


def finish(dataset: str, images: dict[str, dict], jobs: list[ImageJob], rejects: list[dict], opts: PrepareOptions) -> pd.DataFrame:
    """Convert the jobs, build and write the manifest and rejects.csv; raise when nothing usable remains.

    `images` maps image_id -> patient_id, side, view, label, abnormalities (without masks), optional split
    and extra columns; side/view may be None and are then taken from the DICOM header.
    """
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CvfastError(f"{opts.out}: cannot create the output folder ({e.strerror or e})") from None
    records, conv_rejects = convert_all(jobs, opts.out, opts.size, opts.workers)
    rejects = rejects + conv_rejects
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
