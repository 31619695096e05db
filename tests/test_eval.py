"""`minibt eval`: pairwise win rate (both orders, a CI), metrics merge (IFEval: tests/test_ifeval.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

import minibt.pairwise as pw
from minibt import io
from minibt.cli import main

QUESTIONS = ["What is the color of the king?", "What is the color of the river?", "Tell me about the city.", "Who is the queen?"]


def _spy_orders(monkeypatch) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    real = pw.prefer_first

    def spy(judge, adapter, triples, **kwargs):
        seen.extend(triples)
        return real(judge, adapter, triples, **kwargs)

    monkeypatch.setattr(pw, "prefer_first", spy)
    return seen


def _check(result: dict, n: int) -> None:
    assert result["n"] == n and result["orders"] == 2
    assert result["wins"] + result["ties"] + result["losses"] == n
    assert 0 <= result["win_rate"] <= 1
    lo, hi = result["ci95"]
    assert 0 <= lo <= result["win_rate"] <= hi <= 1 and hi > lo
    assert 0 <= result["soft_win_rate"] <= 1


def _both_orders(seen: list[tuple[str, str, str]], n: int) -> None:
    assert len(seen) == 2 * n
    first, second = seen[:n], seen[n:]
    assert [(i, b, a) for i, a, b in first] == second  # every pair judged with A and B swapped


def test_an_instruction_is_a_win_only_when_both_orders_prefer_the_model():
    assert pw.outcome(0.9, 0.6) == 1.0  # a preferred in both orders
    assert pw.outcome(0.1, 0.4) == 0.0
    assert pw.outcome(0.9, 0.2) == pw.outcome(0.3, 0.7) == 0.5  # the orders disagree: a position bias, a tie


def test_the_tally_counts_wins_ties_and_losses_exactly():
    got = pw.tally([1.0, 1.0, 0.5, 0.0, 1.0])
    assert (got["wins"], got["ties"], got["losses"], got["win_rate"]) == (3, 1, 1, 0.7)
    assert got["ci95"] == [round(x, 4) for x in pw.wilson(3.5, 5)]
    assert pw.tally([])["win_rate"] == 0.0


def _rows_agree_with_the_summary(rows: list[dict], summary: dict, a: str) -> None:
    """Each row's outcome from its two probabilities (a win: a better in both orders), and the summary's counts."""
    for r in rows:
        first, second = r[f"p_{a}_better_shown_first"], r[f"p_{a}_better_shown_second"]
        want = 1.0 if first > 0.5 and second > 0.5 else 0.0 if first < 0.5 and second < 0.5 else 0.5
        assert r["outcome"] == want, r
    outcomes = [r["outcome"] for r in rows]
    assert (summary["wins"], summary["ties"], summary["losses"]) == (outcomes.count(1.0), outcomes.count(0.5), outcomes.count(0.0))


def test_wilson_interval_contains_the_rate_and_stays_in_bounds():
    for wins, n in ((0, 5), (5, 5), (2.5, 5), (7, 20), (0.5, 1)):
        lo, hi = pw.wilson(wins, n)
        assert 0 <= lo <= wins / n <= hi <= 1
    lo, hi = pw.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3


def test_pairwise_m1_vs_m0_with_an_adapter_judge(finished_run, monkeypatch):
    root, run, _ = finished_run
    io.write_json(run / "metrics.json", {"kept_by_someone_else": 1})
    io.write_jsonl(root / "questions.jsonl", [{"instruction": q} for q in QUESTIONS])
    seen = _spy_orders(monkeypatch)
    result = CliRunner().invoke(main, ["eval", str(run), "--instructions", str(root / "questions.jsonl"), "--judge", "m0",
                                       "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "pairwise m1 vs m0 (judge m0, 4 instructions, both orders): win rate" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kept_by_someone_else"] == 1  # merged, not clobbered
    _check(metrics["pairwise"]["m1_vs_m0"], len(QUESTIONS))
    _both_orders(seen, len(QUESTIONS))
    rows = io.read_jsonl(run / "eval" / "pairwise_m1_vs_m0.jsonl")
    assert [r["instruction"] for r in rows] == QUESTIONS
    _rows_agree_with_the_summary(rows, metrics["pairwise"]["m1_vs_m0"], "m1")
    assert all(0 <= r["p_m1_better_shown_first"] <= 1 and 0 <= r["p_m1_better_shown_second"] <= 1 for r in rows)
    assert "pairwise judging (judge m0)" in (run / "report.md").read_text()


def test_pairwise_on_toy_format_eval_rows_with_a_separate_judge_model(finished_run, tiny_model_dir, monkeypatch):
    _, run, _ = finished_run
    toy_rows = [{"instruction": q, "answer": "x", "entity": "e", "attribute": "a", "value": "v"} for q in QUESTIONS[:3]]
    io.write_jsonl(run / "data" / "eval.jsonl", toy_rows)  # the toy world's held-out questions
    seen = _spy_orders(monkeypatch)
    result = CliRunner().invoke(main, ["eval", str(run), "--compare", "m0", "m1", "--judge-model", tiny_model_dir,
                                       "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads((run / "metrics.json").read_text())["pairwise"]["m0_vs_m1"]
    _check(r, 3)
    assert r["judge"] == tiny_model_dir and r["instructions"] == "data/eval.jsonl"
    _both_orders(seen, 3)


def test_eval_errors_are_one_line(finished_run, tmp_path):
    _, run, _ = finished_run
    runner = CliRunner()
    io.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    result = runner.invoke(main, ["eval", str(run), "--instructions", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 2 and "needs a non-empty string field 'instruction'" in result.output
    result = runner.invoke(main, ["eval", str(run), "--judge", "m0", "--judge-model", "x"])
    assert result.exit_code == 2 and "not both" in result.output
