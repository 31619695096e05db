"""Every stage measured against the toy world's ground truth: pure functions over rows, no model.

All return percentages (0-100) rounded to 0.1; an empty denominator gives 0.0.
"""

from __future__ import annotations

from typing import Sequence

from minibt.toy.world import answer_is_correct, instruction_asks_for


def backward_accuracy(generated_instructions: Sequence[str], backward_eval_rows: Sequence[dict]) -> float:
    """Share of generated instructions that ask for exactly the row's entity and attribute (without
    stating the row's value, when the row has one)."""
    _same_length(generated_instructions, backward_eval_rows)
    rows = zip(generated_instructions, backward_eval_rows)
    hits = [instruction_asks_for(g, r["entity"], r["attribute"], r.get("value")) for g, r in rows]
    return _percent(sum(hits), len(hits))


def is_correct_pair(pair: dict) -> bool:
    """A fact text with an instruction that asks for the fact it states."""
    return pair["label"] == "fact" and instruction_asks_for(pair["instruction"], pair["entity"], pair["attribute"], pair.get("value"))


def correct_share(pairs: Sequence[dict]) -> float:
    """Share of correct pairs among augmented (or curated) pairs: {instruction, label, entity, attribute}."""
    return _percent(sum(map(is_correct_pair, pairs)), len(pairs))


def curation_precision_recall(scored_rows: Sequence[dict], kept_flags: Sequence[bool]) -> tuple[float, float]:
    """Curation against the noise labels: precision = share of kept rows that are fact texts,
    recall = share of fact texts that were kept."""
    _same_length(scored_rows, kept_flags)
    facts = [r["label"] == "fact" for r in scored_rows]
    kept_facts = sum(f and k for f, k in zip(facts, kept_flags))
    return _percent(kept_facts, sum(map(bool, kept_flags))), _percent(kept_facts, sum(facts))


def forward_accuracy(answers: Sequence[str], eval_rows: Sequence[dict]) -> float:
    """Share of answers that contain the true value of the row's question."""
    _same_length(answers, eval_rows)
    return _percent(sum(answer_is_correct(a, r["value"]) for a, r in zip(answers, eval_rows)), len(answers))


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} model outputs for {len(b)} rows")


def echo_share(answers: Sequence[str]) -> float:
    """Share of answers that are questions (end with "?"): forum-style echoes, not answers."""
    return _percent(sum(a.strip().endswith("?") for a in answers), len(answers))
