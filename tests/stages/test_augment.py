"""Self-augmentation (minibt/stages/augment.py) on the tiny 4-bit engine: myx writes each text's
instruction, the text becomes the pair's output; each shard samples from its own seed, so a resumed run
writes what an uninterrupted one does; a text too long for myx's context is clipped and marked."""

from __future__ import annotations

from minibt import io
from minibt.recipe import AugmentSection, ModelSection, Recipe, RunSection
from minibt.roles import MYX, backward_prompt
from minibt.rundir import RunDir
from minibt.stages.augment import TRUNCATED, augment, usable

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


def test_myx_writes_each_texts_instruction_and_the_text_becomes_the_output(stage_engine, tmp_path):
    rows = augment(run_dir(tmp_path), stage_engine, recipe(temperature=0.0), CORPUS)
    assert io.read_jsonl(tmp_path / "data" / "augmented.jsonl") == rows
    assert [(r["id"], r["source"], r["output"]) for r in rows] == [(c["id"], c["source"], c["text"]) for c in CORPUS]
    assert all("text" not in r and TRUNCATED not in r for r in rows)
    prompts = [backward_prompt(stage_engine, c["text"], 6) for c in CORPUS]
    assert [r["instruction"] for r in rows] == stage_engine.generate(MYX, prompts, max_new_tokens=6)  # greedy: myx's own
    assert [r["instruction"] for r in rows] != stage_engine.generate("m0", prompts, max_new_tokens=6), "written by myx, not another adapter"


def test_each_shard_samples_from_its_own_seed_so_a_resumed_run_writes_the_same(stage_engine, tmp_path):
    whole = augment(run_dir(tmp_path / "whole"), stage_engine, recipe(temperature=1.0, top_p=1.0), CORPUS)
    resumed = tmp_path / "resumed"
    augment(run_dir(resumed), stage_engine, recipe(temperature=1.0, top_p=1.0), CORPUS)
    (resumed / "data" / "augmented.shards" / "00001.jsonl").unlink()  # killed before its second shard was on disk
    stage_engine.generate(MYX, ["something else first"], max_new_tokens=4, temperature=1.0)  # other sampling in between
    assert augment(run_dir(resumed), stage_engine, recipe(temperature=1.0, top_p=1.0), CORPUS) == whole
    reseeded = augment(run_dir(tmp_path / "seed1"), stage_engine, recipe(seed=1, temperature=1.0, top_p=1.0), CORPUS)
    assert [r["instruction"] for r in reseeded] != [r["instruction"] for r in whole], "run.seed drives the sampling"


def test_a_text_too_long_for_myx_is_clipped_and_marked(stage_engine, tmp_path):
    assert stage_engine.model_cfg.max_length == CONTEXT
    long = {"id": 9, "text": " ".join(["the old king of the north is red and the river is blue."] * 40)}
    assert stage_engine.count_tokens(long["text"]) > CONTEXT
    rows = augment(run_dir(tmp_path), stage_engine, recipe(temperature=0.0), CORPUS[:1] + [long])
    assert TRUNCATED not in rows[0] and rows[1][TRUNCATED] is True
    assert rows[1]["output"] == long["text"], "the pair keeps the whole text; only myx's prompt is cut"
    assert stage_engine.count_tokens(backward_prompt(stage_engine, long["text"], 6)) <= CONTEXT - 6
