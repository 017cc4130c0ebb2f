"""The dataset registry: every dataset the kit reads, in one place.

The CLI's `prepare` commands, the datasets `finetune --dataset` accepts, `synth --layouts` and the README's list are
made from `DATASETS`. Adding a dataset = one adapter `cvfast/data/ingest/<name>.py` with `prepare_<name>` (+ a layout
`cvfast/data/synth/<name>.py` with `synth_<name>` if it has synthetic data) and one entry here. The registry itself
imports no adapter, so the CLI starts fast and every layer of the data package may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Callable

# BI-RADS values labelled cancer and no cancer by default (3, probably benign, is ambiguous and excluded unless listed)
INBREAST_BIRADS = (("4a", "4b", "4c", "5", "6"), ("1", "2"))
VINDR_BIRADS = (("4", "5"), ("1", "2"))


@dataclass(frozen=True)
class Option:
    """An option only some datasets have: its name, default and help; `list` options are comma-separated values."""

    name: str
    default: str | None
    help: str
    is_list: bool = False

    def parse(self, text: str | None) -> str | tuple[str, ...] | None:
        """The adapter's keyword value from the command-line text."""
        return tuple(v.strip() for v in text.split(",") if v.strip()) if self.is_list and text is not None else text


@dataclass(frozen=True)
class Dataset:
    """One dataset: its adapter, how its source folder looks, and its defaults."""

    name: str
    title: str
    summary: str
    source_help: str
    official_test: bool = False  # an official test split: no --test-frac
    crop: str = "none"  # prepare's default --crop
    blank: bool = False  # prepare's default --blank
    transfer: bool = True  # a target of `cvfast finetune --dataset` (image-level labels)
    synthetic: bool = False  # `cvfast synth` writes its layout (cvfast/data/synth/<name>.py)
    options: tuple[Option, ...] = field(default_factory=tuple)

    @property
    def prepare(self) -> Callable:
        """The adapter: cvfast.data.ingest.<name>.prepare_<name>(source, opts, **options)."""
        return getattr(import_module(f"cvfast.data.ingest.{self.name}"), f"prepare_{self.name}")

    @property
    def synth(self) -> Callable:
        """The synthetic layout's writer: cvfast.data.synth.<name>.synth_<name>(out, patients, seed, size, difficulty)."""
        return getattr(import_module(f"cvfast.data.synth.{self.name}"), f"synth_{self.name}")


def _birads(defaults: tuple[tuple[str, ...], tuple[str, ...]], what: str = "BI-RADS", note: str = "") -> tuple[Option, ...]:
    """--positive / --negative: the BI-RADS values labelled cancer and no cancer."""
    positive, negative = defaults
    return (Option("positive", ",".join(positive), f"{what} values labelled cancer{note}.", is_list=True),
            Option("negative", ",".join(negative), f"{what} values labelled no cancer (3 is excluded by default).", is_list=True))


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("ddsm", "CBIS-DDSM", "CBIS-DDSM: four CSVs + DICOM tree; official train/test kept, patient-level validation split.",
            "Folder with CBIS-DDSM/ and the case-description CSVs.", official_test=True, transfer=False, synthetic=True),
    Dataset("inbreast", "INbreast", "INbreast: image-level labels from BI-RADS; patient-level splits.",
            "Folder with AllDICOMs/ and INbreast.csv|xls.", synthetic=True, options=_birads(INBREAST_BIRADS)),
    Dataset("mias", "mini-MIAS", "mini-MIAS: circular ROIs become masks; a patient is the left/right pair; cropped to the breast and "
            "blanked outside it by default.", "Folder with Info.txt and mdb*.pgm|png.", crop="breast", blank=True),
    Dataset("csv", "your CSV", "Your own images with image-level labels only (the transfer route).",
            "CSV with path,label[,patient_id,side,view,split]."),
    Dataset("rsna", "RSNA", "RSNA Screening Mammography: label = cancer; patient-level splits stratified by cancer, or a held-out site.",
            "Folder with train.csv and train_images/.", synthetic=True,
            options=(Option("test_site", None, "Hold out every image of this site_id as the test set."),)),
    Dataset("vindr", "VinDr-Mammo", "VinDr-Mammo: label from breast BI-RADS, finding boxes as ROI masks, the official training/test split.",
            "Folder with the two annotation CSVs and images/.", official_test=True, synthetic=True,
            options=_birads(VINDR_BIRADS, "Breast BI-RADS", " (VinDr has no biopsy truth)")),
    Dataset("cmmd", "CMMD", "CMMD: label per breast (Malignant vs Benign); side and view from the DICOM headers; patient-level splits.",
            "Folder with CMMD/ and CMMD_clinicaldata_revision.xlsx.", synthetic=True),
)}
