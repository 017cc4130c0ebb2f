"""RSNA Screening Mammography adapter (image labels: cancer; patient-level splits, optionally a held-out site).

Dataset: Carr, Kitamura, Partridge et al., "RSNA Screening Mammography Breast Cancer Detection", Kaggle / RSNA
(2022-2023), about 54,700 screening images of 11,900 women from two sites (Emory and BreastScreen Victoria), about
2% cancer. Get it with ``kaggle competitions download -c rsna-breast-cancer-detection`` after accepting the rules on
kaggle.com/competitions/rsna-breast-cancer-detection. Point ``cvfast prepare rsna`` at the folder holding
``train.csv`` and ``train_images/<patient_id>/<image_id>.dcm`` (JPEG 2000 or JPEG Lossless DICOMs, many MONOCHROME1,
some with a sigmoid VOI LUT: cvfast.data.read applies them). The unlabelled ``test.csv`` is not read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob
from cvfast.data.ingest.common import PrepareOptions, check_source, finish, read_table, repeated_rows, row_name
from cvfast.data.manifest import abnormality
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files

log = logging.getLogger(__name__)

REQUIRED = ["site_id", "patient_id", "image_id", "laterality", "view", "cancer"]
# carried into the manifest as columns (lower-case names), for evaluation by group and for users' own analyses
CARRIED = {"site_id": "site_id", "machine_id": "machine_id", "age": "age", "biopsy": "biopsy", "invasive": "invasive",
           "BIRADS": "birads", "implant": "implant", "density": "density", "difficult_negative_case": "difficult_negative_case"}


def prepare_rsna(source: str | Path, opts: PrepareOptions, test_site: str | None = None) -> pd.DataFrame:
    """Ingest RSNA train.csv + train_images/: label = cancer; every view kept with its name; site and machine as columns.

    Splits are drawn by patient, stratified by cancer; with `test_site` every image of that site is the test set
    (a site-held-out evaluation) and validation is drawn from the other site's patients.
    """
    source = check_source(source, "RSNA folder")
    table = source / "train.csv"
    if not table.is_file():
        raise CvfastError(f"{source}: no train.csv here (the RSNA download has train.csv beside train_images/)")
    df = read_table(table, REQUIRED, "RSNA label table")
    if test_site is not None and str(test_site) not in set(df["site_id"]):
        raise CvfastError(f"--test-site {test_site}: {table} has sites {', '.join(sorted(set(df['site_id'])))} only")
    images_root = source / "train_images"
    skip, rejects = repeated_rows(df, "image_id", table)
    images, jobs, listed = {}, [], set()
    for i, row in df.iterrows():
        where = row_name(table, i)
        pid, iid = row["patient_id"], row["image_id"]
        if not (pid.isdigit() and iid.isdigit()):  # the documented ids are integers; anything else could name a path
            rejects.append({"source": str(table), "row": where, "reason": f"patient_id {pid!r} / image_id {iid!r} are not the integers RSNA uses"})
            continue
        f = images_root / pid / f"{iid}.dcm"
        listed.add(f)  # its file has a row (rejected or not): not also reported as unlisted
        if i in skip:
            continue
        side, view, cancer = row["laterality"].upper(), row["view"].upper(), row["cancer"]
        if side not in ("L", "R"):
            rejects.append({"source": str(table), "row": where, "reason": f"laterality {row['laterality']!r} is not L or R"})
            continue
        if cancer not in ("0", "1"):
            rejects.append({"source": str(table), "row": where, "reason": f"cancer {cancer!r} is not 0 or 1"})
            continue
        if not view:
            rejects.append({"source": str(table), "row": where, "reason": "view is empty"})
            continue
        if not f.is_file():
            rejects.append({"source": str(table), "row": where, "reason": f"image {iid} resolves to nothing: no {f}"})
            continue
        meta = {"patient_id": pid, "side": side, "view": view, "label": int(cancer),
                "abnormalities": [abnormality(1, "lesion", True)] if cancer == "1" else [],
                **{name: row[col] for col, name in CARRIED.items() if col in df.columns}}
        if test_site is not None and row["site_id"] == str(test_site):
            meta["split"] = "test"
        images[iid] = meta
        jobs.append(ImageJob(iid, str(f)))
    for f in walk_files(images_root, {".dcm"}) if images_root.is_dir() else ():
        if f not in listed:
            rejects.append({"source": str(f), "row": "", "reason": f"not in {table.name} (no label)"})
    return finish("rsna", images, jobs, rejects, opts, inputs=[table])  # a given test split (the held-out site) is kept
