"""cvfast: fastai transfer learning for breast cancer detection on screening mammograms (Shen et al. 2019)."""

__version__ = "0.2.0"
