"""Instruction backtranslation (Li et al. 2023), as minibt runs it.

    seed pairs --reversed--> train M_yx (myx)           seed pairs --> train M0 (m0)
    unlabelled texts --myx--> instructions (self-augmentation)
    for round k = 1..K:   curator m_{k-1} scores every pair; keep score >= threshold (self-curation)
                          train m_k on seed + kept pairs, with the seed/augmented tags

One base model is loaded once; every role is a LoRA adapter on it. Each stage records itself in the
run directory's manifest; a rerun skips what is done and resumes what is not.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from minibt import io
from minibt.engine import Engine, clear_checkpoints, import_backend
from minibt.recipe import Recipe
from minibt.rundir import WEIGHTS, RunDir
from minibt.stack_guards import require_device
from minibt.stages.augment import TRUNCATED, augment, usable
from minibt.stages.backward import MYX, train_myx
from minibt.stages.curate import curate
from minibt.stages.forward import train_forward
from minibt.stages.prepare import prepare, toy_base

log = logging.getLogger("minibt")


def plan(recipe: Recipe) -> list[str]:
    """The stages a recipe runs, in order."""
    rounds = [s for k in range(1, recipe.forward.rounds + 1) for s in (f"curate_r{k}", f"m{k}")]
    toy = ["m1_uncurated", "evaluate"] if recipe.toy is not None else []
    return ["prepare", "backward", "augment", "m0", *rounds, *toy]


def run(recipe: Recipe, out: str | Path, fresh: bool = False) -> RunDir:
    require_device(recipe.model.device, toy=recipe.toy is not None)  # before any download or load
    rd = RunDir.create(out, recipe, fresh=fresh)  # locked: a second run on this folder is refused
    try:
        import_backend(recipe.model.backend)
        run_stages(rd, recipe)
    finally:
        rd.unlock()
    return rd


def prepare_only(recipe: Recipe, out: str | Path, fresh: bool = False) -> tuple[RunDir, bool]:
    """`minibt prepare`: the run directory and its prepare stage, as `run` starts them, and whether the
    stage ran now (False: done before). No model loads; a later `run` on the folder goes on from here."""
    rd = RunDir.create(out, recipe, fresh=fresh)
    try:
        return rd, prepare_stage(rd, recipe)
    finally:
        rd.unlock()


def prepare_stage(rd: RunDir, recipe: Recipe) -> bool:
    """data/seed.jsonl and data/corpus.jsonl (and the toy world's files), recorded in the manifest;
    True if it ran now, False if it was done already."""
    if rd.done("prepare"):
        return False
    with rd.stage("prepare", outputs(rd, "prepare")) as counts:
        counts.update(prepare(rd, recipe))
    return True


def outputs(rd: RunDir, stage: str) -> list[Path]:
    """The files `stage` leaves for later ones: their rows and sha256 are recorded when it finishes and
    checked before they are used again (RunDir.done)."""
    if stage == "prepare":
        return [rd.data(n) for n in ("seed", "corpus", "eval", "backward_eval", "ratings")]  # the last three: toy
    if stage == "augment":
        return [rd.data("augmented")]
    if stage.startswith("curate_r"):
        k = stage.removeprefix("curate_r")
        return [rd.data(f"scored_r{k}"), rd.data(f"curated_r{k}")]
    if stage == "evaluate":
        return []  # metrics.json: no stage reads it, and `minibt eval` adds to it
    return [rd.adapter(MYX if stage == "backward" else stage) / WEIGHTS]


def run_stages(rd: RunDir, recipe: Recipe) -> None:
    """Every stage of `plan(recipe)` not done yet, in order, in the locked run directory `rd`."""
    prepare_stage(rd, recipe)
    if all(rd.done(stage) for stage in plan(recipe)):
        return  # nothing left to do: don't load the base for nothing
    seed = io.read_jsonl(rd.data("seed"))
    corpus = io.read_jsonl(rd.data("corpus"))

    engine = load_engine(rd, recipe)

    # Step 0: the backward model M_yx, trained on the seed pairs reversed (output -> instruction)
    adapter_stage(rd, engine, "backward", MYX, lambda work: train_myx(engine, recipe, seed, work))

    # Step 1: self-augmentation: M_yx writes an instruction for every unlabelled text
    if not rd.done("augment"):
        need(rd, engine, MYX)
        with rd.stage("augment", outputs(rd, "augment")) as counts:
            augmented = augment(rd, engine, recipe, corpus)
            counts.update(texts=len(corpus), empty_instructions=sum(not usable(r) for r in augmented),
                          truncated=sum(bool(r.get(TRUNCATED)) for r in augmented))
    augmented = io.read_jsonl(rd.data("augmented"))

    # The seed-only forward model M0: the first curator
    adapter_stage(rd, engine, "m0", "m0", lambda work: train_forward(engine, recipe, "m0", seed, [], work))

    # Step 2: self-curation, then training on seed + curated pairs; each round's model curates the next
    for k in range(1, recipe.forward.rounds + 1):
        curator, name = f"m{k - 1}", f"m{k}"
        if not rd.done(f"curate_r{k}"):
            need(rd, engine, curator)
            with rd.stage(f"curate_r{k}", outputs(rd, f"curate_r{k}")) as counts:
                counts.update(curate(rd, engine, recipe, k, curator, augmented))
        curated = io.read_jsonl(rd.data(f"curated_r{k}"))
        adapter_stage(rd, engine, name, name, lambda work: train_forward(engine, recipe, name, seed, curated, work))

    if recipe.toy is not None:
        from minibt.toy.evaluate import evaluate_toy

        # The paper's ablation: the same m1 training with curation switched off
        every = [r for r in augmented if usable(r)]
        adapter_stage(rd, engine, "m1_uncurated", "m1_uncurated", lambda work: train_forward(engine, recipe, "m1_uncurated", seed, every, work))
        if not rd.done("evaluate"):
            with rd.stage("evaluate") as counts:
                counts.update(evaluate_toy(rd, engine, recipe))


def load_engine(rd: RunDir, recipe: Recipe) -> Engine:
    """Load the one base model of this run and record it in the manifest."""
    engine = open_engine(recipe, rd.manifest.get("base_model"))
    rd.manifest.update(base_model=engine.model_cfg.name, backend=engine.backend, base_loads=engine.base_loads)
    rd.save()
    return engine


def open_engine(recipe: Recipe, base_model: str | None = None) -> Engine:
    """Load the recipe's base model: for the toy world, the run's own pretrained base (`base_model`
    from its manifest, so later changes to the world's code cannot swap it), else built or cached."""
    model = recipe.model
    if recipe.toy is not None:
        own = base_model if base_model and Path(base_model).is_dir() else None
        model = dataclasses.replace(model, name=own or str(toy_base(recipe)))
    return Engine.load(model, recipe.lora, seed=recipe.run.seed)


def need(rd: RunDir, engine: Engine, name: str) -> None:
    """Make sure adapter `name` is on the engine: trained in this process, or loaded from the run."""
    if name not in engine.adapters:
        engine.load_adapter(name, rd.adapter(name))


def adapter_stage(rd: RunDir, engine: Engine, stage: str, name: str, train: Callable[[Path], dict[str, Any]]) -> None:
    """Train adapter `name` unless its stage is done; save it as a PEFT folder and log its loss curve.

    Training checkpoints in work/<name>/ (see Engine.train) let a killed stage resume mid-training; they
    are deleted once the stage is recorded done, the finished adapter being in adapters/<name>/.
    """
    if rd.done(stage) and rd.adapter(name).exists():
        clear_checkpoints(rd.work(name))  # left behind if a run was killed just after the stage finished
        return
    if name in engine.adapters:  # a half-trained adapter from a failed attempt in this process
        engine.delete_adapter(name)
    with rd.stage(stage, outputs(rd, stage)) as counts:
        with io.disk_errors(rd.work(name)):  # training checkpoints
            result = train(rd.work(name))
        with io.disk_errors(rd.adapter(name)):
            engine.save_adapter(name, rd.adapter(name))
        io.write_json(rd.path / "logs" / f"{name}.json", result.pop("log_history"))
        counts.update(result)
    clear_checkpoints(rd.work(name))
