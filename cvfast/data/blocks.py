"""fastai DataBlocks for patches and whole images: 16 bits kept, train-only mean grey, the paper's augmentation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, Normalize
from fastai.torch_core import num_distrib
from fastai.vision.augment import AffineCoordTfm, RandTransform, aug_transforms
from fastai.vision.core import TensorImage, TensorImageBW

from cvfast.data.classes import PATCH_CLASSES, WHOLE_IMAGE_CLASSES
from cvfast.data.crop import crop_spec_of
from cvfast.data.loader import PersistentTfmdDL, PersistentWeightedDL
from cvfast.data.manifest import MANIFEST_NAME, REJECTS_NAME, read_manifest
from cvfast.data.read import mean_grey, read_png
from cvfast.data.sample import PATCH_MANIFEST, check_patch_set
from cvfast.errors import CvfastError
from cvfast.util.files import read_csv

log = logging.getLogger(__name__)

class TensorMammo(TensorImageBW):
    """A grey-level mammogram tensor, shown with black = 0 (TensorImageBW's default colour map is inverted)."""

    _show_args = {"cmap": "gray"}


def open_mammo16(path: str | Path) -> TensorMammo:
    """A cached 16-bit grey image as a 1xHxW int32 tensor (scaled to floats by the batch transform, on the device).

    OpenCV decodes the cache faster than PIL's mode 'I' (bench/loader_throughput.py; PILImageBW's mode 'L' would clip
    to 8 bits). int32, not uint16: torch cannot pass uint16 tensors between DataLoader worker processes.
    """
    return TensorMammo(torch.from_numpy(read_png(path).astype(np.int32))[None])


def Mammo16Block() -> TransformBlock:
    """Block for 16-bit grey images: read as integers, scaled by 1/65535 to floats in [0, 1] on the device."""
    return TransformBlock(type_tfms=open_mammo16, batch_tfms=IntToFloatTensor(div=65535))


class VerticalFlip(RandTransform):
    """Flip each image upside down with probability p (fastai's flip_vert also transposes, wrong for HxW != WxH)."""

    order, split_idx = 25, 0

    def __init__(self, p: float = 0.5):
        super().__init__(p=1.0)
        self.flip_p = p

    def before_call(self, b, split_idx):
        """Draw which items of the batch flip."""
        super().before_call(b, split_idx)
        x = b[0] if isinstance(b, tuple) else b
        self.mask = torch.rand(x.shape[0], device=x.device) < self.flip_p

    def encodes(self, x: TensorImage):
        """Flip the drawn items along the height axis."""
        return torch.where(self.mask[:, None, None, None], x.flip(-2), x)


class IntensityShift(RandTransform):
    """Add a random grey-level offset per image, uniform in [-max_shift, max_shift] (paper: 20 of 255)."""

    order, split_idx = 40, 0

    def __init__(self, max_shift: float = 20 / 255):
        super().__init__(p=1.0)
        self.max_shift = max_shift

    def before_call(self, b, split_idx):
        """Draw one shift per item."""
        super().before_call(b, split_idx)
        x = b[0] if isinstance(b, tuple) else b
        self.shift = (torch.rand(x.shape[0], device=x.device) * 2 - 1) * self.max_shift

    def encodes(self, x: TensorImage):
        """Add each item's shift."""
        return x + self.shift[:, None, None, None]


class TrainOnlyAffine(AffineCoordTfm):
    """fastai's single-pass affine augmentation, skipped on validation (fastai resamples it through an identity grid)."""

    def before_call(self, b, split_idx):
        """Draw the affine matrices on training batches only."""
        super().before_call(b, split_idx)
        self.do = split_idx == 0


def paper_augmentation(max_rotate: float = 25.0, min_zoom: float = 0.8, max_zoom: float = 1.2,
                       max_shift: float = 20 / 255, size: tuple[int, int] | None = None) -> list:
    """The paper's augmentation as batch transforms: h/v flips, rotation, zoom (one affine pass), intensity shift."""
    # p_affine=1: rotation and zoom on every training image, as Keras' ImageDataGenerator does (fastai's default is 75%)
    affine = aug_transforms(size=size, do_flip=True, flip_vert=False, max_rotate=max_rotate, min_zoom=min_zoom,
                            max_zoom=max_zoom, max_warp=0.0, p_affine=1.0, max_lighting=0.0, p_lighting=0.0, pad_mode="zeros")
    if size is None:  # nothing to resize: validation batches need no resampling at all
        affine = [TrainOnlyAffine(aff_fs=t.aff_fs, coord_fs=t.coord_fs, mode=t.mode, pad_mode=t.pad_mode, mode_mask=t.mode_mask,
                                  align_corners=t.align_corners) for t in affine]
    return [*affine, VerticalFlip(), IntensityShift(max_shift)]


@dataclass
class DataInfo:
    """What a model must store to preprocess inputs as in training (saved beside every model)."""

    classes: list[str]
    mean_grey: float
    size: tuple[int, int]
    kind: str  # 'patch' or 'whole'
    source_size: tuple[int, int] | None = None  # patch models: working size of the images the patches were cut from
    crop: int | None = None  # patch models: side of the cut patches (before any on-the-fly resize to `size`)
    mean_source: str = "the train split"  # where mean_grey comes from (the paper: the whole-image training set's)
    breast_crop: dict | None = None  # the crop spec (cvfast.data.crop.CropSpec) the training images were prepared with


def _with_valid(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Train + valid rows with an is_valid column; the test split stays out of training and of the mean."""
    df = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    if not (df["split"] == "train").any():
        raise CvfastError(f"{where}: no images in the train split")
    if not (df["split"] == "valid").any():
        raise CvfastError(f"{where}: no images in the valid split; re-run prepare with --valid-frac > 0")
    return df.assign(is_valid=df["split"] == "valid")


def _dataloaders(df: pd.DataFrame, classes: list[str], label_col: str, bs: int, augment: bool, balance: bool,
                 file_size: tuple[int, int], size: tuple[int, int] | None, num_workers: int, seed: int | None,
                 mean: float | None = None, mean_source: str | None = None, **kwargs) -> DataLoaders:
    """Build the DataBlock over a DataFrame with absolute 'path' and label columns; attach DataInfo as dls.info.

    `size` other than the files' size resizes on the fly (a batch transform, train and valid alike). `mean` is a
    trained model's stored mean grey (default: computed on the train split).
    """
    n_train, ranks = int((~df["is_valid"]).sum()), max(1, num_distrib())
    if n_train < bs * ranks:  # fastai drops the last incomplete training batch: with fewer images than a batch, nothing trains
        per = f" ({ranks} data-parallel processes, each a batch of {bs})" if ranks > 1 else ""
        raise CvfastError(f"the train split has {n_train} {'patches' if classes == PATCH_CLASSES else 'images'} for a batch of "
                          f"{bs}{per}: lower --bs, or give the train split more data")
    present = set(df.loc[~df["is_valid"], label_col])
    if len(present) < 2:  # one class: every prediction is right, the metrics say 1.000, and the model learnt nothing
        raise CvfastError(f"the train split has only {', '.join(sorted(map(str, present)))} {'patches' if classes == PATCH_CLASSES else 'images'}: "
                          f"a classifier needs at least two of its classes ({', '.join(classes)}) to learn anything")
    given_mean = mean is not None
    mean = mean if given_mean else mean_grey(df.loc[~df["is_valid"], "path"].tolist(), seed=seed or 0)
    resize_to = tuple(size) if size is not None and tuple(size) != tuple(file_size) else None
    if augment:
        geometry = paper_augmentation(size=resize_to)
    else:
        geometry = [AffineCoordTfm(size=resize_to)] if resize_to else []
    batch_tfms = geometry + [Normalize.from_stats([mean], [1.0])]
    block = DataBlock(blocks=(Mammo16Block(), CategoryBlock(vocab=classes, sort=False)), get_x=ColReader("path"),
                      get_y=ColReader(label_col), splitter=ColSplitter("is_valid"), batch_tfms=batch_tfms)
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed)  # fastai's WeightedDL samples with numpy's global RNG
    dsets = block.datasets(df)
    kwargs = {"persistent_workers": True, **kwargs, "bs": bs, "num_workers": num_workers, "after_item": block.item_tfms,
              "after_batch": block.batch_tfms}
    if balance:
        # fastai's weighted_dataloaders, with the persistent-worker WeightedDL: one weight per train row, inverse class frequency
        train = df.iloc[dsets.splits[0]]
        wgts = (1.0 / train[label_col].map(train[label_col].value_counts())).to_numpy()
        dls = dsets.dataloaders(dl_type=PersistentWeightedDL, dl_kwargs=({"wgts": wgts}, {}), **kwargs)
    else:
        dls = dsets.dataloaders(dl_type=PersistentTfmdDL, **kwargs)
    dls.info = DataInfo(classes=list(classes), mean_grey=mean, size=tuple(resize_to or file_size), kind="patch" if classes == PATCH_CLASSES else "whole",
                        mean_source=mean_source or ("given" if given_mean else "the train split"))
    return dls


def patch_dataloaders(patches: str | Path, bs: int = 32, augment: bool = True, balance: bool = True, size: int | None = None,
                      num_workers: int = 0, seed: int | None = 0, mean: float | None = None, **kwargs) -> DataLoaders:
    """DataLoaders for a patch set (folder from `cvfast patches` or its patches.csv): 5 classes, class-balanced.

    The mean grey subtracted is the patch set's: the whole-image train split of the DATA folder it was cut from (the
    paper's one value for patch and whole-image data), unless `mean` is given."""
    path = Path(patches)
    csv = path / PATCH_MANIFEST if path.is_dir() else path
    if not csv.is_file():
        raise CvfastError(f"{csv}: no patch manifest; run `cvfast patches DATA` first")
    info = check_patch_set(csv.parent)
    df = read_csv(csv, "patch manifest", dtype={"image_id": str, "patient_id": str})
    df["path"] = [str(csv.parent / p) for p in df["path"]]
    df = _with_valid(df, str(csv))
    file_size = read_png(df["path"].iloc[0]).shape
    source = None if mean is not None else f"the whole-image train split of {info['source']}"
    mean = mean if mean is not None else float(info["mean_grey"])
    dls = _dataloaders(df, PATCH_CLASSES, "label", bs, augment, balance, file_size, (size, size) if size else None,
                       num_workers, seed, mean, mean_source=source, **kwargs)
    dls.info.source_size = tuple(info["image_size"]) if info.get("image_size") else None
    dls.info.crop = int(file_size[0])
    return dls


def patch_set_train_mean(patches: str | Path, seed: int = 0) -> float:
    """Mean grey of a patch set's own train patches (the reference code's patch mean; the paper uses the whole images')."""
    csv = Path(patches) / PATCH_MANIFEST if Path(patches).is_dir() else Path(patches)
    df = read_csv(csv, "patch manifest", dtype={"image_id": str, "patient_id": str})
    return mean_grey([str(csv.parent / p) for p in df.loc[df["split"] == "train", "path"]], seed=seed)


def whole_image_dataloaders(data: str | Path, bs: int = 2, augment: bool = True, balance: bool = False,
                            size: tuple[int, int] | None = None, num_workers: int = 0, seed: int | None = 0, mean: float | None = None,
                            mean_source: str | None = None, **kwargs) -> DataLoaders:
    """DataLoaders for whole images of a prepared DATA folder: label cancer / no_cancer; mean grey of its train split
    unless `mean` (e.g. the patch model's) is given."""
    df = read_manifest(data)
    df = _with_valid(df, str(data)).assign(target=lambda d: [WHOLE_IMAGE_CLASSES[v] for v in d["label"]])
    file_size = read_png(df["path"].iloc[0]).shape
    dls = _dataloaders(df, WHOLE_IMAGE_CLASSES, "target", bs, augment, balance, file_size, size, num_workers, seed, mean,
                       mean_source=mean_source or (None if mean is not None else f"the train split of {data}"), **kwargs)
    dls.info.breast_crop = crop_spec_of(df["breast_crop"]) if "breast_crop" in df.columns else None
    return dls


def data_files(data: str | Path) -> list[Path]:
    """The files a DATA folder (manifest, rejects, cached images and masks) or a patch set (patches.csv, patchset.json,
    rejects, patches) consists of: what a command reading it must never write over."""
    path = Path(data)
    folder = path if path.is_dir() else path.parent
    files = [folder / n for n in (MANIFEST_NAME, REJECTS_NAME, PATCH_MANIFEST, "patchset.json")]
    if (folder / MANIFEST_NAME).is_file():
        df = read_manifest(folder)
        files += [Path(p) for p in df["path"]] + [Path(a["mask"]) for abns in df["abnormalities"] for a in abns if a.get("mask")]
    if (folder / PATCH_MANIFEST).is_file():
        files += [folder / p for p in read_csv(folder / PATCH_MANIFEST, "patch manifest", usecols=["path"])["path"]]
    return files


def save_batch_grid(dls: DataLoaders, path: str | Path, max_n: int = 16) -> Path:
    """Save `show_batch` of a training batch (augmentation included) as a PNG."""
    import matplotlib.pyplot as plt  # the current backend: Agg when headless, inline in notebooks

    dls.show_batch(max_n=max_n, figsize=(12, 12))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.savefig(path, dpi=80, bbox_inches="tight")
    plt.close("all")
    return path
