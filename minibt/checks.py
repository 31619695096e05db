"""The checks a recipe section runs on its values: each raises RecipeError with one line naming the key.

Shared by the sections (minibt/sections.py), the recipe's cross-section checks (minibt/recipe.py) and
a world's own section (minibt/worlds.py).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from minibt.errors import RecipeError


def positive(key: str, v: float) -> None:
    if not v > 0:
        raise RecipeError(f"{key}: must be > 0, got {v}")


def in_range(key: str, v: float, lo: float, hi: float, low_open: bool = False) -> None:
    if v < lo or v > hi or (low_open and v == lo):
        raise RecipeError(f"{key}: must be in {'(' if low_open else '['}{lo}, {hi}], got {v}")


def one_source(key: str, path: str | None, dataset: str | None) -> None:
    if path and dataset:
        raise RecipeError(f"{key}: give path or dataset, not both")


def changed(obj: Any, *names: str) -> str | None:
    """The first of `names` whose value differs from the dataclass default: a key the recipe set
    (spelling a default out is not setting it)."""
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in names and getattr(obj, f.name) != default:
            return f.name
    return None


def unused(key: str, obj: Any, names: typing.Iterable[str], why: str) -> None:
    """Refuse the first of `names` set away from its default: the recipe makes it do nothing."""
    name = changed(obj, *names)
    if name is not None:
        raise RecipeError(f"{key}.{name}: {why}")


def only_hub_datasets(key: str, section: Any, *names: str) -> None:
    if not section.dataset:
        unused(key, section, names, f"only a hub dataset ({key}.dataset) reads it; remove the key")


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~"))
