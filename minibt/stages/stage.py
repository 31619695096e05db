"""A stage of the method as minibt/pipeline.py declares it, and the one protocol every stage runs through.

`run_stage`: a stage that is done (recorded so, its outputs as they were written) is skipped; any
other is recorded in the manifest (running -> done with its counts and its outputs' rows and sha256,
or failed) and the run's report is rebuilt after it. A stage that trains an adapter also resumes from
its checkpoints in work/<adapter>/, is saved as a PEFT folder adapters/<adapter>/ with its loss curve
in logs/<adapter>.json, and its checkpoints are deleted once it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from minibt import io
from minibt.engine import Engine, Inference, clear_checkpoints
from minibt.recipe import Recipe
from minibt.report import safe_build_report
from minibt.rundir import WEIGHTS, RunDir
from minibt.workers import InProcess, Workers


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict[str, Any]]  # does the work; returns its counts for the manifest
    outputs: tuple[str, ...] = ()  # the data files (data/<name>.jsonl) it leaves for later stages
    needs: tuple[str, ...] = ()  # adapters it uses: put on the engine before it runs
    adapter: str | None = None  # the adapter it trains (its weights are then its output)
    # what it asks of the hardware, for the memory estimate (minibt/memory.py); a stage that trains is "train"
    uses: Literal["cpu", "score", "generate"] = "generate"
    batch_size: int = 0  # "generate": prompts per batch
    spreads: bool = False  # its shards run on the run's workers (inference.workers, minibt/workers.py)

    def files(self, rd: RunDir) -> list[Path]:
        """Its outputs' paths: their rows and sha256 are recorded when it finishes, checked before reuse."""
        return [rd.data(n) for n in self.outputs] + ([rd.adapter(self.adapter) / WEIGHTS] if self.adapter else [])


class Context:
    """What a stage works with: the locked run directory, the recipe, the run's data files, the
    engine, loaded on first use (a rerun with nothing left to do loads no model), and the workers that
    the shards of stages that spread run on (`close()` stops them)."""

    def __init__(self, rd: RunDir, recipe: Recipe, load_engine: Callable[[], Engine]):
        from minibt.inference import RunInference

        self.rd, self.recipe = rd, recipe
        self._load = load_engine
        self._engine: Engine | None = None
        self._workers: Workers | None = None
        self._inference = RunInference(rd, recipe, lambda: self.engine.infer)  # inference.engine: hf, or vLLM of its own

    @property
    def engine(self) -> Engine:
        """The run's engine: training, and the adapters it trains."""
        if self._engine is None:
            self._engine = self._load()
        return self._engine

    @property
    def inference(self) -> Inference:
        """The engine inference stages run on (minibt/inference.py): the run's engine, or a vLLM engine
        started on first use."""
        return self._inference.engine()

    @property
    def workers(self) -> Workers:
        """The run's workers, started on first use: this process's engine, or inference.workers Ray actors
        (a vLLM engine of the run's own: in this process)."""
        if self._inference.separate:
            return InProcess(self.inference)
        return self.start_workers()

    def start_workers(self) -> Workers:
        """The run's workers: this process's engine for workers=1 (Ray never imported), else it and Ray actors,
        started now, in the background, so that they load the base while this process trains; `close()` stops
        them (and a local Ray)."""
        if self._workers is None:
            if self.recipe.inference.workers == 1:
                self._workers = InProcess(self.engine.infer)
            else:
                from minibt.ray_pool import RayWorkers

                pool = RayWorkers(self.recipe, self.engine.infer, self.engine.model_cfg.name)
                try:
                    pool.start()
                except BaseException:
                    pool.close()
                    raise
                self._workers = pool
        return self._workers

    def before_training(self, adapter: str) -> None:
        """Started workers and a vLLM engine hand back what training `adapter` needs (GPUs: their memory)."""
        self._inference.before_training(adapter)
        if self._workers is not None:
            self._workers.before_training()

    def close(self) -> None:
        self._inference.close()
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def rows(self, name: str) -> list[dict[str, Any]]:
        """data/<name>.jsonl, as a finished stage wrote it."""
        return io.read_jsonl(self.rd.data(name))


def run_stage(ctx: Context, stage: Stage) -> bool:
    """Run `stage` unless it is done; True if it ran now."""
    rd = ctx.rd
    if rd.done(stage.name) and (stage.adapter is None or rd.adapter(stage.adapter).exists()):
        if stage.adapter:
            clear_checkpoints(rd.work(stage.adapter))  # left behind if a run was killed just after the stage finished
        return False
    for name in stage.needs:  # trained in this process, or loaded from the run, onto the engine that uses it
        has = ctx.engine if stage.adapter else ctx.inference
        if name not in has.adapters:
            has.load_adapter(name, rd.adapter(name))
    if stage.adapter and stage.adapter in ctx.engine.adapters:  # half-trained by a failed attempt in this process
        ctx.engine.delete_adapter(stage.adapter)
    if stage.adapter:
        ctx.before_training(stage.adapter)
    try:
        with rd.stage(stage.name, stage.files(rd)) as counts:
            counts.update(_train(ctx, stage) if stage.adapter else stage.run(ctx))
    except Exception:  # not on Ctrl-C: leave at once
        safe_build_report(rd.path)
        raise
    safe_build_report(rd.path)
    if stage.adapter:
        clear_checkpoints(rd.work(stage.adapter))
    return True


def _train(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Train the stage's adapter (resuming from work/<adapter>/, see Engine.train), save it and its loss curve."""
    rd, name = ctx.rd, stage.adapter
    assert name is not None  # run_stage trains only a stage that has an adapter
    with io.disk_errors(rd.work(name)):  # training checkpoints
        result = stage.run(ctx)
    with io.disk_errors(rd.adapter(name)):
        ctx.engine.save_adapter(name, rd.adapter(name))
    io.write_json(rd.path / "logs" / f"{name}.json", result.pop("log_history"))
    return result
