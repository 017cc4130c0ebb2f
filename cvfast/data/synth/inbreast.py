"""Synthetic data in the INbreast layout: AllDICOMs/ and INbreast.csv (cvfast.data.ingest.inbreast reads it)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd

from cvfast.data.synth.render import DIFFICULTIES, DX_MAMMO_PRESENTATION, Difficulty, _rng, make_dicom, plan_lesion, render_image, to_inbreast_pixels
from cvfast.util.files import atomic_write_bytes

INBREAST_COLUMNS = ["Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR", "Bi-Rads"]


def synth_inbreast(out: Path, patients: int, seed: int, size: tuple[int, int], difficulty: Difficulty = DIFFICULTIES["hard"]) -> dict:
    """Write an INbreast-layout folder (AllDICOMs/ + INbreast.csv with BI-RADS) and return its ground truth."""
    h, w = size
    rng = _rng(seed, "inbreast-plan")
    sheet, truth = [], {}
    file_no = 20586900
    for p in range(patients):
        phash = f"{zlib.crc32(f'{seed}-{p}'.encode()):08x}{zlib.crc32(f'{p}-{seed}'.encode()):08x}"
        sides = ["L", "R"] if rng.random() < 0.75 else [str(rng.choice(["L", "R"]))]
        for side in sides:
            u, d = rng.random(), difficulty
            if u < d.inbreast_malignant:
                birads = str(rng.choice(["4a", "4b", "4c", "5", "6"]))
                lesions = [plan_lesion(rng, str(rng.choice(["mass", "calc"])), True, rng.uniform(0.035, 0.055), d)]
            elif u < d.inbreast_malignant + d.inbreast_birads3:
                birads, lesions = "3", [plan_lesion(rng, "mass", False, rng.uniform(0.035, 0.05), d)]
            elif u < d.inbreast_malignant + d.inbreast_birads3 + d.inbreast_benign:
                birads, lesions = "2", [plan_lesion(rng, str(rng.choice(["mass", "calc"])), False, rng.uniform(0.035, 0.05), d)]
            else:
                birads, lesions = "1", []
            acr = int(rng.integers(1, 5))
            for view in ("CC", "MLO"):
                file_no += int(rng.integers(1, 40))
                name = f"{file_no}_{phash}_MG_{side}_{view}_ANON.dcm"
                irng = _rng(seed, "inbreast", name)
                signal, _, _, centres = render_image(irng, h, w, side, view, lesions, acr / 4, difficulty)
                make_dicom(out / "AllDICOMs" / name, to_inbreast_pixels(irng, signal), patient_id=phash, sop_class=DX_MAMMO_PRESENTATION,
                           bits_stored=14, laterality=side, view=view, spacing=0.07, uid_seed=f"{seed}{name}")
                sheet.append({"Patient ID": "removed", "Patient age": "removed", "Laterality": side, "View": view,
                              "Acquisition date": f"2008{int(rng.integers(1, 13)):02d}", "File Name": file_no, "ACR": acr, "Bi-Rads": birads})
                truth[str(file_no)] = {"patient_id": phash, "side": side, "view": view, "birads": birads,
                                       "label": None if birads == "3" else int(birads[0] in "456"), "n_lesions": len(lesions)}
    # The real INbreast.csv is semicolon-separated.
    atomic_write_bytes(out / "INbreast.csv", pd.DataFrame(sheet, columns=INBREAST_COLUMNS).to_csv(index=False, sep=";").encode())
    return {"size": [h, w], "images": truth}
