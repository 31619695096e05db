"""Inference shards spread over workers (`inference.workers`; one process by default).

A sharded stage describes each shard's work as a `Task`: picklable data (the stage's kind, a
module-level function, the recipe, the adapters it reads, the shard's rows and index) that a function
`fn(engine, task, progress)` runs against an engine. With one worker the run's own engine runs it in
this process (`InProcess`); with N, N Ray actors each load the base once (through the run's engine
factory, minibt.base_model.open_engine: the HF engine, which `inference.engine: auto` picks with
workers > 1; vLLM spreads over one machine's GPUs itself, inference.data_parallel_size), keep it, and
the adapters they were sent, for the whole run (`RayWorkers`; on GPUs until the next training stage). Either way
map_shards (stages/shards.py) writes each finished shard into the run directory, so resume, the
manifest and the results are those of a one-worker run: the function and its inputs are the same, and
a shard's sampling seed comes from its index, never from which worker ran it.

A worker that dies mid-shard (killed, out of memory) is replaced, the shard goes to the next free
worker, and the stage's counts say `retried_shards`; an error raised by the work itself is the run's
error, not retried. Training stays in the driver's process.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from minibt.errors import MinibtError

log = logging.getLogger("minibt")

MAX_ATTEMPTS = 3  # a shard that kills its worker this many times stops the run (it would kill every worker)
POLL_SECONDS = 0.5  # how often the progress bar reads the workers' progress
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT reads back
# A test hook: "KIND:SHARD[,KIND:SHARD...]" makes the worker running such a shard's first attempt SIGKILL
# itself after its first progress update, so the fault tests kill a worker mid-shard at a known place.
KILL_ENV = "MINIBT_TEST_KILL_WORKER"


@dataclasses.dataclass(frozen=True)
class Work:
    """What a sharded stage asks of each shard: `fn(engine, task, progress) -> rows`, module-level so
    it pickles by reference; `adapters` maps each adapter it uses to its PEFT folder in the run."""

    kind: str  # the stage, for logs: "augment", "curate_r1"
    fn: Callable[[Any, "Task", Any], list[dict[str, Any]]]
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

    def runner(self, work: Work) -> "Runner":
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


def start_workers(recipe: Any, engine: Any, factory: Callable[[Any, str], Any] | None = None) -> Workers:
    """The run's workers: its own engine for workers=1 (Ray never imported), else Ray actors started
    now, so that they load the base while the driver trains; `close()` stops them (and a local Ray)."""
    if recipe.inference.workers == 1:
        return InProcess(engine)
    pool = RayWorkers(recipe, engine.model_cfg.name, factory)
    try:
        pool.start()
    except BaseException:
        pool.close()
        raise
    return pool


class RayWorkers(Workers):
    """N Ray actors, one CPU (and one GPU where the cluster has them) each, shared by the run's stages."""

    def __init__(self, recipe: Any, base_model: str, factory: Callable[[Any, str], Any] | None = None):
        self.recipe, self.base_model, self.count = recipe, base_model, recipe.inference.workers
        self.factory = factory  # engine factory(recipe, base_model), module-level; None: the pipeline's
        self.actors: list[Any] = []
        self.retried = collections.Counter()
        self.own_cluster = False
        self.shipped: dict[tuple[str, str], Any] = {}  # (adapter, folder) -> its files in Ray's object store

    def start(self) -> None:
        import ray

        cfg = self.recipe.inference
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_auth_note)
        if not ray.is_initialized():
            # local: a cluster of our own with one CPU per worker (never one found lying around), whose
            # workers keep the run's priority (Ray's default lowers theirs by 15: on a busy machine they
            # then wait behind everything, the driver included)
            own = {"num_cpus": self.count, "_system_config": {"worker_niceness": 0}}
            address, size = (cfg.ray_address, {}) if cfg.ray_address else ("local", own)
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **size)
            self.own_cluster = True
        have = ray.cluster_resources()
        self.gpus = 1 if have.get("GPU", 0) > 0 else 0
        kind, needed = ("GPU", self.count) if self.gpus else ("CPU", self.count)
        if have.get(kind, 0) < needed:
            raise MinibtError(f"inference.workers: {self.count} workers need {needed} {kind}s, the Ray cluster has {have.get(kind, 0):g}")
        self.progress = ray.remote(num_cpus=0)(_Progress).remote()
        self._start_actors()

    def _start_actors(self) -> None:
        # On the driver's own machine without GPUs, at most cores - 1 load at once: their start (imports,
        # base, first generation) is CPU work, and the driver trains on the core left. Elsewhere all at once.
        at_once = self.count if (self.gpus or not self.own_cluster) else max(1, (os.cpu_count() or 2) - 1)
        self.actors, warms = [], []
        for k in range(self.count):
            self.actors.append(self._new_actor(after=warms[k - at_once] if k >= at_once else None))
            warms.append(self.actors[-1].warmed)
        log.info("workers: %d Ray workers starting (%s each)", self.count, "1 GPU" if self.gpus else "1 CPU")

    def _new_actor(self, after: Any = None) -> Any:
        import ray

        actor = ray.remote(num_cpus=1, num_gpus=self.gpus, max_restarts=0)(_Worker).remote(self.recipe, self.base_model, self.factory)
        # load the base now, while the driver is busy; `after`: another worker's warm-up, which Ray finishes first
        actor.warmed = actor.warm.remote(after)
        return actor

    def before_training(self) -> None:
        """On GPUs the workers let go of theirs (one shares the driver's): the next stage starts new ones.
        On CPUs they stay, warm, in their own processes."""
        if self.gpus:
            self._stop_actors()

    def _stop_actors(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        import ray

        self._stop_actors()
        if self.own_cluster and ray.is_initialized():
            ray.shutdown()

    def _ship(self, work: Work) -> dict[str, Any]:
        """Each adapter's files, put into Ray's object store once: workers on other machines read them there."""
        import ray

        for name, path in work.adapters.items():
            if (name, path) not in self.shipped:
                self.shipped[name, path] = ray.put({f: (Path(path) / f).read_bytes() for f in ADAPTER_FILES})
        return {name: self.shipped[name, path] for name, path in work.adapters.items()}

    def compute(self, tasks: list[Task], bar: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if not tasks:
            return
        if not self.actors:  # let go of before a training stage
            self._start_actors()
        files = self._ship(tasks[0].work)
        queue = collections.deque(tasks)
        running: dict[Any, tuple[int, Task]] = {}  # the task's ref -> (worker slot, task)
        sizes = {t.shard: len(t.rows) for t in tasks}
        finished = bar.n
        while queue or running:
            idle = [s for s in range(self.count) if s not in {slot for slot, _ in running.values()}]
            for slot in idle[: len(queue)]:
                task = queue.popleft()
                running[self.actors[slot].run.remote(task, files, self.progress)] = (slot, task)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                slot, task = running.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayTaskError as e:  # the work raised: a bug or bad input, the same on any worker
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
                except RayActorError:
                    if task.attempt + 1 >= MAX_ATTEMPTS:
                        raise MinibtError(f"{task.work.kind}: shard {task.shard} killed its worker {MAX_ATTEMPTS} times "
                                          "(out of memory?); lower the batch size or the shard size") from None
                    log.warning("%s: a worker died during shard %d; it goes to another worker (a new one replaces the dead)",
                                task.work.kind, task.shard)
                    self.actors[slot] = self._new_actor()
                    queue.appendleft(dataclasses.replace(task, attempt=task.attempt + 1))
                    self.retried[task.work.kind] += 1
                    continue
                finished += sizes[task.shard]
                yield task.shard, rows
            tasks_now = [t for _, t in running.values()]
            done_now = ray.get(self.progress.rows.remote([(t.work.kind, t.shard, t.attempt) for t in tasks_now]))
            in_flight = sum(min(n, sizes[t.shard]) for n, t in zip(done_now, tasks_now))
            bar.update(max(0, finished + in_flight - bar.n))


def _auth_note(record: logging.LogRecord) -> bool:
    """Ray says at every start that token authentication is on (its default: only holders of the
    token, written under ~/.ray, connect); that is as it should be, so the note goes to minibt's debug log."""
    if "Token authentication is enabled" in str(record.msg):
        log.debug("ray: %s", record.getMessage())
        return False
    return True


class _Progress:
    """Rows done per (stage kind, shard, attempt), reported by the workers; the driver's bar adds up
    those of the shards in flight (a stage's shard 0 is not the next stage's)."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, int, int], int] = {}

    def add(self, kind: str, shard: int, attempt: int, n: int) -> None:
        self.done[kind, shard, attempt] = self.done.get((kind, shard, attempt), 0) + n

    def rows(self, running: list[tuple[str, int, int]]) -> list[int]:
        return [self.done.get(tuple(key), 0) for key in running]


class _Bar:
    """The `progress` a worker's engine updates: rows go to the driver's bar through _Progress."""

    def __init__(self, progress: Any, task: Task):
        self.progress, self.task = progress, task

    def update(self, n: int) -> None:
        self.progress.add.remote(self.task.work.kind, self.task.shard, self.task.attempt, n)
        if self.task.attempt == 0 and f"{self.task.work.kind}:{self.task.shard}" in os.environ.get(KILL_ENV, "").split(","):
            os.kill(os.getpid(), signal.SIGKILL)


class _Worker:
    """A Ray actor: one engine, loaded once (the base and each adapter), running one task at a time."""

    def __init__(self, recipe: Any, base_model: str, factory: Callable[[Any, str], Any] | None):
        self.recipe, self.base_model, self.factory, self.engine = recipe, base_model, factory, None
        self.adapter_dirs: dict[str, str] = {}
        self.scratch = tempfile.mkdtemp(prefix="minibt-worker-")

    def warm(self, after: Any = None) -> int:
        if self.engine is None:
            import torch

            torch.set_num_threads(self.recipe.run.threads)  # what the driver's CLI sets for itself
            if self.factory is None:
                from minibt.base_model import open_engine as factory  # the run's one (HF) engine factory
            else:
                factory = self.factory
            self.engine = factory(self.recipe, self.base_model)
            # the first generation pays torch's one-off start (1.5 s of 2.0 for 64 toy texts): now, while
            # the driver trains, not in this worker's first shard
            self.engine.generate("base", ["warm up"], max_new_tokens=2)
        return os.getpid()

    def run(self, task: Task, files: dict[str, Any], progress: Any) -> list[dict[str, Any]]:
        self.warm()
        for name, blob in files.items():
            if name not in self.adapter_dirs:
                import ray

                folder = Path(self.scratch) / name
                folder.mkdir(parents=True, exist_ok=True)
                for f, data in (ray.get(blob) if isinstance(blob, ray.ObjectRef) else blob).items():
                    (folder / f).write_bytes(data)
                self.adapter_dirs[name] = str(folder)
        return run_task(self.engine, task, _Bar(progress, task), self.adapter_dirs)
