"""The run's inference workers on Ray (`inference.workers` > 1; minibt/workers.py says what they compute).

On CPUs, worker 0 is the run's own process: its engine computes shards in a thread, since the driver's
core would otherwise idle while it waits; the other N - 1 are Ray actors of one CPU each. Where the
cluster has GPUs, all N are actors of one GPU each, stopped before each training stage (one may share
the driver's GPU) and started again for the next inference stage. An actor loads the base once
(through the run's engine factory, minibt.base_model.open_engine: the HF engine, which
`inference.engine: auto` picks with workers > 1; vLLM spreads over one machine's GPUs itself,
inference.data_parallel_size) and keeps it, and the adapters it was sent. Ray and the actors start in
a thread of their own, right after prepare, so the driver trains myx meanwhile.

A worker that dies mid-shard (killed, out of memory) is replaced, the shard goes to the next free Ray
worker (never to the driver: it could kill the run), and the stage's counts say `retried_shards`; an
error raised by the work itself is the run's error, not retried.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from minibt.errors import MinibtError
from minibt.workers import Task, Work, Workers, run_task

if TYPE_CHECKING:
    from minibt.engine.interface import Inference

log = logging.getLogger("minibt")

MAX_ATTEMPTS = 3  # a shard that kills its worker this many times stops the run (it would kill every worker)
POLL_SECONDS = 0.5  # how often the progress bar reads the workers' progress
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT reads back
_QUIET: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}


class RayWorkers(Workers):
    """`inference.workers` workers: on CPUs this process (its engine, in a thread) and N - 1 Ray actors
    of one CPU each, whose cores would otherwise idle while the driver waits; where the cluster has
    GPUs, N actors of one GPU (and one CPU) each. Shared by the run's stages."""

    def __init__(self, recipe: Any, engine: Any, base_model: str, factory: Callable[[Any, str], Any] | None = None):
        self.recipe, self.engine, self.base_model, self.count = recipe, engine, base_model, recipe.inference.workers
        self.factory = factory  # engine factory(recipe, base_model), module-level; None: the pipeline's
        self.actors: list[Any] = []
        self.retried = collections.Counter()
        self.here = 1  # workers in this process: 1 on CPUs, 0 on GPUs (the driver's GPU is for training)
        self.ray_started_here = False  # ray.init called by this pool: close() calls ray.shutdown()
        self.local = False  # a local cluster of our own, started in self.up
        self.shipped: dict[tuple[str, str], Any] = {}  # (adapter, folder) -> its files in Ray's object store
        self.up: threading.Thread | None = None
        self.ready, self.stop = threading.Event(), threading.Event()
        self.failed: BaseException | None = None

    def start(self) -> None:
        """Check the cluster has room, then start Ray and the actors in a thread of their own (`_bring_up`):
        the driver goes on (to train) meanwhile. A running cluster (`ray_address`, or a Ray this process
        started) is asked now, so that what it lacks is an error before anything trains."""
        import ray

        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_auth_note)
        address = self.recipe.inference.ray_address
        self.local = not ray.is_initialized() and not address
        if self.local:  # sized by us: as many CPUs as actors; GPUs are the machine's
            import torch

            have = {"CPU": float("inf"), "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}
        else:
            if not ray.is_initialized():
                ray.init(address=address, **_QUIET)
                self.ray_started_here = True
            have = ray.cluster_resources()
        self.gpus = 1 if have.get("GPU", 0) > 0 else 0
        self.here = 0 if self.gpus else 1
        kind, needed = ("GPU", self.count) if self.gpus else ("CPU", self.count - self.here)
        if have.get(kind, 0) < needed:
            what = f"{needed} Ray workers" if self.gpus else f"this process and {needed} Ray workers"
            raise MinibtError(f"inference.workers: {self.count} workers ({what}) need {needed} {kind}s, "
                              f"the Ray cluster has {have.get(kind, 0):g}")
        self.up = threading.Thread(target=self._bring_up, daemon=True, name="minibt-ray")
        self.up.start()

    def _bring_up(self) -> None:
        try:
            import ray

            if self.local:
                # one CPU per actor, never a cluster found lying around; its workers keep the run's priority
                # (Ray's default lowers theirs by 15: on a busy machine they then wait behind everything)
                ray.init(address="local", num_cpus=self.count - self.here, _system_config={"worker_niceness": 0}, **_QUIET)
                self.ray_started_here = True
            # Any: ray's stubs type an actor's methods as plain functions, without .remote
            self.progress: Any = ray.remote(num_cpus=0)(_Progress).remote()
            self._start_actors()
        except BaseException as e:  # raised where the workers are first needed (compute), or logged by close()
            self.failed = e
        finally:
            self.ready.set()
        self.stop.wait()  # the processes of a local Ray die with the thread that started them (PR_SET_PDEATHSIG)

    def _wait_up(self) -> None:
        self.ready.wait()
        if self.failed is not None:
            raise self.failed

    def _start_actors(self) -> None:
        # On the driver's own machine without GPUs, at most cores - 1 load at once: their start (imports,
        # base, first generation) is CPU work, and the driver trains on the core left. Elsewhere all at once.
        n = self.count - self.here
        at_once = n if (self.gpus or not self.local) else max(1, (os.cpu_count() or 2) - 1)
        self.actors = []
        warms: list[Any] = []  # each actor's warm-up (a Ray ObjectRef)
        for k in range(n):
            self.actors.append(self._new_actor(after=warms[k - at_once] if k >= at_once else None))
            warms.append(self.actors[-1].warmed)
        log.info("workers: %d Ray workers starting (%s each)%s", n, "1 GPU" if self.gpus else "1 CPU",
                 " beside this process" if self.here else "")

    def _new_actor(self, after: Any = None) -> Any:
        import ray

        # Any: ray's stubs type an actor's methods as plain functions, without .remote
        actor: Any = ray.remote(num_cpus=1, num_gpus=self.gpus, max_restarts=0)(_Worker).remote(self.recipe, self.base_model, self.factory)
        # load the base now, while the driver is busy; `after`: another worker's warm-up, which Ray finishes first
        actor.warmed = actor.warm.remote(after)
        return actor

    def before_training(self) -> None:
        """On GPUs the workers let go of theirs (one may share the driver's): the next stage starts new
        ones. On CPUs they stay, warm, in their own processes."""
        if self.gpus:
            self.ready.wait()  # actors still starting are stopped too; a failed start is compute()'s to raise
            self._stop_actors()

    def _stop_actors(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        import ray

        if self.up is not None:
            self.ready.wait()  # a Ray still starting is stopped once up, never left half-started
            if self.failed is not None:
                log.debug("workers: Ray did not start: %r", self.failed)
        self._stop_actors()
        if self.ray_started_here and ray.is_initialized():
            ray.shutdown()
        self.stop.set()

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
        self._wait_up()
        if not self.actors:  # let go of before a training stage
            self._start_actors()
        files = self._ship(tasks[0].work)
        queue = collections.deque(tasks)
        own = len(self.actors)  # the slot of this process's worker (when self.here): after the actors'
        running: dict[Future, tuple[int, Task]] = {}  # a shard's result -> (worker slot, task)
        sizes = {t.shard: len(t.rows) for t in tasks}
        done_here = _Count()  # rows of this process's shard in flight
        finished = bar.n
        while queue or running:
            busy = {slot for slot, _ in running.values()}
            for slot in [s for s in range(own + self.here) if s not in busy]:
                # a shard that killed a worker is retried on a worker, never here: it could kill the run
                task = next((t for t in queue if slot < own or t.attempt == 0), None)
                if task is None:
                    continue
                queue.remove(task)
                if slot < own:
                    running[self.actors[slot].run.remote(task, files, self.progress).future()] = (slot, task)
                else:
                    done_here.n = 0
                    running[_in_thread(run_task, self.engine, task, done_here)] = (slot, task)
            ready, _ = wait(list(running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in ready:
                slot, task = running.pop(future)
                try:
                    rows = future.result()
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
            remote = [t for slot, t in running.values() if slot < own]
            done_now = ray.get(self.progress.rows.remote([(t.work.kind, t.shard, t.attempt) for t in remote])) if remote else []
            in_flight = sum(min(n, sizes[t.shard]) for n, t in zip(done_now, remote))
            if any(slot == own for slot, _ in running.values()):
                in_flight += done_here.n
            bar.update(max(0, finished + in_flight - bar.n))


def _in_thread(fn: Callable[..., Any], *args: Any) -> Future:
    """fn(*args) in a thread of this process; its result (or error) in the returned future. Torch lets go
    of the GIL while it computes, so the driver's loop over the workers goes on meanwhile."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=target, daemon=True, name="minibt-shard").start()
    return future


class _Count:
    """The `progress` of this process's own shard: rows done, which the driver's bar adds to the workers'."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


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
        return [self.done.get(cast(tuple[str, int, int], tuple(key)), 0) for key in running]


class _Bar:
    """The `progress` a worker's engine updates: rows go to the driver's bar through _Progress."""

    def __init__(self, progress: Any, task: Task):
        self.progress, self.task = progress, task

    def update(self, n: int) -> None:
        self.progress.add.remote(self.task.work.kind, self.task.shard, self.task.attempt, n)


class _Worker:
    """A Ray actor: one engine, loaded once (the base and each adapter), running one task at a time."""

    def __init__(self, recipe: Any, base_model: str, factory: Callable[[Any, str], Any] | None):
        self.recipe, self.base_model, self.factory = recipe, base_model, factory
        self.engine: Inference | None = None
        self.adapter_dirs: dict[str, str] = {}
        self.scratch = tempfile.mkdtemp(prefix="minibt-worker-")

    def warm(self, after: Any = None) -> int:
        if self.engine is None:
            import torch

            if self.recipe.run.threads:  # what the driver's CLI sets for itself (0: torch's default, every core)
                torch.set_num_threads(self.recipe.run.threads)
            if self.factory is None:
                from minibt.base_model import open_engine  # the run's one (HF) engine factory

                self.engine = open_engine(self.recipe, self.base_model).infer
            else:
                self.engine = self.factory(self.recipe, self.base_model)
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
