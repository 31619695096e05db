"""Nothing lost: a run killed with SIGKILL in different stages resumes to the same result."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minibt import io

SEED = [
    {"instruction": f"What is the {a} of the {t}?", "output": f"The {a} of the {t} is {c}."}
    for a, t, c in [("color", "king", "red"), ("color", "queen", "blue"), ("capital", "river", "north"), ("size", "city", "small")] * 3
]
CORPUS = [
    {"text": f"The {a} of the {p} {t} is {c}."}
    for a in ("color", "capital", "size")
    for p in ("north", "south", "east", "west")
    for t in ("king", "queen", "river")
    for c in ("red", "blue")
]


def recipe_text(model_dir: str) -> str:
    return f"""
run: {{name: resume, seed: 3}}
model: {{name: {model_dir}, backend: transformers, quantization: nf4, max_length: 1536, device: cpu}}
lora: {{r: 4, alpha: 8}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, dedup: false}}
backward: {{max_steps: 6, batch_size: 4, learning_rate: 1.0e-3}}
augment: {{max_new_tokens: 12, batch_size: 4, shard_size: 8}}
curate: {{threshold: 2.5, batch_size: 4, shard_size: 8}}
forward: {{max_steps: 40, batch_size: 4, learning_rate: 1.0e-3, save_steps: 10}}
"""


def start(root: Path, out: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "minibt.cli", "run", str(root / "r.yaml"), "--out", str(root / out)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def status(out: Path, stage: str) -> str:
    return manifest(out).get("stages", {}).get(stage, {}).get("status", "pending")


# Where to pull the plug: inside sharded stages once a shard is on disk, and mid-training once a
# training checkpoint is on disk (forward.save_steps: 10 of m1's 40 steps).
KILL_POINTS = {
    "augment": lambda out: status(out, "augment") == "running" and any((out / "data" / "augmented.shards").glob("*.jsonl")),
    "curate_r1": lambda out: status(out, "curate_r1") == "running" and any((out / "data" / "scored_r1.shards").glob("*.jsonl")),
    "m1": lambda out: status(out, "m1") == "running" and any((out / "work" / "m1").glob("checkpoint-*")),
}


def kill_when(proc: subprocess.Popen, ready, out: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready(out):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the kill point never came")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def results(out: Path) -> dict:
    stages = manifest(out)["stages"]
    counts = {name: {k: v for k, v in s["counts"].items() if k not in ("seconds",)} for name, s in stages.items()}
    return {
        "statuses": {name: s["status"] for name, s in stages.items()},
        "counts": counts,
        "curated": [(r["id"], r["instruction"], r["score"]) for r in io.read_jsonl(out / "data" / "curated_r1.jsonl")],
    }


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    io.write_jsonl(root / "seed.jsonl", SEED)
    io.write_jsonl(root / "corpus.jsonl", CORPUS)
    (root / "r.yaml").write_text(recipe_text(tiny_model_dir))
    return root


def test_sigkill_in_any_stage_then_rerun_gives_the_uninterrupted_result(root):
    reference = start(root, "reference")
    finish(reference)

    out = root / "killed"
    finished_before_kill = {}
    for point, ready in KILL_POINTS.items():
        kill_when(start(root, "killed"), ready, out)
        assert status(out, point) == "running"
        finished_before_kill.update({n: s["finished"] for n, s in manifest(out)["stages"].items() if s["status"] == "done"})
    log = finish(start(root, "killed"))

    assert "reused" in log or finished_before_kill  # shards or stages survived the kills
    assert re.search(r"resuming m1 from step (10|20|30) ", log), "m1 did not resume from its checkpoint"
    assert not list((out / "work").glob("*/*checkpoint-*")), "checkpoints are deleted once their stage is done"
    stages = manifest(out)["stages"]
    for name, when in finished_before_kill.items():
        assert stages[name]["finished"] == when, f"{name} was redone although it had finished"
    assert manifest(out)["base_loads"] == 1
    got, want = results(out), results(root / "reference")
    assert got["counts"] == want["counts"]
    assert got == want


def test_same_seed_same_curated_set(root):
    """Reproducibility: two uninterrupted runs with the same recipe seed curate the same pairs."""
    if not (root / "reference" / "manifest.json").exists():
        finish(start(root, "reference"))
    finish(start(root, "again"))
    assert results(root / "again") == results(root / "reference")


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(root):
    proc = start(root, "interrupted")
    out = root / "interrupted"
    ready = KILL_POINTS["augment"]
    deadline = time.time() + 240
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "rerun the same command to resume" in output and "Traceback" not in output
    assert status(out, "augment") == "failed" and "KeyboardInterrupt" in manifest(out)["stages"]["augment"]["error"]
    finish(start(root, "interrupted"))
    assert status(out, "augment") == "done"
