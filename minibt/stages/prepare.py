"""Prepare: the seed pairs and the unlabelled corpus, as data/seed.jsonl and data/corpus.jsonl.

From the recipe's files or hub datasets (minibt/data), or, with a world section (minibt/worlds.py,
e.g. the toy world), from that world, which writes its own data files too.
"""

from __future__ import annotations

from typing import Any

from minibt import io
from minibt.recipe import Recipe
from minibt.rundir import RunDir
from minibt.worlds import world_of


def prepare(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """Write data/seed.jsonl and data/corpus.jsonl; return the counts for the manifest."""
    world = world_of(recipe)
    if world is not None:
        return world.prepare(run, recipe)
    from minibt.data.corpus import prepare_corpus
    from minibt.data.seed import load_seed

    seed, seed_counts = load_seed(recipe.seed)
    io.write_jsonl(run.data("seed"), seed)
    corpus_counts = prepare_corpus(recipe.corpus, run.data("corpus"))
    return {"seed": seed_counts, "corpus": corpus_counts}


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
    world = world_of(recipe)
    if world is not None:
        return world.prepare_lines(counts)
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
