"""Dataset adapters: each turns one public dataset's raw files into the uniform manifest + cache."""

from cvfast.data.ingest.cmmd import prepare_cmmd
from cvfast.data.ingest.csv import prepare_csv
from cvfast.data.ingest.ddsm import prepare_ddsm
from cvfast.data.ingest.inbreast import prepare_inbreast
from cvfast.data.ingest.mias import prepare_mias
from cvfast.data.ingest.rsna import prepare_rsna
from cvfast.data.ingest.vindr import prepare_vindr

__all__ = ["prepare_cmmd", "prepare_csv", "prepare_ddsm", "prepare_inbreast", "prepare_mias", "prepare_rsna", "prepare_vindr"]
