"""The paper's patch sets S1 and S10: ROI patches and background patches cut from the working-size cache.

S1: one patch centred on each ROI + ``n_background`` (default 1) background patches per image.
S10: 10 patches per ROI sampled around it (accepted when the patch covers at least ``min_overlap`` of the
ROI or the ROI covers at least ``min_overlap`` of the patch; the cut-off is relaxed after repeated failures,
as the reference sampler did) + 10 background patches per image. Background patches lie on breast tissue
(segmented by `crop.segment_breast`) and overlap no ROI of the image -- not just the first. With ``edge_share`` > 0
(not the paper's sampler: an option), that share of them straddles the breast's edge instead -- the skin line, and
the chest wall where the breast meets the image border -- which whole-image windows show but inner-tissue patches never do.
Every image uses its own RNG seeded from (seed, image_id), so the output does not depend on worker order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cvfast.data.classes import PATCH_CLASSES
from cvfast.data.crop import MASK_VERSION, segment_breast
from cvfast.data.manifest import MANIFEST_NAME, REJECTS_NAME, manifest_digest, read_manifest, rejects_frame, write_csv
from cvfast.data.read import mean_grey, read_png, write_png
from cvfast.errors import CvfastError
from cvfast.util.files import TEMP_GLOB, atomic_write_bytes, inside, read_json, refuse_overwrite, unique_stems
from cvfast.util.parallel import default_workers, parallel_map

log = logging.getLogger(__name__)

PATCH_MANIFEST = "patches.csv"


@dataclass
class PatchSetSpec:
    """How to cut one patch set."""

    name: str = "s10"
    size: int = 224
    n_roi: int = 10  # patches per ROI (S1: 1, centred)
    n_background: int = 10  # background patches per image
    centred: bool = False  # S1: the ROI patch is centred on the ROI
    min_overlap: float = 0.75
    min_breast: float = 0.6  # background patches: at least this fraction of the patch on breast tissue
    edge_share: float = 0.0  # of the background patches, the share centred on the breast's edge (skin line, chest wall; rounded half up)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.edge_share <= 1:
            raise CvfastError(f"--edge-share {self.edge_share}: a share of the background patches, in [0, 1]")


PATCH_SETS = {
    "s1": PatchSetSpec(name="s1", n_roi=1, n_background=1, centred=True),
    "s10": PatchSetSpec(name="s10", n_roi=10, n_background=10),
}


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero border, for O(1) window sums over many candidate patches."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return sat


def _window_sums(sat: np.ndarray, cy: np.ndarray, cx: np.ndarray, size: int) -> np.ndarray:
    """Sum of the mask inside size x size windows centred at (cy, cx), clipped to the image."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    y0, x0 = np.clip(cy - size // 2, 0, h), np.clip(cx - size // 2, 0, w)
    y1, x1 = np.clip(cy - size // 2 + size, 0, h), np.clip(cx - size // 2 + size, 0, w)
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]


def crop(img: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """A size x size patch centred at (cy, cx), zero-padded where it leaves the image."""
    out = np.zeros((size, size), img.dtype)
    y0, x0 = cy - size // 2, cx - size // 2
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + size, img.shape[0]), min(x0 + size, img.shape[1])
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def roi_centres(rng: np.random.Generator, roi: np.ndarray, spec: PatchSetSpec) -> list[tuple[int, int]]:
    """Centres of the patches for one ROI: its centre (S1) or n_roi accepted samples around it."""
    ys, xs = np.nonzero(roi)
    if spec.centred:
        return [(int(round((ys.min() + ys.max()) / 2)), int(round((xs.min() + xs.max()) / 2)))]
    sat, area, patch_area = _integral(roi), len(ys), spec.size**2
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    cut, found, tries = spec.min_overlap, [], 0
    while len(found) < spec.n_roi:
        cy = rng.integers(y0 - spec.size // 4, y1 + spec.size // 4 + 1, 256)
        cx = rng.integers(x0 - spec.size // 4, x1 + spec.size // 4 + 1, 256)
        inside = _window_sums(sat, cy, cx, spec.size)
        ok = (inside >= cut * area) | (inside >= cut * patch_area)
        found += list(zip(cy[ok].tolist(), cx[ok].tolist()))
        tries += 256
        if tries % 1024 == 0:  # the reference sampler lowered its cut-off after repeated failures
            cut *= 0.9
    return found[: spec.n_roi]


def background_centres(rng: np.random.Generator, breast: np.ndarray, rois: np.ndarray, spec: PatchSetSpec) -> list[tuple[int, int]]:
    """n_background centres whose patches touch no ROI and lie mostly on breast tissue, inner tissue first."""
    h, w = breast.shape
    roi_sat, breast_sat = _integral(rois), _integral(breast)
    ys, xs = np.nonzero(breast)
    if len(ys) == 0:
        return []
    found: list[tuple[int, int]] = []
    min_breast = spec.min_breast
    for attempt in range(40):
        pick = rng.integers(0, len(ys), 512)
        cy, cx = ys[pick], xs[pick]
        clear = _window_sums(roi_sat, cy, cx, spec.size) == 0
        tissue = _window_sums(breast_sat, cy, cx, spec.size) >= min_breast * spec.size**2
        found += list(zip(cy[clear & tissue].tolist(), cx[clear & tissue].tolist()))
        if len(found) >= spec.n_background:
            break
        if attempt % 10 == 9:
            min_breast *= 0.7  # small or mostly-lesion breasts: accept less tissue, never an ROI
    return found[: spec.n_background]


EDGE_MIN_BREAST = 0.25  # an edge patch still shows this much breast: the edge, not the film beside it


def edge_centres(rng: np.random.Generator, breast: np.ndarray, rois: np.ndarray, spec: PatchSetSpec, n: int) -> list[tuple[int, int]]:
    """Up to n centres of patches on the breast's edge that touch no ROI, alternating skin line and image border.

    The skin line is where the mask meets background inside the image; the image border is where the breast runs off
    it (the chest wall, and the cut of a breast crop). Alternating keeps the long border from crowding out the skin
    line. A patch is centred on an edge pixel, moved inwards just enough to lie inside the image, so a border patch
    sits flush against the border as a whole-image window does, with no padding.
    """
    h, w = breast.shape
    if n < 1 or h < spec.size or w < spec.size:
        return []
    skin = breast & ~ndimage.binary_erosion(breast, border_value=1)
    border = breast & ~ndimage.binary_erosion(breast, border_value=0) & ~skin
    half = spec.size // 2
    roi_sat, breast_sat = _integral(rois), _integral(breast)
    kinds = []
    for edge in (skin, border):
        ys, xs = np.nonzero(edge)
        found: dict[tuple[int, int], None] = {}  # an ordered set: the first draw of a centre keeps its place
        for _ in range(10 if len(ys) else 0):
            pick = rng.integers(0, len(ys), 256)
            cy = np.clip(ys[pick], half, h - spec.size + half)
            cx = np.clip(xs[pick], half, w - spec.size + half)
            ok = (_window_sums(roi_sat, cy, cx, spec.size) == 0) & (_window_sums(breast_sat, cy, cx, spec.size) >= EDGE_MIN_BREAST * spec.size**2)
            found.update(dict.fromkeys(zip(cy[ok].tolist(), cx[ok].tolist())))
            if len(found) >= n:
                break
        kinds.append(list(found))
    # alternate the two kinds; when one runs out the other fills in
    merged = [c for pair in zip(*kinds) for c in pair] + kinds[0][len(kinds[1]):] + kinds[1][len(kinds[0]):]
    return list(dict.fromkeys(merged))[:n]


def _image_seed(seed: int, image_id: str) -> np.random.Generator:
    """Per-image RNG independent of processing order."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def patches_for_image(args: tuple[dict, str, PatchSetSpec, str, str]) -> tuple[list[dict], list[dict]]:
    """Cut one image's patches (written as 16-bit PNGs under OUT/CUT/); return patch rows and rejects."""
    row, out_dir, spec, cut, stem = args
    out = Path(out_dir)
    rows, rejects = [], []
    try:
        img = read_png(row["path"])
        masks = [(a, read_png(a["mask"]) > 0) for a in row["abnormalities"] if a.get("mask") and a.get("patch_class")]
    except CvfastError as e:
        return [], [{"source": row["path"], "row": row["image_id"], "reason": str(e)}]
    for a, m in masks:
        if m.shape != img.shape:
            rejects.append({"source": a["mask"], "row": row["image_id"], "reason": f"mask is {m.shape}, image is {img.shape}"})
    masks = [(a, m) for a, m in masks if m.shape == img.shape]
    rng = _image_seed(spec.seed, row["image_id"])
    union = np.zeros(img.shape, bool)
    for _, m in masks:
        union |= m
    planned = []
    for a, m in masks:
        planned += [(a["patch_class"], f"roi{a['abnormality_id']}", c) for c in roi_centres(rng, m, spec)]
    unmasked = [a for a in row["abnormalities"] if not (a.get("mask") and any(a is b for b, _ in masks))]
    if spec.n_background and unmasked:
        # a lesion without a usable ROI could sit under any "background" patch: take none from this image
        rejects.append({"source": row["path"], "row": row["image_id"],
                        "reason": f"{len(unmasked)} abnormality(ies) without a usable ROI mask; no background patches from this image"})
    elif spec.n_background:
        breast = segment_breast(img)
        inner = background_centres(rng, breast, union, spec)  # first, so an edge share keeps the inner patches it leaves
        edge = edge_centres(rng, breast, union, spec, int(spec.edge_share * spec.n_background + 0.5))
        inner = inner[: spec.n_background - len(edge)]
        if len(inner) + len(edge) < spec.n_background:
            rejects.append({"source": row["path"], "row": row["image_id"],
                            "reason": f"only {len(inner) + len(edge)} of {spec.n_background} background patches fit clear of the ROIs"})
        planned += [("background", "bg", c) for c in inner] + [("background", "edge", c) for c in edge]
    for k, (cls, tag, (cy, cx)) in enumerate(planned):
        rel = f"{cut}/{cls}/{stem}_{tag}_{k:02d}.png"
        write_png(inside(out, rel), crop(img, cy, cx, spec.size))
        rows.append({"patch_id": f"{row['image_id']}_{tag}_{k:02d}", "path": rel, "label": cls, "class_idx": PATCH_CLASSES.index(cls),
                     "image_id": row["image_id"], "patient_id": row["patient_id"], "split": row["split"], "cy": cy, "cx": cx})
    return rows, rejects


def check_patch_set(folder: str | Path) -> dict:
    """Read patchset.json; refuse a set whose patches.csv is not the one it describes (an interrupted re-cut) or whose
    DATA manifest changed since (its splits may be stale)."""
    folder = Path(folder)
    info_path = folder / "patchset.json"
    if not info_path.is_file():
        raise CvfastError(f"{folder}: no patchset.json; run `cvfast patches DATA` first")
    info = read_json(info_path, "patch set description")
    for key in ("classes", "spec", "source", "manifest_sha256", "patches_sha256", "mean_grey"):
        if key not in info:
            raise CvfastError(f"{info_path}: no {key!r}; re-cut the set with `cvfast patches`")
    csv = folder / PATCH_MANIFEST
    if not csv.is_file() or hashlib.sha256(csv.read_bytes()).hexdigest() != info["patches_sha256"]:
        raise CvfastError(f"{csv}: is not the patch list {info_path.name} describes (a re-cut was interrupted, or the file was "
                          "edited); re-run `cvfast patches`")
    source = Path(info["source"])
    if (source / MANIFEST_NAME).is_file() and manifest_digest(source) != info["manifest_sha256"]:
        raise CvfastError(f"{folder}: {source / MANIFEST_NAME} changed since these patches were cut (splits may differ, "
                          f"leaking patients across splits); re-run `cvfast patches {source}`")
    return info


def _cut_name(spec: PatchSetSpec, manifest_sha256: str) -> str:
    """The sub-folder of one cut's patch files: a digest of its settings and its DATA manifest.

    A re-cut with other settings writes into a new sub-folder, so until the new patches.csv and patchset.json are in
    place the old set stays whole; equal settings and data give equal files, so rewriting in place is safe.
    """
    settings = asdict(spec)
    if not settings["edge_share"]:  # the paper's sampler: cuts made before the option existed keep their name
        del settings["edge_share"]
    return "cut-" + hashlib.sha256(json.dumps([settings, manifest_sha256, MASK_VERSION], sort_keys=True).encode()).hexdigest()[:10]


def make_patches(data: str | Path, spec: PatchSetSpec, out: str | Path | None = None, workers: int | None = None) -> pd.DataFrame:
    """Cut a patch set from a prepared DATA folder into OUT (default DATA/patches_<set>); return its manifest."""
    if spec.size < 8:
        raise CvfastError(f"patch size {spec.size}: patches must be at least 8 pixels")
    if spec.n_roi < 1 and spec.n_background < 1:
        raise CvfastError(f"--n-roi {spec.n_roi} and --n-background {spec.n_background}: that cuts no patches")
    df = read_manifest(data)
    data_dir = Path(data) if Path(data).is_dir() else Path(data).parent
    out = Path(out) if out else data_dir / f"patches_{spec.name}"
    with_rois = [r for r in df.to_dict("records") if any(a.get("mask") and a.get("patch_class") for a in r["abnormalities"])]
    if not with_rois:
        raise CvfastError(f"{data_dir}: no image has an ROI mask; patch sets need ROI annotations (CBIS-DDSM or mini-MIAS)")
    shape = read_png(df["path"].iloc[0]).shape
    if spec.size > min(shape):
        raise CvfastError(f"--size {spec.size}: patches larger than the cached images ({shape[0]}x{shape[1]})")
    digest = manifest_digest(data_dir)
    cut = _cut_name(spec, digest)
    was_patch_set = (out / "patchset.json").is_file()
    side_files = [out / REJECTS_NAME, out / PATCH_MANIFEST, out / "patchset.json"]
    inputs = [data_dir / MANIFEST_NAME, data_dir / REJECTS_NAME, *df["path"], *(a["mask"] for abns in df["abnormalities"] for a in abns if a.get("mask"))]
    refuse_overwrite(side_files, inputs, hint="a patch set needs its own folder; choose another --out")
    if (out / MANIFEST_NAME).is_file():
        raise CvfastError(f"{out}: is a prepared DATA folder (it has {MANIFEST_NAME}); a patch set needs a folder of its own")
    for tmp in out.rglob(TEMP_GLOB) if out.is_dir() else []:  # temporaries of a killed run; finished files are never .tmp
        tmp.unlink(missing_ok=True)
    stems = unique_stems(df["image_id"])
    # images without any ROI still give background patches, as in the paper's S10 (normals help the background class)
    items = [(r, str(out), spec, cut, stems[r["image_id"]]) for r in df.to_dict("records")]
    rows, rejects = [], []
    for r, rej in parallel_map(patches_for_image, items, workers or default_workers(), f"patches {spec.name}", chunksize=4):
        rows += r
        rejects += rej
    patches = pd.DataFrame(rows, columns=["patch_id", "path", "label", "class_idx", "image_id", "patient_id", "split", "cy", "cx"])
    train_classes = sorted(set(patches.loc[patches["split"] == "train", "label"]))
    if len(train_classes) < 2:  # nothing to learn from: refused before anything of a new set is written
        raise CvfastError(f"{out}: the cut gives {len(patches)} patches and {len(train_classes)} class(es) in the train split "
                          f"({', '.join(train_classes) or 'none'}; {len(rejects)} images or ROIs rejected); a patch classifier "
                          "needs at least two (see --n-roi / --n-background)")
    write_csv(rejects_frame(rejects), out / REJECTS_NAME)
    written = write_csv(patches, out / PATCH_MANIFEST)
    # the paper's one mean grey for patch and whole-image data: the whole-image training set's, train split only
    train_images = df.loc[df["split"] == "train", "path"].tolist()
    info = {"classes": PATCH_CLASSES, "spec": asdict(spec), "source": str(data_dir), "manifest_sha256": digest,
            "mean_grey": mean_grey(train_images), "mean_grey_images": len(train_images),
            "patches_sha256": hashlib.sha256(written).hexdigest(), "cut": cut,
            "image_size": list(shape)}  # the working size the patches were cut from: where a heatmap slides
    atomic_write_bytes(out / "patchset.json", json.dumps(info, indent=1).encode())  # the commit point of the new set
    for old in out.glob("cut-*"):  # earlier cuts, no longer described by patches.csv
        if old.name != cut and old.is_dir() and re.fullmatch(r"cut-[0-9a-f]{10}", old.name):
            shutil.rmtree(old, ignore_errors=True)
    for legacy in PATCH_CLASSES if was_patch_set else []:  # a set cut before cut-* sub-folders kept its patches in <class>/
        if (out / legacy).is_dir():
            shutil.rmtree(out / legacy, ignore_errors=True)
    log.info("%d patches (%s) in %s", len(patches), ", ".join(f"{k}: {v}" for k, v in patches["label"].value_counts().items()), out)
    return patches
