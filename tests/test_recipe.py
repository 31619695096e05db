"""Recipe loading and validation: every problem is one line that names the key or file."""

from __future__ import annotations

import re
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
def test_shipped_recipes_validate_keep_every_value_they_write_and_reload_from_their_resolved_form(path):
    """Loading raises nothing; every key the file sets reaches the recipe with the file's value (none
    dropped or renamed on the way); the resolved form a run writes to recipe.yaml loads back equal."""
    import yaml

    from minibt.recipe import from_dict

    recipe = load_recipe(path)
    resolved = recipe.to_dict()
    written = yaml.safe_load(path.read_text())
    assert written, f"{path.name} sets nothing"
    for section, keys in written.items():
        for key, value in keys.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key} is {resolved[section][key]!r}, the file says {value!r}"
    assert from_dict(yaml.safe_load(yaml.safe_dump(resolved)), base_dir=path.parent) == recipe


def test_save_steps_is_validated():
    from minibt.recipe import from_dict

    with pytest.raises(RecipeError, match=r"forward\.save_steps: must be >= 0"):
        from_dict({"toy": {}, "forward": {"save_steps": -1}})
    assert from_dict({"toy": {}, "backward": {"save_steps": 0}}).backward.save_steps == 0


@pytest.mark.parametrize("tool", ["tensorboard", "wandb"])
def test_report_to_names_the_package_to_install_only_when_it_is_missing(monkeypatch, tool):
    """Whether the tool is installed here or not: find_spec is made to say so, both ways."""
    import importlib.util

    from minibt.recipe import from_dict

    real = importlib.util.find_spec

    def installed(yes: bool):
        return lambda name, *a, **k: (real("json") if yes else None) if name == tool else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", installed(False))
    for section in ("backward", "forward"):
        with pytest.raises(RecipeError, match=f"^{section}.report_to: {tool} is not installed \\(pip install {tool}\\)$"):
            from_dict({"toy": {}, section: {"report_to": tool}})
    monkeypatch.setattr(importlib.util, "find_spec", installed(True))
    assert from_dict({"toy": {}, "forward": {"report_to": tool}}).forward.report_to == tool
    with pytest.raises(RecipeError, match=r"^forward.report_to: 'mlflow' is not one of none, tensorboard, wandb"):
        from_dict({"toy": {}, "forward": {"report_to": "mlflow"}})
    assert from_dict({"toy": {}}).forward.report_to == "none"  # logs go nowhere unless asked


# --- keys that do nothing are refused ----------------------------------------------------------

TOY = RECIPES / "toy.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed.path=seed.jsonl", "seed.path: the toy world makes its own seed; remove the key or the toy section"),
        ("seed.format=oasst", "seed.format: the toy world makes its own seed"),
        ("seed.max_bad_fraction=0.5", "seed.max_bad_fraction: the toy world makes its own seed"),
        ("corpus.dataset=HuggingFaceFW/fineweb-edu", "corpus.dataset: the toy world makes its own corpus; remove the key or the toy section"),
        ("corpus.min_chars=10", "corpus.min_chars: the toy world makes its own corpus"),
        ("corpus.dedup=false", "corpus.dedup: the toy world makes its own corpus"),
        ("model.name=some-org/some-model", "model.name: the toy world builds its own base; remove the key or the toy section"),
        ("model.revision=main", "model.revision: the toy world builds its own base"),
        ("model.chat_template=minibt", "model.chat_template: the toy world builds its own base"),
    ],
)
def test_with_a_toy_section_seed_corpus_and_base_keys_are_refused(tmp_path, override, message):
    write(tmp_path, "")  # seed.jsonl exists: the key is refused for doing nothing, not for a missing file
    with pytest.raises(RecipeError, match="^" + re.escape(message)) as e:
        load_recipe(TOY, [override.replace("seed.jsonl", str(tmp_path / "seed.jsonl"))])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        # curation keys the method or mode does not read
        (BASE, ["curate.method=likelihood", "curate.mode=generate"], "curate.mode: only the rubric method reads it (curate.method is likelihood)"),
        (BASE, ["curate.method=likelihood", "curate.score=argmax"], "curate.score: only the rubric method reads it"),
        (BASE, ["curate.method=likelihood", "curate.reasoning_tokens=64"], "curate.reasoning_tokens: only the rubric method reads it"),
        (BASE, ["curate.mode=generate", "curate.score=argmax"], "curate.score: mode=generate parses the score the curator writes"),
        (BASE, ["curate.reasoning_tokens=64"], "curate.reasoning_tokens: only mode=generate writes reasoning (curate.mode is distribution)"),
        (BASE, ["curate.ratings=seed.jsonl"], "curate.ratings: read only with curate.calibrate=true"),
        # sampling and tags
        (BASE, ["augment.temperature=0", "augment.top_p=0.5"], "augment.top_p: augment.temperature=0 decodes greedily, without sampling"),
        (BASE, ["forward.tags=false", "forward.seed_tag=Be brief."], "forward.seed_tag: forward.tags is false, so no tag is written"),
        (BASE, ["forward.tags=false", "forward.augmented_tag=From the web."], "forward.augmented_tag: forward.tags is false"),
        # training length and schedule
        (BASE, ["backward.max_steps=10", "backward.epochs=1"], "backward.epochs: backward.max_steps=10 sets the length instead"),
        (BASE, ["forward.max_steps=10", "forward.save_steps=20"], "forward.save_steps: 20 is past forward.max_steps=10, so no checkpoint is ever written"),
        (BASE, ["forward.lr_scheduler=constant", "forward.warmup_ratio=0.1"], "forward.warmup_ratio: the constant scheduler has no warmup"),
        # sources
        (BASE, ["seed.split=test"], "seed.split: only a hub dataset (seed.dataset) reads it"),
        (BASE, ["corpus.name=sample-10BT"], "corpus.name: only a hub dataset (corpus.dataset) reads it"),
        (BASE, ["corpus.split=validation"], "corpus.split: only a hub dataset (corpus.dataset) reads it"),
        (BASE, ["seed.format=oasst", "seed.columns={instruction: q}"], "seed.columns: format oasst has no columns to map"),
        (BASE, ["seed.format=messages", "seed.columns={output: a}"], "seed.columns: format messages has no columns to map"),
        (BASE.replace("corpus.jsonl", "corpus.txt"), ["corpus.text_column=body"], "corpus.text_column: a .txt corpus has no columns"),
        (BASE.replace("some-org/some-model", "./model"), ["model.revision=main"], "model.revision: ./model is a local folder, which has no revisions"),
    ],
)
def test_keys_the_recipe_makes_do_nothing_are_refused(tmp_path, recipe, overrides, message):
    path = write(tmp_path, recipe)
    (tmp_path / "corpus.txt").write_text("c\n")
    (tmp_path / "model").mkdir()
    with pytest.raises(RecipeError, match="^" + re.escape(message)) as e:
        load_recipe(path, overrides)
    assert "\n" not in str(e.value)


def test_spelling_a_default_out_is_not_setting_it(tmp_path):
    """Only keys set away from their default count: these all equal the default, so nothing is refused."""
    r = load_recipe(TOY, ["seed.split=train", "seed.format=auto", "corpus.text_column=text", "corpus.dedup=true",
                          "model.chat_template=auto", "model.trust_remote_code=false"])
    assert r.world is not None and r.seed.path is None
    r = load_recipe(write(tmp_path, BASE), [
        "curate.method=likelihood", "curate.mode=distribution", "curate.score=expected", "curate.reasoning_tokens=128",
        "augment.temperature=0", "augment.top_p=0.9", "forward.tags=false", "forward.seed_tag=Answer in the style of an AI Assistant.",
        "backward.max_steps=10", "backward.epochs=3", "forward.lr_scheduler=constant", "forward.warmup_ratio=0.03",
        "seed.split=train", "corpus.name=null",
    ])
    assert r.curate.method == "likelihood" and r.augment.temperature == 0 and not r.forward.tags


def test_the_same_keys_are_accepted_where_they_act(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["curate.mode=generate", "curate.reasoning_tokens=64", "forward.seed_tag=Be brief.",
                                             "augment.top_p=0.5", "backward.max_steps=10", "backward.save_steps=5",
                                             "forward.lr_scheduler=linear", "forward.warmup_ratio=0.1"])
    assert r.curate.reasoning_tokens == 64 and r.forward.seed_tag == "Be brief." and r.augment.top_p == 0.5
    r = load_recipe(write(tmp_path, BASE), ["curate.score=argmax", "seed.columns={instruction: instruction}"])
    assert r.curate.score == "argmax" and r.seed.columns == {"instruction": "instruction"}


def test_calibration_replaces_the_threshold_without_refusing_it():
    """The one deliberate no-op: the toy recipe's threshold stays while curate.calibrate=true takes over."""
    r = load_recipe(TOY, ["curate.calibrate=true"])
    assert r.curate.calibrate and r.curate.threshold == 0.5
