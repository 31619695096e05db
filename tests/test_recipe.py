"""Recipe loading and validation: every problem is one line that names the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from minibt.errors import RecipeError
from minibt.recipe import load_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    (tmp_path / "seed.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "corpus.jsonl").write_text('{"text": "c"}\n')
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
model: {name: some-org/some-model}
seed: {path: seed.jsonl}
corpus: {path: corpus.jsonl}
"""


def test_defaults_and_paths_resolve_beside_the_recipe(tmp_path):
    r = load_recipe(write(tmp_path, BASE, "my-run.yaml"))
    assert r.run.name == "my-run"
    assert r.augment.temperature == 0.7 and r.augment.top_p == 0.9  # the paper's sampling
    assert Path(r.seed.path) == (tmp_path / "seed.jsonl").resolve()
    assert r.forward.tags and r.curate.method == "rubric"


def test_overrides_apply_with_yaml_types(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["forward.rounds=2", "curate.threshold=5", "lora.r=8", "run.name=x", "backward.learning_rate=2e-3"])
    assert r.forward.rounds == 2 and r.curate.threshold == 5.0 and r.lora.r == 8 and r.run.name == "x"
    assert r.backward.learning_rate == 0.002  # YAML 1.1 reads 2e-3 as a string


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (BASE + "forwrd: {epochs: 1}\n", [], r"forwrd: unknown key \(did you mean forward\?\)"),
        (BASE, ["augment.temprature=0.5"], r"augment.temprature: unknown key \(did you mean augment.temperature\?\)"),
        (BASE, ["backward.epochs=lots"], r"backward.epochs: expected a number, got str 'lots'"),
        (BASE, ["lora.r=2.5"], r"lora.r: expected an integer"),
        (BASE, ["model.quantization=int3"], r"model.quantization: 'int3' is not one of nf4, none"),
        (BASE, ["augment.top_p=0"], r"augment.top_p: must be in \(0.0, 1.0\]"),
        (BASE, ["curate.threshold=7"], r"curate.threshold: must be in \[1.0, 5.0\]"),
        (BASE, ["forward.tags=maybe"], r"forward.tags: expected true or false"),
        (BASE.replace("seed.jsonl", "missing.jsonl"), [], r"seed.path: file missing.jsonl not found"),
        ("model: {name: m}\ncorpus: {path: corpus.jsonl}\n", [], r"seed: give seed.path"),
        (BASE + "model: [\n", [], r"r.yaml:\d+: broken YAML"),
        ("- a\n- b\n", [], r"a recipe is a mapping of sections"),
        (BASE, ["nonsense"], r"override 'nonsense': expected section.key=value"),
    ],
)
def test_bad_recipes_name_the_culprit(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(write(tmp_path, text), overrides)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_toy_section_is_validated_by_the_world(tmp_path):
    with pytest.raises(RecipeError, match=r"toy.entites: unknown key \(did you mean toy.entities\?\)"):
        load_recipe(RECIPES / "toy.yaml", ["toy.entites=3"])
    with pytest.raises(RecipeError, match=r"toy.corpus_entities: must be below entities"):
        load_recipe(RECIPES / "toy.yaml", ["toy.corpus_entities=500"])


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_save_steps_is_validated():
    from minibt.recipe import from_dict

    with pytest.raises(RecipeError, match=r"forward\.save_steps: must be >= 0"):
        from_dict({"toy": {}, "forward": {"save_steps": -1}})
    assert from_dict({"toy": {}, "backward": {"save_steps": 0}}).backward.save_steps == 0
