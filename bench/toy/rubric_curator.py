"""Can the paper's rubric curator work in the toy world? Measured against the ground truth.

    python bench/toy/rubric_curator.py RUN_DIR [--steps 150] [--sample 800] [--extra-ratings 0]
        [--hard-ratings 0] [--rated-pages 0] [--tag NAME]

RUN_DIR is a finished toy run (its augmented pairs and its likelihood scores are reused). An m0-like
adapter is trained on the seed pairs plus the world's rated pairs in the paper's rubric format
(prompt: the ~520-token rubric with the pair; completion "Score: N"), with model.max_length 768; it
then rates a random sample of the augmented pairs, read from the digit distribution after "Score:"
(curate.mode=distribution). `--extra-ratings N` adds N seed pairs rated by the world's own rule
(x3: right answer 5, another seed pair's answer 2, a noise text 1), more than a human would rate.
`--hard-ratings N` adds N rated pairs of the hard case: a true seed fact's text under a question about
another seed entity with the same attribute (myx's commonest error), rated 2 like the world's other
wrong answers. `--rated-pages N` pretrains a base of its own (cached apart) on the world's text plus N
pages that quote a question, an answer and a rating in the rubric's tags (minibt.toy.world.rated_pages).
The separation is read against the truth: AUC of the expected score for right pairs against fact
texts under a wrong instruction (the hard case) and against every other pair, and the pairs kept at the
threshold `curate.calibrate` would set (midpoint of the means on the world's rated pairs >= 4 and < 4).
The likelihood curator's scores for the same pairs (from the run) are scored the same way.
Writes bench/results/toy-rubric[-TAG].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def judge(rows: list[dict], keep: list[bool]) -> dict:
    from minibt.toy import metrics

    precision, recall = metrics.curation_precision_recall(rows, keep)
    kept = [r for r, k in zip(rows, keep) if k]
    return {"kept": len(kept), "precision": precision, "recall": recall, "correct_share": metrics.correct_share(kept)}


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties half: 0.5 is no separation."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def hard_ratings(world, world_cfg, n: int, seed: int) -> list[dict]:
    """n seed facts' texts under a question about another seed entity with the same attribute, rated 2."""
    from minibt.toy import world as w

    r = random.Random(f"hard:{seed}")
    seed_set = set(world.seed_attributes)
    facts = [(e, a) for e in world.entities[: world_cfg.seed_entities] for a in world.facts[e] if a in seed_set]
    rows = []
    while len(rows) < n:
        e, a = r.choice(facts)
        others = [x for x, b in facts if b == a and x != e]
        if others:
            rows.append({"instruction": w._question(r, r.choice(others), a), "output": w._answer(r, e, a, world.facts),
                         "score": w.rating(fact=True, asked_for=False)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sample", type=int, default=800)
    ap.add_argument("--extra-ratings", type=int, default=0)
    ap.add_argument("--hard-ratings", type=int, default=0)
    ap.add_argument("--world-ratings", type=int, default=None, help="the first N of the world's rated pairs (default all; 0: m0 untaught)")
    ap.add_argument("--rated-pages", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from minibt import io
    from minibt.bench import seed_ratings
    from minibt.engine import Engine
    from minibt.rundir import RunDir
    from minibt.roles import RUBRIC_ANSWER_ROOM, rubric_prompt, score_pairs
    from minibt.stages.forward import forward_rows
    from minibt.toy.plugin import toy_base, toy_world
    from minibt.toy import metrics
    from minibt.io import cache_dir
    from minibt.toy.base import build_base
    from minibt.toy.world import rated_pages

    rd = RunDir.open(args.run_dir)
    recipe = rd.recipe()
    world_cfg, world = toy_world(recipe)
    if args.rated_pages:
        world.pretrain_texts = world.pretrain_texts + rated_pages(world, args.rated_pages, world_cfg.seed)
        random.Random(0).shuffle(world.pretrain_texts)
        t0 = time.monotonic()
        base = build_base(world_cfg, world, cache_dir() / "bench-rated-pages")  # its text is in the key
        base_s = time.monotonic() - t0
    else:
        base, base_s = toy_base(recipe), 0.0
    model = dataclasses.replace(recipe.model, name=str(base), max_length=768)
    recipe = dataclasses.replace(recipe, model=model,
                                 curate=dataclasses.replace(recipe.curate, method="rubric", mode="distribution", batch_size=16))
    engine = Engine.load(model, recipe.lora, seed=recipe.run.seed)

    rated = (list(world.rated_pairs)[: args.world_ratings] + seed_ratings(world, args.extra_ratings, recipe.run.seed, stream="rubric")
             + hard_ratings(world, world_cfg, args.hard_ratings, recipe.run.seed))
    rubric_rows = [{"prompt": rubric_prompt(engine.text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM),
                    "completion": f"Score: {r['score']}"} for r in rated]
    rows = forward_rows(engine, recipe, world.seed_pairs, []) + rubric_rows
    cfg = dataclasses.replace(recipe.forward, max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr)
    t0 = time.monotonic()
    trained = engine.train("rater", rows, cfg, rd.path / "work" / "rater")
    train_s = time.monotonic() - t0

    augmented = [r for r in io.read_jsonl(rd.data("augmented")) if r["instruction"].strip()]
    sample = random.Random(0).sample(augmented, min(args.sample, len(augmented)))
    t0 = time.monotonic()
    scored = score_pairs(engine.infer, recipe, "rater", sample)
    score_s = time.monotonic() - t0
    fit = score_pairs(engine.infer, recipe, "rater", [{**r, "rated": r["score"]} for r in world.rated_pairs])
    # the rater is m0 taught the rubric: does it still answer as m0 does (held-out questions)?
    from minibt.toy.evaluate import forward_accuracy

    rater_forward = forward_accuracy(engine.infer, recipe, "rater", world.eval_questions)
    base_forward = forward_accuracy(engine.infer, recipe, "base", world.eval_questions)

    likelihood = {r["id"]: r["score"] for r in io.read_jsonl(rd.data("scored_r1"))}
    lik_threshold = rd.manifest["stages"]["curate_r1"]["counts"]["threshold"]
    out = {
        "run_dir": str(args.run_dir), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "world_ratings": args.world_ratings, "extra_ratings": args.extra_ratings, "hard_ratings": args.hard_ratings, "rated_pages": args.rated_pages,
        "base_s": round(base_s, 1),
        "forward_accuracy": {"base": base_forward, "rater": rater_forward,
                             "run_m0": json.loads((rd.path / "metrics.json").read_text())["forward_accuracy"]["m0"]},
        "rated_pairs": len(rated), "train_rows": len(rows), "train_loss": trained["train_loss"],
        "train_s": round(train_s, 1), "score_s": round(score_s, 1), "sample": len(sample),
        "clean_share": round(100 * sum(r["label"] == "fact" for r in sample) / len(sample), 1),
        "correct_share": metrics.correct_share(sample),
        "mean_digit_mass": round(sum(r["score_mass"] for r in scored) / len(scored), 4),
        "histogram_argmax": {s: sum(r["argmax_score"] == s for r in scored) for s in range(1, 6)},
        "fit_on_rated_pairs": {s: round(sum(f["expected_score"] for f in fit if f["rated"] == s)
                                        / max(1, sum(f["rated"] == s for f in fit)), 2) for s in (1, 2, 5)},
        "rubric": {f"expected>={t}": judge(scored, [r["expected_score"] >= t for r in scored]) for t in (3.0, 4.0, 4.5)},
        "likelihood": judge(sample, [likelihood[r["id"]] >= lik_threshold for r in sample]),
    }
    # the rubric's expectation split by the truth: does it rank right pairs above the rest at all?
    truth = [metrics.is_correct_pair(r) for r in scored]
    out["rubric_mean_expected"] = {
        "correct_pairs": round(sum(r["expected_score"] for r, t in zip(scored, truth) if t) / max(1, sum(truth)), 3),
        "fact_wrong_instruction": round(sum(r["expected_score"] for r, t in zip(scored, truth) if not t and r["label"] == "fact")
                                        / max(1, sum(not t and r["label"] == "fact" for r, t in zip(scored, truth))), 3),
        "noise": round(sum(r["expected_score"] for r in scored if r["label"] == "noise")
                       / max(1, sum(r["label"] == "noise" for r in scored)), 3),
    }
    fact_wrong = [r["expected_score"] for r, t in zip(scored, truth) if not t and r["label"] == "fact"]
    right = [r["expected_score"] for r, t in zip(scored, truth) if t]
    rest = [r["expected_score"] for r, t in zip(scored, truth) if not t]
    good = [f["expected_score"] for f in fit if f["rated"] >= 4]
    bad = [f["expected_score"] for f in fit if f["rated"] < 4]
    calibrated = round((sum(good) / len(good) + sum(bad) / len(bad)) / 2, 3)
    out["auc_right_vs_fact_wrong"] = auc(right, fact_wrong)
    out["auc_right_vs_rest"] = auc(right, rest)
    out["auc_fact_vs_noise"] = auc([r["expected_score"] for r in scored if r["label"] == "fact"],
                                   [r["expected_score"] for r in scored if r["label"] == "noise"])
    out["calibrated_threshold"] = calibrated
    out["rubric"][f"calibrated>={calibrated}"] = judge(scored, [r["expected_score"] >= calibrated for r in scored])
    path = ROOT / "bench" / "results" / f"toy-rubric{('-' + args.tag) if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
