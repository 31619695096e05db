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


# --- what `minibt prepare` prints ---------------------------------------------------------------

# Each count of the loaders (minibt/data) with what it is, in the order the filters apply
SEED_LINES = [("read", "rows read"), ("bad_rows", "malformed rows, skipped"), ("skipped_deleted", "deleted or review-failed messages"),
              ("trees", "message trees (prompter roots)"), ("filtered_lang", "trees not in English"),
              ("no_rank0_reply", "trees without an English rank-0 reply"), ("kept", "pairs kept")]
CORPUS_LINES = [("read", "rows read"), ("bad_rows", "malformed rows, skipped"), ("documents", "documents"),
                ("passages", "passages after segmentation (corpus.max_chars)"), ("too_short", "dropped: shorter than corpus.min_chars"),
                ("too_long", "dropped: one sentence longer than corpus.max_chars"),
                ("low_quality", "dropped: boilerplate or symbols (quality filter)"),
                ("exact_duplicates", "dropped: exact duplicates"), ("near_duplicates", "dropped: near duplicates (MinHash)"),
                ("kept", "passages kept")]


def format_counts(recipe: Recipe, counts: dict[str, Any]) -> list[str]:
    """The prepare stage's counts, one labelled number a line: what was read, what each filter dropped, what was kept."""
    if recipe.toy is not None:
        return [f"seed: {counts['seed']} pairs from the toy world",
                f"corpus: {counts['corpus']} texts from the toy world, {counts['corpus_facts']} of them facts "
                f"(noise {counts['noise_fraction']:.0%})",
                f"eval: {counts['eval_questions']} held-out questions"]
    lines = []
    for key, labels in (("seed", SEED_LINES), ("corpus", CORPUS_LINES)):
        section, values = getattr(recipe, key), dict(counts.get(key, {}))
        lines.append(f"{key} ({section.dataset or section.path}):")
        if "trees" in values:  # Open Assistant: the loader counts messages, whichever layout it read
            labels = [(name, "messages read" if name == "read" else label) for name, label in labels]
        rows = [(label, values.pop(name)) for name, label in labels if name in values]
        rows += sorted(values.items())  # a count a loader added that has no label here yet
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value:>8}" for label, value in rows]
        if section.limit is not None and counts.get(key, {}).get("kept") == section.limit:
            lines.append(f"  (limited by {key}.limit={section.limit})")
    return lines
