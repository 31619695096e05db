"""Self-augmentation on 2 Ray workers against 1 (this process), side by side in one run (issue 18).

    minibt run recipes/toy.yaml --out runs/toy                 # any finished run with myx (or past augment)
    python bench/workers.py --run runs/toy                     # -> bench/results/workers-cpu.json
    python bench/workers.py --run runs/toy --texts 1024 --pairs 3 --out /tmp/w.json

Both sides augment the same first --texts corpus texts of the run with its myx adapter and its recipe
(shards of augment.shard_size, each shard's seed from its index) through map_shards into a fresh folder:
one side on the run's engine in this process (inference.workers=1), the other on 2 Ray actors of one
CPU and one torch thread each (inference.workers=2), warm: they loaded the base and myx before the
first timed pass, as in a run, where they start while the driver trains. Their outputs must be
identical. Timed as interleaved pairs (bench.interleaved_pairs: one untimed 2-worker pass, then
2-worker, 1-worker, ... ); each pair's ratio is 1-worker seconds / 2-worker seconds, the median counts,
`spread` gives the pairs' range. The start-up the 2-worker side paid once (Ray's local cluster and the
actors' imports and base load) is reported apart, with the machine's load average before and after.
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
    from minibt.rundir import RunDir
    from minibt.stages.augment import augment_shard
    from minibt.stages.shards import map_shards
    from minibt.workers import InProcess, RayWorkers, Work

    run = RunDir(args.run)
    recipe = load_recipe(args.run / "recipe.yaml")
    texts = io.read_jsonl(run.data("corpus"))[: args.texts]
    load_before = load_average()
    engine = open_engine(recipe, run.manifest.get("base_model"))
    engine.load_adapter(MYX, run.adapter(MYX))

    two = dataclasses.replace(recipe, inference=dataclasses.replace(recipe.inference, workers=2))
    t0 = time.perf_counter()
    pool = RayWorkers(two, engine.model_cfg.name)
    pool.start()
    import ray

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
        out2, out1, two_s, one_s = interleaved_pairs(lambda: augment_on(pool), lambda: augment_on(InProcess(engine)), args.pairs, 1)
    finally:
        pool.close()
    if out1 != out2:
        sys.exit("2 workers wrote other instructions than 1: the bench's premise is broken")
    ratios = [a / b for a, b in zip(one_s, two_s)]
    n = len(texts)
    one_rate, two_rate = n / statistics.median(one_s), n / statistics.median(two_s)
    result = {
        "what": "self-augmentation of the same texts with myx: 2 Ray workers vs 1 (in-process), interleaved pairs",
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
        "one_worker_seconds": [round(s, 2) for s in one_s],
        "two_worker_seconds": [round(s, 2) for s in two_s],
        "texts_per_second": {"one_worker": round(one_rate, 1), "two_workers": round(two_rate, 1),
                             "per_worker_at_two": round(two_rate / 2, 1)},
        "identical_outputs": True,
        "two_worker_startup_seconds": round(startup_s, 1),
        "startup_measure": "ray.init of a local 2-CPU cluster plus both actors' imports and base load, paid once per run",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": load_average()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
