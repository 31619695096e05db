"""minibt/ray_pool.py on a local Ray cluster of 2 CPUs, with a stand-in engine (no model): shards spread
over both workers (this process and one Ray actor), results equal the in-process ones, a worker
killed mid-shard is replaced and its shard retried (never in this process), an error of the work
itself is the run's error, adapters reach the workers as files. The toy run on workers:
tests/toy/test_toy_workers.py."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import pytest

from minibt.errors import MinibtError
from minibt.recipe import from_dict
from minibt.rundir import RunDir
from minibt.stages.shards import map_shards
from minibt.ray_pool import RayWorkers
from minibt.workers import InProcess, Work

ray = pytest.importorskip("ray")  # the `ray` extra; .ci/run installs it, so CI runs these
ROWS = [{"id": i, "text": f"text {i}"} for i in range(10)]  # shards of 3: 3 + 3 + 3 + 1


class StubEngine:
    """The inference seam's adapter bookkeeping, and nothing else: which adapter folders it loaded."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.loaded)

    def load_adapter(self, name: str, path) -> None:
        self.loaded[name] = open(os.path.join(path, "adapter_config.json")).read()

    def generate(self, adapter, prompts, max_new_tokens, **kwargs):  # the workers' warm-up call
        return ["" for _ in prompts]


def stub_factory(recipe, base_model):
    return StubEngine()


def label(engine, task, progress):
    """The work: each row labelled by the adapter's config text, and by the process that did it."""
    time.sleep(0.2)  # long enough for both workers to take shards
    if progress is not None:
        progress.update(len(task.rows))
    return [{**r, "by": engine.loaded["myx"], "pid": os.getpid(), "shard": task.shard} for r in task.rows]


# Shard 0 is the first a stage hands out, always to a Ray worker (this process takes the next): the
# functions below kill the process running it, which is then never pytest's
def die_mid_shard(engine, task, progress):
    if task.shard == 0 and task.attempt == 0:
        progress.update(1)  # some of the shard done, then the worker dies
        os.kill(os.getpid(), signal.SIGKILL)
    return label(engine, task, progress)


def die_every_time(engine, task, progress):
    if task.shard == 0:  # retried on Ray workers only, never in the driver (it would kill the run)
        os.kill(os.getpid(), signal.SIGKILL)
    return label(engine, task, progress)


def bad_input(engine, task, progress):
    raise MinibtError(f"shard {task.shard}: row 2 has no text")


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapters" / "myx"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return str(folder)


def run_dir(path) -> RunDir:
    rd = RunDir(path)
    rd.manifest.setdefault("stages", {})
    return rd


def sharded(path, workers, fn, adapter):
    runner = workers.runner(Work("augment", fn, workers_recipe(), adapters={"myx": adapter}))
    return map_shards(run_dir(path), "augmented", ROWS, 3, runner, desc="test"), workers.counts("augment")


def workers_recipe(workers=2):
    return from_dict({"toy": {}, "inference": {"workers": workers}})


@contextlib.contextmanager
def started(workers=2):
    """A pool of `workers` on the test cluster, started, and closed afterwards."""
    pool = RayWorkers(workers_recipe(workers), StubEngine(), "base", stub_factory)
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


def without_pids(rows):
    return [{k: v for k, v in r.items() if k != "pid"} for r in rows]


def test_two_workers_give_the_in_process_result(cluster, tmp_path, adapter):
    local, local_counts = sharded(tmp_path / "one", InProcess(StubEngine()), label, adapter)
    with started() as pool:
        spread, counts = sharded(tmp_path / "two", pool, label, adapter)
    assert without_pids(spread) == without_pids(local), "same rows, same order, whichever worker ran a shard"
    assert spread[0]["by"] == '{"r": 4}', "the adapter reached the worker as files"
    pids = {r["pid"] for r in spread}
    assert len(pids) == 2 and os.getpid() in pids, "this process and one Ray worker"
    assert local_counts == {"workers": 1, "retried_shards": 0} and counts == {"workers": 2, "retried_shards": 0}
    assert ray.is_initialized(), "a cluster the pool did not start is left running"


class RecordingBar:
    """tqdm's stand-in in map_shards: every count the bar showed."""

    def __init__(self, total, **kwargs):
        self.total, self.n, self.seen = total, 0, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        bars.append(self)

    def update(self, k):
        self.n += k
        self.seen.append(self.n)


bars: list[RecordingBar] = []


def slow_halves(engine, task, progress):
    """Reports its rows in two halves, a poll apart, so the bar sees shards in flight."""
    half = len(task.rows) // 2
    progress.update(half)
    time.sleep(1.2)
    progress.update(len(task.rows) - half)
    return label(engine, task, None)


def test_one_bar_over_both_workers_counts_each_row_once_stage_after_stage(cluster, tmp_path, adapter, monkeypatch):
    monkeypatch.setattr("minibt.stages.shards.tqdm", RecordingBar)
    bars.clear()
    with started() as pool:
        for kind in ("augment", "curate_r1"):  # the same shard indices again, in another stage
            work = Work(kind, slow_halves, workers_recipe(), adapters={"myx": adapter})
            map_shards(run_dir(tmp_path / kind), kind, ROWS, 3, pool.runner(work), desc=kind)
    for bar in bars:
        assert bar.seen[-1] == len(ROWS) and max(bar.seen) <= len(ROWS), bar.seen
        assert any(n % 3 for n in bar.seen), f"rows of shards in flight were shown, not only whole shards: {bar.seen}"


def test_a_worker_killed_mid_shard_is_replaced_and_its_shard_retried(cluster, tmp_path, adapter):
    want, _ = sharded(tmp_path / "one", InProcess(StubEngine()), label, adapter)
    with started() as pool:
        got, counts = sharded(tmp_path / "two", pool, die_mid_shard, adapter)
    assert without_pids(got) == without_pids(want), "nothing lost"
    assert counts["retried_shards"] == 1
    files = RunDir(tmp_path / "two").manifest["files"]
    assert [files[f"data/augmented.shards/0000{k}.jsonl"]["rows"] for k in range(4)] == [3, 3, 3, 1]


def test_a_shard_that_kills_every_worker_stops_the_run_after_three_attempts(cluster, tmp_path, adapter):
    with started() as pool:
        with pytest.raises(MinibtError, match=r"^augment: shard 0 killed its worker 3 times"):
            sharded(tmp_path, pool, die_every_time, adapter)
    assert pool.retried["augment"] == 2
    shards = sorted(p.name for p in (tmp_path / "data" / "augmented.shards").iterdir())
    assert "00000.jsonl" not in shards and "00001.jsonl" in shards, "the other shards are kept for the rerun"


def test_an_error_of_the_work_itself_is_the_runs_error_not_retried(cluster, tmp_path, adapter):
    with started() as pool:
        with pytest.raises(MinibtError, match=r"^shard \d: row 2 has no text$"):
            sharded(tmp_path, pool, bad_input, adapter)


def test_more_workers_than_the_cluster_has_cpus_is_one_line(cluster):
    pool = RayWorkers(workers_recipe(4), StubEngine(), "base", stub_factory)
    with pytest.raises(MinibtError, match=r"^inference.workers: 4 workers \(this process and 3 Ray workers\) need 3 CPUs, the Ray cluster has 2$"):
        pool.start()
