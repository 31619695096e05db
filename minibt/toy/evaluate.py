"""Measure every stage of a toy-world run against the world's ground truth: metrics.json, report.md."""

from __future__ import annotations

from typing import Any

from minibt import io
from minibt.engine import Engine
from minibt.recipe import Recipe
from minibt.rundir import RunDir
from minibt.stages.backward import MYX, backward_prompt
from minibt.stages.forward import forward_prompt
from minibt.toy import metrics

ANSWER_TOKENS = 32  # a toy answer is one sentence


def forward_accuracy(engine: Engine, recipe: Recipe, adapter: str, questions: list[dict[str, Any]]) -> float:
    prompts = [forward_prompt(engine, recipe, q["instruction"]) for q in questions]
    answers = engine.generate(adapter, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=32)
    return metrics.forward_accuracy(answers, questions)


def evaluate_toy(rd: RunDir, engine: Engine, recipe: Recipe) -> dict[str, Any]:
    backward_eval = io.read_jsonl(rd.data("backward_eval"))
    questions = io.read_jsonl(rd.data("eval"))
    augmented = io.read_jsonl(rd.data("augmented"))
    rounds = recipe.forward.rounds
    for name in [MYX, "m0", *(f"m{k}" for k in range(1, rounds + 1)), "m1_uncurated"]:
        if name not in engine.adapters:
            engine.load_adapter(name, rd.adapter(name))

    written = engine.generate(MYX, [backward_prompt(engine, r["text"], 64) for r in backward_eval], max_new_tokens=64, batch_size=32)
    out: dict[str, Any] = {
        "backward_accuracy": metrics.backward_accuracy(written, backward_eval),
        "noise_fraction": round(100 * sum(r["label"] == "noise" for r in augmented) / max(1, len(augmented)), 1),
        "augmented_correct_share": metrics.correct_share(augmented),
    }
    for k in range(1, rounds + 1):
        scored = io.read_jsonl(rd.data(f"scored_r{k}"))
        kept = [r["score"] is not None and r["score"] >= recipe.curate.threshold for r in scored]
        precision, recall = metrics.curation_precision_recall(scored, kept)
        suffix = "" if k == 1 else f"_r{k}"
        out[f"curated_correct_share{suffix}"] = metrics.correct_share([r for r, keep in zip(scored, kept) if keep])
        out[f"curation_precision{suffix}"] = precision
        out[f"curation_recall{suffix}"] = recall
    out["clean_share"] = round(100 - out["noise_fraction"], 1)
    adapters = ["base", "m0", *(f"m{k}" for k in range(1, rounds + 1)), "m1_uncurated"]
    out["forward_accuracy"] = {a: forward_accuracy(engine, recipe, a, questions) for a in adapters}
    io.write_json(rd.path / "metrics.json", out)
    return out
