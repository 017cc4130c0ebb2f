"""Recipes: TOML files shipped in the package (cvfast/recipes/) describing a paper configuration; CLI flags override them."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import tomli_w

from cvfast.errors import CvfastError
from cvfast.train.schedule import scale_epochs, stages_from

# what keep_best and early stopping watch on the validation split (patch models: the first three; whole-image: the last two)
MONITORS = ("accuracy", "balanced_accuracy_score", "malignant_auc", "roc_auc_score", "valid_loss")
BN_POLICIES = ("hold_body_stats", "fastai")  # whole-image training: the body's BatchNorm statistics held, or fastai's


def recipes_dir() -> Path:
    """The folder of the shipped recipes (package data: found the same way in a checkout, an editable or a wheel install)."""
    folder = files("cvfast") / "recipes"
    if not isinstance(folder, Path):  # pip and setuptools install as folders; a zipped install would need extracting
        raise CvfastError(f"cvfast's recipes are not a folder here ({folder}); install cvfast as a plain package (pip install)")
    return folder


def recipe_paths() -> dict[str, Path]:
    """Recipe name -> file."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.toml"))}


def load_recipe(name_or_path: str | Path) -> dict:
    """A recipe by name (`cvfast recipes list`) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_paths().get(str(name_or_path), recipes_dir() / f"{name_or_path}.toml")
    if not path.is_file():
        raise CvfastError(f"recipe {name_or_path!r} not found; `cvfast recipes list` shows them")
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CvfastError(f"{path}: invalid TOML ({e})") from None
    for key in ("kind", "model", "data", "stages"):
        if key not in recipe:
            raise CvfastError(f"{path}: recipe lacks [{key}]")
    check_recipe(recipe, str(path))
    stages_from(recipe["stages"])  # validate early
    recipe.setdefault("name", path.stem)
    return recipe


@dataclass(frozen=True)
class ModelSection:
    """[model]: the architecture (patch recipes use arch/head/dropout/pretrained; whole-image ones the top's keys too)."""

    arch: Optional[str] = None  # any timm name (patch recipes; whole-image ones take the patch model's)
    head: Literal["paper", "fastai"] = "paper"
    dropout: float = field(default=0.0, metadata={"range": "in [0, 1)", "ok": lambda v: 0 <= v < 1})
    pretrained: bool = False
    top: Literal["resnet", "vgg"] = "resnet"
    heatmap: bool = False
    widths: tuple[int, int, int] = field(default=(512, 512, 1024), metadata={"range": "each >= 1", "ok": lambda v: all(x >= 1 for x in v)})
    stages: int = field(default=2, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    units: int = field(default=2, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    vgg_width: int = field(default=512, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    vgg_convs: int = field(default=3, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    heatmap_pool: int = field(default=5, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    fold_input_std: bool = True


@dataclass(frozen=True)
class DataSection:
    """[data]: batches and images."""

    bs: Optional[int] = field(default=None, metadata={"range": ">= 1", "ok": lambda v: v >= 1})  # None: the kind's (see batch_size)
    size: Union[int, tuple[int, int], None] = field(default=None, metadata={"range": "each >= 8", "ok": lambda v: all(x >= 8 for x in _values(v))})
    augment: bool = True
    grad_acc: int = field(default=1, metadata={"range": ">= 1", "ok": lambda v: v >= 1})
    dataset: Optional[str] = None  # what DATA holds (finetune: recorded with the model)
    mean: Literal["paper", "reference"] = "paper"


@dataclass(frozen=True)
class TrainSection:
    """[train]: seeds, BatchNorm policy, model selection, the optimizer."""

    seed: int = field(default=0, metadata={"range": ">= 0", "ok": lambda v: v >= 0})
    random_init_lr: float = field(default=1e-3, metadata={"range": "> 0 and finite", "ok": lambda v: 0 < v < math.inf})
    bn_policy: Literal[BN_POLICIES] = "hold_body_stats"
    early_stopping_patience: Optional[int] = field(default=None, metadata={"range": ">= 0", "ok": lambda v: v >= 0})
    keep_best: bool = True
    monitor: Optional[Literal[MONITORS]] = None  # None: the kind's (see monitor)
    weight_decay: Literal["l2", "decoupled"] = "l2"
    adam_beta1: float = field(default=0.9, metadata={"range": "in [0, 1)", "ok": lambda v: 0 <= v < 1})
    adam_beta2: float = field(default=0.999, metadata={"range": "in [0, 1)", "ok": lambda v: 0 <= v < 1})
    adam_eps: float = field(default=1e-8, metadata={"range": "> 0 and finite", "ok": lambda v: 0 < v < math.inf})


@dataclass(frozen=True)
class StageSection:
    """[[stages]]: one stage of the schedule."""

    epochs: int = field(metadata={"range": ">= 0", "ok": lambda v: v >= 0})
    lr: Union[float, tuple[float, float, float]] = field(metadata={"range": "> 0 and finite", "ok": lambda v: all(0 < x < math.inf for x in _values(v))})
    name: str = ""
    wd: float = field(default=0.0, metadata={"range": ">= 0 and finite", "ok": lambda v: 0 <= v < math.inf})
    train: Literal["head", "top", "all"] = "all"
    train_bn: bool = True


@dataclass(frozen=True)
class Recipe:
    """A whole recipe, typed and with every default filled in: what the training code reads."""

    kind: Literal["patch", "whole", "finetune"]
    model: ModelSection
    data: DataSection
    train: TrainSection
    stages: tuple[StageSection, ...]
    name: str = ""
    description: str = ""

    @property
    def batch_size(self) -> int:
        """[data] bs, else the kind's: 32 patches, 2 whole images (the paper's)."""
        return self.data.bs if self.data.bs is not None else 32 if self.kind == "patch" else 2

    @property
    def monitor(self) -> str:
        """[train] monitor, else the kind's: patch accuracy, whole-image ROC AUC (the reference's)."""
        return self.train.monitor or ("accuracy" if self.kind == "patch" else "roc_auc_score")


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}
# keys the commands add to a resolved recipe (recorded with the model), not written in recipe files
RUN_KEYS = ("quick", "init", "inputs", "resolved_stages", "scratch", "optimizer")


def _values(v) -> tuple:
    """A scalar or a list as a tuple of values."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _fits(value, hint) -> bool:
    """Whether a TOML value has the type a field's hint names (ints are floats too; bools are neither)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return not isinstance(value, bool) and value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(hint) -> str:
    """A field's type in words, with its allowed values where it has a fixed set."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {PLURALS[args[0]]}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _section(cls, table, where: str, label: str, validate: bool = True):
    """A typed section from a TOML table: unknown keys, missing keys and wrong types or ranges refused with the file and key."""
    if not validate:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
    if not isinstance(table, dict):
        raise CvfastError(f"{where}: {label} must be a table")
    known = {f.name: f for f in fields(cls)}
    hints = get_type_hints(cls)
    for key, value in table.items():
        if key not in known:
            raise CvfastError(f"{where}: unknown key {key!r} in {label} (known: {', '.join(known)})")
        meta = known[key].metadata
        if not _fits(value, hints[key]) or (value is not None and "ok" in meta and not meta["ok"](value)):
            rule = f", {meta['range']}" if "range" in meta else ""
            raise CvfastError(f"{where}: {label} {key} = {value!r} is not valid (expected {_describe(hints[key])}{rule})")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in table]
    if missing:
        raise CvfastError(f"{where}: {label} has no {', '.join(missing)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


def typed(recipe: dict, where: str = "", validate: bool = True) -> Recipe:
    """The typed recipe of a recipe's tables (every default filled in); refused with the key and allowed values if it does not fit.

    validate=False: the defaults only, for code handed a recipe that `load_recipe` / `resolve` checked already (a notebook
    may then change a value on purpose -- an lr of 0 to hold the weights -- as it always could)."""
    where = where or f"recipe {recipe.get('name', '?')}"
    if validate:
        _check_top(recipe, where)
    return Recipe(kind=recipe["kind"], name=recipe.get("name", ""), description=recipe.get("description", ""),
                  **{s: _section(cls, recipe.get(s, {}), where, f"[{s}]", validate) for s, cls in SECTIONS.items()},
                  stages=tuple(_section(StageSection, st, f"{where} stage {i + 1}", "[[stages]]", validate) for i, st in enumerate(recipe["stages"])))


def _check_top(recipe: dict, where: str) -> None:
    """The recipe's own keys: kind, name, description and a non-empty [[stages]] list; nothing else."""
    top = {k: v for k, v in recipe.items() if k not in (*SECTIONS, "stages", *RUN_KEYS)}
    for key in top:
        if key not in ("kind", "name", "description"):
            raise CvfastError(f"{where}: unknown key {key!r} in the recipe (known: kind, name, description, {', '.join(SECTIONS)}, stages)")
    if not _fits(recipe.get("kind"), get_type_hints(Recipe)["kind"]):
        raise CvfastError(f"{where}: kind = {recipe.get('kind')!r} is not valid (expected {_describe(get_type_hints(Recipe)['kind'])})")
    for key in ("name", "description"):
        if not isinstance(recipe.get(key, ""), str):
            raise CvfastError(f"{where}: {key} = {recipe[key]!r} is not valid (expected a string)")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise CvfastError(f"{where}: [[stages]] must be a list of tables, at least one")
    if all(isinstance(s, dict) and s.get("epochs") == 0 for s in stages):  # training would export the untrained model as if trained
        raise CvfastError(f"{where}: every stage has epochs = 0; at least one stage must train")


def check_recipe(recipe: dict, where: str) -> None:
    """Validate a recipe's every table against its typed schema (a wrong type is refused, not accepted: lr = "fast")."""
    typed(recipe, where)


def as_toml(recipe: Recipe) -> str:
    """A typed recipe as TOML, every default written out (what `cvfast recipes show --resolved` prints; loads back equal)."""
    def table(section) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(section).items() if v is not None}

    doc = {"kind": recipe.kind, "name": recipe.name, "description": recipe.description,
           **{s: table(getattr(recipe, s)) for s in SECTIONS}, "stages": [table(st) for st in recipe.stages]}
    return tomli_w.dumps(doc)


def resolve(recipe: dict, overrides: dict[str, dict], epochs_scale: float | None = None, quick: bool = False) -> dict:
    """Apply --quick's size reduction, CLI overrides ({section: {key: value}}; None = not given), then the epoch scale."""
    out = copy.deepcopy(recipe)
    if quick:  # smoke runs on a CPU: a quarter of the recipe's image size (an explicit --size below wins)
        size = out["data"].get("size")
        if isinstance(size, list):
            out["data"]["size"] = [max(32, v // 4) for v in size]
        elif isinstance(size, int):
            out["data"]["size"] = max(32, size // 4)
    for section, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                out.setdefault(section, {})[key] = value
    scale = epochs_scale if epochs_scale is not None else (0.1 if quick else None)
    if scale is not None:
        out["stages"] = [dict(s, epochs=st.epochs) for s, st in zip(out["stages"], scale_epochs(stages_from(out["stages"]), scale))]
    check_recipe(out, f"recipe {out.get('name', '?')} with the command's options")
    out["quick"] = quick
    return out


def fingerprint(recipe: dict) -> str:
    """Stable hash of a resolved recipe (a resumed run must continue the same recipe)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
