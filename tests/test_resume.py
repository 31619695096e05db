"""Nothing lost: a run killed with SIGKILL in different stages, stopped by a full disk, or resumed on
damaged files ends as the uninterrupted run does; a second run on a folder in use is refused."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fault_injection import cut_last_line, drop_row, fill_disk, fill_disk_for_adapters, flip_bit
from minibt import io
from minibt.cli import main

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


_launches = itertools.count()


def start(root: Path, out: str) -> subprocess.Popen:
    """`minibt run` in its own process; its output goes to a file (proc.log), read back by `output`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "minibt.cli", "run", str(root / "r.yaml"), "--out", str(root / out)]
    log = root / f"{out}.{next(_launches)}.log"
    with open(log, "w") as f:
        # SIGINT as a terminal gives it: a shell that starts jobs in the background leaves SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler (so Ctrl-C would do nothing)
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


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


def kill_when(proc: subprocess.Popen, ready, out: Path, timeout: float = 240) -> str:
    """SIGKILL `proc` once `ready(out)`; returns what it printed until then."""
    deadline = time.time() + timeout
    while not ready(out):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{output(proc)[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the kill point never came")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return output(proc)


def finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=300)
    assert proc.returncode == 0, output(proc)[-3000:]
    return output(proc)


def lock_holder(out: Path) -> str:
    try:
        return (out / ".lock").read_text()
    except FileNotFoundError:
        return ""


def results(out: Path) -> dict:
    stages = manifest(out)["stages"]
    counts = {name: {k: v for k, v in s["counts"].items() if k not in ("seconds",)} for name, s in stages.items()}
    return {
        "statuses": {name: s["status"] for name, s in stages.items()},
        "counts": counts,
        "curated": [(r["id"], r["instruction"], r["score"]) for r in io.read_jsonl(out / "data" / "curated_r1.jsonl")],
        "adapters": {p.parent.name: io.digest(p)["sha256"] for p in sorted((out / "adapters").glob("*/adapter_model.safetensors"))},
    }


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    io.write_jsonl(root / "seed.jsonl", SEED)
    io.write_jsonl(root / "corpus.jsonl", CORPUS)
    (root / "r.yaml").write_text(recipe_text(tiny_model_dir))
    return root


@pytest.fixture(scope="module")
def reference_run(root) -> SimpleNamespace:
    """The uninterrupted run (.out). While it ran, a second `minibt run` on its folder was tried (.second:
    its exit code and output, whether the first still ran when it stopped, the first's pid)."""
    first = start(root, "reference")
    deadline = time.time() + 120
    while not lock_holder(root / "reference").startswith(f"pid {first.pid} ") and first.poll() is None:
        assert time.time() < deadline, "the run never took its folder's lock"
        time.sleep(0.05)
    second = start(root, "reference")
    second.wait(timeout=120)
    tried = (second.returncode, output(second), first.poll() is None, first.pid)
    finish(first)
    return SimpleNamespace(out=root / "reference", second=tried)


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    return reference_run.out


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(reference_run):
    code, said, first_was_running, first_pid = reference_run.second
    assert first_was_running, "the first run ended before the second reached the lock: nothing was tested"
    assert code == 2, said[-2000:]
    (line,) = [x for x in said.splitlines() if x.startswith("error: ")]
    assert f"is in use by pid {first_pid} on " in line and "--out" in line
    assert "Loading weights" not in said, "refused before any model loads"


def test_sigkill_in_any_stage_then_rerun_gives_the_uninterrupted_result(root, reference):
    out = root / "killed"
    finished_before_kill, logs = {}, []
    for point, ready in KILL_POINTS.items():
        logs.append(kill_when(start(root, "killed"), ready, out))
        assert status(out, point) == "running"
        finished_before_kill.update({n: s["finished"] for n, s in manifest(out)["stages"].items() if s["status"] == "done"})
    log = finish(start(root, "killed"))  # a lock left by a SIGKILLed run never blocks the next one

    # each restart picked up what the kill before it left on disk: augment's shard, curation's shard, m1's checkpoint
    assert re.search(r"augmented: reused [1-9]\d* finished shard\(s\) of 9", logs[1]), logs[1][-3000:]
    assert re.search(r"scored_r1: reused [1-9]\d* finished shard\(s\) of 9", logs[2]), logs[2][-3000:]
    assert re.search(r"resuming m1 from step (10|20|30) ", log), "m1 did not resume from its checkpoint"
    assert not list((out / "work").glob("*/*checkpoint-*")), "checkpoints are deleted once their stage is done"
    stages = manifest(out)["stages"]
    for name, when in finished_before_kill.items():
        assert stages[name]["finished"] == when, f"{name} was redone although it had finished"
    assert manifest(out)["base_loads"] == 1
    got, want = results(out), results(reference)
    assert got["counts"] == want["counts"]
    assert got == want


def test_same_seed_same_curated_set(root, reference):
    """Reproducibility: two uninterrupted runs with the same recipe seed curate the same pairs."""
    finish(start(root, "again"))
    assert results(root / "again") == results(reference)


def invoke_run(root: Path, out: Path):
    return CliRunner().invoke(main, ["run", str(root / "r.yaml"), "--out", str(out)])


def error_line(result) -> str:
    (line,) = [x for x in result.output.splitlines() if x.startswith("error: ")]
    return line


def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_resumes(root, reference, monkeypatch):
    out = root / "disk-full"
    failed = fill_disk(monkeypatch, "00001.jsonl")  # the disk fills while augment writes its second shard
    result = invoke_run(root, out)
    assert result.exit_code == 2 and failed
    assert f"{out / 'data' / 'augmented.shards' / '00001.jsonl'}: No space left on device" in error_line(result)
    assert status(out, "augment") == "failed"
    assert sorted(p.name for p in (out / "data" / "augmented.shards").iterdir()) == ["00000.jsonl"]
    monkeypatch.undo()

    failed = fill_disk_for_adapters(monkeypatch, "m0")  # space back, then full again while m0 is saved
    result = invoke_run(root, out)
    assert result.exit_code == 2 and failed
    assert f"{out / 'adapters' / 'm0'}: No space left on device" in error_line(result)
    assert status(out, "augment") == "done" and status(out, "m0") == "failed"
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["myx"], "no half-saved m0, no temp folder"
    weights = "adapters/myx/adapter_model.safetensors"
    assert io.digest(out / weights) == io.digest(reference / weights), "myx, saved before the disk filled, is intact"
    monkeypatch.undo()

    result = invoke_run(root, out)
    assert result.exit_code == 0, result.output[-3000:]
    assert results(out) == results(reference)


def test_damaged_files_found_on_resume_are_redone_never_used(root, reference, caplog):
    out = root / "damaged"
    shutil.copytree(reference, out)
    drop_row(out / "data" / "corpus.jsonl", 5)
    drop_row(out / "data" / "augmented.jsonl", 3)
    flip_bit(out / "data" / "augmented.shards" / "00001.jsonl")
    cut_last_line(out / "data" / "curated_r1.jsonl")
    trained = {s: manifest(out)["stages"][s]["finished"] for s in ("backward", "m0", "m1")}

    with caplog.at_level(logging.INFO, logger="minibt"):
        result = invoke_run(root, out)
    assert result.exit_code == 0, result.output[-3000:]
    said = [r.getMessage() for r in caplog.records]
    for redone in ("data/corpus.jsonl: 71 complete rows where 72 were written: redoing prepare",
                   "data/augmented.jsonl: 71 complete rows where 72 were written: redoing augment",
                   "augmented: shard 00001.jsonl: same size as written but different bytes (corrupted): redoing it",
                   "augmented: reused 8 finished shard(s) of 9"):
        assert redone in said, said
    assert any(m.startswith("data/curated_r1.jsonl: ") and m.endswith("the last one cut short: redoing curate_r1") for m in said), said
    assert {s: manifest(out)["stages"][s]["finished"] for s in trained} == trained, "no adapter was retrained"
    assert results(out) == results(reference)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(root):
    proc = start(root, "interrupted")
    out = root / "interrupted"
    # any moment of augment (its whole stage, not just after a shard: a loaded CI machine once missed that
    # window); polling fast, since the poller shares two cores with the run
    deadline = time.time() + 240
    while status(out, "augment") != "running":
        assert proc.poll() is None, f"the run ended before augment was seen running:\n{output(proc)[-3000:]}"
        assert time.time() < deadline, "augment never started"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    said = output(proc)
    assert proc.returncode == 130, said[-2000:]
    assert "rerun the same command to resume" in said and "Traceback" not in said
    assert status(out, "augment") == "failed" and "KeyboardInterrupt" in manifest(out)["stages"]["augment"]["error"]
    finish(start(root, "interrupted"))
    assert status(out, "augment") == "done"
