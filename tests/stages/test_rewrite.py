"""The rewrite stage (Back-and-Forth Translation) on a tiny 4-bit Llama: the guard's rule, rows that keep
their original text, counts that match the rows, shards reused on resume, and sampling that a resumed
run repeats exactly."""

from __future__ import annotations

import pytest

from minibt import io
from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection, Recipe, RewriteSection
from minibt.rundir import RunDir
from minibt.stages import rewrite as rw

CURATED = [{"id": i, "instruction": f"What is the color of the {w}?", "output": f"The color of the {w} is red, said the {w}."}
           for i, w in enumerate(["king", "queen", "river", "city", "north"])]  # shards of 2: 2 + 2 + 1
CONTEXT = 192  # the tiny tokenizer spends ~100 tokens on the rewrite prompt without its text


def test_content_overlap_counts_distinct_content_words():
    # content words of the original: color, king, red (the, of, is are stopwords)
    assert rw.content_words("The color of the King is RED.") == {"color", "king", "red"}
    assert rw.content_overlap("The color of the king is red.", "Red is the king's color.") == 1.0
    assert rw.content_overlap("The color of the king is red.", "The color of the king is blue.") == pytest.approx(2 / 3)
    assert rw.content_overlap("the of is", "anything") == 1.0  # nothing to lose


def test_guard_keeps_the_original_where_the_rewrite_loses_content():
    row = {"instruction": "What is the color of the king?", "output": "The color of the king is red."}
    good = rw.guard(row, "The king's color is red.", min_overlap=0.7)
    assert good["rewrite_used"] and good["output"] == "The king's color is red."
    assert good["original_output"] == row["output"]
    lost = rw.guard(row, "The color of the king is blue.", min_overlap=0.7)  # 2/3 of the content
    assert not lost["rewrite_used"] and lost["output"] == row["output"] and lost["rewrite"] == "The color of the king is blue."
    assert rw.guard(row, "The color of the king is blue.", min_overlap=0.0)["rewrite_used"]  # 0: every non-empty rewrite
    assert not rw.guard(row, "  ", min_overlap=0.0)["rewrite_used"]  # an empty rewrite never replaces the text


def test_adapter_defaults_to_the_rounds_curator():
    recipe = Recipe(rewrite=RewriteSection(enabled=True))
    assert [rw.rewrite_adapter(recipe, k) for k in (1, 2)] == ["m0", "m1"]
    fixed = Recipe(rewrite=RewriteSection(enabled=True, adapter="myx"))
    assert rw.rewrite_adapter(fixed, 2) == "myx"


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(ModelSection(name=tiny_model_dir, max_length=CONTEXT), LoraSection(r=4, alpha=8), seed=0)


def recipe(**rewrite) -> Recipe:
    cfg = {"enabled": True, "adapter": "base", "max_new_tokens": 12, "batch_size": 4, "shard_size": 2, **rewrite}
    return Recipe(model=ModelSection(max_length=CONTEXT), rewrite=RewriteSection(**cfg))


def run_dir(path) -> RunDir:
    rd = RunDir(path)
    rd.manifest.setdefault("stages", {})
    return rd


def test_stage_writes_rows_with_their_original_and_counts_that_match(engine, tmp_path):
    counts = rw.rewrite(run_dir(tmp_path), engine.infer, recipe(min_overlap=0.0), 1, CURATED)
    rows = io.read_jsonl(tmp_path / "data" / "rewritten_r1.jsonl")
    assert [r["original_output"] for r in rows] == [r["output"] for r in CURATED]
    assert all(r["output"] == (r["rewrite"] if r["rewrite_used"] else r["original_output"]) for r in rows)
    assert counts["pairs"] == 5 and counts["adapter"] == "base" and counts["engine"] == "hf"
    assert counts["rewritten"] == sum(r["rewrite_used"] for r in rows)
    assert counts["rewritten"] + counts["kept_original"] == 5
    assert counts["kept_original"] == counts["empty_rewrites"]  # min_overlap 0: only empty rewrites are refused
    # the same rewrites under the strictest guard: only those keeping every content word replace the text
    strict = rw.rewrite(run_dir(tmp_path / "strict"), engine.infer, recipe(min_overlap=1.0), 1, CURATED)
    strict_rows = io.read_jsonl(tmp_path / "strict" / "data" / "rewritten_r1.jsonl")
    assert [r["rewrite"] for r in strict_rows] == [r["rewrite"] for r in rows]  # greedy: the same text
    assert strict["rewritten"] == sum(r["rewrite_overlap"] == 1.0 and bool(r["rewrite"].strip()) for r in rows)


def test_a_resumed_sampled_rewrite_equals_an_uninterrupted_one(engine, tmp_path, monkeypatch):
    sampled = recipe(temperature=1.0, top_p=0.9)
    want = rw.rewrite(run_dir(tmp_path / "whole"), engine.infer, sampled, 1, CURATED)
    want_rows = io.read_jsonl(tmp_path / "whole" / "data" / "rewritten_r1.jsonl")

    real, calls = engine.infer.generate, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the stage
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.infer, "generate", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        rw.rewrite(run_dir(tmp_path / "killed"), engine.infer, sampled, 1, CURATED)
    assert sorted(p.name for p in (tmp_path / "killed" / "data" / "rewritten_r1.shards").iterdir()) == ["00000.jsonl"]
    calls.clear()
    monkeypatch.setattr(engine.infer, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    got = rw.rewrite(run_dir(tmp_path / "killed"), engine.infer, sampled, 1, CURATED)
    assert len(calls) == 2, "the finished shard is reused: shards 1 and 2 only"
    assert io.read_jsonl(tmp_path / "killed" / "data" / "rewritten_r1.jsonl") == want_rows
    assert got == want


def test_a_long_text_is_clipped_to_leave_room_for_the_answer(engine, tmp_path):
    long = [{"id": 0, "instruction": "What is the color of the king?", "output": " ".join(["the king is red"] * 60)}]
    cfg = recipe(min_overlap=0.0)
    head = engine.text.count_tokens(rw.rewrite_prompt(engine.text, cfg, long[0]["instruction"], ""))
    assert head + 16 + 12 < CONTEXT, "the prompt without the text leaves room to clip it into"
    counts = rw.rewrite(run_dir(tmp_path), engine.infer, cfg, 1, long)
    row = io.read_jsonl(tmp_path / "data" / "rewritten_r1.jsonl")[0]
    assert counts["truncated"] == 1 and row[rw.TRUNCATED] and row["original_output"] == long[0]["output"]
    prompt = rw.rewrite_prompt(engine.text, cfg, long[0]["instruction"], long[0]["output"])
    assert engine.text.count_tokens(prompt) <= cfg.model.max_length - cfg.rewrite.max_new_tokens
