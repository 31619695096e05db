"""Self-augmentation on 2 workers (this process and a Ray actor) against 1, side by side in one run.

    minibt run recipes/toy.yaml --out runs/toy                 # any finished run with myx (or past augment)
    python bench/workers.py --run runs/toy                     # -> bench/results/workers-cpu.json
    python bench/workers.py --run runs/toy --texts 1024 --pairs 3 --out /tmp/w.json

Both sides augment the same first --texts corpus texts of the run with its myx adapter and its recipe
(shards of augment.shard_size, each shard's seed from its index) through map_shards into a fresh folder:
one side on the run's engine in this process (inference.workers=1), the other on 2 workers of one
torch thread each (inference.workers=2: the same engine, in a thread, and a Ray actor of one CPU), warm:
the actor loaded the base and myx before the first timed pass, as in a run, where it starts while the
driver trains. Their outputs must be
identical. Timed as interleaved pairs (bench.interleaved_pairs: one untimed 2-worker pass, then
2-worker, 1-worker, ... ); each pair's ratio is 1-worker seconds / 2-worker seconds, the median counts,
`spread` gives the pairs' range. The start-up the 2-worker side paid once (Ray's local cluster and the
actor's imports and base load) is reported apart, with the machine's load average before and after.
The machine may be shared: each side's run also records the CPU seconds other processes used meanwhile
(`foreign_cpu_seconds`), and `speedup_quiet_pairs` is the median over the pairs where that stayed under
a tenth of a core on both sides (two workers need both cores; another job on one of them halves them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "workers-cpu.json"


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _our_processes() -> list[int]:
    """This process and every descendant (Ray's processes and actors of a local cluster are ours)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    ours, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.append(pid)
        todo += parents.get(pid, [])
    return ours


def foreign_cpu(fn, record: list):
    """fn, wrapped: each call appends the CPU seconds that other processes used on the machine meanwhile
    (all busy CPU time from /proc/stat minus this process tree's), the measure of a quiet pair."""

    def ours() -> float:
        total = 0.0
        for pid in _our_processes():
            try:
                total += _cpu_seconds(pid)
            except OSError:
                pass  # ended meanwhile
        return total

    def busy() -> float:
        with open("/proc/stat") as f:
            t = [int(x) for x in f.readline().split()[1:]]
        return (sum(t) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def wrapped():
        b0, o0 = busy(), ours()
        out = fn()
        record.append(round(max(0.0, (busy() - b0) - (ours() - o0)), 2))
        return out

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a run directory with adapters/myx and data/corpus.jsonl")
    ap.add_argument("--texts", type=int, default=2048, help="corpus texts per pass (default 2048: 4 shards of 512)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from minibt import io
    from minibt.bench import interleaved_pairs, load_average, spread
    from minibt.pipeline import open_engine
    from minibt.recipe import load_recipe
    from minibt.roles import MYX
    from minibt.ray_pool import RayWorkers
    from minibt.rundir import RunDir
    from minibt.stages.augment import augment_shard
    from minibt.stages.shards import map_shards
    from minibt.workers import InProcess, Work

    run = RunDir(args.run)
    recipe = load_recipe(args.run / "recipe.yaml")
    texts = io.read_jsonl(run.data("corpus"))[: args.texts]
    load_before = load_average()
    engine = open_engine(recipe, run.manifest.get("base_model"))
    engine.load_adapter(MYX, run.adapter(MYX))

    two = dataclasses.replace(recipe, inference=dataclasses.replace(recipe.inference, workers=2))
    t0 = time.perf_counter()
    pool = RayWorkers(two, engine.infer, engine.model_cfg.name)  # this process's engine and one Ray actor
    pool.start()
    import ray

    pool.ready.wait()
    ray.get([actor.warm.remote() for actor in pool.actors])
    startup_s = time.perf_counter() - t0
    work = Work("augment", augment_shard, recipe, adapters={MYX: str(run.adapter(MYX))})
    scratch = Path(tempfile.mkdtemp(prefix="bench-workers-"))

    def augment_on(workers) -> list[dict]:
        folder = RunDir(scratch / f"pass-{time.monotonic_ns()}")  # a fresh folder: no shard to reuse
        folder.manifest.setdefault("stages", {})
        return map_shards(folder, "augmented", texts, recipe.augment.shard_size, workers.runner(work), desc="bench")

    try:
        # the 2-worker side first (its actors' first shard also loads myx there), then 1, 2, 1, ...
        two_foreign: list[float] = []
        one_foreign: list[float] = []
        out2, out1, two_s, one_s = interleaved_pairs(foreign_cpu(lambda: augment_on(pool), two_foreign),
                                                     foreign_cpu(lambda: augment_on(InProcess(engine.infer)), one_foreign), args.pairs, 1)
        two_foreign = two_foreign[1:]  # the untimed first pass
    finally:
        pool.close()
    if out1 != out2:
        sys.exit("2 workers wrote other instructions than 1: the bench's premise is broken")
    ratios = [a / b for a, b in zip(one_s, two_s)]
    # a pair is quiet when other processes used under a tenth of a core during each of its sides
    quiet = [i for i in range(len(ratios)) if two_foreign[i] < 0.1 * two_s[i] and one_foreign[i] < 0.1 * one_s[i]]
    n = len(texts)
    one_rate, two_rate = n / statistics.median(one_s), n / statistics.median(two_s)
    result = {
        "what": "self-augmentation of the same texts with myx: 2 workers (this process and a Ray actor) vs 1 (in-process), interleaved pairs",
        "run": str(args.run),
        "texts": n,
        "shard_size": recipe.augment.shard_size,
        "shards": -(-n // recipe.augment.shard_size),
        "max_new_tokens": recipe.augment.max_new_tokens,
        "batch_size": recipe.augment.batch_size,
        "pairs": args.pairs,
        "speedup": round(statistics.median(ratios), 3),
        "speedup_measure": f"1-worker seconds / 2-worker seconds per pair, median over {args.pairs} interleaved pairs",
        "spread": spread(ratios),
        "goal": 1.7,
        "quiet_pairs": len(quiet),
        "speedup_quiet_pairs": round(statistics.median([ratios[i] for i in quiet]), 3) if quiet else None,
        "quiet_measure": "pairs during whose both sides other processes used < 0.1 CPU-second per second (/proc/stat "
                         "busy time minus this process tree's); the machine is shared with other jobs",
        "foreign_cpu_seconds": {"one_worker": one_foreign, "two_workers": two_foreign},
        "one_worker_seconds": [round(s, 2) for s in one_s],
        "two_worker_seconds": [round(s, 2) for s in two_s],
        "texts_per_second": {"one_worker": round(one_rate, 1), "two_workers": round(two_rate, 1),
                             "per_worker_at_two": round(two_rate / 2, 1)},
        "identical_outputs": True,
        "two_worker_startup_seconds": round(startup_s, 1),
        "startup_measure": "ray.init of a local 1-CPU cluster plus its actor's imports and base load, paid once per run (in the background of training)",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": load_average()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
