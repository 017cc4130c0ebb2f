"""What every adapter shares: run the conversion, attach masks, split by patient, write manifest + rejects."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from cvfast.data.convert import ImageJob, convert_all
from cvfast.data.crop import CropSpec
from cvfast.data.manifest import MANIFEST_NAME, REJECTS_NAME, assign_splits, rejects_frame, write_csv, write_manifest
from cvfast.data.read import WORKING_SIZE
from cvfast.errors import CvfastError
from cvfast.util.files import atomic_write_bytes, file_identity, read_json, refuse_overwrite, unique_stems

log = logging.getLogger(__name__)

SHARDS_DIR = ".shards"  # one JSON per finished shard of a sharded preparation


@dataclass
class PrepareOptions:
    """Options every `prepare` shares."""

    out: Path
    size: tuple[int, int] = WORKING_SIZE
    workers: int | None = None
    seed: int = 0
    valid_frac: float = 0.15
    test_frac: float = 0.2  # used only where the dataset has no official test split
    shard: tuple[int, int] | None = None  # (k, n): convert only the k-th of n shards (1-based); `merge_shards` assembles them
    crop: CropSpec = field(default_factory=CropSpec)  # breast crop and side flip before resizing


def check_source(source: str | Path, what: str) -> Path:
    """The source path, or a clear error when it does not exist."""
    p = Path(source).expanduser()
    if not p.exists():
        raise CvfastError(f"{p}: {what} not found")
    return p


def find_sheet(source: Path, names: Iterable[str], what: str) -> Path:
    """A dataset's label sheet (the first of `names` found) in SOURCE or one level up."""
    names = tuple(names)
    for folder in (source, source.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise CvfastError(f"{source}: no {what} ({', '.join(names)}) here or one level up")


def read_table(path: Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """A dataset's label table (CSV, or XLSX/XLS) as stripped strings; a clear error for an unreadable file or missing columns."""
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            df = pd.read_excel(path, dtype=str).fillna("")
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise CvfastError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CvfastError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} of the {what}")
    return df.apply(lambda col: col.str.strip())


def repeated_rows(table: pd.DataFrame, key: str, path: Path, source: str | None = None) -> tuple[set[int], list[dict]]:
    """Rows to skip for ids listed more than once: the later copies of identical rows (counted once), every copy of rows
    that disagree (which is right is unknown); each with a rejects entry naming its row."""
    skip, rejects = set(), []
    for value, rows in table[table[key].duplicated(keep=False)].groupby(key, sort=False):
        first = row_name(path, rows.index[0])
        same = (rows.nunique(dropna=False) <= 1).all()
        for i in rows.index[1:] if same else rows.index:
            skip.add(i)
            reason = (f"{key} {value} listed again (first at {first}); counted once" if same else
                      f"{key} {value} listed {len(rows)} times with different values; which is right is unknown, so none is used")
            rejects.append({"source": source or str(path), "row": row_name(path, i), "reason": reason})
    return skip, rejects


def row_name(path: Path, index: int) -> str:
    """How a rejects entry names a table row: the file and its 1-based line, the header being line 1."""
    return f"{path.name} row {index + 2}"


def finish(dataset: str, images: dict[str, dict], jobs: list[ImageJob], rejects: list[dict], opts: PrepareOptions,
           inputs: Iterable[str | Path] = ()) -> pd.DataFrame:
    """Convert the jobs, build and write the manifest and rejects.csv; raise when nothing usable remains.

    `images` maps image_id -> patient_id, side, view, label, abnormalities (without masks), optional split
    and extra columns; side/view may be None and are then taken from the DICOM header. `inputs`: the label
    files read (CSVs, sheets), protected like the images from being written over. With `opts.shard` only that
    shard's images are converted and recorded under OUT/.shards/ (no manifest): `merge_shards` assembles them.
    """
    stems = unique_stems(j.image_id for j in jobs)
    for j in jobs:
        j.stem = stems[j.image_id]
    sources = [f for j in jobs for f in (j.source, *(c for r in j.rois for c in r.candidates))]
    outputs = [opts.out / MANIFEST_NAME, opts.out / REJECTS_NAME, *(opts.out / rel for j in jobs for rel in j.outputs())]
    refuse_overwrite(outputs, [*inputs, *sources], hint="the cache would replace the source; choose an --out that holds no source files")
    source_of = {j.image_id: j.source for j in jobs}
    jobs, dup_rejects = _unique_sources(jobs, images, source_of)
    order = {j.image_id: k for k, j in enumerate(jobs)}  # the listing's order decides which copy is kept, sharded or not
    if opts.shard:
        jobs = [j for j in jobs if shard_of(j.image_id, opts.shard[1]) == opts.shard[0]]
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CvfastError(f"{opts.out}: cannot create the output folder ({e.strerror or e})") from None
    records, conv_rejects = convert_all(jobs, opts.out, opts.size, opts.workers, opts.crop)
    order_of_source = {j.source: order[j.image_id] for j in jobs}
    for r in conv_rejects:  # ordered as an unsharded run lists them, whichever shard met them
        r["order"] = order_of_source.get(r["source"], -1)
    part = {"dataset": dataset, "options": _shared_options(opts), "listing": _listing_digest(order, source_of),
            "listing_rejects": rejects + dup_rejects,
            "images": {i: {**images[i], "order": order[i], "source": source_of[i]} for i in records},
            "records": records, "conversion_rejects": conv_rejects}
    if opts.shard:
        k, n = opts.shard
        atomic_write_bytes(opts.out / SHARDS_DIR / f"{k}-of-{n}.json", json.dumps(part).encode())
        log.info("shard %d of %d: %d images converted; when all %d shards are done: cvfast prepare merge %s", k, n, len(records), n, opts.out)
        return pd.DataFrame({"image_id": list(records)}).assign(split="", shard=f"{k}/{n}")
    return _assemble([part], opts)


def shard_of(image_id: str, n: int) -> int:
    """The shard (1..n) an image belongs to: from a digest of its id, so every machine agrees whatever the listing order."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:12], 16) % n + 1


def _listing_digest(order: dict[str, int], source_of: dict[str, str]) -> str:
    """A digest of the images listed (ids and sources): every shard of one preparation must have seen the same."""
    return hashlib.sha256(json.dumps([[i, source_of[i]] for i in order]).encode()).hexdigest()


def _shared_options(opts: PrepareOptions) -> dict:
    """The options every shard of one preparation must share (the split is drawn with them at merge)."""
    return {"size": list(opts.size), "seed": opts.seed, "valid_frac": opts.valid_frac, "test_frac": opts.test_frac, "crop": asdict(opts.crop)}


def merge_shards(out: str | Path) -> pd.DataFrame:
    """Assemble the shards under OUT/.shards/ into one manifest, with pixel de-duplication and the splits drawn over all."""
    out = Path(out)
    files = sorted((out / SHARDS_DIR).glob("*-of-*.json"))
    if not files:
        raise CvfastError(f"{out}: no shards here ({SHARDS_DIR}/K-of-N.json); run `cvfast prepare <dataset> ... --shard K/N` first")
    counts = {f.stem.split("-of-")[1] for f in files}
    if len(counts) > 1:
        raise CvfastError(f"{out}: shards of different splittings ({', '.join(f.name for f in files)}); remove the stale ones")
    n = int(counts.pop())
    missing = sorted(set(range(1, n + 1)) - {int(f.stem.split("-of-")[0]) for f in files})
    if missing:
        raise CvfastError(f"{out}: shard(s) {', '.join(f'{k}/{n}' for k in missing)} of {n} not done yet; run them, then merge")
    parts = [read_json(f, "shard record") for f in sorted(files, key=lambda f: int(f.stem.split("-of-")[0]))]
    first = parts[0]
    for f, part in zip(sorted(files, key=lambda f: int(f.stem.split("-of-")[0])), parts):
        if (part["dataset"], part["options"]) != (first["dataset"], first["options"]):
            raise CvfastError(f"{f}: prepared as {part['dataset']} with {part['options']}, but shard 1 as {first['dataset']} with "
                              f"{first['options']}; every shard must run the same command")
        if part["listing"] != first["listing"]:
            raise CvfastError(f"{f}: made from another listing of the dataset than shard 1 (its label files or images changed in "
                              "between); run every shard again on the same files")
    o = first["options"]
    opts = PrepareOptions(out=out, size=tuple(o["size"]), seed=o["seed"], valid_frac=o["valid_frac"], test_frac=o["test_frac"],
                          crop=CropSpec(**o["crop"]))
    return _assemble(parts, opts)


def _assemble(parts: list[dict], opts: PrepareOptions) -> pd.DataFrame:
    """Manifest and rejects.csv from converted parts (one, or every shard), in the listing's order."""
    dataset = parts[0]["dataset"]
    images = dict(sorted(((i, m) for p in parts for i, m in p["images"].items()), key=lambda kv: kv[1]["order"]))
    records = {i: r for p in parts for i, r in p["records"].items()}
    records = {i: records[i] for i in images}
    source_of = {i: m.pop("source") for i, m in images.items()}
    for m in images.values():
        m.pop("order")
    conv_rejects = [{k: v for k, v in r.items() if k != "order"} for r in sorted((r for p in parts for r in p["conversion_rejects"]),
                                                                                key=lambda r: r["order"])]
    records, same_pixels = _unique_pixels(records, images, source_of)
    rejects = parts[0]["listing_rejects"] + conv_rejects + same_pixels
    rows = []
    for image_id, meta in images.items():
        rec = records.get(image_id)
        if rec is None:
            continue
        abns = [{**a, "mask": rec["masks"].get(str(a["abnormality_id"]), "")} for a in meta.pop("abnormalities")]
        rows.append({
            **meta, "image_id": image_id, "dataset": dataset,
            "side": meta.get("side") or rec["laterality"] or "", "view": meta.get("view") or rec["view"] or "",
            "path": rec["path"], "source": rec["source"], "orig_height": rec["orig_height"], "orig_width": rec["orig_width"],
            "pathology": "MALIGNANT" if any(a["pathology"] == "MALIGNANT" for a in abns) else ("BENIGN" if abns else "NORMAL"),
            "n_abnormalities": len(abns), "abnormalities": json.dumps(abns),
            **({"breast_crop": rec["breast_crop"]} if opts.crop.active else {}),
        })
    write_csv(rejects_frame(rejects), opts.out / REJECTS_NAME)
    if rejects:
        log.warning("%d files or rows could not be used; reasons in %s", len(rejects), opts.out / REJECTS_NAME)
    if not rows:
        raise CvfastError(f"nothing usable remains of {dataset} ({len(rejects)} rejects; see {opts.out / REJECTS_NAME})")
    df = pd.DataFrame(rows)
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = assign_splits(df, opts.seed, opts.valid_frac, opts.test_frac)
    write_manifest(df, opts.out)
    return df


def _keep_one(groups: dict, images: dict[str, dict], source_of: dict[str, str], what: str) -> tuple[set[str], list[dict]]:
    """For groups of image ids that are one image: keep the first listed when they agree on patient and label, none when not."""
    dropped, rejects = set(), []
    for ids in groups.values():
        if len(ids) < 2:
            continue
        patients = sorted({str(images[i]["patient_id"]) for i in ids})
        labels = {images[i]["label"] for i in ids}
        keep = ids[0] if len(patients) == 1 and len(labels) == 1 else None
        for i in ids:
            if i == keep:
                continue
            dropped.add(i)
            others = ", ".join(x for x in ids if x != i)
            reason = (f"{what} as image {keep} of the same patient; counted once" if keep else
                      f"{what} as {others}, with other patients or labels (patients {', '.join(patients)}; labels "
                      f"{', '.join(map(str, sorted(labels)))}): which is right is unknown, so none of them is used "
                      "(it would leak across splits or carry two labels)")
            rejects.append({"source": source_of[i], "row": i, "reason": reason})
    return dropped, rejects


def _unique_sources(jobs: list[ImageJob], images: dict[str, dict], source_of: dict[str, str]) -> tuple[list[ImageJob], list[dict]]:
    """Drop jobs whose source file is another job's (the same file listed twice, or under two patients)."""
    groups: dict[tuple, list[str]] = {}
    for j in jobs:
        groups.setdefault(file_identity(j.source), []).append(j.image_id)
    dropped, rejects = _keep_one(groups, images, source_of, "the same source file")
    for i in dropped:
        images.pop(i, None)
    return [j for j in jobs if j.image_id not in dropped], rejects


def _unique_pixels(records: dict[str, dict], images: dict[str, dict], source_of: dict[str, str]) -> tuple[dict[str, dict], list[dict]]:
    """Drop images whose working-size pixels equal another's (a copy of one file under another name)."""
    groups: dict[str, list[str]] = {}
    for i, rec in records.items():
        groups.setdefault(rec["pixels_sha256"], []).append(i)
    dropped, rejects = _keep_one(groups, images, source_of, "identical pixels")
    return {i: r for i, r in records.items() if i not in dropped}, rejects
