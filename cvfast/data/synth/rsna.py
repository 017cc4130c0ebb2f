"""Synthetic data in the RSNA Screening Mammography layout: train.csv and train_images/<patient>/<image>.dcm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from cvfast.data.synth.render import DX_MAMMO_PRESENTATION, Difficulty, _rng, make_dicom
from cvfast.data.synth.screening import _view, plan_breasts
from cvfast.util.files import atomic_write_bytes

RSNA_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive", "BIRADS",
                "implant", "density", "machine_id", "difficult_negative_case"]
RSNA_MACHINES = {1: (21, 29, 49), 2: (48, 93, 170, 190, 197, 210, 216)}  # 48 and 93: the MONOCHROME1 ones here


def synth_rsna(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty) -> dict:
    """RSNA Screening Mammography layout: train.csv + train_images/<patient_id>/<image_id>.dcm (two sites, their codecs)."""
    rng = _rng(seed, "rsna")
    rows, truth = [], {}
    patient_ids = sorted(rng.choice(np.arange(10000, 65535), patients, replace=False).tolist())
    image_ids = iter((10**6 + rng.choice(2**31 - 10**6, patients * 6, replace=False)).tolist())  # no array of 2^31 candidates
    sites = {p: 1 + int(rng.random() < 0.5) for p in range(patients)}
    ages = {p: float(rng.integers(40, 85)) for p in range(patients)}
    for n, br in enumerate(plan_breasts(seed, "rsna", patients, difficulty)):
        site, pid = sites[br.patient], patient_ids[br.patient]
        # site 2: JPEG Lossless, and every other woman's machine stores MONOCHROME1 with a sigmoid VOI LUT; site 1: JPEG 2000
        monochrome1 = site == 2 and br.patient % 2 == 0
        machine = int(rng.choice((48, 93) if monochrome1 else [m for m in RSNA_MACHINES[site] if m not in (48, 93)]))
        views = ["CC", "MLO"] + (["ML"] if n % 7 == 3 else [])  # a few extra views, as in the real set
        cancer = int(br.finding == "malignant")
        for view in views:
            image_id = next(image_ids)
            name = f"train_images/{pid}/{image_id}.dcm"
            bits = 12 if site == 2 else 16
            pixels, _ = _view(seed, name, br, view, size, difficulty, bits)
            extra = {"BodyPartExamined": "BREAST"}
            if monochrome1:
                pixels = (2**bits - 1 - pixels).astype(np.uint16)
                extra |= {"WindowCenter": [2047, 1800], "WindowWidth": [4096, 3000], "VOILUTFunction": "SIGMOID"}
            make_dicom(out / name, pixels, patient_id=str(pid), sop_class=DX_MAMMO_PRESENTATION, bits_stored=bits,
                       syntax=JPEGLosslessSV1 if site == 2 else JPEG2000Lossless, photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                       uid_seed=f"{seed}{name}", extra=extra)  # RSNA's headers carry no laterality or view
            rows.append({"site_id": site, "patient_id": pid, "image_id": image_id, "laterality": br.side, "view": view,
                         "age": ages[br.patient], "cancer": cancer, "biopsy": int(cancer or rng.random() < 0.1),
                         "invasive": int(cancer and rng.random() < 0.7), "BIRADS": "" if cancer else str(int(rng.choice([0, 1, 1, 2]))),
                         "implant": 0, "density": str(rng.choice(["A", "B", "C", "D", ""])), "machine_id": machine,
                         "difficult_negative_case": bool(not cancer and rng.random() < 0.1)})
            truth[str(image_id)] = {"patient_id": str(pid), "side": br.side, "view": view, "label": cancer, "site_id": site,
                                   "photometric": "MONOCHROME1" if monochrome1 else "MONOCHROME2"}
    atomic_write_bytes(out / "train.csv", pd.DataFrame(rows, columns=RSNA_COLUMNS).to_csv(index=False).encode())
    return {"size": list(size), "images": truth}
