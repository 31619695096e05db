"""Forward models' training rows: seed and augmented pairs, and with curate.teach the rated pairs in the
rubric format, exactly as the curator is asked them (tiny 4-bit Llama)."""

from __future__ import annotations

import types

import pytest

from minibt import io
from minibt.engine import Engine
from minibt.errors import RecipeError
from minibt.recipe import LoraSection, ModelSection, Recipe, from_dict
from minibt.roles import RUBRIC_ANSWER_ROOM, forward_prompt, rubric_prompt
from minibt.sections import CurateSection
from minibt.stages.forward import forward_rows, taught

SEED = [{"instruction": "What is the color of the king?", "output": "The king is red."}]
RATED = [{"instruction": "What is the color of the king?", "output": "The king is red.", "score": 5},
         {"instruction": "What is the color of the king?", "output": "Buy two shoes, get one free.", "score": 1}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(ModelSection(name=tiny_model_dir, max_length=1024), LoraSection(r=4, alpha=8), seed=0)


def test_rated_pairs_join_the_rows_as_the_curator_is_asked_them(engine):
    recipe = Recipe(curate=CurateSection(teach=True))
    plain = forward_rows(engine, recipe, SEED, [])
    rows = forward_rows(engine, recipe, SEED, [], RATED)
    assert rows[: len(plain)] == plain == [{"prompt": forward_prompt(engine.text, recipe, SEED[0]["instruction"]), "completion": "The king is red."}]
    assert rows[len(plain):] == [
        {"prompt": rubric_prompt(engine.text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM), "completion": f"Score: {r['score']}"}
        for r in RATED
    ]


def test_taught_reads_the_ratings_only_with_teach(tmp_path):
    io.write_jsonl(tmp_path / "data" / "ratings.jsonl", RATED)
    own = tmp_path / "mine.jsonl"
    io.write_jsonl(own, RATED[:1])
    rd = types.SimpleNamespace(data=lambda name: tmp_path / "data" / f"{name}.jsonl")

    def ctx(**curate):
        return types.SimpleNamespace(recipe=Recipe(curate=CurateSection(**curate)), rd=rd)

    assert taught(ctx()) == []
    assert taught(ctx(teach=True)) == RATED  # the run's (the toy world's) data/ratings.jsonl
    assert taught(ctx(teach=True, ratings=str(own))) == RATED[:1]  # curate.ratings wins


def test_teach_is_refused_where_it_would_do_nothing(tmp_path, tiny_model_dir):
    io.write_jsonl(tmp_path / "seed.jsonl", SEED)
    io.write_jsonl(tmp_path / "corpus.jsonl", [{"text": "The queen is blue."}])
    io.write_jsonl(tmp_path / "rated.jsonl", RATED)
    raw = {"model": {"name": tiny_model_dir}, "seed": {"path": str(tmp_path / "seed.jsonl")},
           "corpus": {"path": str(tmp_path / "corpus.jsonl")}}
    with pytest.raises(RecipeError, match=r"curate.teach: needs curate.ratings"):
        from_dict({**raw, "curate": {"teach": True}})
    with pytest.raises(RecipeError, match=r"curate.teach: only the rubric method reads it"):
        from_dict({**raw, "curate": {"method": "likelihood", "teach": True, "ratings": str(tmp_path / "rated.jsonl")}})
    taught_recipe = from_dict({**raw, "curate": {"teach": True, "ratings": str(tmp_path / "rated.jsonl")}})
    assert taught_recipe.curate.teach and not taught_recipe.curate.calibrate  # ratings read by teach alone
