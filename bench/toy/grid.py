"""The toy world's effect across world seeds and repeats, and the design choices ablated one at a time.

    python bench/toy/grid.py                       # grid (3 world seeds x 3 run seeds) then ablations
    python bench/toy/grid.py --part grid --workers 2
    python bench/toy/grid.py --part ablations --seeds 0 1
    python bench/toy/grid.py --part grid --set rewrite.enabled=true --name toy-grid-rewrite

Every job is `minibt run recipes/toy.yaml toy.seed=W run.seed=R [ablation overrides]` in its own process
(one torch thread each; `--workers` of them at once). Results land in bench/results/toy-grid.json (every
run's metrics.json, wall time and stage times) and bench/results/toy-grid.md (tables and spread),
rewritten after each job; a rerun skips the jobs already there. Run directories go to --runs.
`--set KEY=VALUE` adds an override to every job (a variant's grid, with its own --name).
Wall times of parallel jobs are not single-run times: two processes share the two cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

# One design choice changed at a time, against the default recipe.
ABLATIONS = {
    "no_list_pages": ["toy.list_pages=false"],  # no "list of <attribute> by entity" pretraining pages
    "noise_50": ["toy.noise_fraction=0.5"],  # half the corpus noise instead of 80 %
    "no_tags": ["forward.tags=false"],  # no seed / augmented system-prompt tags
    "greedy_augment": ["augment.temperature=0"],  # myx decodes greedily instead of T=0.7, top_p=0.9
    "calibrated": ["curate.calibrate=true"],  # threshold from the world's rated pairs, not 0.5 nats
    "keep_all": ["curate.threshold=-1000000000"],  # curation off; every run already trains m1_uncurated
}


def jobs(part: str, seeds: list[int], repeats: list[int], ablations: list[str]) -> list[dict]:
    out = []
    if part in ("grid", "all"):
        for r in repeats:
            for w in seeds:
                out.append({"name": f"w{w}-r{r}", "group": "default", "world_seed": w, "run_seed": r,
                            "overrides": [f"toy.seed={w}", f"run.seed={r}"]})
    if part in ("ablations", "all"):
        for w in seeds:  # world seed 0 of every ablation first: a stopped bench still compares them all
            for a in ablations:
                out.append({"name": f"{a}-w{w}-r0", "group": a, "world_seed": w, "run_seed": 0,
                            "overrides": [f"toy.seed={w}", "run.seed=0", *ABLATIONS[a]]})
    return out


def run_job(job: dict, runs: Path, recipe: Path) -> dict:
    out = runs / job["name"]
    cmd = [sys.executable, "-m", "minibt.cli", "run", str(recipe), *job["overrides"], "--out", str(out), "--fresh"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = round(time.monotonic() - start, 1)
    (runs / f"{job['name']}.log").write_text(proc.stdout + proc.stderr)
    result = {**job, "ok": proc.returncode == 0, "wall_s": wall}
    if (out / "metrics.json").is_file():
        result["metrics"] = json.loads((out / "metrics.json").read_text())
    if (out / "manifest.json").is_file():
        stages = json.loads((out / "manifest.json").read_text()).get("stages", {})
        result["stage_s"] = {k: v.get("seconds") for k, v in stages.items()}
    return result


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def row_values(r: dict) -> dict:
    m = r.get("metrics") or {}
    acc = m.get("forward_accuracy") or {}
    v = {
        "backward": m.get("backward_accuracy"), "bw_unseen": m.get("backward_accuracy_unseen_attributes"),
        "aug_correct": m.get("augmented_correct_share"), "cur_correct": m.get("curated_correct_share"),
        "precision": m.get("curation_precision"), "recall": m.get("curation_recall"), "clean": m.get("clean_share"),
        "base": acc.get("base"), "m0": acc.get("m0"), "m1": acc.get("m1"), "m1_unc": acc.get("m1_uncurated"),
        # response rewriting (rewrite.enabled): fact rewrites keeping the true value, rewrites the guard used;
        # and m1's answers in the seed's answer form (runs before these keys have none)
        "rw_keeps": (m.get("rewrite") or {}).get("keeps_value"), "rw_used": (m.get("rewrite") or {}).get("used"),
        "m1_form": (m.get("forward_answer_form_share") or {}).get("m1"),
    }
    if v["m1"] is not None and v["m0"] is not None:
        v["m1-m0"] = round(v["m1"] - v["m0"], 1)
        v["m1-unc"] = round(v["m1"] - v["m1_unc"], 1)
    v["claims"] = f"{sum(c['holds'] for c in m.get('claims', []))}/{len(m.get('claims', []))}" if m.get("claims") else "-"
    return v


COLS = ["backward", "bw_unseen", "aug_correct", "cur_correct", "precision", "recall", "clean", "base", "m0", "m1",
        "m1_unc", "m1-m0", "m1-unc", "rw_keeps", "rw_used", "m1_form"]


def spread(rows: list[dict], col: str) -> str:
    xs = [row_values(r)[col] for r in rows if row_values(r).get(col) is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.1f} ± {sd:.1f} [{min(xs):.1f}, {max(xs):.1f}]"


def markdown(results: list[dict]) -> str:
    ok = [r for r in results if r.get("metrics")]
    lines = ["# Toy world: seeds x repeats, and ablations", "",
             "Written by `bench/toy/grid.py` (recipes/toy.yaml; `toy.seed` = world seed, `run.seed` = repeat).",
             "Accuracies in %; `m1-m0` and `m1-unc` in points. Wall times: `--workers` runs at once on a shared 2-core VM.", "",
             "| run | " + " | ".join(COLS) + " | claims | wall s |", "|---|" + "---:|" * (len(COLS) + 2)]
    for r in results:
        v = row_values(r)
        lines.append(f"| {r['name']} | " + " | ".join(_f(v.get(c)) for c in COLS) + f" | {v['claims']} | {r['wall_s']}"
                     + ("" if r["ok"] else " (failed)") + " |")
    grid = [r for r in ok if r["group"] == "default"]
    if grid:
        lines += ["", f"## Spread over the default grid ({len(grid)} runs): mean ± sd [min, max]", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {c} | {spread(grid, c)} |" for c in COLS]
        holds = {}
        for r in grid:
            for c in r["metrics"].get("claims", []):
                holds.setdefault(c["claim"], []).append(c["holds"])
        lines += ["", "| claim | holds in |", "|---|---|"]
        lines += [f"| {c} | {sum(h)}/{len(h)} runs |" for c, h in holds.items()]
    groups = sorted({r["group"] for r in ok} - {"default"})
    if groups:
        lines += ["", "## Ablations (run.seed 0), mean over world seeds, against the default with the same seeds", "",
                  "| variant | world seeds | " + " | ".join(COLS) + " |", "|---|---|" + "---:|" * len(COLS)]
        for g in groups:
            rows = [r for r in ok if r["group"] == g]
            seeds = sorted(r["world_seed"] for r in rows)
            base = [r for r in grid if r["run_seed"] == 0 and r["world_seed"] in seeds]
            for label, rs in (("default (same seeds)", base), (g, rows)):
                vals = [statistics.mean([row_values(r)[c] for r in rs]) if rs and all(row_values(r).get(c) is not None for r in rs) else None
                        for c in COLS]
                lines.append(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(_f(x) for x in vals) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["grid", "ablations", "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablations", nargs="+", default=[a for a in ABLATIONS if a != "keep_all"], choices=list(ABLATIONS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "toy.yaml")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/minibt-toy-bench"))
    ap.add_argument("--name", default="toy-grid", help="results file stem under bench/results/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override added to every job, e.g. rewrite.enabled=true")
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    results = json.loads(json_path.read_text()) if json_path.is_file() else []
    done = {r["name"] for r in results if r.get("ok")}
    results = [r for r in results if r.get("ok")]
    todo = [{**j, "overrides": [*j["overrides"], *args.overrides]}
            for j in jobs(args.part, args.seeds, args.repeats, args.ablations) if j["name"] not in done]
    lock = threading.Lock()

    def one(job: dict) -> None:
        print(f"start {job['name']}: {' '.join(job['overrides'])}", flush=True)
        r = run_job(job, args.runs, args.recipe)
        with lock:
            results.append(r)
            json_path.write_text(json.dumps(results, indent=1))
            md_path.write_text(markdown(results))
        v = row_values(r)
        print(f"done {job['name']} ok={r['ok']} {r['wall_s']}s m0 {v.get('m0')} m1 {v.get('m1')} "
              f"unc {v.get('m1_unc')} cur {v.get('cur_correct')}", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, todo))
    md_path.write_text(markdown(results))


if __name__ == "__main__":
    main()
