"""Files: the guards every writer uses (safe names, folder walks, no write onto an input) and atomic writes.

One place for three rules (users' files are sacred, their inputs untrusted):
- a file name derived from data (image, patient or abnormality ids, uids, stems) goes through `safe_stem` /
  `unique_stems` and is joined under its output folder with `inside`, so no id can leave --out;
- folders are searched with `walk_files`, which follows symlinked folders (clusters link datasets in) and
  stops at loops;
- before a command writes, `refuse_overwrite` checks that none of its outputs is one of its inputs;
- a file that already exists is replaced only when cvfast wrote it and nobody changed it since (`claim_output`: a
  digest of each file cvfast writes is kept beside it, in the folder's `.cvfast-written/`);
- every file is written whole or not at all (`atomic_write_bytes`).

The floor of the house: used by every layer, imports nothing of cvfast but errors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from cvfast.errors import CvfastError, DiskFull

# what a stem may hold as it is: portable on every file system, no separators, no leading dot, no NUL
PLAIN_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
MAX_STEM = 120
TEMP_PREFIX = ".cvfast-"  # temporaries of a killed run are removed by this prefix: never a user's own hidden files
TEMP_GLOB = f"{TEMP_PREFIX}*.tmp"
LOCK_NAME = f"{TEMP_PREFIX}lock"  # held by the run writing into a folder (`exclusive`)
DEVICE_NAMES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.I)  # Windows refuses these as file names


def _digest(text: str) -> str:
    """A short, stable digest of an id (keeps sanitised names distinct)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def safe_stem(text: str) -> str:
    """A file-name stem for an id: the id itself when it is plain, else a slug of it plus a digest of the original.

    `../../x` -> `x-<digest>`; an absolute path, separators, NUL, control characters or a very long id
    likewise; two ids never share a stem unless they are equal (the digest is of the whole original).
    """
    text = str(text)
    if PLAIN_STEM.match(text) and not text.endswith(".") and not DEVICE_NAMES.match(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[: MAX_STEM - 11] or "id"
    return f"{slug}-{_digest(text)}"


def unique_stems(ids: Iterable[str]) -> dict[str, str]:
    """Safe stems for a set of ids, distinct even on case-insensitive file systems (macOS, Windows).

    Ids whose stems differ only by case all get a digest suffix, so `P1` and `p1` never share a file.
    """
    ids = list(dict.fromkeys(map(str, ids)))
    stems = {i: safe_stem(i) for i in ids}
    by_fold: dict[str, list[str]] = {}
    for i, s in stems.items():
        by_fold.setdefault(s.casefold(), []).append(i)
    for group in by_fold.values():
        if len(group) > 1:
            for i in group:
                stems[i] = f"{stems[i][: MAX_STEM - 11]}-{_digest(i)}"
    return stems


def inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """ROOT/RELATIVE, refused when RELATIVE could leave ROOT (absolute, or climbing with ..): the last line of defence
    behind safe_stem. Judged on the path as written, so an images/ folder that is a symlink to another disk is fine."""
    rel = os.path.normpath(str(relative))
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep) or "\x00" in rel:
        raise CvfastError(f"{relative!r}: would be written outside the output folder {root}; refused")
    return Path(root) / rel


def walk_files(root: str | os.PathLike, suffixes: Iterable[str] | None = None) -> Iterator[Path]:
    """Files below ROOT (sorted, hidden names skipped), following symlinked folders; a folder reached twice is read once."""
    suffixes = {s.lower() for s in suffixes} if suffixes is not None else None
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
        except OSError:
            return  # a dangling link
        if (st.st_dev, st.st_ino) in seen:
            return  # a link loop, or a folder linked in twice
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            if e.is_dir():  # follows symlinks
                yield from visit(p)
            elif e.is_file() and (suffixes is None or p.suffix.lower() in suffixes):
                yield p

    yield from visit(Path(root))


def file_identity(path: str | os.PathLike) -> tuple:
    """What makes two paths the same file: the inode when it exists, else the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def refuse_overwrite(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike], hint: str = "choose another --out") -> None:
    """Raise CvfastError when any output path is (a link to, or the same file as) an input file."""
    known: dict[tuple, str] = {}
    for p in inputs:
        known.setdefault(file_identity(p), str(p))
        known.setdefault(("path", os.path.realpath(p)), str(p))
    for out in outputs:
        for key in (file_identity(out), ("path", os.path.realpath(out))):
            if key in known:
                raise CvfastError(f"{out}: writing it would overwrite the input {known[key]}; refused ({hint})")


# the files that make a prepared DATA folder, a patch set or a model folder what it is: a predictions CSV, a report or
# an overlay never takes one of these names (`predict --out DATA/manifest.csv` would destroy a DATA folder)
RESERVED_NAMES = frozenset({"manifest.csv", "rejects.csv", "patches.csv", "patchset.json", "model.json", "model.pkl",
                            "model.safetensors", "recipe.json", "progress.json", "Info.txt", "INbreast.csv", "INbreast.xls", "INbreast.xlsx"})


# sub-folders holding a prepared DATA folder's cache or a patch set's patches (beside its manifest.csv / patchset.json)
CACHE_FOLDERS = re.compile(r"^(images|masks|\.records|cut-[0-9a-f]{10}|checkpoints)$")


def check_output_name(path: str | os.PathLike) -> Path:
    """PATH, unless it names one of a cvfast folder's own files (RESERVED_NAMES), a dataset's label sheet, or lies in a
    DATA folder's cache or a patch set's patches (a heatmap saved over a cached image would corrupt training data)."""
    path = Path(path)
    _parents_are_folders(path)
    if path.name in RESERVED_NAMES or re.search(r"_case_description_(train|test)_set\.csv$", path.name, re.I):
        raise CvfastError(f"{path}: that name belongs to a DATA folder, patch set, model or dataset file; choose another --out name")
    for folder in path.parents:
        if CACHE_FOLDERS.match(folder.name) and any((folder.parent / n).is_file() for n in ("manifest.csv", "patchset.json", "model.json")):
            raise CvfastError(f"{path}: lies in {folder}, the cache of a cvfast DATA folder, patch set or model; choose another --out")
    return path


def _parents_are_folders(path: Path) -> None:
    """Refuse a path under an existing file (OUT/x.csv where OUT is a file), which mkdir reports only as 'File exists'."""
    for folder in reversed(path.parents):
        if folder.exists() and not folder.is_dir():
            raise CvfastError(f"{path}: {folder} is a file, not a folder; choose another --out")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from a side file, or a CvfastError naming the file (truncated, not JSON, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CvfastError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CvfastError(f"{path}: {what} is not valid JSON (truncated or edited?): {e}") from None
    if not isinstance(value, dict):
        raise CvfastError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


# beside the files cvfast writes: WRITTEN_DIR/<name>.sha256 lists the digests of what it wrote, so a later run can tell
# its own earlier output (replace it) from a user's file of the same name (keep it, refuse)
WRITTEN_DIR = ".cvfast-written"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _written_record(path: Path) -> Path:
    return path.parent / WRITTEN_DIR / f"{path.name}.sha256"


def _recorded(path: Path) -> set[str]:
    try:
        return set(_written_record(path).read_text().split())
    except OSError:
        return set()


def written_by_cvfast(path: str | os.PathLike) -> bool:
    """True when PATH holds exactly what cvfast wrote there."""
    path = Path(path)
    digests = _recorded(path)
    try:
        return bool(digests) and file_sha256(path) in digests
    except OSError:
        return False


def claim_output(path: str | os.PathLike) -> None:
    """Refuse to replace an existing file that cvfast did not write (a user's own file of the same name), or that was
    changed since cvfast wrote it; a file that does not exist yet is free."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise CvfastError(f"{path}: is a folder; cvfast would write a file of that name there")
    if path.exists() and not written_by_cvfast(path):
        raise CvfastError(f"{path}: already exists and was not written by cvfast (or was changed since); it is kept: move it or choose "
                          f"another --out (a folder written by a cvfast older than 0.2, which kept no records: `cvfast adopt {path.parent}` once)")


def _write_record(path: Path, digests: set[str]) -> None:
    record = _written_record(path)
    record.parent.mkdir(exist_ok=True)
    fd, rtmp = tempfile.mkstemp(dir=record.parent, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{d}\n" for d in sorted(digests)))
        os.replace(rtmp, record)
    except BaseException:
        Path(rtmp).unlink(missing_ok=True)
        try:
            record.parent.rmdir()  # only when empty: a failed first record leaves no folder behind
        except OSError:
            pass
        raise


def _replace(tmp: str | os.PathLike, path: Path, digest: str | None) -> None:
    """os.replace(tmp, path) with path's record (None: a cache file, whose folder cvfast keeps its own records for).

    The record lists the new digest beside the old one before the rename and only the new one after it, so a kill or a
    full disk at any point leaves a file that a re-run recognises as cvfast's.
    """
    if digest is None:
        os.replace(tmp, path)
        return
    old = _recorded(path) & {file_sha256(path)} if path.is_file() else set()
    _write_record(path, old | {digest})
    os.replace(tmp, path)
    if old - {digest}:
        _write_record(path, {digest})


def adopt(folder: str | os.PathLike) -> int:
    """Record every file below FOLDER as cvfast's own (for folders written before cvfast kept records); return how many."""
    n = 0
    for path in walk_files(folder):
        if TEMP_PREFIX not in path.name:
            _write_record(path, {file_sha256(path)})
            n += 1
    return n


# how libraries that write through their own C++ code (torch's zip writer, safetensors) report a full disk
DISK_FULL_WORDS = ("No space left", "unexpected pos", "Disk quota exceeded")


def disk_full(e: BaseException) -> bool:
    """Whether a failed write failed for lack of space (an OSError's errno, or a library's own wording of it)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, DiskFull) or any(w in str(e) for w in DISK_FULL_WORDS)


@contextmanager
def exclusive(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold a lock on FOLDER while a run writes into it: a second run into the same folder is refused, never interleaved.

    A POSIX record lock (lockf): it goes with the process, so a killed run leaves none behind, and forked loader workers
    do not inherit it. Where the file system or the platform has no locks (Windows, some network mounts) it holds none.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise CvfastError(f"{folder}: another {what} is writing into this folder now; wait for it to end, or choose another --out") from None
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise
            logging.getLogger(__name__).warning("%s: this file system has no file locks (%s); nothing stops a second run into it", folder, e.strerror)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _unwritable(path: Path, e: OSError) -> CvfastError:
    """The message for a write that failed; a full disk is said to be one (an environment failure, not bad input)."""
    if disk_full(e):
        return DiskFull(f"{path}: cannot write: the disk is full (or over quota); free space and run the same command again: finished work is kept")
    return CvfastError(f"{path}: cannot write ({e.strerror or e})")


def read_csv(path: str | os.PathLike, what: str, **kwargs):
    """pandas.read_csv, with an empty, truncated or non-text file refused by name (pandas' EmptyDataError names no file)."""
    import pandas as pd  # here, not at the top: the floor of the house stays cheap to import

    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise CvfastError(f"{path}: {what} not found") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise CvfastError(f"{path}: {what} is not a readable CSV (empty, truncated or edited?): {' '.join(str(e).split())[:160]}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, cache: bool = False, edit: bool = False) -> None:
    """Write bytes to path via a temporary file in the same folder and os.replace, so no partial file appears.

    An existing file is replaced only when cvfast wrote it (`claim_output`); CACHE files (cached images, records of a
    DATA folder's cache) skip that check and its record: their folder's own records say what they hold. EDIT: the user
    asked for this very file to be rewritten (no check, a new record).
    """
    path = Path(path)
    if not (cache or edit):
        claim_output(path)
    fd = tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _replace(tmp, path, None if cache else hashlib.sha256(data).hexdigest())
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (FileExistsError, NotADirectoryError)):  # a file where a folder must be: say which
            _parents_are_folders(path)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from None
        raise


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike, digest: str | None = None) -> None:
    """Move a finished temporary file (written by a library: torch, safetensors) onto PATH, with atomic_write_bytes' check
    and record; the temporary is removed when that fails."""
    path = Path(path)
    try:
        claim_output(path)
        _replace(tmp, path, digest or file_sha256(tmp))  # DIGEST: the caller's, when it hashed the file already
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from None
        raise
