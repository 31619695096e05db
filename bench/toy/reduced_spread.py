"""The spread of every quantity tests/toy/test_toy_run.py asserts, over world seeds x run seeds.

    python bench/toy/reduced_spread.py                      # world seeds 0 1 2 x run seeds 0 1
    python bench/toy/reduced_spread.py --worlds 0 1 2 3 --runs 0 1 2

Each job is the test's own reduced recipe (`small_recipe`, its broken variants and the broken stage
`forward_not_reversed`, imported from the test file, so the two never drift apart) with `toy.seed`
= world seed and `run.seed` = run seed, run through the real CLI (`minibt run`) in its own process,
one at a time, one torch thread. bench/results/reduced-spread.json gets every run's metrics, the
derived quantities the tests assert (per seed pair) and their min/max/mean/sd; it is rewritten after
each job, and a rerun skips the jobs already there for the same recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "reduced-spread.json"
TEST_FILE = ROOT / "tests" / "toy" / "test_toy_run.py"
METRICS = ("backward_accuracy", "augmented_correct_share", "curated_correct_share", "curation_precision",
           "curation_recall", "clean_share", "noise_fraction", "forward_accuracy")  # fmt: skip


def test_module():
    sys.path.insert(0, str(TEST_FILE.parent))  # the test imports tests/toy/reduced_world.py, as pytest lets it
    spec = importlib.util.spec_from_file_location("test_toy_run", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_recipe(variant: str, world: int, run: int) -> dict:
    """The recipe each test runs: `good` (test_small_world_run...), `wrong_way`, `keep_all`."""
    t = test_module()
    sections = {"good": {}, "wrong_way": {"forward": {"max_steps": 20}},
                "keep_all": {"curate": {"threshold": -1.0e9}, "forward": {"max_steps": 20}}}[variant]
    recipe = t.small_recipe(**sections)
    recipe["toy"]["seed"], recipe["run"]["seed"] = world, run
    return recipe


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def run_one(variant: str, world: int, run: int, out: Path) -> None:
    """In the job's own process: the test's recipe (and broken stage) through `minibt run`."""
    import torch
    import yaml

    torch.set_num_threads(1)
    from minibt.cli import main
    from minibt.stages import backward

    if variant == "wrong_way":
        backward.backward_rows = test_module().forward_not_reversed
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(variant_recipe(variant, world, run)))
    main(["run", str(path), "--out", str(out), "--fresh"])


def derived(good: dict, wrong: dict | None, keep: dict | None) -> dict:
    """The quantities the tests assert, for one seed pair (points unless named a ratio)."""
    d = {
        "good.backward_accuracy": good["backward_accuracy"],
        "good.noise_fraction": good["noise_fraction"],
        "good.curated_minus_augmented": good["curated_correct_share"] - good["augmented_correct_share"],
        "good.precision_minus_clean": good["curation_precision"] - good["clean_share"],
        "good.m1_minus_m0": good["forward_accuracy"]["m1"] - good["forward_accuracy"]["m0"],
        "good.m1_minus_m1_uncurated": good["forward_accuracy"]["m1"] - good["forward_accuracy"]["m1_uncurated"],
    }
    if wrong:
        d.update({
            "wrong_way.backward_accuracy": wrong["backward_accuracy"],
            "good_minus_wrong_way.backward_accuracy": good["backward_accuracy"] - wrong["backward_accuracy"],
            "wrong_way_over_good.augmented_correct_share_ratio":
                wrong["augmented_correct_share"] / max(good["augmented_correct_share"], 1e-9),
            "good_minus_wrong_way.curated_correct_share": good["curated_correct_share"] - wrong["curated_correct_share"],
        })  # fmt: skip
    if keep:
        d.update({
            "keep_all.curated_minus_augmented": keep["curated_correct_share"] - keep["augmented_correct_share"],
            "keep_all.precision_minus_clean": keep["curation_precision"] - keep["clean_share"],
            "keep_all.curation_recall": keep["curation_recall"],
            "good_minus_keep_all.curated_correct_share": good["curated_correct_share"] - keep["curated_correct_share"],
        })  # fmt: skip
    return {k: round(v, 2) for k, v in d.items()}


def summarize(runs: list[dict]) -> dict:
    by = {(r["world_seed"], r["run_seed"], r["variant"]): r.get("metrics") for r in runs if r.get("ok")}
    pairs = {}
    for (w, s, v), m in sorted(by.items()):
        if v == "good":
            pairs[f"w{w}-r{s}"] = derived(m, by.get((w, s, "wrong_way")), by.get((w, s, "keep_all")))
    spread = {}
    for key in sorted({k for d in pairs.values() for k in d}):
        values = [d[key] for d in pairs.values() if key in d]
        spread[key] = {"n": len(values), "min": min(values), "max": max(values), "mean": round(statistics.mean(values), 2),
                       "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None}
    return {"per_seed_pair": pairs, "spread": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["good", "wrong_way", "keep_all"])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "minibt-reduced-spread")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--job", nargs=4, metavar=("VARIANT", "WORLD", "RUN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        variant, world, run, out = args.job
        return run_one(variant, int(world), int(run), Path(out))

    done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    for s in args.runs:
        for w in args.worlds:
            for v in args.variants:
                h = recipe_hash(variant_recipe(v, w, s))
                if any((r["variant"], r["world_seed"], r["run_seed"], r["recipe_hash"], r["ok"]) == (v, w, s, h, True)
                       for r in done):
                    continue
                out = args.work / f"{v}-w{w}-r{s}"
                cmd = [sys.executable, __file__, "--job", v, str(w), str(s), str(out)]
                start = time.monotonic()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                wall = round(time.monotonic() - start, 1)
                (args.work / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
                row = {"variant": v, "world_seed": w, "run_seed": s, "recipe_hash": h, "ok": proc.returncode == 0,
                       "wall_s": wall, "load_average": [round(x, 2) for x in os.getloadavg()]}
                if (out / "metrics.json").is_file():
                    m = json.loads((out / "metrics.json").read_text())
                    row["metrics"] = {k: m[k] for k in METRICS if k in m}
                print(f"{out.name}: ok={row['ok']} {wall}s {row.get('metrics', {}).get('backward_accuracy')}", flush=True)
                done = [r for r in done if (r["variant"], r["world_seed"], r["run_seed"]) != (v, w, s)] + [row]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"runs": done, **summarize(done)}, indent=1) + "\n")
                tmp.replace(args.out)


if __name__ == "__main__":
    main()
