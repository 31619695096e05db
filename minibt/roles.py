"""How each role of the method is asked, at inference: myx's prompt, the forward models' prompt (with
the paper's seed/augmented tags), the curator's rubric prompt and score, and the rule that keeps a
scored pair.

The stages (minibt/stages) and the Python API (minibt/session.py) both ask the roles, so this lives
apart from training: a session imports no stage. Prompts need only an engine's text rules
(minibt/engine/text.py); scoring needs its inference (minibt/engine/interface.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from minibt import prompts
from minibt.engine.interface import BASE, Inference
from minibt.engine.text import TextRules

if TYPE_CHECKING:
    from minibt.recipe import Recipe

MYX = "myx"  # the backward model's adapter
RUBRIC_ANSWER_ROOM = 8  # tokens after the rubric prompt: "Score: N" and EOS
TRUNCATED_FOR_RUBRIC = "truncated_for_rubric"  # a scored pair's mark: its output was cut to fit the rubric prompt


def backward_prompt(text: TextRules, output: str, room: int) -> str:
    """The rendered myx prompt for `output`, the output clipped so `room` tokens remain for the instruction."""
    return clipped_backward_prompt(text, output, room)[0]


def clipped_backward_prompt(text: TextRules, output: str, room: int) -> tuple[str, bool]:
    """`backward_prompt`, and whether the output was cut to fit."""
    overhead = text.count_tokens(text.render(prompts.backward_messages(""))) + 8
    clipped, cut = text.clip(output, max(16, text.max_length - room - overhead))
    return text.render(prompts.backward_messages(clipped)), cut


def forward_prompt(text: TextRules, recipe: Recipe, instruction: str, augmented: bool = False) -> str:
    """The rendered forward prompt; with `forward.tags`, the seed tag (or the augmented-data tag)."""
    cfg = recipe.forward
    tag = (cfg.augmented_tag if augmented else cfg.seed_tag) if cfg.tags else None
    return text.render(prompts.forward_messages(instruction, tag))


def rubric_prompt(text: TextRules, instruction: str, output: str, room: int) -> str:
    return clipped_rubric_prompt(text, instruction, output, room)[0]


def clipped_rubric_prompt(text: TextRules, instruction: str, output: str, room: int) -> tuple[str, bool]:
    """The rendered rubric prompt, the output clipped so `room` tokens remain, and whether it was cut."""
    overhead = text.count_tokens(text.render(prompts.rubric_messages(instruction, ""))) + 8
    clipped, cut = text.clip(output, max(16, text.max_length - room - overhead))
    return text.render(prompts.rubric_messages(instruction, clipped)), cut


def build_prompts(rows: list[dict[str, Any]], build: Callable[[dict[str, Any]], tuple[str, bool]],
                  mark: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Prompts for rows (`build` gives a row's prompt and whether its text was cut to fit), and the rows
    marked `<mark>: true` where it was.

    The mark travels with the row into its shard file, so counts survive a resumed run.
    """
    built, marked = [], []
    for r in rows:
        prompt, cut = build(r)
        built.append(prompt)
        marked.append({**r, mark: True} if cut else r)
    return built, marked


def score_pairs(engine: Inference, recipe: Recipe, curator: str, rows: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]:
    """Rows plus `score` (and the details of the recipe's curation method, see minibt/stages/curate.py)."""
    cfg = recipe.curate
    if cfg.method == "likelihood":
        given = engine.completion_logprobs(
            curator, [forward_prompt(engine.text, recipe, r["instruction"], augmented=False) for r in rows],
            [r["output"] for r in rows], batch_size=cfg.batch_size,
        )
        alone = engine.completion_logprobs(BASE, [""] * len(rows), [r["output"] for r in rows], batch_size=cfg.batch_size)
        if bar is not None:
            bar.update(len(rows))
        return [{**r, "score": round(float(g - a), 4)} for r, g, a in zip(rows, given, alone)]
    if cfg.mode == "generate":
        texts, rows = build_prompts(
            rows, lambda r: clipped_rubric_prompt(engine.text, r["instruction"], r["output"], cfg.reasoning_tokens), TRUNCATED_FOR_RUBRIC)
        texts = engine.generate(
            curator, texts,
            max_new_tokens=cfg.reasoning_tokens, batch_size=cfg.batch_size, progress=bar,
        )
        return [{**r, "rating": t, "score": prompts.parse_score(t)} for r, t in zip(rows, texts)]
    texts, rows = build_prompts(
        rows, lambda r: clipped_rubric_prompt(engine.text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM), TRUNCATED_FOR_RUBRIC)
    probs, mass = engine.next_token_probs(
        curator, texts,
        prompts.SCORE_PREFIX, prompts.SCORE_CHOICES, batch_size=cfg.batch_size, progress=bar,
    )
    values = np.arange(1, len(prompts.SCORE_CHOICES) + 1)
    out = []
    for r, p, m in zip(rows, probs, mass):
        expected, argmax = float(p @ values), int(values[p.argmax()])
        out.append({
            **r,
            "score_probs": [round(float(x), 5) for x in p],
            "score_mass": round(float(m), 5),  # how much the curator put on digits at all
            "expected_score": round(expected, 4),
            "argmax_score": argmax,
            "score": round(expected, 4) if cfg.score == "expected" else argmax,
        })
    return out


def keeps(score: float | None, threshold: float) -> bool:
    """Self-curation's rule: a pair is kept when it scored at least the threshold (unparsed: dropped)."""
    return score is not None and score >= threshold


def round_threshold(run: Any, recipe: Recipe, round_: int) -> float:
    """The threshold curation round k applied: the run manifest's (a calibrated one differs from the
    recipe's), else the recipe's. `run`: the RunDir."""
    counts = run.manifest.get("stages", {}).get(f"curate_r{round_}", {}).get("counts", {})
    t = counts.get("threshold")
    return float(t) if isinstance(t, (int, float)) else recipe.curate.threshold
