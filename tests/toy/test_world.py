"""The toy world: determinism, ground-truth labels, metrics, and a loadable pretrained base."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import torch

from minibt.errors import RecipeError
from minibt.recipe import from_dict
from minibt.toy import metrics
from minibt.toy.world import (
    ATTRIBUTE_WORDS,
    WorldConfig,
    answer_is_correct,
    build_world,
    instruction_asks_for,
    small_world_config,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig())


def test_same_seed_same_world_other_seed_other_world(world):
    assert dataclasses.asdict(build_world(WorldConfig())) == dataclasses.asdict(world)
    other = build_world(WorldConfig(seed=1))
    assert other.entities != world.entities and other.corpus != world.corpus


def test_one_knob_leaves_the_facts_alone(world):
    noisier = build_world(WorldConfig(noise_fraction=0.5))
    assert noisier.facts == world.facts and noisier.seed_pairs == world.seed_pairs
    assert sum(r["label"] == "noise" for r in noisier.corpus) < sum(r["label"] == "noise" for r in world.corpus)


def test_default_world_sizes(world):
    labels = [r["label"] for r in world.corpus]
    assert 250 < len(world.seed_pairs) < 320
    assert labels.count("noise") / len(labels) == pytest.approx(0.8, abs=0.01)
    assert len(world.eval_questions) > 250 and len(world.rated_pairs) == 60
    assert len(set(ATTRIBUTE_WORDS)) == len(ATTRIBUTE_WORDS) >= 200


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def _asked(world, instruction: str) -> tuple[str, str]:
    """The (entity, attribute) that a well-formed question of the world names."""
    words = _words(instruction)
    (entity,) = words & set(world.entities)
    (attribute,) = words & set(world.attributes)
    return entity, attribute


def test_corpus_labels_are_true(world):
    values = {v for vs in world.facts.values() for v in vs.values()}
    for row in world.corpus:
        if row["label"] == "fact":
            value = world.facts[row["entity"]][row["attribute"]]
            assert answer_is_correct(row["text"], value) and row["entity"] in row["text"]
        else:
            assert row["label"] == "noise" and row["entity"] is None and row["attribute"] is None
            assert not _words(row["text"]) & values  # noise answers nothing: it names no value


def test_splits(world):
    held_out, seed_attributes = set(world.held_out_entities), set(world.seed_attributes)
    seed_entities = set(world.entities[: WorldConfig().seed_entities])
    tuning_texts = [p["instruction"] + " " + p["output"] for p in world.seed_pairs + world.rated_pairs]
    tuning_texts += [r["text"] for r in world.corpus]
    assert held_out and not any(_words(t) & held_out for t in tuning_texts)  # held out: pretraining only
    for pair in world.seed_pairs + world.rated_pairs:
        entity, attribute = _asked(world, pair["instruction"])
        assert attribute in seed_attributes and entity in seed_entities
        assert "score" in pair or answer_is_correct(pair["output"], world.facts[entity][attribute])
    assert all(q["attribute"] not in seed_attributes and q["entity"] in held_out for q in world.eval_questions)
    assert all(world.facts[q["entity"]][q["attribute"]] == q["value"] for q in world.eval_questions)
    assert all(r["entity"] in held_out for r in world.backward_eval)
    pretrain = "\n".join(world.pretrain_texts)  # the base never saw a question answered
    assert not any(p["instruction"] + sep + p["output"] in pretrain for p in world.seed_pairs for sep in " \n")


def test_rated_pairs_follow_the_rubric(world):
    assert {r["score"] for r in world.rated_pairs} == {1, 2, 5}
    for r in world.rated_pairs:
        entity, attribute = _asked(world, r["instruction"])
        value = world.facts[entity][attribute]
        states_it = {entity, attribute} <= _words(r["output"]) and answer_is_correct(r["output"], value)
        assert states_it == (r["score"] == 5)


def test_ground_truth_checks():
    assert instruction_asks_for("What is the color of Zorbin?", "Zorbin", "color")
    assert instruction_asks_for("Do you know zorbin's color?", "Zorbin", "color")
    assert not instruction_asks_for("What is the color of Zorbinal?", "Zorbin", "color")
    assert not instruction_asks_for("What is the colour of Zorbin?", "Zorbin", "color")
    assert not instruction_asks_for("What is the color and height of Zorbin?", "Zorbin", "color")
    assert not instruction_asks_for("The color of Zorbin is Kavela.", "Zorbin", "color", "Kavela")  # states it
    assert instruction_asks_for("What is the color of Zorbin?", "Zorbin", "color", "Kavela")
    assert not instruction_asks_for("The color of Zorbin is Dorun.", "Zorbin", "color", "Kavela")  # a statement
    assert instruction_asks_for("Tell me the color of Zorbin.", "Zorbin", "color", "Kavela")
    assert answer_is_correct("The color of Zorbin is Kavela.", "Kavela")
    assert answer_is_correct("kavela", "Kavela")
    assert not answer_is_correct("The color of Zorbin is Kavelano.", "Kavela")


def test_metrics_on_hand_made_rows():
    rows = [{"entity": "Zorbin", "attribute": "color"}, {"entity": "Mira", "attribute": "height"}]
    assert metrics.backward_accuracy(["What is the color of Zorbin?", "What is Mira's color?"], rows) == 50.0
    fact = {"text": "Kavela is the color of Zorbin.", "label": "fact", "entity": "Zorbin", "attribute": "color"}
    pairs = [
        {"instruction": "What is the color of Zorbin?", **fact},  # correct
        {"instruction": "What is the height of Zorbin?", **fact},  # a fact under the wrong instruction
        {"instruction": "What is the color of Zorbin?", "text": "Buy now!", "label": "noise", "entity": None,
         "attribute": None},
    ]  # fmt: skip
    assert metrics.correct_share(pairs) == 33.3
    assert metrics.correct_share([]) == 0.0
    assert metrics.curation_precision_recall(pairs, [True, False, True]) == (50.0, 50.0)
    assert metrics.curation_precision_recall(pairs, [False, False, False]) == (0.0, 0.0)
    evals = [{"value": "Kavela"}, {"value": "Dorun"}, {"value": "Sima"}]
    assert metrics.forward_accuracy(["It is Kavela.", "Dorunas", "sima"], evals) == 66.7
    with pytest.raises(ValueError):
        metrics.forward_accuracy(["one answer"], evals)


def test_recipe_section_builds_and_checks_world_config():
    recipe = from_dict({"toy": {"seed": 3, "noise_fraction": 0.5, "list_pages": False}})
    assert recipe.world.seed == 3 and recipe.world.list_pages is False
    with pytest.raises(RecipeError, match="toy.noise_fraction"):
        from_dict({"toy": {"noise_fraction": "lots"}})
    with pytest.raises(RecipeError, match="toy.corpus_entities"):
        WorldConfig(corpus_entities=200).check("toy")
    with pytest.raises(RecipeError, match="toy.hidden_size"):
        WorldConfig(hidden_size=130).check("toy")


def test_small_base_loads_and_renders_chat(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minibt import prompts
    from minibt.toy.base import build_base

    cfg = small_world_config(pretrain_steps=50)  # loadable and cached, not knowledgeable
    world = build_world(cfg)
    folder = build_base(cfg, world, cache_dir=tmp_path)
    assert list(tmp_path.joinpath("toy-base").iterdir()) == [folder]  # no temp folder left behind
    start = time.monotonic()
    assert build_base(cfg, world, cache_dir=tmp_path) == folder and time.monotonic() - start < 2  # cached

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = prompts.forward_messages("What is the color of Zorbin?")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("### Assistant:\n") and "### User:\nWhat is the color of Zorbin?" in text
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    sentence = "The color of Zorbin is Kavela."
    assert tok.decode(tok(sentence)["input_ids"], skip_special_tokens=True) == sentence
