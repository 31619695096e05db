"""Instruction backtranslation (Li et al. 2023), as minibt runs it.

    seed pairs --reversed--> train M_yx (myx)           seed pairs --> train M0 (m0)
    unlabelled texts --myx--> instructions (self-augmentation)
    for round k = 1..K:   curator m_{k-1} scores every pair; keep score >= threshold (self-curation)
                          train m_k on seed + kept pairs, with the seed/augmented tags

One base model is loaded once; every role is a LoRA adapter on it. Each stage records itself in the
run directory's manifest; a rerun skips what is done and resumes what is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minibt.base_model import open_engine
from minibt.engine import BASE, Engine, import_backend
from minibt.recipe import Recipe
from minibt.rundir import RunDir
from minibt.stack_guards import require_device
from minibt.stages.augment import TRUNCATED, augment, unusable_counts
from minibt.stages.backward import MYX, train_myx
from minibt.stages.curate import curate
from minibt.stages.forward import taught, train_forward
from minibt.stages.prepare import prepare
from minibt.stages.rewrite import rewrite, rewrite_adapter
from minibt.stages.stage import Context, Stage, run_stage
from minibt.worlds import world_of

log = logging.getLogger("minibt")


def stages(recipe: Recipe) -> list[Stage]:
    """The method, stage by stage, in the order it runs: `plan` lists it, `run` executes it.

    A new stage is one entry here: its name, the function that runs it (a Context in, its counts out),
    the data files it leaves (`outputs`), the adapters it uses (`needs`) or the one it trains (`adapter`).
    A world (the toy world) adds its own stages at the end: minibt/worlds.py.
    """
    world = world_of(recipe)
    method = [
        Stage("prepare", prepare_data, outputs=("seed", "corpus", *(world.data_files if world else ())), uses="cpu"),
        # Step 0: the backward model M_yx, trained on the seed pairs reversed (output -> instruction)
        Stage("backward", train_backward, adapter=MYX),
        # Step 1: self-augmentation: M_yx writes an instruction for every unlabelled text
        Stage("augment", self_augment, outputs=("augmented",), needs=(MYX,), batch_size=recipe.augment.batch_size,
              spreads=True),
        # The seed-only forward model M0: the first curator
        Stage("m0", train_forward_on("m0"), adapter="m0"),
    ]
    # Step 2: self-curation, then training on seed + curated pairs; each round's model curates the next
    for k in range(1, recipe.forward.rounds + 1):
        method += [
            Stage(f"curate_r{k}", self_curate(k), outputs=(f"scored_r{k}", f"curated_r{k}"), needs=(f"m{k - 1}",), uses="score",
                  spreads=True),
            *rewrite_stages(recipe, k),  # optional: response rewriting (rewrite.enabled)
            Stage(f"m{k}", train_forward_on(f"m{k}", _trained_rows(recipe, k)), adapter=f"m{k}"),
        ]
    return method + (world.stages(recipe) if world else [])


def plan(recipe: Recipe) -> list[str]:
    """The stages a recipe runs, in order."""
    return [stage.name for stage in stages(recipe)]


def run(recipe: Recipe, out: str | Path, fresh: bool = False) -> RunDir:
    require_device(recipe.model.device, toy=world_of(recipe) is not None)  # before any download or load
    rd = RunDir.create(out, recipe, fresh=fresh)  # locked: a second run on this folder is refused
    try:
        import_backend(recipe.model.backend)
        ctx = Context(rd, recipe, lambda: load_engine(rd, recipe))
        method = stages(recipe)
        try:
            for stage in method:
                run_stage(ctx, stage)
                if stage is method[0] and any(s.spreads and not rd.done(s.name) for s in method):
                    ctx.start_workers()  # after prepare, before training: Ray workers load the base while this trains
        finally:
            ctx.close()
    finally:
        rd.unlock()
    return rd


def _no_engine() -> Engine:
    raise AssertionError("the prepare stage loads no model")


def prepare_only(recipe: Recipe, out: str | Path, fresh: bool = False) -> tuple[RunDir, bool]:
    """`minibt prepare`: the run directory and its prepare stage, as `run` starts them, and whether the
    stage ran now (False: done before). No model loads; a later `run` on the folder goes on from here."""
    rd = RunDir.create(out, recipe, fresh=fresh)
    try:
        return rd, run_stage(Context(rd, recipe, _no_engine), stages(recipe)[0])
    finally:
        rd.unlock()


# --- what each stage does -------------------------------------------------------------------------


def prepare_data(ctx: Context) -> dict[str, Any]:
    return prepare(ctx.rd, ctx.recipe)


def train_backward(ctx: Context) -> dict[str, Any]:
    return train_myx(ctx.engine, ctx.recipe, ctx.rows("seed"), ctx.rd.work(MYX))


def self_augment(ctx: Context) -> dict[str, Any]:
    corpus = ctx.rows("corpus")
    augmented = augment(ctx.rd, ctx.inference, ctx.recipe, corpus, ctx.workers)
    return {"texts": len(corpus), **unusable_counts(augmented),
            "truncated": sum(bool(r.get(TRUNCATED)) for r in augmented), "engine": ctx.inference.name,
            **ctx.workers.counts("augment")}


def self_curate(k: int) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: {**curate(ctx.rd, ctx.inference, ctx.recipe, k, f"m{k - 1}", ctx.rows("augmented"), ctx.workers),
                        "engine": ctx.inference.name}


def rewrite_stages(recipe: Recipe, k: int) -> list[Stage]:
    """rewrite_r{k} when rewrite.enabled: round k's curated pairs rewritten for m_k (minibt/stages/rewrite.py)."""
    if not recipe.rewrite.enabled:
        return []
    adapter = rewrite_adapter(recipe, k)
    return [Stage(f"rewrite_r{k}", lambda ctx: rewrite(ctx.rd, ctx.inference, ctx.recipe, k, ctx.rows(f"curated_r{k}"), ctx.workers),
                  outputs=(f"rewritten_r{k}",), needs=() if adapter == BASE else (adapter,),
                  batch_size=recipe.rewrite.batch_size, spreads=True)]


def trained_on(recipe: Recipe, k: int) -> str:
    """What m_k trains on besides the seed: round k's curated pairs, rewritten when rewriting is on."""
    return f"rewritten_r{k}" if recipe.rewrite.enabled else f"curated_r{k}"


def _trained_rows(recipe: Recipe, k: int) -> Callable[[Context], list[dict[str, Any]]]:
    """m_k's stage reads trained_on(recipe, k) when it runs."""
    return lambda ctx: ctx.rows(trained_on(recipe, k))


def train_forward_on(name: str, pairs: Callable[[Context], list[dict[str, Any]]] = lambda ctx: []) -> Callable[[Context], dict[str, Any]]:
    """Training forward model `name` on the seed pairs plus `pairs(ctx)` (augmented ones, tagged so)."""
    return lambda ctx: train_forward(ctx.engine, ctx.recipe, name, ctx.rows("seed"), pairs(ctx), ctx.rd.work(name), taught(ctx))


# --- the base model -------------------------------------------------------------------------------


def load_engine(rd: RunDir, recipe: Recipe) -> Engine:
    """Load the one base model of this run and record it in the manifest."""
    engine = open_engine(recipe, rd.manifest.get("base_model"))
    rd.note(base_model=engine.model_cfg.name, backend=engine.backend, base_loads=engine.base_loads)
    return engine
