"""m1 with and without response rewriting, on the same runs: for each finished toy run made with
`rewrite.enabled=true`, m1 is trained again on seed + curated_r1 (the pairs before rewriting), with
the run's own recipe, base and training code, and measured as the run measured its m1.

    python bench/toy/rewrite_ablation.py RUN_DIR [RUN_DIR ...] [--out bench/results/toy-rewrite-ablation.json]

Everything before m1 (prepare, myx, augment, m0, curation) is shared by the two m1s, so this costs one
m1 training and its evaluation per run instead of a second whole run. Check it against a plain run:
the m1 of `minibt run recipes/toy.yaml` with the same seeds must come out the same (on one machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def without_rewrite(run_dir: Path) -> dict:
    from minibt import io
    from minibt.pipeline import open_engine
    from minibt.rundir import RunDir
    from minibt.stages.forward import train_forward
    from minibt.toy import metrics
    from minibt.toy.evaluate import forward_answers

    rd = RunDir.open(run_dir)
    recipe = rd.recipe()
    recipe = dataclasses.replace(recipe, rewrite=dataclasses.replace(recipe.rewrite, enabled=False))
    engine = open_engine(recipe, rd.manifest.get("base_model"))
    seed, curated = io.read_jsonl(rd.data("seed")), io.read_jsonl(rd.data("curated_r1"))
    questions = io.read_jsonl(rd.data("eval"))
    # named m1 as in the run: an adapter's LoRA init comes from the run seed and its name
    with tempfile.TemporaryDirectory() as work:
        trained = train_forward(engine, recipe, "m1", seed, curated, Path(work))
    answers = forward_answers(engine.infer, recipe, "m1", questions)
    with_rw = json.loads((rd.path / "metrics.json").read_text())
    return {
        "run": run_dir.name, "examples": trained["examples"],
        "m1_without_rewrite": metrics.forward_accuracy(answers, questions),
        "m1_with_rewrite": with_rw["forward_accuracy"]["m1"],
        "form_without_rewrite": metrics.answer_form_share(answers),
        "form_with_rewrite": with_rw["forward_answer_form_share"]["m1"],
        "m0": with_rw["forward_accuracy"]["m0"], "form_m0": with_rw["forward_answer_form_share"]["m0"],
        "rewrite": with_rw["rewrite"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toy-rewrite-ablation.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {r["run"] for r in results}
    for run in args.runs:
        if run.name in done or not (run / "metrics.json").is_file():
            continue
        r = without_rewrite(run)
        print(json.dumps({k: v for k, v in r.items() if k != "rewrite"}), flush=True)
        results.append(r)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
