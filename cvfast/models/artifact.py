"""Model files and the model factory: a fastai .pkl learner, a safetensors weights file and a JSON sidecar to rebuild without unpickling.

One registry of model kinds (`MODEL_KINDS`): what each kind outputs (its classes, in order) and how its architecture is
built from a sidecar's spec (`create_model`). Adding a model kind = one builder + one registry entry here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from cvfast.data.classes import PATCH_CLASSES, WHOLE_IMAGE_CLASSES
from cvfast.data.crop import CropSpec
from cvfast.errors import CvfastError, DiskFull
from cvfast.models.body import create_body
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import whole_from_patch
from cvfast.util.files import TEMP_PREFIX, atomic_write_bytes, claim_output, disk_full, file_sha256, replace_file

log = logging.getLogger(__name__)

FORMAT = "cvfast-model/1"
PKL, WEIGHTS, SIDECAR = "model.pkl", "model.safetensors", "model.json"


def export_model(learn, out_dir: str | Path, recipe: dict | None = None, metrics: dict | None = None) -> dict[str, Path]:
    """Write OUT/model.pkl (learn.export), OUT/model.safetensors and OUT/model.json, all or nothing.

    Both big files are written to temporaries first: a failure there (a full disk) leaves the folder as it was. Then
    model.json, the commit point, is removed, the files moved in, and the new model.json written last: a folder without
    model.json is an unfinished export, which load_model refuses (it never falls back to a lone model.pkl).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = learn.model
    temps = {PKL: out / f"{TEMP_PREFIX}{PKL}.tmp", WEIGHTS: out / f"{TEMP_PREFIX}{WEIGHTS}.tmp"}
    try:
        for name in (PKL, WEIGHTS, SIDECAR):
            claim_output(out / name)  # before any work: a user's own file of one of these names stays
        learn.export(temps[PKL].resolve())
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(temps[WEIGHTS]))
        digests = {name: file_sha256(tmp) for name, tmp in temps.items()}
        sidecar = {"format": FORMAT, "kind": model.spec["kind"], **model.info, "spec": model.spec,
                   "weights": WEIGHTS, "weights_sha256": digests[WEIGHTS], "pkl_sha256": digests[PKL],
                   "recipe": recipe or {}, "metrics": metrics or {}}
        sidecar = json.loads(json.dumps(sidecar, default=str))  # tuples -> lists: the digest is of what a reader sees
        sidecar["content_sha256"] = content_digest(sidecar)
        (out / SIDECAR).unlink(missing_ok=True)
        for name, tmp in temps.items():
            replace_file(tmp, out / name, digests[name])
        atomic_write_bytes(out / SIDECAR, json.dumps(sidecar, indent=1, default=str).encode())
    except BaseException as e:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if disk_full(e):  # torch and safetensors wrap a failed write in their own errors (RuntimeError, SafetensorError)
            raise DiskFull(f"{out}: the model could not be written ({' '.join(str(e).split())[:160]}); free space and export again "
                           "(the folder holds no half-written model: its model.json is written last)") from None
        raise
    return {"pkl": out / PKL, "weights": out / WEIGHTS, "sidecar": out / SIDECAR}


def model_files(path: str | Path) -> list[Path]:
    """The files a model path stands for (folder, model.json, .safetensors or .pkl): what reading it reads."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return [path, *(folder / n for n in (SIDECAR, WEIGHTS, PKL) if (folder / n).is_file())]


def _patch_model(spec: dict) -> torch.nn.Module:
    """A patch classifier: the body of spec["arch"] and the paper's (or fastai's) head."""
    model = PatchClassifier(create_body(spec["arch"]), spec["n_classes"], spec["head"], spec.get("dropout", 0.0))
    model.spec = spec
    return model


def _whole_model(spec: dict) -> torch.nn.Module:
    """A whole-image classifier: the patch classifier of spec["patch"] with the top blocks the spec names."""
    patch = _patch_model(spec["patch"])
    top = {k: spec[k] for k in ("top", "heatmap", "stages", "units", "vgg_width", "vgg_convs", "dropout")}
    top |= {k: spec[k] for k in ("heatmap_window", "heatmap_pool") if spec.get(k) is not None}
    if spec.get("heatmap") and not spec.get("heatmap_window"):
        raise CvfastError("a heatmap model exported before cvfast used the reference heatmap (its spec has no heatmap_window); "
                          "retrain it with `cvfast whole --heatmap`")
    return whole_from_patch(patch, n_classes=spec["n_classes"], widths=tuple(spec["widths"]), **top)


@dataclass(frozen=True)
class ModelKind:
    """A kind of model: the classes it outputs (in order) and the builder of its architecture from a spec."""

    classes: list[str]
    build: Callable[[dict], torch.nn.Module]


MODEL_KINDS: dict[str, ModelKind] = {"patch": ModelKind(PATCH_CLASSES, _patch_model), "whole": ModelKind(WHOLE_IMAGE_CLASSES, _whole_model)}


def create_model(spec: dict) -> torch.nn.Module:
    """An untrained model of the architecture a sidecar's spec describes (no hub, no pickles)."""
    kind = MODEL_KINDS.get(spec.get("kind"))
    if kind is None:
        raise CvfastError(f"unknown model kind {spec.get('kind')!r} (known: {', '.join(MODEL_KINDS)})")
    model = kind.build(spec)
    model.spec = spec
    return model


# what decides a model's outputs: covered by content_sha256 (recipe and metrics are notes about the run, not covered)
CONTENT_FIELDS = ("format", "kind", "classes", "mean_grey", "size", "source_size", "crop", "spec", "weights", "weights_sha256")


def content_digest(sidecar: dict) -> str:
    """SHA-256 of the sidecar fields that decide the model's outputs (canonical JSON)."""
    fields = {k: sidecar.get(k) for k in CONTENT_FIELDS}
    if sidecar.get("breast_crop") is not None:  # added later: absent, it leaves the digests of earlier models as they were
        fields["breast_crop"] = sidecar["breast_crop"]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _pair(value, name: str, where: str) -> list[int]:
    """A (height, width) of positive ints, or a clear error."""
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise CvfastError(f"{where}: {name} {value!r} is not [height, width] in pixels")
    return value


def check_info(info: dict, kind: str, where: str) -> None:
    """Refuse preprocessing settings that would make a model's outputs meaningless (class order, mean grey, sizes)."""
    if kind not in MODEL_KINDS:
        raise CvfastError(f"{where}: kind {kind!r}, expected one of {sorted(MODEL_KINDS)}")
    classes = MODEL_KINDS[kind].classes
    if list(info.get("classes") or []) != classes:
        raise CvfastError(f"{where}: classes {info.get('classes')!r}; a {kind} model outputs {classes} in this order "
                          "(an edited class order would silently change what p_cancer means)")
    m = info.get("mean_grey")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or not 0 <= m <= 1:
        raise CvfastError(f"{where}: mean_grey {m!r} is not a grey value in [0, 1]")
    _pair(list(info["size"]) if isinstance(info.get("size"), (list, tuple)) else info.get("size"), "size", where)
    if info.get("source_size") is not None:
        _pair(list(info["source_size"]) if isinstance(info["source_size"], (list, tuple)) else info["source_size"], "source_size", where)
    crop = info.get("crop")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        raise CvfastError(f"{where}: crop {crop!r} is not a patch side in pixels")
    if info.get("breast_crop") is not None:
        try:
            CropSpec(**info["breast_crop"])
        except (TypeError, CvfastError):
            raise CvfastError(f"{where}: breast_crop {info['breast_crop']!r} is not a crop spec (breast, flip_to, margin)") from None


def check_sidecar(sidecar, path: Path) -> dict:
    """A model.json checked whole: its format, its content digest, and every field the outputs depend on."""
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CvfastError(f"{path}: not a cvfast model sidecar (expected a JSON object with format {FORMAT})")
    if "content_sha256" not in sidecar:
        raise CvfastError(f"{path}: has no content_sha256 (written before cvfast checked model files whole, or edited); if you "
                          f"trust its content, seal it with `python -m cvfast.models.artifact {path.parent}`")
    if sidecar["content_sha256"] != content_digest(sidecar):
        raise CvfastError(f"{path}: its content does not match its checksum (content_sha256): a field that decides the outputs "
                          f"({', '.join(CONTENT_FIELDS[1:])}) was edited or damaged; re-export the model")
    return check_fields(sidecar, path)


def check_fields(sidecar: dict, path: Path) -> dict:
    """Every field of a sidecar that the outputs depend on, checked one by one."""
    spec = sidecar.get("spec")
    if not isinstance(spec, dict) or spec.get("kind") != sidecar.get("kind"):
        raise CvfastError(f"{path}: spec {str(spec)[:60]!r} does not describe a {sidecar.get('kind')!r} model")
    check_info(sidecar, sidecar.get("kind"), str(path))
    weights = sidecar.get("weights")
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", ".", ".."):
        raise CvfastError(f"{path}: weights {weights!r} must be a file name next to {path.name}")
    if not isinstance(sidecar.get("weights_sha256"), str):
        raise CvfastError(f"{path}: no weights_sha256")
    return sidecar


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a model from a model folder, its model.json, or a .pkl (with a warning); return (model, sidecar)."""
    path = Path(path)
    if path.is_dir():
        if not (path / SIDECAR).is_file() and (path / PKL).is_file():
            raise CvfastError(f"{path}: no {SIDECAR}: its export did not finish (export again), or the folder holds only a learner "
                              f"pickle: name {path / PKL} itself to load it")
        path = path / SIDECAR
    if not path.is_file():
        raise CvfastError(f"{path}: no such model file")
    if path.suffix == ".pkl":
        _check_pickle_against_sidecar(path)
        return _load_pickle(path)
    if path.suffix == ".safetensors":
        path = path.with_name(SIDECAR)
    try:
        sidecar = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CvfastError(f"{path}: not a cvfast model sidecar (expected JSON with format {FORMAT})") from None
    sidecar = check_sidecar(sidecar, path)
    weights = path.parent / sidecar["weights"]
    if not weights.is_file():
        raise CvfastError(f"{weights}: weights file missing next to {path.name}")
    if file_sha256(weights) != sidecar["weights_sha256"]:
        raise CvfastError(f"{weights}: SHA-256 does not match {path.name}; the file is corrupt or was replaced")
    try:
        model = create_model(sidecar["spec"])
        model.load_state_dict(load_file(str(weights)))
    except CvfastError as e:
        raise CvfastError(f"{path}: {e}") from None
    except Exception as e:  # a spec that builds no model, or weights of another architecture
        raise CvfastError(f"{path}: its spec and weights do not make a model ({type(e).__name__}: {str(e)[:200]})") from None
    model.info = {k: sidecar[k] for k in ("classes", "mean_grey", "size", "source_size", "crop", "mean_grey_source", "breast_crop") if k in sidecar}
    return model.eval(), sidecar


def _check_pickle_against_sidecar(path: Path) -> None:
    """Refuse a model.pkl that its folder's model.json does not describe (left by an export that did not finish)."""
    try:
        expected = json.loads((path.parent / SIDECAR).read_text()).get("pkl_sha256") if path.name == PKL else None
    except (OSError, ValueError, AttributeError):
        return  # no sidecar (or not ours): a learner pickle on its own
    if isinstance(expected, str) and file_sha256(path) != expected:
        raise CvfastError(f"{path}: does not match {SIDECAR} beside it (an export that did not finish, or a replaced file); export again")


def _load_pickle(path: Path) -> tuple[torch.nn.Module, dict]:
    """Unpickle a fastai learner (runs code from the file: only for files you trust)."""
    from fastai.learner import load_learner

    warnings.warn(f"{path}: loading a pickle runs code stored in it; load only files you trust. The safe "
                  f"alternative is {SIDECAR} + {WEIGHTS} in the same folder (cvfast.models.artifact.load_model).", stacklevel=2)
    try:
        learn = load_learner(path)
    except Exception as e:
        raise CvfastError(f"{path}: cannot load this learner pickle ({type(e).__name__}: {e})") from None
    model = learn.model
    if not isinstance(getattr(model, "spec", None), dict) or not isinstance(getattr(model, "info", None), dict):
        raise CvfastError(f"{path}: this learner's model carries no cvfast spec/info; not a cvfast model")
    check_info(model.info, model.spec.get("kind"), str(path))
    return model.eval(), {"kind": model.spec["kind"], **model.info, "spec": model.spec}


def seal(folder: str | Path) -> Path:
    """Add content_sha256 to a trusted model.json written before sidecars carried one (its fields are checked first)."""
    path = Path(folder)
    path = path / SIDECAR if path.is_dir() else path
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CvfastError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CvfastError(f"{path}: not a cvfast model sidecar (expected a JSON object with format {FORMAT})")
    check_fields(sidecar, path)
    sidecar["content_sha256"] = content_digest(sidecar)
    atomic_write_bytes(path, json.dumps(sidecar, indent=1).encode(), edit=True)  # the user named this file to be sealed
    load_model(path)  # the weights must fit too
    return path


if __name__ == "__main__":  # python -m cvfast.models.artifact MODEL_FOLDER: seal an older model.json you trust
    import sys

    try:
        print(f"sealed {seal(sys.argv[1])}")
    except (CvfastError, IndexError) as e:
        sys.exit(f"error: {e if isinstance(e, CvfastError) else 'usage: python -m cvfast.models.artifact MODEL_FOLDER'}")
