"""Self-augmentation: M_yx writes an instruction for every unlabelled text."""

from __future__ import annotations

import re
from typing import Any

from minibt.engine import Inference
from minibt.recipe import AugmentSection, Recipe
from minibt.roles import MYX, build_prompts, clipped_backward_prompt
from minibt.rundir import RunDir
from minibt.stages.shards import map_shards
from minibt.workers import InProcess, Task, Work, Workers

TRUNCATED = "truncated_for_myx"  # the row's text was cut to fit myx's context

UNUSABLE = ("empty_instructions", "copies")  # why a pair is left out, as the manifest counts it

COPY_RUN = 4  # words: a run this long found verbatim in the output was repeated from it, not asked
COPY_SHARE = 0.9  # share of the instruction's words inside such runs that makes it a copy
COPY_MIN_WORDS = 8  # shorter instructions are not judged; a copy may also open with a run this long


def usable(pair: dict[str, Any]) -> bool:
    """A pair later stages can use: myx wrote an instruction, and not a copy of the text."""
    return why_unusable(pair) is None


def why_unusable(pair: dict[str, Any]) -> str | None:
    """None for a usable pair, else which of UNUSABLE it is: myx wrote nothing, or repeated its text."""
    if not pair["instruction"].strip():
        return "empty_instructions"
    return "copies" if copies_output(pair["instruction"], pair["output"]) else None


def unusable_counts(pairs: list[dict[str, Any]]) -> dict[str, int]:
    """How many pairs are left out, per reason (UNUSABLE)."""
    reasons = [why_unusable(p) for p in pairs]
    return {reason: reasons.count(reason) for reason in UNUSABLE}


def copies_output(instruction: str, output: str) -> bool:
    """The instruction repeats its output. On lowercased words (split on non-word characters), an
    instruction of COPY_MIN_WORDS words or more is a copy when
    - COPY_SHARE of its words or more lie in runs of COPY_RUN or more consecutive words found verbatim
      in the output (a copied sentence, perhaps lightly edited: an edit uncovers about one word), or
    - it opens with a run of COPY_MIN_WORDS words or more found verbatim in the output, at least half
      of it (a copy with words of its own tacked on, a continuation).

    Why these numbers: an answer that restates its question leaves the question's own words (What is,
    Who, for my house) uncovered and at its start, so people's pairs stay clear of both rules (1 of the
    910 databricks-dolly-15k pairs in bench/real/data is flagged, a 13-word question restated whole);
    only short questions get quoted whole by their answers ("It is hard to say what is the best
    swimming form"): hence no verdict under eight words.
    """
    words, out = _words(instruction), _words(output)
    if len(words) < COPY_MIN_WORDS:
        return False
    runs = {tuple(out[i:i + COPY_RUN]) for i in range(len(out) - COPY_RUN + 1)}
    covered = [False] * len(words)
    for i in range(len(words) - COPY_RUN + 1):
        if tuple(words[i:i + COPY_RUN]) in runs:
            covered[i:i + COPY_RUN] = [True] * COPY_RUN
    opening = max((_common_prefix(words, out[j:]) for j in range(len(out))), default=0)
    return sum(covered) >= COPY_SHARE * len(words) or opening >= max(COPY_MIN_WORDS, len(words) / 2)


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def augment(run: RunDir, engine: Inference, recipe: Recipe, corpus: list[dict[str, Any]],
            workers: Workers | None = None) -> list[dict[str, Any]]:
    """Rows of the corpus plus `instruction` (sampled: T=0.7, top_p=0.9 by default), in shards, on
    the run's `workers` (default: `engine`, in this process).

    Each shard samples from its own seed, so a resumed run writes what an uninterrupted one would,
    whichever worker runs it.
    """
    work = Work("augment", augment_shard, recipe, adapters={MYX: str(run.adapter(MYX))})
    runner = (workers or InProcess(engine)).runner(work)
    return map_shards(run, "augmented", corpus, recipe.augment.shard_size, runner, desc="augment (myx)")


def augment_shard(engine: Inference, task: Task, progress: Any) -> list[dict[str, Any]]:
    """One shard of augment, on any worker's engine (minibt/workers.py): its seed comes from its index."""
    recipe = task.work.recipe
    return write_instructions(engine, recipe.augment, task.rows, seed=recipe.run.seed * 1_000_003 + task.shard, progress=progress)


def write_instructions(engine: Inference, cfg: AugmentSection, rows: list[dict[str, Any]], seed: int,
                       progress: Any = None) -> list[dict[str, Any]]:
    """Each row with the instruction myx writes for its text, the text becoming the pair's `output`."""
    texts, rows = build_prompts(rows, lambda r: clipped_backward_prompt(engine.text, r["text"], cfg.max_new_tokens), TRUNCATED)
    instructions = engine.generate(
        MYX,
        texts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=seed,
        progress=progress,
    )
    return [{**_without_text(r), "instruction": i, "output": r["text"]} for r, i in zip(rows, instructions)]


def _without_text(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "text"}
