"""Self-augmentation: M_yx writes an instruction for every unlabelled text."""

from __future__ import annotations

from typing import Any

from minibt.engine import Engine
from minibt.recipe import AugmentSection, Recipe
from minibt.rundir import RunDir
from minibt.roles import MYX, build_prompts, clipped_backward_prompt
from minibt.stages.shards import map_shards
from minibt.workers import InProcess, Task, Work, Workers

TRUNCATED = "truncated_for_myx"  # the row's text was cut to fit myx's context


def usable(pair: dict[str, Any]) -> bool:
    """A pair later stages can use: myx wrote an instruction (it sometimes writes none)."""
    return bool(pair["instruction"].strip())


def augment(run: RunDir, engine: Engine, recipe: Recipe, corpus: list[dict[str, Any]],
            workers: Workers | None = None) -> list[dict[str, Any]]:
    """Rows of the corpus plus `instruction` (sampled: T=0.7, top_p=0.9 by default), in shards, on
    the run's `workers` (default: `engine`, in this process).

    Each shard samples from its own seed, so a resumed run writes what an uninterrupted one would,
    whichever worker runs it.
    """
    work = Work("augment", augment_shard, recipe, adapters={MYX: str(run.adapter(MYX))})
    runner = (workers or InProcess(engine)).runner(work)
    return map_shards(run, "augmented", corpus, recipe.augment.shard_size, runner, desc="augment (myx)")


def augment_shard(engine: Engine, task: Task, progress: Any) -> list[dict[str, Any]]:
    """One shard of augment, on any worker's engine (minibt/workers.py): its seed comes from its index."""
    recipe = task.work.recipe
    return write_instructions(engine, recipe.augment, task.rows, seed=recipe.run.seed * 1_000_003 + task.shard, progress=progress)


def write_instructions(engine: Engine, cfg: AugmentSection, rows: list[dict[str, Any]], seed: int,
                       progress: Any = None) -> list[dict[str, Any]]:
    """Each row with the instruction myx writes for its text, the text becoming the pair's `output`."""
    texts, rows = build_prompts(rows, lambda r: clipped_backward_prompt(engine, r["text"], cfg.max_new_tokens), TRUNCATED)
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
