"""Worlds: a recipe section that brings its own data, base model, stages, metrics and report lines.

The toy world (minibt/toy) is one, and no generic module imports it. A world registers itself
through the entry-point group `minibt.worlds` (pyproject.toml: `toy = "minibt.toy.plugin:WORLD"`),
read on first use, so nothing generic names it and a world from another package plugs in the same
way; `register` adds one in-process (tests). A recipe holds at most one world section, as
`recipe.world`: that world's own dataclass (`World.config`), built and checked like every section
before any model loads. `world_of(recipe)` gives the World behind it.
"""

from __future__ import annotations

from importlib.metadata import distributions
from pathlib import Path
from typing import Any

ENTRY_POINTS = "minibt.worlds"


class World:
    """What a world contributes. `section`, `title`, `config`, `prepare` and `base` it must give; every
    other hook contributes nothing unless the world overrides it."""

    section: str = ""  # its recipe section's key ("toy")
    title: str = ""  # how messages name it ("the toy world")
    config: type = object  # the dataclass of its section, with check(key) raising one-line RecipeErrors
    data_files: tuple[str, ...] = ()  # what its prepare writes besides data/seed.jsonl and data/corpus.jsonl

    def prepare(self, run: Any, recipe: Any) -> dict[str, Any]:
        """Write data/seed.jsonl, data/corpus.jsonl and `data_files` into the RunDir; return the counts."""
        raise NotImplementedError

    def base(self, recipe: Any) -> Path:
        """The folder of its base model (built, or from a cache)."""
        raise NotImplementedError

    def shape(self, recipe: Any) -> Any:
        """Its base's shape (minibt.memory.Shape) for the dry-run memory estimate, without building it."""
        return None

    def stages(self, recipe: Any) -> list[Any]:
        """Stages (minibt/stages/stage.py) that run after the method's own."""
        return []

    def evaluate(self, run: Any, engine: Any, recipe: Any, workers: Any = None) -> dict[str, Any]:
        """Its metrics: the part of metrics.json it owns (`minibt eval --toy` recomputes them); its
        generations may run on the run's `workers` (minibt/workers.py), else on `engine`."""
        return {}

    def prepare_lines(self, counts: dict[str, Any]) -> list[str]:
        """`minibt prepare`'s lines for the counts its prepare returned."""
        return []

    def describe(self, stage: str, counts: dict[str, Any]) -> str | None:
        """A stage's line in the run summary and the report, for prepare and its own stages; None: the
        generic line (minibt/report.py's describe_stage)."""
        return None

    def metrics_lines(self, metrics: dict[str, Any]) -> list[str]:
        """Readable lines of metrics.json for the end of `minibt run`."""
        return []

    def pair_truth(self, row: dict[str, Any]) -> bool | None:
        """The ground truth of a scored pair (is it a right pair?), for the report; None: not known."""
        return None

    def report_lines(self, metrics: dict[str, Any]) -> list[str]:
        """Its lines in report.md's metrics section."""
        return []


_worlds: dict[str, World] | None = None


def _registry() -> dict[str, World]:
    global _worlds
    if _worlds is None:
        _worlds = {}
        # every distribution's entry points, not importlib's one per name: a stale build's metadata in the
        # working directory (an sdist build leaves minibt.egg-info there) would hide the installed one's
        for point in sorted({p for d in distributions() for p in d.entry_points if p.group == ENTRY_POINTS}, key=lambda p: p.name):
            world = point.load()
            _worlds.setdefault(world.section, world)
    return _worlds


def register(world: World) -> None:
    """Add a world in this process (the entry points are read first, so this one can replace theirs)."""
    _registry()[world.section] = world


def sections() -> list[str]:
    """The recipe keys of the registered worlds."""
    return list(_registry())


def named(section: str) -> World:
    return _registry()[section]


def world_of(recipe: Any) -> World | None:
    """The world whose section the recipe holds; None for a recipe on real data. (`recipe`: a Recipe, which
    imports this module to read world sections, so it is not named here.)"""
    if recipe.world is None:
        return None
    return next(w for w in _registry().values() if isinstance(recipe.world, w.config))


def of_run(recipe_dict: dict[str, Any]) -> World | None:
    """The world of a run, from its recipe.yaml as read (no validation: the report reads half-made runs)."""
    found = [s for s in sections() if isinstance(recipe_dict, dict) and recipe_dict.get(s) is not None]
    return named(found[0]) if found else None
