"""Recipes: TOML files in recipes/ describing a paper configuration; CLI flags override them."""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from pathlib import Path

from cvfast.errors import CvfastError
from cvfast.train.schedule import scale_epochs, stages_from

# what keep_best and early stopping watch on the validation split (patch models: the first three; whole-image: the last two)
MONITORS = ("accuracy", "balanced_accuracy_score", "malignant_auc", "roc_auc_score", "valid_loss")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def recipe_paths() -> dict[str, Path]:
    """Recipe name -> file."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str | Path) -> dict:
    """A recipe by name (recipes/NAME.toml) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_paths().get(str(name_or_path), RECIPES_DIR / f"{name_or_path}.toml")
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


def _is(value, kind: str) -> bool:
    """Whether a TOML value has one of the schema's kinds (ints are floats too; bools are neither)."""
    if isinstance(value, bool):
        return kind == "bool"
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)), "str": isinstance(value, str),
            "int2": isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value),
            "int3": isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value),
            "float3": isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            }.get(kind, False)


# every key a recipe may hold: its kinds and a check of its value (configuration as data, refused when it does not fit)
SCHEMA: dict[str, dict[str, tuple[tuple[str, ...], object]]] = {
    "": {"kind": (("str",), lambda v: v in ("patch", "whole", "finetune")), "name": (("str",), None), "description": (("str",), None)},
    "model": {"arch": (("str",), None), "head": (("str",), lambda v: v in ("paper", "fastai")), "dropout": (("float",), lambda v: 0 <= v < 1),
              "pretrained": (("bool",), None), "top": (("str",), lambda v: v in ("resnet", "vgg")), "heatmap": (("bool",), None),
              "widths": (("int3",), None), "stages": (("int",), lambda v: v >= 1), "units": (("int",), lambda v: v >= 1),
              "vgg_width": (("int",), lambda v: v >= 1), "vgg_convs": (("int",), lambda v: v >= 1),
              "heatmap_pool": (("int",), lambda v: v >= 1), "fold_input_std": (("bool",), None)},
    "data": {"bs": (("int",), lambda v: v >= 1), "size": (("int", "int2"), lambda v: isinstance(v, list) or v >= 8),
             "augment": (("bool",), None), "grad_acc": (("int",), lambda v: v >= 1), "dataset": (("str",), None),
             "mean": (("str",), lambda v: v in ("paper", "reference"))},
    "train": {"seed": (("int",), lambda v: v >= 0), "random_init_lr": (("float",), lambda v: v > 0), "bn_policy": (("str",), None),
              "early_stopping_patience": (("int",), lambda v: v >= 0), "keep_best": (("bool",), None),
              "monitor": (("str",), lambda v: v in MONITORS),
              "weight_decay": (("str",), lambda v: v in ("l2", "decoupled")), "adam_beta1": (("float",), lambda v: 0 <= v < 1),
              "adam_beta2": (("float",), lambda v: 0 <= v < 1), "adam_eps": (("float",), lambda v: v > 0)},
    "stages": {"name": (("str",), None), "epochs": (("int",), lambda v: v >= 0), "lr": (("float", "float3"), lambda v: all(x > 0 for x in (v if isinstance(v, list) else [v]))),
               "wd": (("float",), lambda v: v >= 0), "train": (("str",), None), "train_bn": (("bool",), None)},
}


def _check_table(table: dict, section: str, where: str) -> None:
    """Refuse unknown keys (typos) and values of the wrong kind or range in one recipe table."""
    schema = SCHEMA[section]
    label = f"[{section}]" if section else "the recipe"
    for key, value in table.items():
        if section == "" and key in SCHEMA:
            continue
        if key not in schema:
            raise CvfastError(f"{where}: unknown key {key!r} in {label} (known: {', '.join(schema)})")
        kinds, ok = schema[key]
        if not any(_is(value, k) for k in kinds) or (ok is not None and not ok(value)):
            raise CvfastError(f"{where}: {label} {key} = {value!r} is not a valid {' or '.join(kinds)} value")


def check_recipe(recipe: dict, where: str) -> None:
    """Validate a recipe's every table against SCHEMA (a wrong type is refused, not accepted: lr = "fast")."""
    _check_table({k: v for k, v in recipe.items() if k not in ("quick", "init", "inputs", "resolved_stages", "scratch", "optimizer")}, "", where)
    for section in ("model", "data", "train"):
        if not isinstance(recipe.get(section, {}), dict):
            raise CvfastError(f"{where}: {section} must be a table [{section}]")
        _check_table(recipe.get(section, {}), section, where)
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise CvfastError(f"{where}: [[stages]] must be a list of tables, at least one")
    for i, st in enumerate(stages):
        _check_table(st, "stages", f"{where} stage {i + 1}")
        for key in ("epochs", "lr"):
            if key not in st:
                raise CvfastError(f"{where} stage {i + 1}: no {key}")


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
