"""Recipes: TOML files in recipes/ describing a paper configuration; CLI flags override them."""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from pathlib import Path

from cvfast.errors import CvfastError
from cvfast.train.schedule import scale_epochs, stages_from

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
    stages_from(recipe["stages"])  # validate early
    recipe.setdefault("name", path.stem)
    return recipe


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
    out["quick"] = quick
    return out


def fingerprint(recipe: dict) -> str:
    """Stable hash of a resolved recipe (a resumed run must continue the same recipe)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
