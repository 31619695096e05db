"""Self-augmentation (minibt/stages/augment.py) on the tiny 4-bit engine: myx writes each text's
instruction, the text becomes the pair's output; each shard samples from its own seed, so a resumed run
writes what an uninterrupted one does; a text too long for myx's context is clipped and marked. Without
a model: which pairs later stages can use (not empty, not a copy of the text)."""

from __future__ import annotations

import pytest

from minibt import io
from minibt.recipe import AugmentSection, ModelSection, Recipe, RunSection
from minibt.roles import MYX, backward_prompt
from minibt.rundir import RunDir
from minibt.stages.augment import TRUNCATED, augment, copies_output, unusable_counts, usable, why_unusable

CONTEXT = 256  # the stage_engine's (tests/stages/conftest.py)

CORPUS = [{"id": i, "source": "web", "text": t} for i, t in enumerate(
    ["The king is red.", "The river is blue and old.", "A small city in the north.", "The queen is tall.", "Five old mountains."])]


def run_dir(path) -> RunDir:
    rd = RunDir(path)
    rd.manifest.setdefault("stages", {})
    return rd


def recipe(seed: int = 0, **augment_keys) -> Recipe:
    cfg = {"max_new_tokens": 6, "batch_size": 4, "shard_size": 2, **augment_keys}  # shards of 2: 2 + 2 + 1
    return Recipe(run=RunSection(seed=seed), model=ModelSection(max_length=CONTEXT), augment=AugmentSection(**cfg))


def test_usable_pairs_have_an_instruction():
    assert usable({"instruction": "What is red?", "output": "x"})
    assert not usable({"instruction": "", "output": "x"}) and not usable({"instruction": " \n\t", "output": "x"})


PASSAGE = ("Britain was the first to pass any act outlawing cruelty to animals. The Cruelty to Animals Act of 1822, "
           "introduced by Richard Martin, protected cattle, horses and sheep from beating and abuse. Two years later "
           "Martin helped found the Society for the Prevention of Cruelty to Animals.")

COPIES = {  # what a small myx writes for PASSAGE instead of a request
    "the first sentence": "Britain was the first to pass any act outlawing cruelty to animals.",
    "its first eight words": "Britain was the first to pass any act",
    "case and punctuation changed": "britain was the first to pass any act, outlawing cruelty to animals",
    "a later sentence, cut short": "The Cruelty to Animals Act of 1822, introduced by Richard Martin, protected cattle",
    "a continuation into the next sentence": ("Britain was the first to pass any act outlawing cruelty to animals, and the "
                                              "Cruelty to Animals Act of 1822 protected cattle, horses and sheep"),
    "a continuation in its own words": ("Britain was the first to pass any act outlawing cruelty to animals, and many "
                                        "other countries followed its example soon after"),
    "a question of its own tacked on": "Britain was the first to pass any act outlawing cruelty to animals. What is this about?",
    "a word added": "Britain was the first nation to pass any act outlawing cruelty to animals.",
    "a word changed": "Britain was the first to pass an act outlawing cruelty to animals.",
    "a question tacked on": "Britain was the first to pass any act outlawing cruelty to animals. Why?",
}

REQUESTS = {  # honest (instruction, output) pairs, many from databricks-dolly-15k: they share words, not the text
    "capital": ("What is the capital of France?", "The capital of France is Paris."),
    "answer restates the question": ("Who became king of Holland in 1806?",
                                     "William I of the Netherlands became king of Holland in 1806."),
    "answer restates most of it": ("What is the tallest mountain in the continental US?",
                                   "Mt. Whitney, which is 14,500 ft, is the tallest mountain in the continental US."),
    "a long question restated": ("What are 4 good reasons to get solar panels and a powerwall for my house?",
                                 "The following are 4 good reasons to get solar panels and a powerwall on your house: "
                                 "lower bills, backup power during outages, selling power back, cleaner energy."),
    "a long name restated": ("What is the Research Collaboratory for Structural Bioinformatics Protein Data Bank (RCSB PDB)?",
                             "The Research Collaboratory for Structural Bioinformatics Protein Data Bank (RCSB PDB) is "
                             "a database for the three-dimensional structural data of large biological molecules."),
    "a question about the passage": ("Which country was the first to pass a law against cruelty to animals?", PASSAGE),
    "a request naming a phrase of it": ("Write a short paragraph about the Cruelty to Animals Act of 1822 and who introduced it.",
                                        PASSAGE),
    "a summary request": ("Summarize the history of animal welfare laws in Britain in three sentences.", PASSAGE),
    "a request that quotes it first": ("Britain was the first to pass any act outlawing cruelty to animals: explain in a "
                                       "few sentences why that law mattered and who fought for it.", PASSAGE),
    "a classification": ("Classify these cities by country: Paris, Munich, Lyon, Dresden",
                         "France: Paris, Lyon\nGermany: Munich, Dresden"),
    "a short question quoted whole": ("What is the best swimming form?", "It is hard to say what is the best swimming "
                                      "form as everyone's body may be more suited to one or another."),
    "seven words quoted whole": ("Who is the best Formula 1 driver", "Who is the best Formula 1 driver has been a hotly "
                                 "debated topic for decades."),
    "too short to judge": ("The capital of France", "The capital of France is Paris."),
    "a short title": ("Cruelty to Animals Act", PASSAGE),
}


@pytest.mark.parametrize("name", COPIES)
def test_an_instruction_that_repeats_its_text_is_a_copy(name):
    pair = {"instruction": COPIES[name], "output": PASSAGE}
    assert copies_output(pair["instruction"], PASSAGE), name
    assert why_unusable(pair) == "copies" and not usable(pair)


@pytest.mark.parametrize("name", REQUESTS)
def test_a_request_sharing_words_with_its_answer_is_not_a_copy(name):
    instruction, output = REQUESTS[name]
    assert not copies_output(instruction, output), name
    assert usable({"instruction": instruction, "output": output})


def test_unusable_pairs_are_counted_per_reason():
    pairs = [{"instruction": i, "output": PASSAGE} for i in [*COPIES.values(), "", "  ", REQUESTS["a summary request"][0]]]
    assert unusable_counts(pairs) == {"empty_instructions": 2, "copies": len(COPIES)}
    assert [why_unusable(p) for p in pairs[-3:]] == ["empty_instructions", "empty_instructions", None]


def test_myx_writes_each_texts_instruction_and_the_text_becomes_the_output(stage_engine, tmp_path):
    rows = augment(run_dir(tmp_path), stage_engine.infer, recipe(temperature=0.0), CORPUS)
    assert io.read_jsonl(tmp_path / "data" / "augmented.jsonl") == rows
    assert [(r["id"], r["source"], r["output"]) for r in rows] == [(c["id"], c["source"], c["text"]) for c in CORPUS]
    assert all("text" not in r and TRUNCATED not in r for r in rows)
    prompts = [backward_prompt(stage_engine.text, c["text"], 6) for c in CORPUS]
    assert [r["instruction"] for r in rows] == stage_engine.infer.generate(MYX, prompts, max_new_tokens=6)  # greedy: myx's own
    assert [r["instruction"] for r in rows] != stage_engine.infer.generate("m0", prompts, max_new_tokens=6), "written by myx, not another adapter"


def test_each_shard_samples_from_its_own_seed_so_a_resumed_run_writes_the_same(stage_engine, tmp_path):
    whole = augment(run_dir(tmp_path / "whole"), stage_engine.infer, recipe(temperature=1.0, top_p=1.0), CORPUS)
    resumed = tmp_path / "resumed"
    augment(run_dir(resumed), stage_engine.infer, recipe(temperature=1.0, top_p=1.0), CORPUS)
    (resumed / "data" / "augmented.shards" / "00001.jsonl").unlink()  # killed before its second shard was on disk
    stage_engine.infer.generate(MYX, ["something else first"], max_new_tokens=4, temperature=1.0)  # other sampling in between
    assert augment(run_dir(resumed), stage_engine.infer, recipe(temperature=1.0, top_p=1.0), CORPUS) == whole
    reseeded = augment(run_dir(tmp_path / "seed1"), stage_engine.infer, recipe(seed=1, temperature=1.0, top_p=1.0), CORPUS)
    assert [r["instruction"] for r in reseeded] != [r["instruction"] for r in whole], "run.seed drives the sampling"


def test_a_text_too_long_for_myx_is_clipped_and_marked(stage_engine, tmp_path):
    assert stage_engine.model_cfg.max_length == CONTEXT
    long = {"id": 9, "text": " ".join(["the old king of the north is red and the river is blue."] * 40)}
    assert stage_engine.text.count_tokens(long["text"]) > CONTEXT
    rows = augment(run_dir(tmp_path), stage_engine.infer, recipe(temperature=0.0), CORPUS[:1] + [long])
    assert TRUNCATED not in rows[0] and rows[1][TRUNCATED] is True
    assert rows[1]["output"] == long["text"], "the pair keeps the whole text; only myx's prompt is cut"
    assert stage_engine.text.count_tokens(backward_prompt(stage_engine.text, long["text"], 6)) <= CONTEXT - 6
