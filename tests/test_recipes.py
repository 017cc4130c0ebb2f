"""Typed recipes: every key has a type, a default and a range; what does not fit is refused with the file, key and allowed values."""

from __future__ import annotations

import tomllib

import pytest

from cvfast.errors import CvfastError
from cvfast.train.recipes import MONITORS, as_toml, load_recipe, recipe_paths, resolve, typed


def _write(tmp_path, text: str):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


BASE = "kind = 'patch'\n[model]\narch = 'test_resnet'\n[data]\nbs = 8\n[train]\nseed = 1\n[[stages]]\nepochs = 1\nlr = 1e-3\n"


@pytest.mark.parametrize("name", sorted(recipe_paths()))
def test_every_shipped_recipe_is_typed_and_its_resolved_toml_loads_back_equal(name):
    recipe = typed(load_recipe(name))
    assert typed(tomllib.loads(as_toml(recipe))) == recipe


def test_defaults_are_filled_in_one_place():
    r = typed(tomllib.loads(BASE))
    assert (r.model.head, r.model.dropout, r.train.weight_decay, r.train.adam_beta2, r.stages[0].train, r.stages[0].wd) == \
        ("paper", 0.0, "l2", 0.999, "all", 0.0)
    assert r.batch_size == 8 and r.monitor == "accuracy"  # the kind's defaults where the recipe is silent
    whole = typed(tomllib.loads(BASE.replace("'patch'", "'whole'").replace("bs = 8\n", "")))
    assert whole.batch_size == 2 and whole.monitor == "roc_auc_score"


@pytest.mark.parametrize("old, new, says", [
    ("seed = 1", "sed = 1", "unknown key 'sed' in [train] (known: seed, random_init_lr, bn_policy"),
    ("[data]", "[data]\nmean = 'imagenet'", "[data] mean = 'imagenet' is not valid (expected one of 'paper', 'reference')"),
    ("seed = 1", "monitor = 'auc'", f"[train] monitor = 'auc' is not valid (expected one of {', '.join(map(repr, MONITORS))})"),
    ("lr = 1e-3", "lr = inf", "[[stages]] lr = inf is not valid (expected a number or a list of 3 numbers, > 0 and finite)"),
    ("lr = 1e-3", "lr = [1e-3, 1e-3]", "lr = [0.001, 0.001] is not valid"),
    ("lr = 1e-3", "lr = 'fast'", "lr = 'fast' is not valid"),
    ("[data]", "[data]\nsize = [0, 0]", "[data] size = [0, 0] is not valid (expected an integer or a list of 2 integers, each >= 8)"),
    ("arch = 'test_resnet'", "arch = 'test_resnet'\nwidths = [0, -1, 5]", "[model] widths = [0, -1, 5] is not valid"),
    ("bs = 8", "bs = true", "[data] bs = True is not valid (expected an integer, >= 1)"),
    ("seed = 1", "seed = 1.5", "[train] seed = 1.5 is not valid (expected an integer, >= 0)"),
    ("epochs = 1\n", "", "stage 1: [[stages]] has no epochs"),
    ("kind = 'patch'", "kind = 'teacher'", "kind = 'teacher' is not valid (expected one of 'patch', 'whole', 'finetune')"),
    ("kind = 'patch'", "kind = 'patch'\nauthor = 'me'", "unknown key 'author' in the recipe"),
])
def test_what_does_not_fit_is_refused_with_file_key_and_allowed_values(tmp_path, old, new, says):
    path = _write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(CvfastError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and says in str(e.value)


def test_command_line_overrides_are_checked_as_the_file_is():
    with pytest.raises(CvfastError, match=r"\[data\] bs = 0 is not valid"):
        resolve(load_recipe("demo-patch"), {"data": {"bs": 0}})
