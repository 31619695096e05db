"""Peak memory of each stage on the real model, measured at its worst case, beside `--dry-run`'s estimate.

    MINIBT_CACHE=/work/cache python bench/real/memory.py [--stages backward augment m0 curate_r1]
        [--set model.max_length=768 ...] [--out bench/results/real-memory.json]

Each stage runs in a fresh process (peak RSS is a process's high-water mark) on the cpu-135m recipe with the
local SmolLM2 folder: the base loaded as the recipe loads it, then the stage's own code on inputs made as
long as model.max_length allows (every batch padded to it, what the estimate assumes): training runs two
optimizer steps on rows of passages longer than the limit; augment one batch of augment.batch_size long
texts with augment.max_new_tokens; rubric curation one batch of curate.batch_size long pairs. The adapters
are fresh (untrained): memory does not depend on their values. On a GPU the figure is torch's peak
allocation; on a CPU the process's peak RSS, which the CPU estimate counts from the Python runtime up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench" / "real" / "data"
STAGES = ("backward", "augment", "m0", "curate_r1")


def long_texts(n: int, words: int = 1200) -> list[str]:
    """`n` texts longer than any max_length here: the bench's human-written passages, joined until long."""
    passages = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines() if line.strip()]
    out, i = [], 0
    for _ in range(n):
        text = []
        while sum(len(t.split()) for t in text) < words:
            text.append(passages[i % len(passages)])
            i += 1
        out.append("\n\n".join(text))
    return out


def child(stage: str, overrides: list[str]) -> dict[str, Any]:
    """Runs in the measured process: load, record RSS, run the stage's worst case, return both peaks."""
    import dataclasses
    import tempfile

    import torch

    from minibt.base_model import open_engine
    from minibt.bench.stats import peak_rss_mib
    from minibt.recipe import load_recipe
    from minibt.recipes import builtin_path
    from minibt.roles import score_pairs
    from minibt.stages.augment import write_instructions
    from minibt.stages.backward import backward_rows
    from minibt.stages.forward import forward_rows

    recipe = load_recipe(builtin_path("cpu-135m"), overrides)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    engine = open_engine(recipe)
    loaded = peak_rss_mib()
    if stage in ("backward", "m0"):
        cfg = recipe.backward if stage == "backward" else recipe.forward
        texts = long_texts(2 * cfg.batch_size)
        seed = [{"instruction": f"Question {i}: what does this passage say about its subject?", "output": t} for i, t in enumerate(texts)]
        rows = backward_rows(engine, seed) if stage == "backward" else forward_rows(engine, recipe, seed, [])
        engine.train("myx" if stage == "backward" else "m0", rows, dataclasses.replace(cfg, max_steps=2), tempfile.mkdtemp())
    elif stage == "augment":
        engine.add_adapter("myx")
        rows = [{"text": t} for t in long_texts(recipe.augment.batch_size)]
        write_instructions(engine.infer, dataclasses.replace(recipe.augment, temperature=0.0), rows, seed=0)
    else:
        engine.add_adapter("m0")
        rows = [{"instruction": "Explain the passage.", "output": t} for t in long_texts(recipe.curate.batch_size)]
        score_pairs(engine.infer, recipe, "m0", rows)
    return {"rss_after_load_mib": loaded, "peak_mib": peak_rss_mib()}


def measure(stage: str, overrides: list[str]) -> dict[str, Any]:
    """One stage in a fresh process, and the estimate of that stage for the same recipe."""
    from minibt.memory import estimate
    from minibt.recipe import load_recipe
    from minibt.recipes import builtin_path

    out = subprocess.run([sys.executable, __file__, "--child", stage, "--set", *overrides], check=True,
                         capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    est = next(s for s in estimate(load_recipe(builtin_path("cpu-135m"), overrides)).stages if s.stage == stage)
    estimate_mib = est.total / 2**20
    return {**measured, "estimate_mib": round(estimate_mib, 1), "estimate_parts_mib": {k: round(v / 2**20, 1) for k, v in est.parts.items()},
            "estimate_error": round(estimate_mib / measured["peak_mib"] - 1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, after the local model's")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real-memory.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.set)))
        return
    from minibt.bench.smollm2 import folder

    overrides = [f"model.name={folder()}", *args.set]
    result = {"overrides": overrides, "stages": {}}
    for stage in args.stages:
        result["stages"][stage] = measure(stage, overrides)
        print(stage, json.dumps(result["stages"][stage]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
