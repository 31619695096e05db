"""The recipe: its sections (minibt/sections.py) loaded from YAML, with `section.key=value` overrides.

Everything is validated here, before any model loads: unknown keys (with the nearest valid key
suggested), wrong types, out-of-range values and missing files all raise RecipeError with one
line that names the culprit.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minibt import worlds
from minibt.checks import looks_local, unused
from minibt.errors import RecipeError
from minibt.gguf import is_gguf, read_metadata
from minibt.sections import (  # noqa: F401 - re-exported: `from minibt.recipe import ModelSection` is the public name
    AugmentSection,
    CorpusSection,
    CurateSection,
    ForwardSection,
    InferenceSection,
    LoraSection,
    ModelSection,
    RewriteSection,
    RunSection,
    SeedSection,
    TrainSection,
)


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    seed: SeedSection = field(default_factory=SeedSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    backward: TrainSection = field(default_factory=TrainSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    curate: CurateSection = field(default_factory=CurateSection)
    forward: ForwardSection = field(default_factory=ForwardSection)
    rewrite: RewriteSection = field(default_factory=RewriteSection)  # optional stage rewrite_r{k}, off by default
    inference: InferenceSection = field(default_factory=InferenceSection)  # how inference stages run: workers, engine
    # a new section: its dataclass in minibt/sections.py and a field here
    # a world's section (minibt/worlds.py), e.g. the toy world's `toy:`: that world's own dataclass,
    # written under its section's key; None on real data
    world: Any | None = field(default=None, metadata={"key": False})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "world"}
        if self.world is not None:
            world = worlds.world_of(self)
            assert world is not None  # the world whose section self.world is
            out[world.section] = dataclasses.asdict(self.world)
        return out


# --- loading --------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{where}: broken YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    recipe = from_dict(raw, base_dir=path.parent)
    if not recipe.run.name:
        recipe.run.name = path.stem
    return recipe


def from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> Recipe:
    raw, world, world_raw = _world_section(raw)
    recipe = _build(Recipe, raw, "", also=worlds.sections())
    if world is not None:  # before the sections' own checks: this is the reason to give
        _refuse_with_world(recipe, world)
    _check(recipe, "")
    if world is None:
        for key in ("seed", "corpus"):
            section = getattr(recipe, key)
            if not section.path and not section.dataset:
                raise RecipeError(f"{key}: give {key}.path (a local file) or {key}.dataset (a HF dataset id)")
        if not recipe.model.name:
            raise RecipeError("model.name: missing (a HF model id or a local folder)")
        for key in ("seed", "corpus"):
            section = getattr(recipe, key)
            if section.path is not None:
                section.path = str(_resolve(section.path, base_dir, f"{key}.path"))
        for key in ("calibrate", "teach"):
            if getattr(recipe.curate, key) and not recipe.curate.ratings:
                raise RecipeError(f"curate.{key}: needs curate.ratings (a JSONL of pairs rated 1-5)")
        if is_gguf(recipe.model.name):
            read_metadata(recipe.model.name)  # missing, damaged or unreadable: one line now, not after loading
        elif looks_local(recipe.model.name) and not Path(recipe.model.name).expanduser().exists():
            raise RecipeError(f"model.name: local folder {recipe.model.name} not found")
    else:  # the world's own section, typed and checked like the others
        recipe.world = _build(world.config, world_raw, world.section)
        _check(recipe.world, world.section)
    if recipe.curate.ratings:
        recipe.curate.ratings = str(_resolve(recipe.curate.ratings, base_dir, "curate.ratings"))
    return recipe


def _world_section(raw: Any) -> tuple[Any, worlds.World | None, dict[str, Any]]:
    """`raw` without its world section, the world it names (None: real data) and that section."""
    if not isinstance(raw, dict):
        return raw, None, {}
    present = [s for s in worlds.sections() if raw.get(s) is not None]
    if len(present) > 1:
        raise RecipeError(f"{present[1]}: a recipe holds one world section, and {present[0]} is there too; remove one")
    rest = {k: v for k, v in raw.items() if k not in worlds.sections()}
    if not present:
        return rest, None, {}
    return rest, worlds.named(present[0]), raw[present[0]]


WORLD_MAKES = {"seed": "its own seed", "corpus": "its own corpus"}
WORLD_MODEL_KEYS = ("name", "revision", "trust_remote_code", "chat_template")  # its base has minibt's template


def _refuse_with_world(recipe: Recipe, world: worlds.World) -> None:
    """A world makes the seed, the corpus and the base: the keys that would choose them do nothing."""
    for key, what in WORLD_MAKES.items():
        section = getattr(recipe, key)
        unused(key, section, [f.name for f in dataclasses.fields(section)],
               f"{world.title} makes {what}; remove the key or the {world.section} section")
    unused("model", recipe.model, WORLD_MODEL_KEYS, f"{world.title} builds its own base; remove the key or the {world.section} section")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise RecipeError(f"override {dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = yaml.safe_load(value) if value.strip() else ""


def _build(cls: type, raw: Any, key: str, also: typing.Sequence[str] = ()) -> Any:
    """`cls` from the mapping `raw` at `key`; `also`: more valid keys, read elsewhere (world sections)."""
    where = key or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)] + list(also)
    kwargs = {}
    for k, v in raw.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f" (did you mean {(key + '.') if key else ''}{near[0]}?)" if near else ""
            valid = ", ".join(names)
            raise RecipeError(f"{full}: unknown key{hint}; valid keys: {valid}")
        kwargs[k] = _coerce(hints[k], v, full)
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, key)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), v if v is not None else {}, key)  # a field's type: a dataclass, not an instance
    if origin is Literal:
        if v not in args:
            raise RecipeError(f"{key}: {v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is list:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise RecipeError(f"{key}: expected a list of strings, got {_kind(v)}")
        return list(v)
    if origin is dict:
        if not isinstance(v, dict):
            raise RecipeError(f"{key}: expected a mapping, got {_kind(v)}")
        if args and args[1] is str and not all(isinstance(x, str) for x in v.values()):
            raise RecipeError(f"{key}: expected a mapping of strings")
        return dict(v)
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise RecipeError(f"{key}: expected true or false, got {_kind(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"{key}: expected an integer, got {_kind(v)}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {_kind(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise RecipeError(f"{key}: expected a string, got {_kind(v)}")
        return v
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")  # a bug in minibt


def _check(obj: Any, key: str) -> None:
    if hasattr(obj, "check"):
        obj.check(key)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check(v, f"{key}.{f.name}" if key else f.name)


def _kind(v: Any) -> str:
    return "nothing" if v is None else f"{type(v).__name__} {v!r}"[:80]


def _resolve(p: str, base_dir: Path | None, key: str) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        # relative paths resolve from the working directory first, then beside the recipe
        if (base_dir / path).exists():
            path = base_dir / path
    if not path.exists():
        raise RecipeError(f"{key}: file {p} not found")
    return path.resolve()
