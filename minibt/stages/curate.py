"""Self-curation: the curator (the forward model of the previous round) scores every pair.

rubric/distribution (default): the paper's 5-point rubric; one forward pass reads P(score digit)
after "Score:", so every pair gets a score (never unparseable): the distribution, its expectation
and its argmax are stored, and `curate.score` picks which one the threshold applies to.
rubric/generate: the paper's own way, reasoning then "Score: N", parsed; unparseable pairs score None.
likelihood (a named alternative, not the paper's): how much the instruction raises the curator's
mean log-likelihood of the output over the base model's likelihood of the output alone.
The scoring itself is minibt/roles.py's `score_pairs` (the Python API scores pairs with it too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minibt import io
from minibt.engine import Inference
from minibt.errors import MinibtError
from minibt.recipe import Recipe
from minibt.roles import TRUNCATED_FOR_RUBRIC, keeps, score_pairs
from minibt.rundir import RunDir
from minibt.stages.augment import unusable_counts, usable
from minibt.stages.shards import map_shards
from minibt.workers import InProcess, Task, Work, Workers


def curate(run: RunDir, engine: Inference, recipe: Recipe, round_: int, curator: str, augmented: list[dict[str, Any]],
           workers: Workers | None = None) -> dict[str, Any]:
    """Score every augmented pair with `curator`, in shards on the run's `workers` (default: `engine`,
    in this process); keep those scoring >= curate.threshold.

    Writes data/scored_r{k}.jsonl (every usable pair with its score and `kept`, the one record of the
    decision: readers take it from there) and data/curated_r{k}.jsonl (the kept pairs); returns the
    counts for the manifest.
    """
    cfg = recipe.curate
    candidates = [r for r in augmented if usable(r)]
    threshold, calibration = cfg.threshold, None
    if cfg.calibrate:
        threshold, calibration = calibrate(run, engine, recipe, curator)

    workers = workers or InProcess(engine)
    work = Work(f"curate_r{round_}", curate_shard, recipe, adapters={curator: str(run.adapter(curator))},
                args={"curator": curator, "threshold": threshold})
    scored = map_shards(run, f"scored_r{round_}", candidates, cfg.shard_size, workers.runner(work), desc=f"curate r{round_} ({curator})")
    kept = [r for r in scored if r["kept"]]
    io.write_jsonl(run.data(f"curated_r{round_}"), kept)
    unparseable = sum(r["score"] is None for r in scored)
    counts = {
        "pairs": len(augmented),
        **unusable_counts(augmented),  # left out before scoring: empty instructions, copies of the text
        "scored": len(scored),
        "unparseable": unparseable,
        "unparseable_rate": round(unparseable / max(1, len(scored)), 4),
        "kept": len(kept),
        "dropped": len(scored) - len(kept),
        "truncated": sum(bool(r.get(TRUNCATED_FOR_RUBRIC)) for r in scored),
        "threshold": threshold,
        "curator": curator,
        **workers.counts(work.kind),
    }
    if calibration:
        counts["calibration"] = calibration
    if cfg.method == "rubric" and cfg.mode == "distribution":
        counts["histogram"] = {str(s): sum(r["argmax_score"] == s for r in scored) for s in range(1, 6)}
    return counts


def curate_shard(engine: Inference, task: Task, progress: Any) -> list[dict[str, Any]]:
    """One shard of curation, on any worker's engine (minibt/workers.py): each pair scored and `kept` decided."""
    curator, threshold = task.work.args["curator"], task.work.args["threshold"]
    return [{**r, "kept": keeps(r["score"], threshold)} for r in score_pairs(engine, task.work.recipe, curator, task.rows, progress)]


GOOD_RATING = 4  # calibration: pairs rated >= this are the good class


def calibrate(run: RunDir, engine: Inference, recipe: Recipe, curator: str) -> tuple[float, dict]:
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
