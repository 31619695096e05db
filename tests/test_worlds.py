"""The world registry (minibt/worlds.py): the toy world is found through its entry point, a world added
in-process plugs its typed section, data, stages, base and lines into generic code, and no generic
module imports the toy world."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import minibt
from minibt import io, worlds
from minibt.errors import RecipeError
from minibt.recipe import from_dict
from minibt.stages.stage import Stage

PACKAGE = Path(minibt.__file__).parent


@dataclasses.dataclass
class TinyConfig:
    size: int = 3

    def check(self, key: str) -> None:
        if self.size < 1:
            raise RecipeError(f"{key}.size: must be >= 1, got {self.size}")


class TinyWorld(worlds.World):
    section, title, config, data_files = "tiny", "the tiny world", TinyConfig, ("answers",)

    def prepare(self, run, recipe):
        pairs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(recipe.world.size)]
        io.write_jsonl(run.data("seed"), pairs)
        io.write_jsonl(run.data("corpus"), [{"text": p["output"]} for p in pairs])
        io.write_jsonl(run.data("answers"), pairs)
        return {"pairs": len(pairs)}

    def base(self, recipe):
        return Path("/tiny/base")

    def stages(self, recipe):
        return [Stage("tiny_check", lambda ctx: {"ok": 1})]

    def describe(self, stage, counts):
        return f"{counts['pairs']} tiny pairs" if stage == "prepare" else None


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(worlds, "_worlds", dict(worlds._registry()))  # undone after the test
    worlds.register(TinyWorld())
    return worlds.named("tiny")


def test_the_toy_world_comes_from_its_entry_point():
    from minibt.toy.plugin import WORLD
    from minibt.toy.world import WorldConfig

    assert "toy" in worlds.sections() and worlds.named("toy") is WORLD
    recipe = from_dict({"toy": {"seed": 2}})
    assert isinstance(recipe.world, WorldConfig) and recipe.world.seed == 2 and worlds.world_of(recipe) is WORLD
    assert recipe.to_dict()["toy"]["seed"] == 2 and "world" not in recipe.to_dict()
    assert worlds.world_of(from_dict({"model": {"name": "m"}, "seed": {"dataset": "d"}, "corpus": {"dataset": "c"}})) is None


def test_a_world_section_is_typed_checked_and_written_back_under_its_key(tiny):
    recipe = from_dict({"tiny": {"size": 5}})
    assert recipe.world == TinyConfig(size=5) and worlds.world_of(recipe) is tiny
    assert recipe.to_dict()["tiny"] == {"size": 5} and from_dict(recipe.to_dict()).world == TinyConfig(size=5)
    with pytest.raises(RecipeError, match=r"^tiny\.size: must be >= 1, got 0$"):
        from_dict({"tiny": {"size": 0}})
    with pytest.raises(RecipeError, match=r"^tiny\.sise: unknown key \(did you mean tiny\.size\?\)"):
        from_dict({"tiny": {"sise": 2}})
    with pytest.raises(RecipeError, match=r"^tiny\.size: expected an integer"):
        from_dict({"tiny": {"size": "many"}})
    with pytest.raises(RecipeError, match=r"^seed\.path: the tiny world makes its own seed; remove the key or the tiny section$"):
        from_dict({"tiny": {}, "seed": {"path": "x.jsonl"}})
    with pytest.raises(RecipeError, match="one world section"):
        from_dict({"tiny": {}, "toy": {}})
    with pytest.raises(RecipeError, match=r"^world: unknown key"):  # the field's name is not a recipe key
        from_dict({"world": {}})


def test_a_world_plugs_its_data_stages_base_and_lines_into_generic_code(tiny, tmp_path):
    from minibt.base_model import model_of
    from minibt.cli.runs import summary
    from minibt.pipeline import plan, prepare_only

    recipe = from_dict({"tiny": {"size": 4}})
    assert plan(recipe)[-1] == "tiny_check" and plan(recipe)[:4] == ["prepare", "backward", "augment", "m0"]
    assert model_of(recipe).name == "/tiny/base"
    assert model_of(recipe, recorded=str(tmp_path)).name == str(tmp_path)  # the run's own base, once it has one
    rd, ran = prepare_only(recipe, tmp_path / "run")  # no model loads
    assert ran and len(io.read_jsonl(rd.data("answers"))) == 4
    assert rd.manifest["stages"]["prepare"]["outputs"] == ["data/seed.jsonl", "data/corpus.jsonl", "data/answers.jsonl"]
    assert "prepare        done" in summary(rd) and "4 tiny pairs" in summary(rd)


def test_no_generic_module_imports_the_toy_world():
    """Only the toy world itself and the toy bench (minibt/bench/ measures on a toy recipe) may import
    minibt.toy."""
    above = {PACKAGE / "toy", PACKAGE / "bench"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if above & set(path.parents):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "minibt.toy" or n.startswith("minibt.toy.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
