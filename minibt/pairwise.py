"""Pairwise judging: two adapters (default m1 vs m0) answer held-out instructions; a judge (an adapter of the
same run, or any local model loaded on its own) reads both answers and its next-token distribution over "A"/"B"
is the verdict: one forward pass, nothing to parse. Each pair is judged in both orders, so a judge that prefers a
position cancels out; an instruction is a win when both orders prefer the model, a tie when they disagree
(counted as half). The win rate comes with a 95 % Wilson interval.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from minibt import prompts
from minibt.engine import BASE, BaseOnly, HFInference, Inference, load_base


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (fractional successes allowed: ties count half).

    It always contains successes / n, and stays inside [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def load_judge(name: str, quantization: Literal["none", "nf4"] = "none", trust_remote_code: bool = False,
               revision: str | None = None) -> HFInference:
    """Any local causal LM (or hub id in the cache) as a judge: loaded as the engine loads a base, no
    adapters ("base" only), the engine's scoring code; its context is the model's, at most 4096 tokens."""
    from minibt.sections import ModelSection

    cfg = ModelSection(name=name, backend="transformers", quantization=quantization, trust_remote_code=trust_remote_code,
                       revision=revision)
    model, tokenizer = load_base(cfg)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    cfg = dataclasses.replace(cfg, max_length=min(int(context), 4096))
    return HFInference(model, tokenizer, cfg, "transformers", BaseOnly(model, tokenizer), seed=0)


def judge_prompts(judge: Inference, instruction: str, first: str, second: str) -> str:
    """The rendered judge prompt, each answer clipped so the whole fits the judge's context."""
    text = judge.text
    overhead = text.count_tokens(text.render(prompts.judge_messages(instruction, "", ""))) + 8
    budget = max(16, (text.max_length - overhead) // 2)
    return text.render(prompts.judge_messages(instruction, text.clip_text(first, budget), text.clip_text(second, budget)))


def prefer_first(judge: Inference, adapter: str, triples: Sequence[tuple[str, str, str]], batch_size: int = 8,
                 progress: Any = None) -> np.ndarray:
    """P(the judge prefers answer A) for each (instruction, A, B), renormalised over "A"/"B"."""
    texts = [judge_prompts(judge, i, a, b) for i, a, b in triples]
    probs, _ = judge.next_token_probs(adapter, texts, prompts.JUDGE_PREFIX, prompts.JUDGE_CHOICES,
                                      batch_size=batch_size, progress=progress)
    return probs[:, 0]


def pairwise(engine: Inference, recipe: Any, instructions: Sequence[str], a: str, b: str, *, max_new_tokens: int,
             judge: Inference | None = None, judge_adapter: str = BASE, judge_name: str | None = None,
             batch_size: int = 8) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Win rate of adapter `a` over adapter `b` on `instructions`; returns (summary, per-instruction rows)."""
    from tqdm.auto import tqdm

    from minibt.roles import forward_prompt

    judge = judge or engine
    rendered = [forward_prompt(engine.text, recipe, i) for i in instructions]
    answers = {}
    for name in (a, b):
        with tqdm(total=len(rendered), desc=f"eval: {name} answers", unit="row", dynamic_ncols=True) as bar:
            answers[name] = engine.generate(name, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=bar)
    # both orders: a first, then b first; P(a better) = P(A) in the first, P(B) in the second
    triples = [(i, x, y) for i, x, y in zip(instructions, answers[a], answers[b])]
    triples += [(i, y, x) for i, x, y in zip(instructions, answers[a], answers[b])]
    with tqdm(total=len(triples), desc=f"eval: judge {judge_name or judge_adapter}", unit="pair", dynamic_ncols=True) as bar:
        p_first = prefer_first(judge, judge_adapter, triples, batch_size=batch_size, progress=bar)
    n = len(instructions)
    p_a_shown_first, p_a_shown_second = p_first[:n], 1 - p_first[n:]
    outcomes = [outcome(x, y) for x, y in zip(p_a_shown_first, p_a_shown_second)]
    rows = [{"instruction": instruction, f"answer_{a}": answers[a][k], f"answer_{b}": answers[b][k],
             f"p_{a}_better_shown_first": round(float(p_a_shown_first[k]), 5),
             f"p_{a}_better_shown_second": round(float(p_a_shown_second[k]), 5), "outcome": outcomes[k]}
            for k, instruction in enumerate(instructions)]
    summary = {
        "a": a, "b": b, "judge": judge_name or judge_adapter, "n": n, **tally(outcomes),
        "soft_win_rate": round(float(np.mean((p_a_shown_first + p_a_shown_second) / 2)) if n else 0.5, 4),
        "orders": 2,
        "judge_prefers_position_a": round(float(np.mean(p_first)), 4) if n else 0.5,  # 0.5: no position bias
        "order_consistent": round(sum(o != 0.5 for o in outcomes) / max(1, n), 4),
        "identical_answers": sum(x == y for x, y in zip(answers[a], answers[b])),
        "max_new_tokens": max_new_tokens,
    }
    return summary, rows


def outcome(p_a_shown_first: float, p_a_shown_second: float) -> float:
    """One instruction's result for model a: 1 a win (both orders prefer a), 0 a loss, 0.5 a tie (the orders
    disagree, or the judge is undecided in both)."""

    def verdict(p: float) -> float:
        return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5

    return (verdict(p_a_shown_first) + verdict(p_a_shown_second)) / 2


def tally(outcomes: Sequence[float]) -> dict[str, Any]:
    """Wins, ties and losses of model a, its win rate (ties count half) and the rate's 95 % Wilson interval."""
    n = len(outcomes)
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    lo, hi = wilson(wins + 0.5 * ties, n)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": round((wins + 0.5 * ties) / max(1, n), 4),
            "ci95": [round(lo, 4), round(hi, 4)], "ci_method": "wilson, ties count half"}
