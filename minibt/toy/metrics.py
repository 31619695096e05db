"""Every stage measured against the toy world's ground truth: pure functions over rows, no model.

All return percentages (0-100) rounded to 0.1; an empty denominator gives 0.0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from minibt.toy.world import ANSWER_FORMS, answer_is_correct, instruction_asks_for

# The seed's answer forms as patterns: any attribute word, any capitalized names
_ANSWER_FORM_RES = [
    re.compile(re.escape(f).replace(r"\{a\}", "[a-z]+").replace(r"\{e\}", "[A-Z][a-z]+").replace(r"\{v\}", "[A-Z][a-z]+") + "$")
    for f in ANSWER_FORMS
]


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


def is_answer_form(text: str) -> bool:
    """The text is one sentence in one of the seed's answer forms."""
    return any(p.match(text.strip()) for p in _ANSWER_FORM_RES)


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} model outputs for {len(b)} rows")


def echo_share(answers: Sequence[str]) -> float:
    """Share of answers that are questions (end with "?"): forum-style echoes, not answers."""
    return _percent(sum(a.strip().endswith("?") for a in answers), len(answers))


def answer_form_share(texts: Sequence[str]) -> float:
    """Share of texts that are one sentence in one of the seed's answer forms ("The A of E is V." ...)."""
    return _percent(sum(map(is_answer_form, texts)), len(texts))


def rewrite_measures(rows: Sequence[dict]) -> dict:
    """The rewrite stage against the truth, over its fact texts (rows of data/rewritten_r{k}.jsonl):
    how many rewrites keep the true value, take the seed's answer form, or both; how often the guard
    used the rewrite; and how right it was: of the rewrites it used, the share that kept the value, and
    of the rewrites that lost the value, the share it caught (kept the original for)."""
    facts = [r for r in rows if r["label"] == "fact"]
    keeps = [answer_is_correct(r["rewrite"], r["value"]) for r in facts]
    form = [is_answer_form(r["rewrite"]) for r in facts]
    used = [r["rewrite_used"] for r in facts]
    lost = [u for u, k in zip(used, keeps) if not k]
    return {
        "fact_rows": len(facts),
        "keeps_value": _percent(sum(keeps), len(facts)),
        "answer_form": _percent(sum(form), len(facts)),
        "keeps_value_and_form": _percent(sum(k and f for k, f in zip(keeps, form)), len(facts)),
        "used": _percent(sum(used), len(facts)),
        "used_keeps_value": _percent(sum(k for u, k in zip(used, keeps) if u), sum(used)),
        "lost_value_caught": _percent(sum(not u for u in lost), len(lost)),
    }
