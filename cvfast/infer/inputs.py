"""What to predict on: files, folders, a prepared DATA folder's manifest, or a CSV of paths -> one row per image."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from cvfast.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME, read_manifest
from cvfast.data.read import RASTER_SUFFIXES, dicom_identity, norm_side
from cvfast.errors import CvfastError
from cvfast.util.files import walk_files
from cvfast.util.progress import progress_bar

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES
# columns carried from inputs to predictions when known; evaluate groups by these
ID_COLUMNS = ["image_id", "patient_id", "side", "view", "exam_id", "label", "split", "dataset"]


def _from_folder(folder: Path) -> list[tuple[Path, str]]:
    """Image files under a folder (recursively, symlinked folders followed), with ids = their paths relative to it, suffix dropped."""
    files, skipped = [], {}
    everything = list(walk_files(folder))
    prepared = {p.parent for p in everything if p.name == MANIFEST_NAME}  # DATA folders inside: their masks are not mammograms
    if prepared:
        log.warning("%s: holds prepared DATA folders (%s), not read; give them as inputs themselves", folder,
                    ", ".join(str(p) for p in sorted(prepared)))
    for p in everything:
        if prepared.intersection(p.parents):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.append((p, p.relative_to(folder).with_suffix("").as_posix()))
        else:
            skipped[p.suffix.lower() or "(none)"] = skipped.get(p.suffix.lower() or "(none)", 0) + 1
    if skipped:
        log.info("%s: not image files, not read: %s", folder, ", ".join(f"{n} {s}" for s, n in sorted(skipped.items())))
    return files


def _from_csv(path: Path) -> pd.DataFrame:
    """A CSV with a 'path' column (relative to the CSV) and optional identity/label columns."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in ("image_id", "patient_id", "side", "view", "exam_id", "split")})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise CvfastError(f"{path}: not a readable CSV ({e})") from None
    if set(MANIFEST_COLUMNS) <= set(df.columns):
        return read_manifest(path)
    if "path" not in df.columns:
        raise CvfastError(f"{path}: no 'path' column; a CSV of inputs needs path[,label,patient_id,side,view,image_id]")
    df["path"] = [str((path.parent / str(p)).resolve()) for p in df["path"]]
    if "image_id" not in df.columns:
        df["image_id"] = [Path(p).stem for p in df["path"]]
    return df


def _normalised_sides(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Sides as L/R (LEFT, RIGHT, any case, spaces stripped), blank as missing; rows with another side rejected with their reason.

    Done once here so that evaluate --by breast groups each breast's views together (L on CC and LEFT on MLO are one breast).
    """
    if "side" not in df.columns:
        return df, []
    given = df["side"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    sides = given.map(norm_side)
    bad = (given != "") & sides.isna()
    rejects = [{"source": str(df.at[i, "path"]), "row": str(df.at[i, "image_id"]), "reason": f"side {given[i]!r} is not L, R, LEFT or RIGHT"}
               for i in df.index[bad]]
    return df[~bad].assign(side=sides[~bad]), rejects


def collect_inputs(sources: Sequence[str | Path], split: str | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Rows to predict (path, image_id and what is known of patient/side/view/label/split) and the rejected inputs.

    A source is an image file (DICOM, PNG, TIFF, PGM), a folder of them (searched recursively), a prepared DATA
    folder or its manifest.csv (the cached working-size images, with labels and splits), or a CSV with a
    'path' column. `split` keeps only that split of manifests/CSVs that have one.
    """
    frames, rejects, loose = [], [], []
    for src in map(Path, sources):
        if src.is_dir() and (src / MANIFEST_NAME).is_file():
            frames.append(read_manifest(src))
        elif src.is_dir():
            found = _from_folder(src)
            if not found:
                rejects.append({"source": str(src), "row": "", "reason": f"{src}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"})
            loose += found
        elif src.is_file() and src.suffix.lower() == ".csv":
            frames.append(_from_csv(src))
        elif src.is_file():
            loose.append((src, src.stem))
        else:
            rejects.append({"source": str(src), "row": "", "reason": f"{src}: no such file or folder"})
    rows = []
    with progress_bar(enabled=len(loose) > 100) as bar:  # a folder of 10,000 DICOMs: each header is a file read
        task = bar.add_task("reading DICOM headers", total=len(loose))
        for path, image_id in loose:
            bar.advance(task)
            row = {"path": str(path.resolve()), "image_id": image_id}
            if path.suffix.lower() in DICOM_SUFFIXES:
                try:
                    row.update(dicom_identity(path))
                except CvfastError as e:
                    rejects.append({"source": str(path), "row": image_id, "reason": str(e)})
                    continue
            rows.append(row)
    frames.append(pd.DataFrame(rows, columns=["path", "image_id"] if not rows else None))
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame(columns=["path", "image_id"])
    if split is not None:
        if "split" not in df.columns:
            raise CvfastError(f"--split {split}: the inputs have no split column (only manifests and CSVs with one do)")
        present = sorted(df["split"].dropna().astype(str).unique())
        if split not in present:
            raise CvfastError(f"--split {split}: no input has that split (splits present: {', '.join(present) or 'none'})")
        df = df[df["split"] == split]
    df, bad_sides = _normalised_sides(df)
    rejects += bad_sides
    df["path"] = [str(Path(p).resolve()) for p in df["path"]]  # one spelling per file, for the duplicate check
    repeated = int(df["path"].duplicated().sum())
    if repeated:
        log.warning("%d inputs name a file already given; each file is predicted once", repeated)
    df = df.drop_duplicates("path").reset_index(drop=True)
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():  # e.g. CBIS-DDSM names every full image 1-1.dcm: ids must stay unique for evaluate's joins
        log.warning("%d inputs share an image_id; their full paths are used as ids instead", int(dup.sum()))
        df.loc[dup, "image_id"] = df.loc[dup, "path"]
    # a dataset's own columns (site_id, machine_id, density, ...) travel with the predictions, for evaluate --by-group
    carried = [c for c in df.columns if c not in (*MANIFEST_COLUMNS, *ID_COLUMNS) and not c.startswith("p_")]
    keep = ["path"] + [c for c in ID_COLUMNS if c in df.columns] + carried
    return df[keep], rejects
