"""Synthetic data in the VinDr-Mammo layout: breast-level and finding annotation CSVs and images/<study>/<image>.dicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from cvfast.data.synth.render import DX_MAMMO_PRESENTATION, Difficulty, _rng, make_dicom
from cvfast.data.synth.screening import _hex, _view, plan_breasts
from cvfast.util.files import atomic_write_bytes

VINDR_BREAST_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width", "breast_birads",
                        "breast_density", "split"]
VINDR_FINDING_COLUMNS = [*VINDR_BREAST_COLUMNS[:-1], "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"]


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
