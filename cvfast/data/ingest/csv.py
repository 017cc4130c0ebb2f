"""Any site's own images with image-level labels only: a CSV of ``path,label[,patient_id,side,view,split]``.

This is the route the transfer step exists for: no ROI annotations, just one label per image
(1 = cancer, 0 = no cancer). Paths are relative to the CSV's folder or absolute; DICOM, PNG, TIFF and PGM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob
from cvfast.data.ingest.common import PrepareOptions, check_source, finish
from cvfast.data.manifest import SPLITS
from cvfast.data.read import norm_side
from cvfast.errors import CvfastError

log = logging.getLogger(__name__)

OPTIONAL = ("patient_id", "side", "view", "split", "image_id")


def prepare_csv(source: str | Path, opts: PrepareOptions) -> pd.DataFrame:
    """Ingest images listed in a CSV with image-level labels (patient-level splits when patient_id is given)."""
    source = check_source(source, "label CSV")
    try:
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
    except Exception as e:
        raise CvfastError(f"{source}: unreadable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise CvfastError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; expected path,label[,{','.join(OPTIONAL)}]")
    if "patient_id" not in df.columns:
        log.warning("%s has no patient_id column: every image is its own patient, so images of one woman may "
                    "land in different splits; add patient_id for honest evaluation", source)
    images, jobs, rejects = {}, [], []
    for i, row in df.iterrows():
        where = f"{source.name} row {i + 2}"
        path = Path(row["path"].strip())
        path = path if path.is_absolute() else source.parent / path
        label = row["label"].strip()
        if label not in ("0", "1"):
            rejects.append({"source": str(source), "row": where, "reason": f"label {label!r} is not 0 or 1"})
            continue
        if not path.is_file():
            rejects.append({"source": str(source), "row": where, "reason": f"path {row['path']!r} resolves to nothing ({path})"})
            continue
        image_id = row.get("image_id", "").strip() or path.stem
        if image_id in images:
            rejects.append({"source": str(source), "row": where, "reason": f"duplicate image_id {image_id!r} (add an image_id column)"})
            continue
        split = row.get("split", "").strip().lower()
        if split and split not in SPLITS:
            rejects.append({"source": str(source), "row": where, "reason": f"split {split!r} is not one of {SPLITS}"})
            continue
        patient = row.get("patient_id", "").strip() if "patient_id" in df.columns else image_id
        if not patient:  # the image as its own patient could put one woman's images in two splits
            rejects.append({"source": str(source), "row": where, "reason": "blank patient_id: a patient-level split cannot place this image"})
            continue
        side = row.get("side", "").strip()
        if side and norm_side(side) is None:
            rejects.append({"source": str(source), "row": where, "reason": f"side {side!r} is not L, R, LEFT or RIGHT"})
            continue
        meta = {"patient_id": patient, "side": norm_side(side), "view": row.get("view", "").strip().upper() or None, "label": int(label),
                "abnormalities": []}
        if split:
            meta["split"] = split
        images[image_id] = meta
        jobs.append(ImageJob(image_id, str(path)))
    return finish("csv", images, jobs, rejects, opts, inputs=[source])
