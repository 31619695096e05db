"""The reduced toy run through the real CLI with `inference.workers=2` (the run's process and a Ray
actor of a local cluster, one thread each, started and stopped by the run): its augmented instructions, scores, curated set
and everything after them equal the one-worker run's, byte for byte, while a worker is SIGKILLed in the
middle of an augment shard and another in the middle of a curation shard (tests/fault_sites/sitecustomize.py,
on the workers' PYTHONPATH); each killed shard is retried and counted. The pool alone: tests/test_ray_pool.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from reduced_world import run_toy, small_recipe  # tests/toy is on sys.path (pytest's prepend import mode)

pytest.importorskip("ray")  # the `ray` extra; .ci/run installs it, so CI runs this

# 950 texts in shards of 256: 4 augment shards and 4 curation shards, so both workers get some
SHARDS = {"augment": {"shard_size": 256}, "curate": {"shard_size": 256}}
RESULTS = ["data/augmented.jsonl", "data/scored_r1.jsonl", "data/curated_r1.jsonl",
           "adapters/m1/adapter_model.safetensors", "metrics.json"]


def digests(run) -> dict[str, str]:
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in RESULTS}


def test_two_workers_with_a_worker_killed_in_each_stage_give_the_one_worker_run(toy_cache, tmp_path, monkeypatch):
    run_toy(tmp_path, "one", small_recipe(**SHARDS))
    # read by the Ray actor the run starts; shard 0 is the first a stage hands out, always to that actor
    sites = Path(__file__).parents[1] / "fault_sites"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(sites), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MINIBT_FAULT_KILL_SHARDS", "augment:0,curate_r1:0")
    run_toy(tmp_path, "two", {**small_recipe(**SHARDS), "inference": {"workers": 2}})

    one, two = tmp_path / "one", tmp_path / "two"
    assert digests(two) == digests(one), "same instructions, scores, curated set, m1 and metrics"
    assert len((one / "data" / "curated_r1.jsonl").read_text().splitlines()) > 0
    stages = json.loads((two / "manifest.json").read_text())["stages"]
    for stage in ("augment", "curate_r1"):
        counts = stages[stage]["counts"]
        assert (counts["workers"], counts["retried_shards"]) == (2, 1), (stage, counts)
    ref = json.loads((one / "manifest.json").read_text())["stages"]
    assert (ref["augment"]["counts"]["workers"], ref["augment"]["counts"]["retried_shards"]) == (1, 0)
    assert ref["curate_r1"]["counts"]["scored"] == stages["curate_r1"]["counts"]["scored"]
