"""The Python API (minibt/session.py) on conftest's finished tiny run: one base with the run's adapters,
switched by name; generate, stream, backtranslate and score as the run does them; the default answer
length rules. (The same entry points against the toy world's own metrics: tests/toy/test_inference.py.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml

import minibt
from minibt import io
from minibt.engine import MIN_NEW_TOKENS
from minibt.errors import MinibtError

ASKED = ["What is the color of the king?", "What is the color of the river?", "Tell me about the north."]


@pytest.fixture(scope="module")
def session(finished_run):
    return minibt.open_run(finished_run[1])


def test_open_run_attaches_every_adapter_of_the_run_on_one_base(session, finished_run):
    assert sorted(session.adapters) == ["m0", "m1", "myx"]
    lazy = minibt.open_run(finished_run[1], adapters=["m0"])
    assert lazy.adapters == ["m0"]
    model = lazy.engine.model
    lazy.generate(ASKED[:1], adapter="m1", max_new_tokens=2)  # attached on first use, not reloaded
    assert sorted(lazy.adapters) == ["m0", "m1"] and lazy.engine.model is model
    with pytest.raises(MinibtError, match=r"^adapter 'm9' does not exist in .* \(have: m0, m1, myx; 'base' means no adapter\)$"):
        lazy.generate("hi", adapter="m9")


def test_generate_answers_each_instruction_in_order_and_by_the_adapter_named(session):
    both = session.generate(ASKED, adapter="m1", max_new_tokens=8)
    assert both == [session.generate(q, adapter="m1", max_new_tokens=8)[0] for q in ASKED], "a batch answers as one at a time"
    assert len(session.generate(ASKED[0], adapter="m1", max_new_tokens=8)) == 1  # a string is one instruction
    by_adapter = {a: session.generate(ASKED, adapter=a, max_new_tokens=8) for a in ("base", "m0", "m1")}
    assert by_adapter["m1"] == both
    assert len({tuple(v) for v in by_adapter.values()}) == 3, f"switching the adapter changes the answers: {by_adapter}"


def test_defaults_are_the_runs_budgets(session):
    assert session.generate(ASKED, adapter="m1") == session.generate(ASKED, adapter="m1", max_new_tokens=session.answer_tokens)
    assert session.instruction_tokens == session.recipe.augment.max_new_tokens == 6
    texts = ["The king is red.", "The river of the south is green."]
    written = session.backtranslate(texts)
    assert written == session.backtranslate(texts, max_new_tokens=6)
    assert written != session.backtranslate(texts, max_new_tokens=12), "a longer budget writes more: 6 was the limit"


def test_stream_sends_the_reply_as_it_is_made_and_it_is_generates_answer(session):
    chunks = []
    reply = session.stream([{"role": "user", "content": ASKED[0]}], adapter="m1", max_new_tokens=8, on_text=chunks.append)
    assert len(chunks) > 1 and "".join(chunks).strip() == reply
    assert reply == session.generate(ASKED[0], adapter="m1", max_new_tokens=8)[0]


def test_score_is_the_runs_curation_with_its_threshold(session, finished_run, tmp_path):
    run = finished_run[1]
    scored = io.read_jsonl(run / "data" / "scored_r1.jsonl")  # round 1, curated by m0
    got = session.score([r["instruction"] for r in scored], [r["output"] for r in scored], adapter="m0")
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in scored], abs=1e-3)
    assert [p for g in got for p in g["score_probs"]] == pytest.approx([p for r in scored for p in r["score_probs"]], abs=1e-3)
    assert [g["kept"] for g in got] == [r["kept"] for r in scored]
    one = session.score(scored[0]["instruction"], scored[0]["output"], adapter="m0")  # one pair: a dict
    assert one["score"] == pytest.approx(scored[0]["score"], abs=1e-3) and "instruction" not in one

    # the threshold the round applied, as the manifest records it (a calibrated one is not the recipe's)
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("plots", "work"))
    data = json.loads((copy / "manifest.json").read_text())
    top = max(r["score"] for r in scored)
    data["stages"]["curate_r1"]["counts"]["threshold"] = top
    io.write_json(copy / "manifest.json", data)
    calibrated = minibt.open_run(copy, adapters=["m0"])
    strict = calibrated.score([r["instruction"] for r in scored], [r["output"] for r in scored])
    assert [s["kept"] for s in strict] == [r["score"] >= top for r in scored] and 1 <= sum(s["kept"] for s in strict) < len(scored)
    # m1 curates round 2, which this run never ran: the recipe's threshold (2.0, below every score here) applies
    by_m1 = calibrated.score([r["instruction"] for r in scored], [r["output"] for r in scored], adapter="m1")
    assert all(s["score"] >= 2.0 for s in by_m1) and all(s["kept"] for s in by_m1)


# --- the default answer length ---------------------------------------------------------------


def session_with(run, tmp_path, outputs: list[str] | None, max_length: int | None = None):
    """A copy of the run whose seed answers are `outputs` (None: no seed file), at another context."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("adapters", "plots", "work"))
    if outputs is None:
        (copy / "data" / "seed.jsonl").unlink()
    else:
        io.write_jsonl(copy / "data" / "seed.jsonl", [{"instruction": "q", "output": o} for o in outputs])
    if max_length is not None:
        recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
        recipe["model"]["max_length"] = max_length
        (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return minibt.open_run(copy, adapters=[])


LONG = "the old king of the north is red and the small river of the south is blue and green . " * 2


def test_answer_tokens_is_one_and_a_half_times_the_longest_seed_answer(finished_run, tmp_path):
    s = session_with(finished_run[1], tmp_path, ["The king is red.", LONG])
    n = s.engine.text.count_tokens(LONG)
    assert 16 < 1.5 * (n + 1) < 512, n  # neither bound applies
    assert s.answer_tokens == math.ceil(1.5 * (n + 1))  # its tokens and EOS, with room to spare


def test_answer_tokens_is_at_least_min_new_tokens(finished_run, tmp_path):
    s = session_with(finished_run[1], tmp_path, ["Red."])
    assert 1.5 * (s.engine.text.count_tokens("Red.") + 1) < MIN_NEW_TOKENS
    assert s.answer_tokens == MIN_NEW_TOKENS


def test_answer_tokens_is_at_most_half_the_context_and_half_without_a_seed(finished_run, tmp_path):
    s = session_with(finished_run[1], tmp_path / "a", [LONG], max_length=64)
    assert s.engine.text.count_tokens(LONG) > 32
    assert s.answer_tokens == 32
    assert session_with(finished_run[1], tmp_path / "b", None).answer_tokens == 512  # model.max_length 1024


def test_the_python_api_imports_no_training_stage():
    code = ("import sys, minibt.session; "
            "print(' '.join(m for m in sys.modules if m.startswith(('minibt.pipeline', 'minibt.stages', 'minibt.workers', 'minibt.toy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"minibt.session pulls in {out}"
