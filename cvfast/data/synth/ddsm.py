"""Synthetic data in the CBIS-DDSM layout: four case-description CSVs and the DICOM tree (cvfast.data.ingest.ddsm reads it)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from cvfast.data.synth.render import DIFFICULTIES, Difficulty, LesionSpec, _rng, _uid, make_dicom, plan_lesion, render_image, to_ddsm_pixels
from cvfast.util.files import atomic_write_bytes

DDSM_CSV_NAMES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]
CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]


def mass_descriptors(rng: np.random.Generator, les: LesionSpec) -> dict[str, str]:
    """CBIS-DDSM's mass shape and margins for the lesion as drawn (its look, not its pathology); the random draws are the
    first data's, so the easy data's CSVs stay as they were."""
    shape = str(rng.choice(["IRREGULAR", "LOBULATED"]) if les.malignant else rng.choice(["ROUND", "OVAL"]))
    margins = str(rng.choice(["SPICULATED", "ILL_DEFINED"])) if les.malignant else "CIRCUMSCRIBED"
    if les.irregular is None or les.irregular == les.malignant and les.spiculated == les.malignant:
        return {"mass shape": shape, "mass margins": margins}
    swap = {"IRREGULAR": "ROUND", "LOBULATED": "OVAL", "ROUND": "IRREGULAR", "OVAL": "LOBULATED"}
    shape = shape if les.irregular == les.malignant else swap[shape]
    return {"mass shape": shape, "mass margins": "SPICULATED" if les.spiculated else "ILL_DEFINED" if les.irregular else "CIRCUMSCRIBED"}


def synth_ddsm(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty = DIFFICULTIES["hard"]) -> dict:
    """Write a CBIS-DDSM-layout tree (four CSVs + CBIS-DDSM/ DICOM folders) and return its ground truth."""
    h, w = size
    rng = _rng(seed, "ddsm-plan")
    rows: dict[tuple[str, str], list[dict]] = {k: [] for k in DDSM_CSV_NAMES}
    truth: dict[str, dict] = {}
    n_test = max(1, int(round(patients * 0.2)))
    test_patients = set(rng.choice(patients, n_test, replace=False).tolist())
    image_no = 0
    for p in range(patients):
        pid = f"P_{p + 1:05d}"
        official = "test" if p in test_patients else "train"
        sides = ["LEFT", "RIGHT"] if rng.random() < 0.3 else [rng.choice(["LEFT", "RIGHT"])]
        for side in sides:
            kind = "mass" if rng.random() < 0.55 else "calc"
            n_les = 2 if rng.random() < 0.2 else 1
            lesions = [plan_lesion(rng, kind, bool(rng.random() < 0.45), rng.uniform(0.035, 0.055) if kind == "mass" else rng.uniform(0.04, 0.06), difficulty)
                       for _ in range(n_les)]
            density = int(rng.integers(1, 5))
            for view in ("CC", "MLO"):
                image_no += 1
                image_id = f"{pid}_{side}_{view}"
                irng = _rng(seed, "ddsm", image_id)
                signal, _, masks, centres = render_image(irng, h, w, side[0], view, lesions, density / 4, difficulty)
                pixels = to_ddsm_pixels(irng, signal, with_label=image_no % 2 == 0)
                prefix = f"{'Mass' if kind == 'mass' else 'Calc'}-{'Training' if official == 'train' else 'Test'}"
                folder = f"{prefix}_{image_id}"
                study, series = _uid(seed, image_id, "st"), _uid(seed, image_id, "se")
                layout_descriptive = image_no % 3 == 0
                full_dir = out / "CBIS-DDSM" / folder / (f"07-20-2016-DDSM-{image_no:05d}" if layout_descriptive else study)
                full_dir = full_dir / (f"1.000000-full mammogram images-{image_no:05d}" if layout_descriptive else series)
                make_dicom(full_dir / "1-1.dcm", pixels, patient_id=folder, syntax=RLELossless if image_no % 3 == 1 else ExplicitVRLittleEndian, uid_seed=f"{seed}{image_id}",
                           extra={"BodyPartExamined": "BREAST", "SeriesDescription": "full mammogram images"})
                csv_full = f"{folder}/{_uid(seed, image_id, 'csv-st')}/{_uid(seed, image_id, 'csv-se')}/000000.dcm"
                abns = []
                for k, (les, m, (cx, cy)) in enumerate(zip(lesions, masks, centres), start=1):
                    roi_folder = f"{folder}_{k}"
                    mask_px = (m.astype(np.uint8) * 255)
                    if (image_no + k) % 5 == 0:  # real CBIS-DDSM: some masks are a few pixels off the image size
                        mask_px = cv2.resize(mask_px, (w + 3, h - 2), interpolation=cv2.INTER_NEAREST)
                    ys, xs = np.nonzero(m)
                    crop = pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                    rdir = out / "CBIS-DDSM" / roi_folder / _uid(seed, roi_folder, "st") / _uid(seed, roi_folder, "se")
                    swap = (image_no + k) % 2 == 0  # download order of mask vs crop is not stable
                    make_dicom(rdir / ("1-2.dcm" if swap else "1-1.dcm"), mask_px, patient_id=roi_folder, uid_seed=f"{seed}{roi_folder}m")
                    make_dicom(rdir / ("1-1.dcm" if swap else "1-2.dcm"), np.ascontiguousarray(crop), patient_id=roi_folder, uid_seed=f"{seed}{roi_folder}c")
                    pathology = "MALIGNANT" if les.malignant else ("BENIGN_WITHOUT_CALLBACK" if (image_no + k) % 4 == 0 else "BENIGN")
                    base = {
                        "patient_id": pid, "left or right breast": side, "image view": view, "abnormality id": k,
                        "assessment": int(rng.choice([4, 5])) if les.malignant else int(rng.choice([2, 3, 4])),
                        "pathology": pathology, "subtlety": int(rng.integers(1, 6)), "image file path": csv_full,
                        # CBIS-DDSM's paths name 000000/000001.dcm and carry stray newlines; downloads say 1-1/1-2.
                        "cropped image file path": f"{roi_folder}/{_uid(seed, roi_folder, 'cst')}/{_uid(seed, roi_folder, 'cse')}/000000.dcm\n",
                        "ROI mask file path": f"{roi_folder}/{_uid(seed, roi_folder, 'cst')}/{_uid(seed, roi_folder, 'cse')}/000001.dcm\n",
                    }
                    if kind == "mass":
                        base |= {"breast_density": density, "abnormality type": "mass", **mass_descriptors(rng, les)}
                    else:
                        base |= {"breast density": density, "abnormality type": "calcification",
                                 "calc type": rng.choice(["PLEOMORPHIC", "FINE_LINEAR_BRANCHING"]) if les.malignant else rng.choice(["COARSE", "ROUND_AND_REGULAR"]),
                                 "calc distribution": "CLUSTERED"}
                    rows[(kind, official)].append(base)
                    abns.append({"abnormality_id": k, "kind": kind, "malignant": les.malignant, "pathology": pathology,
                                 "center": [round(cx, 1), round(cy, 1)], "mask_pixels": int(m.sum()), "contrast": round(les.contrast, 3),
                                 **({"irregular": les.malignant if les.irregular is None else les.irregular,
                                     "spiculated": les.malignant if les.spiculated is None else les.spiculated} if kind == "mass" else {})})
                truth[image_id] = {"patient_id": pid, "side": side[0], "view": view, "split": official,
                                   "label": int(any(a["malignant"] for a in abns)), "abnormalities": abns, "folder": folder}
    for (kind, split), name in DDSM_CSV_NAMES.items():
        cols = MASS_COLUMNS if kind == "mass" else CALC_COLUMNS
        df = pd.DataFrame(rows[(kind, split)], columns=cols)
        atomic_write_bytes(out / name, df.to_csv(index=False).encode())
    return {"size": [h, w], "images": truth, "rows": sum(len(v) for v in rows.values())}
