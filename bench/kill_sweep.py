"""kill -9 at random moments over every stage of a reduced toy run, each followed by a resume.

    python bench/kill_sweep.py                    # 12 kills, seed 0 -> bench/results/kill-sweep.json
    python bench/kill_sweep.py --kills 20 --seed 1 --out /tmp/sweep

One uninterrupted reference run of the reduced toy world (minibt.toy.world.small_world_config, small
shards and frequent training checkpoints so every stage has something to resume), then the same recipe
in another folder, SIGKILLed at --kills moments: every stage of the plan gets at least one, the rest
go to random stages, each at a random fraction of that stage's reference duration after it starts
(a kill can spill into the next stage or into a model load; the stage it hit is recorded). After each
kill the run is simply started again, as a user would. Once it finishes, its curated set, every data
file and every adapter's weights must equal the reference's byte for byte.

Per kill the JSON says where it landed, what was on disk (stages done, shards, checkpoint step), the
work lost (seconds since the last durable write of the stage in flight: a shard, a checkpoint, or the
stage's start) and what the resume said it reused ("reused N finished shard(s)", "resuming m1 from
step N"). One process at a time, one torch thread, the base from MINIBT_CACHE (built on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kill-sweep.json"
TRAIN = {"batch_size": 16, "learning_rate": 2.0e-3, "warmup_ratio": 0.0}


def sweep_recipe() -> dict:
    from minibt.toy.world import small_world_config

    return {
        "run": {"name": "kill-sweep", "seed": 0, "threads": 1},
        "model": {"backend": "transformers", "quantization": "nf4", "max_length": 128},
        "lora": {"r": 32, "alpha": 64},
        "backward": {**TRAIN, "max_steps": 80, "save_steps": 20},
        "augment": {"max_new_tokens": 24, "batch_size": 64, "shard_size": 128},
        "curate": {"method": "likelihood", "threshold": 0.5, "batch_size": 64, "shard_size": 128},
        "forward": {**TRAIN, "max_steps": 60, "save_steps": 15},
        "toy": dataclasses.asdict(small_world_config()),
    }


class Run:
    """`minibt run` of the sweep's recipe into `out`, in its own process, its output in a log file."""

    count = 0

    def __init__(self, recipe: Path, out: Path):
        Run.count += 1
        self.log = out.parent / f"{out.name}.{Run.count:02d}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "minibt.cli", "run", str(recipe), "--out", str(out)],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.t0 = time.time()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> float:
        if self.proc.wait() != 0:
            raise SystemExit(f"run failed (exit {self.proc.returncode}):\n{self.output()[-3000:]}")
        return time.time() - self.t0


def manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def running_here(out: Path, run: Run) -> str | None:
    """The stage `run` is in ("running" and started by it: one left "running" by a killed process is not)."""
    stages = manifest(out).get("stages", {}).items()
    return next((n for n, s in stages if s.get("status") == "running" and _epoch(s["started"]) >= int(run.t0)), None)


def status(out: Path, stage: str) -> str:
    return manifest(out).get("stages", {}).get(stage, {}).get("status", "pending")


def durable(out: Path, stage: str | None, started: float | None) -> dict:
    """What of the stage in flight (started at `started`) is on disk: its shards or its newest checkpoint,
    and when the last of them (or the stage's start) was written."""
    info: dict = {}
    last = started
    shard_dir = None
    if stage == "augment":
        shard_dir = "augmented"
    elif stage and stage.startswith("curate_r"):
        shard_dir = "scored_r" + stage.removeprefix("curate_r")
    if shard_dir:
        shards = sorted((out / "data" / f"{shard_dir}.shards").glob("*.jsonl"))
        info["shards_on_disk"] = len(shards)
        last = max([last or 0, *(p.stat().st_mtime for p in shards)]) or None
    elif stage and stage not in ("prepare", "evaluate"):
        adapter = "myx" if stage == "backward" else stage
        ckpts = [(int(p.name.split("-")[1]), p) for p in (out / "work" / adapter).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        if ckpts:
            step, path = max(ckpts)
            info["checkpoint_step"] = step
            last = max(last or 0, path.stat().st_mtime)
    info["last_durable"] = last
    return info


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d minibt(?:\.\w+)?: (.*)$")
PICKED_UP = re.compile(r"reused \d+ finished shard|resuming \S+ from step|redoing|redid|from the start")


def resume_said(text: str) -> list[str]:
    """What a restarted run said it picked up, or redid (its log lines, without time and logger)."""
    said = [m.group(1).strip() for m in map(LOG_LINE.match, text.splitlines()) if m]
    return [line for line in said if PICKED_UP.search(line)]


def fingerprint(out: Path) -> dict[str, str]:
    """sha256 of every data file and adapter weight file: what must equal the reference's."""
    files = sorted((out / "data").glob("*.jsonl")) + sorted((out / "adapters").glob("*/adapter_model.safetensors"))
    files.append(out / "metrics.json")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="where the kills land")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kill-sweep")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    from minibt.pipeline import plan
    from minibt.recipe import load_recipe

    args.out.mkdir(parents=True, exist_ok=True)
    recipe_path = args.out / "kill-sweep.yaml"
    recipe_path.write_text(yaml.safe_dump(sweep_recipe(), sort_keys=False))
    stages = plan(load_recipe(recipe_path))
    reference, killed = args.out / "reference", args.out / "killed"
    for d in (reference, killed):
        shutil.rmtree(d, ignore_errors=True)
    for log in args.out.glob("*.log"):
        log.unlink()

    # the small base, pretrained once and cached, so that neither timed run includes it
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from minibt.recipe import load_recipe; "
                    "from minibt.toy.plugin import toy_base; print(toy_base(load_recipe(sys.argv[1])))", str(recipe_path)],
                   check=True, cwd=ROOT)
    print("reference run ...", flush=True)
    ref_wall = Run(recipe_path, reference).wait()
    ref_stages = {n: s["seconds"] for n, s in manifest(reference)["stages"].items()}
    print(f"reference: {ref_wall:.1f} s, stages {ref_stages}", flush=True)

    rng = random.Random(args.seed)
    targets = stages + [rng.choice(stages) for _ in range(max(0, args.kills - len(stages)))]
    targets.sort(key=stages.index)
    kills = []
    t_chain = time.time()
    run = Run(recipe_path, killed)
    for target in targets:
        fraction = rng.uniform(0.05, 0.95)
        while status(killed, target) != "done" and running_here(killed, run) != target and run.proc.poll() is None:
            time.sleep(0.01)
        if run.proc.poll() is not None:
            break  # the run finished before this kill: the sweep ends
        seen = time.time()
        time.sleep(fraction * max(ref_stages[target], 0.2))
        hit = running_here(killed, run)  # None: between stages (loading the base or an adapter, a report)
        entry = manifest(killed).get("stages", {}).get(hit or "", {})
        started = (seen if hit == target else _epoch(entry["started"])) if hit else None
        on_disk = durable(killed, hit, started)
        t_kill = time.time()
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        since = t_kill - started if started else None
        last = on_disk.pop("last_durable")
        kill = {"target": target, "fraction_of_reference": round(fraction, 3), "stage_hit": hit,
                "seconds_into_stage": round(since, 2) if since is not None else None,
                "stages_done": [n for n, s in manifest(killed).get("stages", {}).items() if s.get("status") == "done"],
                **on_disk, "work_lost_s": round(t_kill - last, 2) if last else 0.0}
        run = Run(recipe_path, killed)  # the resume; its first words say what it picked up
        kills.append(kill)
        print(f"kill {len(kills)}: {kill}", flush=True)
    run.wait()
    chain_wall = time.time() - t_chain

    # what each resume said: the log of the run started right after each kill
    logs = sorted(args.out.glob("killed.*.log"))
    for kill, log in zip(kills, logs[1:]):
        kill["resume_said"] = resume_said(log.read_text(errors="replace"))

    want, got = fingerprint(reference), fingerprint(killed)
    same = {k: got.get(k) == v for k, v in want.items()}
    result = {
        "what": "kill -9 at random moments over every stage of a reduced toy run (bench/kill_sweep.py), each followed by a resume",
        "command": f"python bench/kill_sweep.py --kills {args.kills} --seed {args.seed}",
        "recipe": sweep_recipe(),
        "stages": stages,
        "reference": {"wall_s": round(ref_wall, 1), "stage_seconds": ref_stages},
        "killed_chain": {"kills": len(kills), "processes": len(kills) + 1, "wall_s": round(chain_wall, 1),
                         "extra_s_over_reference": round(chain_wall - ref_wall, 1),
                         "work_lost_s_total": round(sum(k["work_lost_s"] for k in kills), 1),
                         # the rest of the extra time: each restart's process start, imports, base load, checks
                         "restart_overhead_s_each": round((chain_wall - ref_wall - sum(k["work_lost_s"] for k in kills)) / max(1, len(kills)), 1),
                         "stages_hit": sorted({k["stage_hit"] or "between stages" for k in kills}, key=lambda s: stages.index(s) if s in stages else -1)},
        "notes": ["work_lost_s: seconds between the last durable write of the stage hit (a shard, a training "
                  "checkpoint, or the stage's start in that process) and the kill: the work its resume redid",
                  "stage_hit null: the kill landed between stages (loading the base or an adapter, writing the report); "
                  "prepare lasts ~0.1 s, so kills aimed at it land in the base load after it",
                  "resume_said: the log lines of the next run that say what it picked up"],
        "identical_to_reference": all(same.values()) and set(got) == set(want),
        "files_compared": same,
        "kills": kills,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("reference", "killed_chain", "identical_to_reference")}, indent=2))
    if not result["identical_to_reference"]:
        raise SystemExit("the resumed run differs from the reference: " + ", ".join(k for k, v in same.items() if not v))


if __name__ == "__main__":
    main()
