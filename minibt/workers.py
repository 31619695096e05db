"""Inference shards spread over workers (`inference.workers`; one process by default).

A sharded stage describes each shard's work as a `Task`: picklable data (the stage's kind, a
module-level function, the recipe, the adapters it reads, the shard's rows and index) that a function
`fn(engine, task, progress)` runs against an engine. With one worker the run's own engine runs it in
this process (`InProcess`); with N, the shards go to N workers on Ray (minibt/ray_pool.py). Either way
map_shards (stages/shards.py) writes each finished shard into the run directory, so resume, the
manifest and the results are those of a one-worker run: the function and its inputs are the same, and
a shard's sampling seed comes from its index, never from which worker ran it. Training stays in the
driver's process.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Work:
    """What a sharded stage asks of each shard: `fn(engine, task, progress) -> rows`, module-level so
    it pickles by reference; `adapters` maps each adapter it uses to its PEFT folder in the run."""

    kind: str  # the stage, for logs: "augment", "curate_r1"
    fn: Callable[[Any, Task, Any], list[dict[str, Any]]]
    recipe: Any
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    args: dict[str, Any] = dataclasses.field(default_factory=dict)  # the stage's own inputs (curator, threshold)


@dataclasses.dataclass(frozen=True)
class Task:
    work: Work
    shard: int
    rows: list[dict[str, Any]]
    attempt: int = 0


def run_task(engine: Any, task: Task, progress: Any = None, adapter_dirs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The one code path for a shard's work, in this process or on a worker: load what is missing, run."""
    for name, path in task.work.adapters.items():
        if name not in engine.adapters:
            engine.load_adapter(name, (adapter_dirs or {}).get(name, path))
    return task.work.fn(engine, task, progress)


class Workers:
    """Where a run's shards are computed; `runner(work)` is what a stage hands to map_shards."""

    count: int
    retried: collections.Counter  # shards retried after their worker died, per Work.kind

    def runner(self, work: Work) -> Runner:
        return Runner(self, work)

    def counts(self, kind: str) -> dict[str, int]:
        """For the manifest counts of the stage whose Work.kind is `kind`."""
        return {"workers": self.count, "retried_shards": self.retried[kind]}

    def compute(self, tasks: list[Task], bar: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        raise NotImplementedError

    def before_training(self) -> None:
        """The driver is about to train: hand back whatever it needs for that (RayWorkers: GPUs)."""

    def close(self) -> None:
        """The run is over (or failed): stop what was started for it."""


class InProcess(Workers):
    """workers=1: the run's engine computes the shards one after another, here."""

    count = 1

    def __init__(self, engine: Any):
        self.engine, self.retried = engine, collections.Counter()

    def compute(self, tasks: list[Task], bar: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        for task in tasks:
            yield task.shard, run_task(self.engine, task, bar)


class Runner:
    """One stage's shards on the run's workers, as map_shards asks for them."""

    def __init__(self, workers: Workers, work: Work):
        self.workers, self.work = workers, work

    def compute(self, jobs: list[tuple[int, list[dict[str, Any]]]], bar: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        return self.workers.compute([Task(self.work, k, rows) for k, rows in jobs], bar)
