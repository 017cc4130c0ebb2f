"""Synthetic screening sets in the RSNA, VinDr-Mammo and CMMD layouts, as their downloads arrive.

File names, folder trees, CSV/XLSX columns and value spellings follow each dataset's documentation (see the
adapters in cvfast.data.ingest), and the DICOMs carry what makes the real files hard to read: JPEG 2000 and JPEG
Lossless transfer syntaxes, MONOCHROME1 with a sigmoid VOI LUT (RSNA), VOI windows and view codes instead of
ViewPosition (CMMD). The cancer rate is set for training a small model, not the real one (RSNA: 2%).
Lesions are drawn as in cvfast.data.synth, so the same difficulty applies; everything follows the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1

from cvfast.data.read import atomic_write_bytes
from cvfast.data.synth import DX_MAMMO_PRESENTATION, Difficulty, LesionSpec, _rng, make_dicom, plan_lesion, render_image

RSNA_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive", "BIRADS",
                "implant", "density", "machine_id", "difficult_negative_case"]
VINDR_BREAST_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
                        "breast_density", "split"]
VINDR_FINDING_COLUMNS = [*VINDR_BREAST_COLUMNS[:-1], "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"]
CMMD_COLUMNS = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
RSNA_MACHINES = {1: (21, 29, 49), 2: (48, 93, 170, 190, 197, 210, 216)}  # 48 and 93: the MONOCHROME1 ones here
VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}


@dataclass
class PlannedBreast:
    """One breast of a synthetic woman: what it holds (drawn the same in every view) and its tissue density (1-4)."""

    patient: int
    side: str
    finding: str  # "malignant" | "benign" | "none"
    lesions: list[LesionSpec]
    density: int


def plan_breasts(seed: int, layout: str, patients: int, difficulty: Difficulty, malignant: float = 0.25, benign: float = 0.3,
                 findings_only: bool = False) -> list[PlannedBreast]:
    """Both breasts of each woman with their findings (findings_only: only breasts with a finding, as CMMD lists them)."""
    rng = _rng(seed, layout, "plan")
    breasts = []
    for p in range(patients):
        for side in ("L", "R"):
            u = rng.random()
            finding = "malignant" if u < malignant else "benign" if u < malignant + benign else "none"
            if findings_only and finding == "none":
                continue
            lesions = [] if finding == "none" else [plan_lesion(rng, str(rng.choice(["mass", "calc"])), finding == "malignant",
                                                                  float(rng.uniform(0.035, 0.055)), difficulty)]
            breasts.append(PlannedBreast(p, side, finding, lesions, int(rng.integers(1, 5))))
    if findings_only and not breasts:
        breasts.append(PlannedBreast(0, "L", "benign", [plan_lesion(rng, "mass", False, 0.045, difficulty)], 2))
    return breasts


def _view(seed: int, name: str, br: PlannedBreast, view: str, size: tuple[int, int], difficulty: Difficulty, bits: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One projection of a planned breast as `bits`-bit digital pixels (MONOCHROME2 sense) and its lesions' masks."""
    rng = _rng(seed, name)
    signal, _, masks, _ = render_image(rng, *size, br.side, "MLO" if view not in ("CC", "XCCL") else "CC", br.lesions, br.density / 4, difficulty)
    v = 0.05 + 0.62 * np.power(np.clip(signal, 0, None), 0.7) + rng.normal(0, 0.004, signal.shape).astype(np.float32)
    return (np.clip(v, 0, 1) * (2**bits - 1) + 0.5).astype(np.uint16), masks


def _hex(seed: int, *parts: object) -> str:
    """A deterministic 32-digit hex id (VinDr's study, series and image ids look like this)."""
    return hashlib.md5(repr((seed, parts)).encode()).hexdigest()


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


def synth_vindr(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty) -> dict:
    """VinDr-Mammo layout: breast-level_annotations.csv, finding_annotations.csv, images/<study_id>/<image_id>.dicom."""
    rng = _rng(seed, "vindr")
    breast_rows, finding_rows, truth = [], [], {}
    plan = plan_breasts(seed, "vindr", patients, difficulty)
    # the official split: a fifth of the women in test, drawn from those with and without a suspicious breast alike
    suspicious = sorted({br.patient for br in plan if br.finding == "malignant"})
    groups = [suspicious, sorted(set(range(patients)) - set(suspicious))]
    test = {int(p) for g in groups if g for p in rng.choice(g, max(1, round(len(g) * 0.2)), replace=False)}
    for br in plan:
        study = _hex(seed, "study", br.patient)
        birads = {"malignant": int(rng.choice([4, 5])), "benign": int(rng.choice([2, 3])), "none": 1}[br.finding]
        density = f"DENSITY {'ABCD'[br.density - 1]}"
        split = "test" if br.patient in test else "training"
        for view in ("CC", "MLO"):
            image_id, series = _hex(seed, "image", br.patient, br.side, view), _hex(seed, "series", br.patient, view)
            name = f"images/{study}/{image_id}.dicom"
            pixels, masks = _view(seed, name, br, view, size, difficulty, 12)
            monochrome1 = rng.random() < 0.25  # one vendor's files
            make_dicom(out / name, (4095 - pixels).astype(np.uint16) if monochrome1 else pixels, patient_id=study,
                       sop_class=DX_MAMMO_PRESENTATION, bits_stored=12, syntax=JPEG2000Lossless if rng.random() < 0.3 else ExplicitVRLittleEndian,
                       photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2", laterality=br.side, view=view, uid_seed=f"{seed}{name}",
                       extra={"WindowCenter": 2048, "WindowWidth": 4096})
            base = {"study_id": study, "series_id": series, "image_id": image_id, "laterality": br.side, "view_position": view,
                    "height": size[0], "width": size[1], "breast_birads": f"BI-RADS {birads}", "breast_density": density}
            breast_rows.append({**base, "split": split})
            boxes = []
            for les, m in zip(br.lesions, masks):
                ys, xs = np.nonzero(m)
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]  # VinDr: pixel corners
                category = "['Mass']" if les.kind == "mass" else "['Suspicious Calcification']"
                finding_rows.append({**base, "finding_categories": category, "finding_birads": f"BI-RADS {birads}",
                                     **dict(zip(("xmin", "ymin", "xmax", "ymax"), box)), "split": split})
                boxes.append(box)
            if not br.lesions:
                finding_rows.append({**base, "finding_categories": "['No Finding']", "finding_birads": "", "xmin": "", "ymin": "",
                                     "xmax": "", "ymax": "", "split": split})
            truth[image_id] = {"patient_id": study, "side": br.side, "view": view, "birads": birads, "split": split,
                               "label": None if birads == 3 else int(birads >= 4), "boxes": boxes}
    atomic_write_bytes(out / "breast-level_annotations.csv", pd.DataFrame(breast_rows, columns=VINDR_BREAST_COLUMNS).to_csv(index=False).encode())
    atomic_write_bytes(out / "finding_annotations.csv", pd.DataFrame(finding_rows, columns=VINDR_FINDING_COLUMNS).to_csv(index=False).encode())
    return {"size": list(size), "images": truth}


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


SCREENING_WRITERS = {"rsna": synth_rsna, "vindr": synth_vindr, "cmmd": synth_cmmd}
