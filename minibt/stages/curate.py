"""Self-curation: the curator (the forward model of the previous round) scores every pair.

rubric/distribution (default): the paper's 5-point rubric; one forward pass reads P(score digit)
after "Score:", so every pair gets a score (never unparseable): the distribution, its expectation
and its argmax are stored, and `curate.score` picks which one the threshold applies to.
rubric/generate: the paper's own way, reasoning then "Score: N", parsed; unparseable pairs score None.
likelihood (a named alternative, not the paper's): how much the instruction raises the curator's
mean log-likelihood of the output over the base model's likelihood of the output alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minibt import io, prompts
from minibt.engine import BASE, Engine
from minibt.errors import MinibtError
from minibt.recipe import Recipe
from minibt.rundir import RunDir
from minibt.stages.forward import forward_prompt
from minibt.stages.shards import build_prompts, map_shards

RUBRIC_ANSWER_ROOM = 8  # tokens after the rubric prompt: "Score: N" and EOS
TRUNCATED = "truncated_for_rubric"  # the pair's output was cut to fit the rubric prompt


def rubric_prompt(engine: Engine, instruction: str, output: str, room: int) -> str:
    overhead = engine.count_tokens(engine.render(prompts.rubric_messages(instruction, ""))) + 8
    text = engine.clip_text(output, max(16, engine.model_cfg.max_length - room - overhead))
    return engine.render(prompts.rubric_messages(instruction, text))


def score_pairs(engine: Engine, recipe: Recipe, curator: str, rows: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]:
    """Rows plus `score` (and the details of the chosen method)."""
    cfg = recipe.curate
    if cfg.method == "likelihood":
        given = engine.completion_logprobs(
            curator, [forward_prompt(engine, recipe, r["instruction"], augmented=False) for r in rows],
            [r["output"] for r in rows], batch_size=cfg.batch_size,
        )
        alone = engine.completion_logprobs(BASE, [""] * len(rows), [r["output"] for r in rows], batch_size=cfg.batch_size)
        if bar is not None:
            bar.update(len(rows))
        return [{**r, "score": round(float(g - a), 4)} for r, g, a in zip(rows, given, alone)]
    if cfg.mode == "generate":
        texts, rows = build_prompts(engine, rows, lambda r: rubric_prompt(engine, r["instruction"], r["output"], cfg.reasoning_tokens), TRUNCATED)
        texts = engine.generate(
            curator, texts,
            max_new_tokens=cfg.reasoning_tokens, batch_size=cfg.batch_size, progress=bar,
        )
        return [{**r, "rating": t, "score": prompts.parse_score(t)} for r, t in zip(rows, texts)]
    texts, rows = build_prompts(engine, rows, lambda r: rubric_prompt(engine, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM), TRUNCATED)
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


def curate(run: RunDir, engine: Engine, recipe: Recipe, round_: int, curator: str, augmented: list[dict[str, Any]]) -> dict[str, Any]:
    """Score every augmented pair with `curator`; keep those scoring >= curate.threshold.

    Writes data/scored_r{k}.jsonl (every pair with its score) and data/curated_r{k}.jsonl (kept);
    returns the counts for the manifest.
    """
    cfg = recipe.curate
    candidates = [r for r in augmented if r["instruction"].strip()]
    threshold, calibration = cfg.threshold, None
    if cfg.calibrate:
        threshold, calibration = calibrate(run, engine, recipe, curator)

    def shard(rows: list[dict[str, Any]], k: int, bar: Any) -> list[dict[str, Any]]:
        return score_pairs(engine, recipe, curator, rows, bar)

    scored = map_shards(run, f"scored_r{round_}", candidates, cfg.shard_size, shard, desc=f"curate r{round_} ({curator})")
    kept = [r for r in scored if r["score"] is not None and r["score"] >= threshold]
    io.write_jsonl(run.data(f"curated_r{round_}"), kept)
    unparseable = sum(r["score"] is None for r in scored)
    counts = {
        "pairs": len(augmented),
        "empty_instructions": len(augmented) - len(candidates),
        "scored": len(scored),
        "unparseable": unparseable,
        "unparseable_rate": round(unparseable / max(1, len(scored)), 4),
        "kept": len(kept),
        "dropped": len(scored) - len(kept),
        "truncated": sum(bool(r.get(TRUNCATED)) for r in scored),
        "threshold": threshold,
        "curator": curator,
    }
    if calibration:
        counts["calibration"] = calibration
    if cfg.method == "rubric" and cfg.mode == "distribution":
        counts["histogram"] = {str(s): sum(r["argmax_score"] == s for r in scored) for s in range(1, 6)}
    return counts


def round_threshold(run: RunDir, recipe: Recipe, round_: int) -> float:
    """The threshold round k applied: the manifest's (a calibrated one differs from the recipe's), else the recipe's."""
    counts = run.manifest.get("stages", {}).get(f"curate_r{round_}", {}).get("counts", {})
    t = counts.get("threshold")
    return float(t) if isinstance(t, (int, float)) else recipe.curate.threshold


GOOD_RATING = 4  # calibration: pairs rated >= this are the good class


def calibrate(run: RunDir, engine: Engine, recipe: Recipe, curator: str) -> tuple[float, dict]:
    """The threshold from human-rated pairs (curate.ratings, else the run's data/ratings.jsonl):
    the midpoint between the curator's mean score on pairs rated >= GOOD_RATING and on the rest."""
    path = recipe.curate.ratings or run.data("ratings")
    try:
        rated = io.read_jsonl(path)
    except FileNotFoundError:
        raise MinibtError(f"curate.calibrate: no ratings file {path} (set curate.ratings)") from None
    rows = [{"instruction": r["instruction"], "output": r["output"], "rated": r["score"]} for r in rated]
    scored = [r for r in score_pairs(engine, recipe, curator, rows) if r["score"] is not None]
    good = [r["score"] for r in scored if r["rated"] >= GOOD_RATING]
    bad = [r["score"] for r in scored if r["rated"] < GOOD_RATING]
    if not good or not bad:
        raise MinibtError(f"curate.calibrate: {path} needs pairs rated >= {GOOD_RATING} and below it")
    good_mean, bad_mean = float(np.mean(good)), float(np.mean(bad))
    threshold = round((good_mean + bad_mean) / 2, 4)
    return threshold, {"ratings": len(scored), "good_mean": round(good_mean, 4), "bad_mean": round(bad_mean, 4)}
