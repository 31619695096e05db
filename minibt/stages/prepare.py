"""Prepare: the seed pairs and the unlabelled corpus, as data/seed.jsonl and data/corpus.jsonl.

From the recipe's files or hub datasets (minibt/data), or, with a `toy` section, from the toy world,
whose tiny base model is pretrained here (cached) and whose ground truth goes to data/ too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from minibt import io
from minibt.recipe import Recipe
from minibt.rundir import RunDir


def prepare(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """Write data/seed.jsonl and data/corpus.jsonl; return the counts for the manifest."""
    if recipe.toy is not None:
        return _prepare_toy(run, recipe)
    from minibt.data.corpus import prepare_corpus
    from minibt.data.seed import load_seed

    seed, seed_counts = load_seed(recipe.seed)
    io.write_jsonl(run.data("seed"), seed)
    corpus_counts = prepare_corpus(recipe.corpus, run.data("corpus"))
    return {"seed": seed_counts, "corpus": corpus_counts}


def toy_world(recipe: Recipe) -> tuple[Any, Any]:
    from minibt.toy.world import WorldConfig, build_world

    cfg = WorldConfig(**recipe.toy)
    return cfg, build_world(cfg)


def toy_base(recipe: Recipe) -> Path:
    """The toy world's pretrained tiny base (built once, then cached)."""
    from minibt.toy.base import build_base

    cfg, world = toy_world(recipe)
    return build_base(cfg, world)


def _prepare_toy(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    cfg, world = toy_world(recipe)
    io.write_jsonl(run.data("seed"), world.seed_pairs)
    io.write_jsonl(run.data("corpus"), [{"id": i, **row} for i, row in enumerate(world.corpus)])
    io.write_jsonl(run.data("eval"), world.eval_questions)
    io.write_jsonl(run.data("backward_eval"), world.backward_eval)
    io.write_jsonl(run.data("ratings"), world.rated_pairs)
    facts = sum(r["label"] == "fact" for r in world.corpus)
    return {
        "seed": len(world.seed_pairs),
        "corpus": len(world.corpus),
        "corpus_facts": facts,
        "noise_fraction": round(1 - facts / max(1, len(world.corpus)), 3),
        "eval_questions": len(world.eval_questions),
        "world": dataclasses.asdict(cfg),
    }
