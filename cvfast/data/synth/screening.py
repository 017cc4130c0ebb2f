"""Breasts planned for the screening layouts (RSNA, VinDr-Mammo, CMMD): who has cancer, and each view drawn.

File names, folder trees, CSV/XLSX columns and value spellings follow each dataset's documentation (see the
adapters in cvfast.data.ingest), and the DICOMs carry what makes the real files hard to read: JPEG 2000 and JPEG
Lossless transfer syntaxes, MONOCHROME1 with a sigmoid VOI LUT (RSNA), VOI windows and view codes instead of
ViewPosition (CMMD). The cancer rate is set for training a small model, not the real one (RSNA: 2%).
Lesions are drawn as in cvfast.data.synth, so the same difficulty applies; everything follows the seed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cvfast.data.synth.render import Difficulty, LesionSpec, _rng, plan_lesion, render_image


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
