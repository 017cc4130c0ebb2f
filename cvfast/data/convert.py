"""Parallel, resumable conversion of source images (and their ROIs) into the working-size PNG cache."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cvfast.data.crop import CropSpec, apply_crop, cut_breast
from cvfast.data.read import WORKING_SIZE, read_mammogram, read_png, resize, resize_mask, write_png
from cvfast.errors import CvfastError, DiskFull
from cvfast.util.files import TEMP_GLOB, TEMP_PREFIX, atomic_write_bytes, inside, read_json, safe_stem
from cvfast.util.parallel import default_workers, parallel_map

log = logging.getLogger(__name__)

MIN_ROI_ON_BREAST = 0.5  # an ROI mostly off the breast mask is an annotation error (mini-MIAS mdb212, mdb214)
RECORDS_DIR = ".records"  # one JSON per finished image; its presence is what makes a re-run skip the image


@dataclass
class RoiSpec:
    """Where one abnormality's ROI comes from: DICOM files to search for the mask, a circle or a box."""

    abnormality_id: int
    candidates: list[str] = field(default_factory=list)  # files in a CBIS-DDSM ROI folder
    circle: tuple[float, float, float] | None = None  # (x, y, radius) in source pixels
    box: tuple[float, float, float, float] | None = None  # (xmin, ymin, xmax, ymax) pixel corners in source pixels (VinDr)
    y_from_bottom: bool = False  # mini-MIAS counts y from the bottom edge


@dataclass
class ImageJob:
    """One image to convert: its id, source file, ROIs and the safe stem of its cache files (from its id)."""

    image_id: str
    source: str
    rois: list[RoiSpec] = field(default_factory=list)
    stem: str = ""  # set by the caller from paths.unique_stems; safe_stem(image_id) when empty

    def __post_init__(self):
        self.stem = self.stem or safe_stem(self.image_id)

    def outputs(self) -> list[str]:
        """The cache files this job writes, relative to the DATA folder."""
        return [self.image_path, self.record_path, *(self.mask_path(r.abnormality_id) for r in self.rois)]

    @property
    def image_path(self) -> str:
        """The working-size image, relative to the DATA folder."""
        return f"images/{self.stem}.png"

    @property
    def record_path(self) -> str:
        """The finished-image record, relative to the DATA folder."""
        return f"{RECORDS_DIR}/{self.stem}.json"

    def mask_path(self, abnormality_id: int) -> str:
        """One ROI's working-size mask, relative to the DATA folder."""
        return f"masks/{self.stem}_{int(abnormality_id)}.png"


def _mask_from_candidates(roi: RoiSpec, shape: tuple[int, int]) -> np.ndarray:
    """Pick the ROI mask among a CBIS-DDSM ROI folder's DICOMs: the binary one near the full image's size."""
    h, w = shape
    tol = max(8, int(0.01 * max(h, w)))  # real CBIS-DDSM masks can be a few pixels off the full image
    seen = []
    for f in roi.candidates:
        px = read_mammogram(f, allow_blank=True).pixels  # an all-zero mask is reported below as an empty ROI
        seen.append(f"{Path(f).name} {px.shape[0]}x{px.shape[1]}")
        if px.shape[0] < h // 2 and px.shape[1] < w // 2:
            continue  # the cropped lesion
        values = np.unique(px[:: max(1, px.shape[0] // 256), :: max(1, px.shape[1] // 256)])
        if len(values) > 2:
            continue
        if abs(px.shape[0] - h) > tol or abs(px.shape[1] - w) > tol:
            raise CvfastError(f"{f}: ROI mask is {px.shape[0]}x{px.shape[1]} but its full image is {h}x{w} "
                              f"(more than {tol} px off); abnormality {roi.abnormality_id} skipped")
        return px > 0
    raise CvfastError(f"{Path(roi.candidates[0]).parent if roi.candidates else '?'}: no binary ROI mask of the full "
                      f"image's size among {', '.join(seen) or 'no DICOM files'}; abnormality {roi.abnormality_id} skipped")


def _circle_mask(roi: RoiSpec, shape: tuple[int, int]) -> np.ndarray:
    """A filled circle in source pixel coordinates."""
    x, y, r = roi.circle
    if roi.y_from_bottom:
        y = shape[0] - y
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return (xs - x) ** 2 + (ys - y) ** 2 <= r * r


def _box_mask(roi: RoiSpec, shape: tuple[int, int]) -> np.ndarray:
    """A filled box in source pixel coordinates, clipped to the image."""
    xmin, ymin, xmax, ymax = roi.box
    m = np.zeros(shape, bool)
    m[max(0, int(np.floor(ymin))) : max(0, int(np.ceil(ymax))), max(0, int(np.floor(xmin))) : max(0, int(np.ceil(xmax)))] = True
    return m


def _roi_mask(roi: RoiSpec, shape: tuple[int, int]) -> np.ndarray:
    """The full-size mask of one ROI, whichever way it is given."""
    if roi.circle:
        return _circle_mask(roi, shape)
    if roi.box:
        return _box_mask(roi, shape)
    return _mask_from_candidates(roi, shape)


def job_key(job: ImageJob, size: tuple[int, int], crop: CropSpec = CropSpec()) -> str:
    """What a finished record must match to be reused: size, crop, ROI specs and the source files' size and mtime."""
    files = [job.source, *(f for roi in job.rois for f in roi.candidates)]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) if os.path.exists(f) else (f, None, None) for f in files]
    return json.dumps([list(size), [asdict(r) for r in job.rois], stats] + ([asdict(crop)] if crop.active else []))


def convert_one(job: ImageJob, data_dir: str, size: tuple[int, int], crop: CropSpec = CropSpec()) -> dict:
    """Convert one image and its ROI masks into the cache; return its record (with per-ROI rejects)."""
    data_dir = Path(data_dir)
    record_path = inside(data_dir, job.record_path)
    key = job_key(job, size, crop)
    if record_path.is_file():
        try:
            record = read_json(record_path, "conversion record")
            outputs = [record["path"], *record["masks"].values()]
            if record.get("key") == key and all((data_dir / p).is_file() for p in outputs):
                if "pixels_sha256" not in record:  # a record of an older cvfast: the digest from the cache, not a re-conversion
                    record["pixels_sha256"] = _pixels_digest(read_png(data_dir / record["path"]))
                    atomic_write_bytes(record_path, json.dumps(record).encode(), cache=True)
                return record
        except (CvfastError, KeyError, AttributeError, TypeError):
            pass  # a damaged record: convert the image again
    mammo = read_mammogram(job.source)
    rel = job.image_path
    cut, planned, breast = cut_breast(mammo.pixels, crop) if crop.active else (mammo.pixels, None, None)
    working = resize(cut, size)
    write_png(inside(data_dir, rel), working)
    masks, rejects = {}, []
    for roi in job.rois:
        try:
            full = _roi_mask(roi, mammo.pixels.shape)
            if not full.any():
                raise CvfastError(f"{job.source}: ROI of abnormality {roi.abnormality_id} is empty (outside the {mammo.pixels.shape[0]}x"
                                  f"{mammo.pixels.shape[1]} image?)")
            if breast is not None:
                on_breast = float(breast[full].mean())
                if on_breast < MIN_ROI_ON_BREAST:
                    raise CvfastError(f"{job.source}: ROI of abnormality {roi.abnormality_id} lies off the breast ({on_breast:.0%} of it "
                                      f"on breast tissue, at least {MIN_ROI_ON_BREAST:.0%} needed): an annotation error; the image is "
                                      "kept with its label, without this ROI")
                full = apply_crop(full, planned)
                if not full.any():
                    raise CvfastError(f"{job.source}: ROI of abnormality {roi.abnormality_id} lies outside the breast crop")
            mrel = job.mask_path(roi.abnormality_id)
            write_png(inside(data_dir, mrel), resize_mask(full, size))
            masks[str(roi.abnormality_id)] = mrel
        except CvfastError as e:
            rejects.append({"source": job.source, "row": f"{job.image_id} abnormality {roi.abnormality_id}", "reason": str(e)})
    record = {"image_id": job.image_id, "key": key, "path": rel, "source": job.source, "orig_height": int(mammo.pixels.shape[0]),
              "orig_width": int(mammo.pixels.shape[1]), "laterality": mammo.laterality, "view": mammo.view,
              "patient_id": mammo.patient_id, "masks": masks, "rejects": rejects,
              # the working-size pixels' digest: the same image under two names or patients is found by it
              "pixels_sha256": _pixels_digest(working), **({"breast_crop": planned.to_json(crop)} if planned else {})}
    atomic_write_bytes(record_path, json.dumps(record).encode(), cache=True)
    return record


def _pixels_digest(pixels: np.ndarray) -> str:
    """SHA-256 of working-size pixels (what makes two cache entries the same image)."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _run_job(args: tuple[ImageJob, str, tuple[int, int], CropSpec]) -> tuple[str, dict | None, str | None]:
    """Worker entry point: never raises for bad input, returns the error text instead; a full disk stops the run (it is no
    fault of the image: a rejects line for it would publish a dataset with images silently missing)."""
    job, data_dir, size, crop = args
    try:
        return job.image_id, convert_one(job, data_dir, size, crop), None
    except DiskFull:
        raise
    except CvfastError as e:
        return job.image_id, None, str(e)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{data_dir}: the disk is full (or over quota) while converting {job.source}; free space and run the same "
                           "command again: the images converted so far are kept") from None
        return job.image_id, None, f"{job.source}: {e.strerror or e}"
    except Exception as e:  # an unexpected failure on one file must not kill the whole run
        return job.image_id, None, f"{job.source}: {type(e).__name__}: {e}"


def convert_all(jobs: list[ImageJob], data_dir: str | Path, size: tuple[int, int] = WORKING_SIZE,
                workers: int | None = None, crop: CropSpec = CropSpec()) -> tuple[dict[str, dict], list[dict]]:
    """Convert every job (skipping finished ones); return records by image_id and the rejects."""
    data_dir = Path(data_dir)
    # temporaries of a killed run (finished files are never .tmp); only of this run's own files, as the shards of a
    # job array write into one folder at the same time
    own = {Path(rel).name for j in jobs for rel in j.outputs()}
    for sub in ("images", "masks", RECORDS_DIR):
        for tmp in (data_dir / sub).glob(TEMP_GLOB):
            if tmp.name[len(TEMP_PREFIX):].rsplit(".", 2)[0] in own:
                tmp.unlink(missing_ok=True)
    done = sum((data_dir / j.record_path).is_file() for j in jobs)
    if done:
        log.info("resuming: %d of %d images already converted (re-done where their sources or ROIs changed)", done, len(jobs))
    records, rejects = {}, []
    sources = {j.image_id: j.source for j in jobs}
    items = [(j, str(data_dir), tuple(size), crop) for j in jobs]
    for image_id, record, error in parallel_map(_run_job, items, workers or default_workers(), "converting", chunksize=2):
        if record is None:
            rejects.append({"source": sources[image_id], "row": image_id, "reason": error})
            continue
        records[image_id] = record
        rejects.extend(record["rejects"])
    return records, rejects

