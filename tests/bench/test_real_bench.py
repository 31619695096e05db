"""The real-model bench's arithmetic (bench/real/run.py): AUC, keep precision/recall, the baselines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("real_bench", Path(__file__).parents[2] / "bench" / "real" / "run.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_auc_counts_wins_and_half_ties():
    assert bench.auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx((2 + 1 + 0.5) / 4)
    assert bench.auc([1.0], [2.0]) == 0.0 and bench.auc([], [1.0]) is None


def test_keep_stats_precision_recall_and_clean_share_leave_web_texts_apart():
    rows = [{"label": "good", "kind": "heldout"}] * 4 + [{"label": "bad", "kind": "promo"}] * 2 + [{"label": "web", "kind": "wiki"}]
    kept = [True, True, True, False, True, False, True]
    s = bench.keep_stats(rows, kept)
    assert (s["precision"], s["recall"], s["clean_share"]) == (0.75, 0.75, round(4 / 6, 4))
    assert s["keep_rates"]["web"] == {"n": 1, "kept": 1} and s["keep_rates"]["promo"] == {"n": 2, "kept": 1}


def test_first_sentence_and_rouge_baselines():
    assert bench.first_sentence("Paris is the capital. It is big.") == "Paris is the capital."
    assert bench.rouge_l([("what is the capital of france", "what is the capital of france")]) == 1.0
    assert bench.rouge_l([("what is the capital of france", "tell me a poem")]) == 0.0
