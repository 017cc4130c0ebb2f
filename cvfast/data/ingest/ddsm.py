"""CBIS-DDSM adapter.

Dataset: Lee, Gimenez, Hoogi et al., "A curated mammography data set for use in computer-aided detection
and diagnosis research", Sci. Data 4:170177 (2017). Get it from The Cancer Imaging Archive
(https://www.cancerimagingarchive.net/collection/cbis-ddsm/) with the NBIA Data Retriever; put the four
``*_case_description_*_set.csv`` files next to the ``CBIS-DDSM/`` image tree (or one level up) and point
``cvfast prepare ddsm`` at that folder. Partial downloads work: missing CSVs and ROI folders are reported.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from cvfast.data.convert import ImageJob, RoiSpec
from cvfast.data.ingest.common import PrepareOptions, check_source, finish
from cvfast.data.manifest import abnormality
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files

log = logging.getLogger(__name__)

CSV_PATTERN = re.compile(r"(mass|calc)_case_description_(train|test)_set\.csv$", re.I)
REQUIRED = ["patient_id", "left or right breast", "image view", "abnormality id", "abnormality type", "pathology",
            "image file path", "ROI mask file path"]
PATHOLOGY = {"MALIGNANT": True, "BENIGN": False, "BENIGN_WITHOUT_CALLBACK": False}


def find_csvs(source: Path) -> dict[tuple[str, str], Path]:
    """The case-description CSVs in SOURCE or one level up, keyed by (kind, split)."""
    found = {}
    for folder in (source, source.parent):
        for f in sorted(folder.glob("*.csv")):
            m = CSV_PATTERN.search(f.name)
            if m and (m[1].lower(), m[2].lower()) not in found:
                found[(m[1].lower(), m[2].lower())] = f
    return found


def image_root(source: Path) -> Path:
    """The folder holding the Mass-*/Calc-* image folders."""
    return source / "CBIS-DDSM" if (source / "CBIS-DDSM").is_dir() else source


def _folder(csv_path_value: str) -> str:
    """First component of a CSV path: the only part that reliably matches the download's folders."""
    return str(csv_path_value).strip().replace("\\", "/").split("/")[0]


def _dicoms(folder: Path) -> list[str]:
    """All DICOM files below a folder (symlinked sub-folders followed), sorted."""
    return sorted(str(p) for p in walk_files(folder, {".dcm"}))


def read_case_csv(path: Path) -> pd.DataFrame:
    """Read one case-description CSV; raise naming the file when a needed column is missing."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise CvfastError(f"{path}: unreadable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise CvfastError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; is this a CBIS-DDSM case-description CSV?")
    return df


def prepare_ddsm(source: str | Path, opts: PrepareOptions) -> pd.DataFrame:
    """Ingest a CBIS-DDSM download: group rows per image, resolve paths, find masks, keep the official split."""
    source = check_source(source, "CBIS-DDSM download folder")
    csvs = find_csvs(source)
    if not csvs:
        raise CvfastError(f"{source}: no CBIS-DDSM case-description CSVs (e.g. mass_case_description_train_set.csv) here or one level up")
    for kind in ("mass", "calc"):
        for split in ("train", "test"):
            if (kind, split) not in csvs:
                log.warning("no %s_case_description_%s_set.csv: %s %s cases not ingested", kind, split, kind, split)
    root = image_root(source)
    folders = {e.name: Path(e.path) for e in os.scandir(root) if e.is_dir()}
    images: dict[str, dict] = {}
    rois: dict[str, list[RoiSpec]] = {}
    sources: dict[str, str] = {}
    rejects: list[dict] = []
    seen_rows: dict[tuple, tuple[str, tuple]] = {}  # (image, kind, abnormality id) -> (where, what the row says)
    for (kind, split), csv_path in sorted(csvs.items()):
        df = read_case_csv(csv_path)
        for i, row in df.iterrows():
            where = f"{csv_path.name} row {i + 2}"  # line number in the file (header is line 1)
            pathology = row["pathology"].strip().upper()
            side, view = row["left or right breast"].strip().upper(), row["image view"].strip().upper()
            if pathology not in PATHOLOGY or side not in ("LEFT", "RIGHT") or not view:
                rejects.append({"source": str(csv_path), "row": where, "reason": f"bad pathology/side/view: {pathology!r}, {side!r}, {view!r}"})
                continue
            folder = _folder(row["image file path"])
            if folder not in folders:
                rejects.append({"source": str(csv_path), "row": where,
                                "reason": f"image file path {row['image file path'].strip()!r} resolves to nothing: no folder {folder!r} under {root}"})
                continue
            image_id = f"{row['patient_id'].strip()}_{side}_{view}"
            if image_id not in sources:
                files = _dicoms(folders[folder])
                if not files:
                    rejects.append({"source": str(folders[folder]), "row": where, "reason": "folder holds no .dcm files (partial download?)"})
                    continue
                # one full image per folder; if a download left extras, the biggest file is the image
                sources[image_id] = max(files, key=os.path.getsize)
                images[image_id] = {"patient_id": row["patient_id"].strip(), "side": side[0], "view": view, "split": split,
                                    "label": 0, "abnormalities": []}
                rois[image_id] = []
            meta = images[image_id]
            mask_folder = _folder(row["ROI mask file path"])
            key, says = (image_id, kind, row["abnormality id"].strip()), (pathology, mask_folder, split)
            if key in seen_rows:  # one abnormality listed twice (hand-merged CSVs): count it once
                first, first_says = seen_rows[key]
                reason = (f"abnormality {key[2]} of {image_id} already listed at {first}; counted once" if says == first_says else
                          f"abnormality {key[2]} of {image_id} listed again with other values than at {first} "
                          f"({first_says} vs {says}); the first row is used")
                rejects.append({"source": str(csv_path), "row": where, "reason": reason})
                continue
            seen_rows[key] = (f"{csv_path.name} row {i + 2}", says)
            abn_id = len(meta["abnormalities"]) + 1
            crop_folder = _folder(row.get("cropped image file path", "")) or mask_folder
            candidates = sorted({f for fo in (mask_folder, crop_folder) if fo in folders for f in _dicoms(folders[fo])})
            if candidates:
                rois[image_id].append(RoiSpec(abn_id, candidates))
            else:
                rejects.append({"source": str(csv_path), "row": where,
                                "reason": f"ROI folder {mask_folder!r} not found (partial download?); image kept without this mask"})
            malignant = PATHOLOGY[pathology]
            meta["abnormalities"].append(abnormality(abn_id, "mass" if kind == "mass" else "calc", malignant,
                                                     source_id=row["abnormality id"].strip(), source_pathology=pathology))
            meta["label"] = max(meta["label"], int(malignant))
            if split == "test":
                meta["split"] = "test"
    jobs = [ImageJob(i, sources[i], rois[i]) for i in sorted(images)]
    return finish("cbis-ddsm", images, jobs, rejects, opts, inputs=csvs.values())
