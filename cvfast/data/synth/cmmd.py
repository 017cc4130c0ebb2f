"""Synthetic data in the CMMD layout: the clinical XLSX and CMMD/<patient>/<series>/*.dcm with view codes."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from cvfast.data.synth.render import DX_MAMMO_PRESENTATION, Difficulty, _rng, make_dicom
from cvfast.data.synth.screening import _view, plan_breasts
from cvfast.util.files import atomic_write_bytes

CMMD_COLUMNS = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}


def synth_cmmd(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty) -> dict:
    """CMMD layout (TCIA download): CMMD/<ID1>/<study>/<series>/1-N.dcm and CMMD_clinicaldata_revision.xlsx."""
    rng = _rng(seed, "cmmd")
    rows, truth = [], {}
    files: dict[int, list] = {}
    ages = {p: int(rng.integers(30, 85)) for p in range(patients)}
    # CMMD lists only breasts with a biopsied finding: half benign, half malignant here
    for br in plan_breasts(seed, "cmmd", patients, difficulty, malignant=0.4, benign=0.4, findings_only=True):
        pid = f"D{1 + int(br.patient >= patients // 2)}-{br.patient + 1:04d}"
        malignant = br.finding == "malignant"
        rows.append({"ID1": pid, "LeftRight": br.side, "Age": ages[br.patient], "number": 2,
                     "abnormality": br.lesions[0].kind.replace("calc", "calcification"),
                     "classification": "Malignant" if malignant else "Benign",
                     "subtype": str(rng.choice(["Luminal A", "Luminal B", "HER2-enriched", "triple negative"])) if malignant and pid.startswith("D2") else ""})
        for view in ("CC", "MLO"):
            pixels, _ = _view(seed, f"cmmd/{pid}/{br.side}/{view}", br, view, size, difficulty, 8)
            files.setdefault(br.patient, []).append((pid, br, view, pixels.astype(np.uint8)))
    for patient, images in files.items():
        pid = images[0][0]
        folder = out / "CMMD" / pid / f"07-18-2010-NA-NA-{int(rng.integers(10000, 99999))}" / f"1.000000-NA-{int(rng.integers(10000, 99999))}"
        for k, (_, br, view, pixels) in enumerate(images, start=1):
            code, meaning = VIEW_CODES[view]
            item = pydicom.Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SRT", meaning
            # CMMD's headers give laterality and the view as a code sequence, not as ViewPosition
            make_dicom(folder / f"1-{k}.dcm", pixels, patient_id=pid, sop_class=DX_MAMMO_PRESENTATION, laterality=br.side,
                       uid_seed=f"{seed}{pid}{k}", extra={"ViewCodeSequence": pydicom.Sequence([item]), "WindowCenter": 128, "WindowWidth": 256})
            truth[f"{pid}_1-{k}"] = {"patient_id": pid, "side": br.side, "view": view, "label": int(br.finding == "malignant"),
                                   "file": str((folder / f"1-{k}.dcm").relative_to(out))}
    buf = BytesIO()
    pd.DataFrame(rows, columns=CMMD_COLUMNS).to_excel(buf, index=False)
    atomic_write_bytes(out / "CMMD_clinicaldata_revision.xlsx", buf.getvalue())
    return {"size": list(size), "images": truth}
