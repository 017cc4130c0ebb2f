"""CMMD adapter (label per breast: biopsy-proven Malignant vs Benign; laterality and view from the DICOM headers).

Dataset: Cui, Li, Li et al., "The Chinese Mammography Database (CMMD): an online mammography database with biopsy
confirmed types for machine diagnosis of breast", The Cancer Imaging Archive (2021), doi:10.7937/tcia.eqde-4b16;
1,775 women, 3,728 images, every listed breast with a biopsied finding. Get it from TCIA (the NBIA Data Retriever
downloads ``CMMD/<ID1>/<study>/<series>/1-N.dcm``) with ``CMMD_clinicaldata_revision.xlsx`` from the same page.
Point ``cvfast prepare cmmd`` at the folder holding both (the sheet may also sit one level up).

The sheet has one row per breast (ID1, LeftRight, Age, number, abnormality, classification, subtype); the files
do not say which breast they show in their names, so each image's patient, side and view come from its header.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob
from cvfast.data.ingest.common import PrepareOptions, check_source, find_sheet, finish, read_table, row_name
from cvfast.data.manifest import abnormality
from cvfast.data.read import dicom_identity, norm_side
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files

log = logging.getLogger(__name__)

SHEET_NAMES = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv")
REQUIRED = ["ID1", "LeftRight", "classification"]
CARRIED = {"Age": "age", "abnormality": "abnormality", "subtype": "subtype"}
CLASSES = {"malignant": 1, "benign": 0}


def prepare_cmmd(source: str | Path, opts: PrepareOptions) -> pd.DataFrame:
    """Ingest CMMD: each DICOM's patient and side from its header, labelled by its breast's row of the clinical sheet."""
    source = check_source(source, "CMMD folder")
    sheet_path = find_sheet(source, SHEET_NAMES, "clinical sheet")
    sheet = read_table(sheet_path, REQUIRED, "CMMD clinical sheet")
    rejects: list[dict] = []
    breasts: dict[tuple[str, str], dict] = {}
    conflicting: set[tuple[str, str]] = set()
    for i, row in sheet.iterrows():
        where = row_name(sheet_path, i)
        side, label = norm_side(row["LeftRight"]), CLASSES.get(row["classification"].lower())
        reason = (f"LeftRight {row['LeftRight']!r} is not L or R" if side is None else
                  f"classification {row['classification']!r} is not Benign or Malignant" if label is None else
                  "ID1 is empty" if not row["ID1"] else None)
        if reason:
            rejects.append({"source": str(sheet_path), "row": where, "reason": reason})
            continue
        key = (row["ID1"], side)
        if key in breasts:
            same = breasts[key]["label"] == label
            if not same:
                conflicting.add(key)
            rejects.append({"source": str(sheet_path), "row": where, "reason": f"{key[0]} {side} listed again (first at {breasts[key]['row']}); "
                            + ("counted once" if same else "with another classification: which is right is unknown, so the breast is not used")})
            continue
        breasts[key] = {"label": label, "row": where, **{name: row[col] for col, name in CARRIED.items() if col in sheet.columns}}
    images, jobs, found = {}, [], set()
    for f in walk_files(source, {".dcm"}):
        try:
            header = dicom_identity(f)
        except CvfastError as e:
            rejects.append({"source": str(f), "row": "", "reason": str(e)})
            continue
        patient = header["patient_id"] or _patient_folder(f, source)
        key = (patient, header["side"])
        if header["side"] is None:
            rejects.append({"source": str(f), "row": "", "reason": "no ImageLaterality in the header: which breast it shows is unknown"})
            continue
        if key in conflicting:
            rejects.append({"source": str(f), "row": "", "reason": f"{patient} {header['side']} has conflicting rows in {sheet_path.name}"})
            continue
        if key not in breasts:
            rejects.append({"source": str(f), "row": "", "reason": f"no row for {patient} {header['side']} in {sheet_path.name} (no label)"})
            continue
        found.add(key)
        image_id = f"{patient}_{f.stem}"
        if image_id in images:  # two series of one woman both holding 1-1.dcm: the path tells them apart
            image_id = "_".join((patient, *f.relative_to(source).with_suffix("").parts))
        while image_id in images:  # a patient id in two folders' headers
            image_id += "_"
        meta = {k: v for k, v in breasts[key].items() if k != "row"}
        images[image_id] = {**meta, "patient_id": patient, "side": header["side"], "view": header["view"],
                            "abnormalities": [abnormality(1, "lesion", bool(meta["label"]))]}  # every listed breast has a biopsied finding
        jobs.append(ImageJob(image_id, str(f)))
    for key in sorted(set(breasts) - found - conflicting):
        rejects.append({"source": str(sheet_path), "row": breasts[key]["row"], "reason": f"no DICOM of {key[0]} {key[1]} under {source}"})
    return finish("cmmd", images, jobs, rejects, opts, inputs=[sheet_path])


def _patient_folder(f: Path, source: Path) -> str:
    """The patient folder (CMMD/<ID1>/...) of a file whose header has no PatientID."""
    parts = f.relative_to(source).parts
    return parts[parts.index("CMMD") + 1] if "CMMD" in parts[:-1] else parts[0]
