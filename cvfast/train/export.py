"""Model files: a fastai .pkl learner, a safetensors weights file and a JSON sidecar to rebuild without unpickling."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cvfast.data.read import atomic_write_bytes
from cvfast.errors import CvfastError
from cvfast.models.body import create_body
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import whole_from_patch

log = logging.getLogger(__name__)

FORMAT = "cvfast-model/1"
PKL, WEIGHTS, SIDECAR = "model.pkl", "model.safetensors", "model.json"


def _sha256(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_model(learn, out_dir: str | Path, recipe: dict | None = None, metrics: dict | None = None) -> dict[str, Path]:
    """Write OUT/model.pkl (learn.export), OUT/model.safetensors and OUT/model.json; each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = learn.model
    tmp_pkl = out / f".{PKL}.tmp"
    learn.export(tmp_pkl.resolve())
    os.replace(tmp_pkl, out / PKL)
    tmp_w = out / f".{WEIGHTS}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp_w))
    os.replace(tmp_w, out / WEIGHTS)
    sidecar = {"format": FORMAT, "kind": model.spec["kind"], **model.info, "spec": model.spec,
               "weights": WEIGHTS, "weights_sha256": _sha256(out / WEIGHTS), "recipe": recipe or {}, "metrics": metrics or {}}
    atomic_write_bytes(out / SIDECAR, json.dumps(sidecar, indent=1, default=str).encode())
    return {"pkl": out / PKL, "weights": out / WEIGHTS, "sidecar": out / SIDECAR}


def build_model(spec: dict) -> torch.nn.Module:
    """An untrained model of the architecture a sidecar describes (no hub, no pickles)."""
    if spec["kind"] == "patch":
        model = PatchClassifier(create_body(spec["arch"]), spec["n_classes"], spec["head"], spec.get("dropout", 0.0))
    elif spec["kind"] == "whole":
        p = spec["patch"]
        patch = PatchClassifier(create_body(p["arch"]), p["n_classes"], p["head"], p.get("dropout", 0.0))
        patch.spec = p
        top = {k: spec[k] for k in ("top", "heatmap", "stages", "units", "vgg_width", "vgg_convs", "dropout")}
        model = whole_from_patch(patch, n_classes=spec["n_classes"], widths=tuple(spec["widths"]), **top)
    else:
        raise CvfastError(f"unknown model kind {spec['kind']!r}")
    model.spec = spec
    return model


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a model from a model folder, its model.json, or a .pkl (with a warning); return (model, sidecar)."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR if (path / SIDECAR).is_file() else path / PKL
    if not path.is_file():
        raise CvfastError(f"{path}: no such model file")
    if path.suffix == ".pkl":
        return _load_pickle(path)
    if path.suffix == ".safetensors":
        path = path.with_name(SIDECAR)
    try:
        sidecar = json.loads(path.read_text())
        assert sidecar.get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise CvfastError(f"{path}: not a cvfast model sidecar (expected JSON with format {FORMAT})") from None
    weights = path.parent / sidecar["weights"]
    if not weights.is_file():
        raise CvfastError(f"{weights}: weights file missing next to {path.name}")
    if _sha256(weights) != sidecar["weights_sha256"]:
        raise CvfastError(f"{weights}: SHA-256 does not match {path.name}; the file is corrupt or was replaced")
    model = build_model(sidecar["spec"])
    model.load_state_dict(load_file(str(weights)))
    model.info = {k: sidecar[k] for k in ("classes", "mean_grey", "size", "source_size", "crop") if k in sidecar}
    return model.eval(), sidecar


def _load_pickle(path: Path) -> tuple[torch.nn.Module, dict]:
    """Unpickle a fastai learner (runs code from the file: only for files you trust)."""
    from fastai.learner import load_learner

    warnings.warn(f"{path}: loading a pickle runs code stored in it; load only files you trust. The safe "
                  f"alternative is {SIDECAR} + {WEIGHTS} in the same folder (cvfast.train.export.load_model).", stacklevel=2)
    try:
        learn = load_learner(path)
    except Exception as e:
        raise CvfastError(f"{path}: cannot load this learner pickle ({type(e).__name__}: {e})") from None
    model = learn.model
    return model.eval(), {"kind": model.spec["kind"], **model.info, "spec": model.spec}
