"""Where a model looks: sliding-window class heatmaps of a patch classifier, class activation maps of a whole-image model."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvfast.data.classes import MALIGNANT_PATCH_CLASSES
from cvfast.data.crop import CropSpec, cut_breast
from cvfast.data.read import WORKING_SIZE, read_mammogram, resize
from cvfast.errors import CvfastError
from cvfast.infer.predict import working_image
from cvfast.models.artifact import load_model, model_files
from cvfast.models.whole import WholeImageClassifier
from cvfast.util.files import atomic_write_bytes, check_output_name, refuse_overwrite, safe_stem
from cvfast.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class Heatmap:
    """Score maps over a mammogram, each (height, width) at the working size, values in [0, 1]."""

    image: np.ndarray  # the working-size image, floats in [0, 1]
    maps: dict[str, np.ndarray]
    kind: str  # 'sliding-window' or 'cam'
    orig_shape: tuple[int, int]  # the source image's (height, width): the overlay's aspect
    info: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # the files it was made from: save_overlay never writes onto them


def _image(source: str | Path | np.ndarray, size: tuple[int, int], breast_crop: dict | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """A file or uint16 array as the working-size [0, 1] float image (prepare's crop and resize) and the shape it was resized from.

    A model trained on breast-cropped images sees the image cropped the same way (`breast_crop`: its stored spec).
    """
    pixels = source if isinstance(source, np.ndarray) else read_mammogram(source).pixels
    if pixels.dtype != np.uint16:
        raise CvfastError(f"heatmap input array must be uint16 (got {pixels.dtype}); read files with cvfast.data.read.read_mammogram")
    if breast_crop:
        pixels = cut_breast(pixels, CropSpec(**breast_crop))[0]
    return working_image(pixels, size), tuple(pixels.shape)


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every `stride`, plus one flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@torch.no_grad()
def sliding_window_heatmap(model: nn.Module, sidecar: dict, source: str | Path | np.ndarray, image_size: tuple[int, int] = WORKING_SIZE,
                           stride: int | None = None, bs: int = 64, device: str | torch.device = "cpu", progress: bool = True) -> Heatmap:
    """A patch classifier's class probabilities for every window of the working-size image (batched).

    Each pixel gets the mean probability of the windows covering it. Maps: one per class, plus 'malignant'
    (calc_malignant + mass_malignant) and 'lesion' (1 - background).
    """
    if stride is not None and stride < 1:
        raise CvfastError(f"--stride {stride}: must be at least 1")
    p, fed = int(sidecar.get("crop") or sidecar["size"][0]), int(sidecar["size"][0])  # window in image px; model input side
    stride = stride or max(1, p // 4)
    if stride > p:  # windows further apart than their side would leave stripes no window covers, drawn as "no finding"
        log.warning("--stride %d is larger than the %d-pixel window; using %d so that every pixel is covered", stride, p, p)
        stride = p
    image, orig = _image(source, image_size, sidecar.get("breast_crop"))
    h, w = image.shape
    if h < p or w < p:
        raise CvfastError(f"image size {h}x{w} is smaller than the model's {p}-pixel patches")
    x = torch.from_numpy(image - float(sidecar["mean_grey"]))[None, None].to(device)
    ys, xs = _starts(h, p, stride), _starts(w, p, stride)
    corners = [(y, x0) for y in ys for x0 in xs]
    model = model.to(device).eval()
    probs = []
    with progress_bar(enabled=progress and len(corners) > bs) as bar:  # thousands of windows at full resolution on a CPU
        task = bar.add_task(f"{len(corners)} windows", total=len(corners))
        for i in range(0, len(corners), bs):
            batch = torch.cat([x[..., y:y + p, x0:x0 + p] for y, x0 in corners[i:i + bs]])
            if fed != p:  # the model was trained on patches resized on the fly
                batch = F.interpolate(batch, size=(fed, fed), mode="bilinear", align_corners=False)
            probs.append(torch.softmax(model(batch), dim=1).cpu())
            bar.advance(task, len(batch))
    probs = torch.cat(probs).numpy()
    classes = sidecar["classes"]
    total, count = np.zeros((len(classes), h, w), np.float32), np.zeros((h, w), np.float32)
    for (y, x0), pr in zip(corners, probs):
        total[:, y:y + p, x0:x0 + p] += pr[:, None, None]
        count[y:y + p, x0:x0 + p] += 1
    assert count.min() > 0, "every pixel is covered by a window"
    maps = {c: total[i] / count for i, c in enumerate(classes)}
    if all(c in maps for c in MALIGNANT_PATCH_CLASSES):
        maps["malignant"] = sum(maps[c] for c in MALIGNANT_PATCH_CLASSES)
    if "background" in maps:
        maps["lesion"] = 1 - maps["background"]
    return Heatmap(image, maps, "sliding-window", orig, {"patch": p, "stride": stride, "windows": len(corners)})


@torch.no_grad()
def class_activation_map(model: WholeImageClassifier, sidecar: dict, source: str | Path | np.ndarray, device: str | torch.device = "cpu") -> Heatmap:
    """A whole-image model's class activation map from its last convolutional block (Zhou et al. 2016).

    The top's features weighted by the FC layer's cancer-minus-no-cancer weights give a per-position logit whose
    spatial mean plus the bias is the model's logit; the map is its sigmoid, a local cancer probability.
    """
    image, orig = _image(source, tuple(sidecar["size"]), sidecar.get("breast_crop"))
    x = torch.from_numpy(image - float(sidecar["mean_grey"]))[None, None].to(device)
    model = model.to(device).eval()
    f = model.body(x)
    if model.heatmap is not None:
        f = model.heatmap(f)
    f = model.top(f)
    fc = model.head[-1]
    cancer, normal = sidecar["classes"].index("cancer"), sidecar["classes"].index("no_cancer")
    weight = fc.weight[cancer] - fc.weight[normal]
    cam = torch.einsum("c,bchw->bhw", weight, f) + (fc.bias[cancer] - fc.bias[normal])
    p_cancer = float(torch.sigmoid(cam.mean()))  # = the model's own probability (GAP and FC commute)
    cam = F.interpolate(cam[:, None], size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    return Heatmap(image, {"cancer": torch.sigmoid(cam).cpu().numpy()}, "cam", orig, {"feature_map": list(f.shape[-2:]), "p_cancer": p_cancer})


def heatmap(model_path: str | Path, source: str | Path | np.ndarray, image_size: tuple[int, int] | None = None, stride: int | None = None,
            bs: int = 64, device: str | torch.device = "cpu", progress: bool = True) -> Heatmap:
    """The heatmap suited to the model: sliding windows for a patch classifier, a CAM for a whole-image model.

    A patch model slides over the image at the working size its patches were cut from (stored with it), unless
    image_size says otherwise.
    """
    model, sidecar = load_model(model_path)
    if sidecar["kind"] == "patch":
        size = image_size or tuple(sidecar.get("source_size") or WORKING_SIZE)
        hm = sliding_window_heatmap(model, sidecar, source, size, stride, bs, device, progress)
    else:
        if stride is not None:  # a class activation map has no windows: a stride the user asked for would do nothing
            raise CvfastError(f"--stride {stride}: {model_path} is a whole-image model, whose heatmap is a class activation map without "
                              "windows; --stride applies to patch models only")
        if image_size is not None and tuple(image_size) != tuple(sidecar["size"]):
            log.warning("a whole-image model sees images at its own size %s; --size ignored", sidecar["size"])
        hm = class_activation_map(model, sidecar, source, device)
    hm.inputs = [*map(str, model_files(model_path)), *([] if isinstance(source, np.ndarray) else [str(source)])]
    return hm


def overlay(hm: Heatmap, name: str, alpha: float = 0.45, height: int | None = None) -> np.ndarray:
    """The map blended over the mammogram as an RGB uint8 array with the source image's aspect (inferno colours, 0..1)."""
    import matplotlib

    if name not in hm.maps:
        raise CvfastError(f"no map {name!r}; this heatmap has {', '.join(hm.maps)}")
    oh, ow = hm.orig_shape
    height = height or hm.image.shape[0]
    size = (height, max(1, round(height * ow / oh)))
    grey = resize(hm.image, size)  # back to the source's aspect (the working size ignores it, as in the paper)
    heat = resize(hm.maps[name].astype(np.float32), size)
    colours = matplotlib.colormaps["inferno"](np.clip(heat, 0, 1))[..., :3]
    rgb = (1 - alpha) * np.clip(grey, 0, 1)[..., None] + alpha * colours
    return (rgb * 255 + 0.5).astype(np.uint8)


def save_overlay(hm: Heatmap, out: str | Path, name: str | None = None, alpha: float = 0.45) -> list[Path]:
    """Write the overlay PNG(s): one map, or with name='all' every map as OUT_<map>.png."""
    from PIL import Image

    out = check_output_name(out)
    names = list(hm.maps) if name == "all" else [name or ("malignant" if "malignant" in hm.maps else next(iter(hm.maps)))]
    paths = [out.with_name(f"{out.stem}_{safe_stem(n)}{out.suffix}") if name == "all" else out for n in names]
    refuse_overwrite(paths, hm.inputs, hint="choose another --out for the overlay")
    written = []
    for n, path in zip(names, paths):
        buf = io.BytesIO()
        Image.fromarray(overlay(hm, n, alpha)).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written
