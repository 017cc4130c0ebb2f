"""Synthetic mammograms in the layouts of the public datasets: the kit's built-in, licence-free data.

`render` draws (breasts, lesions, DICOM files); one module per dataset layout writes its files, as `cvfast.data.ingest`
has one adapter per dataset to read them; `synthesize` writes the chosen layouts and their ground truth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cvfast.data.datasets import DATASETS
from cvfast.data.synth.render import DIFFICULTIES, SIZE_PRESETS, parse_size
from cvfast.errors import CvfastError
from cvfast.util.files import atomic_write_bytes, claim_output, written_by_cvfast

log = logging.getLogger(__name__)


# the datasets with a synthetic layout (the registry's; each layout's writer in its own module, cvfast/data/synth/<name>.py)
LAYOUTS = tuple(name for name, d in DATASETS.items() if d.synthetic)


def synthesize(out: str | Path, patients: int = 24, seed: int = 0, size: str = "tiny", difficulty: str = "hard",
               layouts: tuple[str, ...] = ("ddsm", "inbreast")) -> dict:
    """Generate the chosen dataset layouts under OUT/<layout>; write and return OUT/ground_truth.json."""
    out = Path(out)
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise CvfastError(f"layouts {', '.join(unknown) or '(none)'}: expected some of {', '.join(LAYOUTS)}")
    truth_file = out / "ground_truth.json"
    claim_output(truth_file)  # before anything is written: a user's own ground_truth.json stays, and so does the rest
    occupied = [p for sub in layouts if (out / sub).is_dir() for p in (out / sub).iterdir()]
    if occupied and not written_by_cvfast(truth_file):  # someone's data, not an earlier synth run's: keep it
        raise CvfastError(f"{out}: already holds {occupied[0]} (not written by `cvfast synth`); choose an empty --out")
    if patients < 2:
        raise CvfastError(f"--patients {patients}: need at least 2 patients for a train/test split")
    if difficulty not in DIFFICULTIES:
        raise CvfastError(f"--difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTIES)}")
    look = DIFFICULTIES[difficulty]
    if size in SIZE_PRESETS:
        ddsm_size, digital_size = SIZE_PRESETS[size]
    else:
        ddsm_size = parse_size(size)
        digital_size = (int(ddsm_size[0] * 1.021), int(ddsm_size[1] * 1.109))
    truth = {"seed": seed, "patients": patients, "difficulty": difficulty}
    for name in layouts:
        truth[name] = DATASETS[name].synth(out / name, patients, seed, ddsm_size if name == "ddsm" else digital_size, look)
    atomic_write_bytes(truth_file, json.dumps(truth, indent=1).encode())
    log.info("synthetic data: %s in %s", ", ".join(f"{len(truth[n]['images'])} {n}-like images" for n in layouts), out)
    return truth
