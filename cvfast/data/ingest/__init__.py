"""Dataset adapters: each turns one public dataset's raw files into the uniform manifest + cache."""

from cvfast.data.ingest.csv import prepare_csv
from cvfast.data.ingest.ddsm import prepare_ddsm
from cvfast.data.ingest.inbreast import prepare_inbreast
from cvfast.data.ingest.mias import prepare_mias

__all__ = ["prepare_csv", "prepare_ddsm", "prepare_inbreast", "prepare_mias"]
