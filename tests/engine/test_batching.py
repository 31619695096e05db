"""Prompts as token batches (minibt/engine/batching.py): the generation budget (a prompt is never cut to make
room for generation that does not fit), and the shared head."""

from __future__ import annotations

import logging

import pytest

from minibt.engine import MIN_NEW_TOKENS, Engine, generation_budget
from minibt.engine.batching import common_prefix, pad_groups
from minibt.recipe import LoraSection, ModelSection

CONTEXT = 64


@pytest.mark.parametrize(
    "prompt, want, kept, new",
    [
        (10, 20, 10, 20),  # fits: everything asked
        (40, 256, 40, 24),  # asked too much: the budget shrinks, the prompt stays whole
        (60, 256, 64 - MIN_NEW_TOKENS, MIN_NEW_TOKENS),  # leaves too little: clipped to leave the floor
        (200, 8, 56, 8),  # alone too long, small request: room for the request only
        (63, 1, 63, 1),
    ],
)
def test_generation_budget(prompt, want, kept, new):
    assert generation_budget(prompt, want, CONTEXT) == (kept, new)
    assert kept + new <= CONTEXT


@pytest.mark.parametrize("lengths", [[50, 10, 48, 9, 30, 50, 1], [7], [3, 3, 3, 3], list(range(1, 40))])
@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 1.0])
def test_pad_groups_cover_every_row_once_longest_first_within_the_padding_bound(lengths, share):
    groups = pad_groups(lengths, share)
    rows = [i for g in groups for i in g]
    assert sorted(rows) == list(range(len(lengths)))
    assert [lengths[i] for i in rows] == sorted(lengths, reverse=True)
    for g in groups:
        width = lengths[g[0]]
        assert width * len(g) - sum(lengths[i] for i in g) <= share * width * len(g)
    if share == 1.0:
        assert len(groups) == 1
    if share == 0.0:  # only equal lengths share a forward
        assert len(groups) == len(set(lengths))


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=CONTEXT), LoraSection(r=4, alpha=8), seed=0)
    e.add_adapter("m0")  # LoRA B starts at zero: m0 answers as the base, which is all these tests need
    return e


def words(n: int) -> str:
    return " ".join(["the king is red"] * n)


def test_long_request_keeps_the_prompt_whole(engine, caplog):
    """The old rule kept max(1, context - asked) = 1 prompt token here, silently."""
    prompt = engine.text.render([{"role": "user", "content": words(2)}])  # 35 of the 64 tokens
    before = engine.text.truncated
    with caplog.at_level(logging.WARNING, logger="minibt"):
        out = engine.infer.generate("m0", [prompt], max_new_tokens=256)
    assert engine.text.truncated == before and not caplog.records
    ids = engine.tokenizer(prompt)["input_ids"]
    assert engine.text.fit([prompt], 256) == ([ids], [CONTEXT - len(ids)])
    # asking for exactly the room the prompt leaves gives the same text
    assert out == engine.infer.generate("m0", [prompt], max_new_tokens=CONTEXT - len(ids))
    assert out != engine.infer.generate("m0", [prompt], max_new_tokens=CONTEXT - len(ids) - 10)  # the budget is used


def test_prompt_longer_than_the_context_is_clipped_counted_and_reported(engine, caplog):
    long_prompt = engine.text.render([{"role": "user", "content": words(40)}])
    assert len(engine.tokenizer(long_prompt)["input_ids"]) > CONTEXT
    before = engine.text.truncated
    with caplog.at_level(logging.WARNING, logger="minibt"):
        out = engine.infer.generate("m0", [long_prompt, long_prompt], max_new_tokens=256)
    assert engine.text.truncated == before + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 2 prompts") and "model.max_length=64" in warnings[0]
    assert all(out), "a clipped prompt still generates"


def test_streaming_follows_the_same_rule(engine, caplog):
    long_prompt = engine.text.render([{"role": "user", "content": words(40)}])
    pieces = []
    with caplog.at_level(logging.WARNING, logger="minibt"):
        reply = engine.infer.stream("m0", long_prompt, 256, 0.0, 1.0, pieces.append)
    assert reply and "".join(pieces).strip() == reply
    assert any("1 of 1 prompts" in r.getMessage() for r in caplog.records)


def test_rows_of_one_batch_keep_their_own_budgets(engine):
    """Mixed prompt lengths in one batch (27-107 tokens: budgets 37, 29, 21 and 16 after clipping):
    each row stops at its own budget, as it would alone."""
    prompts = [engine.text.render([{"role": "user", "content": words(k)}]) for k in (1, 2, 3, 11)]
    batched = engine.infer.generate("m0", prompts, max_new_tokens=40, batch_size=4)
    single = [engine.infer.generate("m0", [p], max_new_tokens=40)[0] for p in prompts]
    assert batched == single


def test_common_prefix_leaves_a_token_for_every_row():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a row equal to the prefix keeps its last token
    assert common_prefix([[7]]) == 0
    assert common_prefix([]) == 0
