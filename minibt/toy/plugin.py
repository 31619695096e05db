"""The toy world as the pipeline sees it: one World (minibt/worlds.py), registered through the
`minibt.worlds` entry point (pyproject.toml). It makes the run's data (seed pairs, a noisy corpus, the
held-out questions and rated pairs), pretrains the base, adds the paper's ablation (m1_uncurated) and
the ground-truth evaluation as stages, and says how its counts, metrics and pairs read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from minibt import io
from minibt.toy.world import WorldConfig, build_world
from minibt.worlds import World


def toy_world(recipe: Any) -> tuple[WorldConfig, Any]:
    """The recipe's world config (its `toy` section) and the world it makes."""
    return recipe.world, build_world(recipe.world)


def toy_base(recipe: Any) -> Path:
    """The toy world's pretrained tiny base (built once, then cached)."""
    from minibt.toy.base import build_base

    return build_base(*toy_world(recipe))


def train_uncurated(ctx: Any) -> dict[str, Any]:
    """The paper's ablation: m1's training with curation switched off (every usable augmented pair)."""
    from minibt.stages.augment import usable
    from minibt.stages.forward import taught, train_forward

    pairs = [r for r in ctx.rows("augmented") if usable(r)]
    return train_forward(ctx.engine, ctx.recipe, "m1_uncurated", ctx.rows("seed"), pairs, ctx.rd.work("m1_uncurated"), taught(ctx))


def evaluate(ctx: Any) -> dict[str, Any]:
    """The evaluate stage: the ground-truth metrics, merged into metrics.json (other parts stay)."""
    from minibt.evaluate import merge_metrics

    metrics = WORLD.evaluate(ctx.rd, ctx.inference, ctx.recipe, ctx.workers)
    merge_metrics(ctx.rd.path, metrics)
    return {**metrics, "engine": ctx.inference.name}


class ToyWorld(World):
    section = "toy"
    title = "the toy world"
    config = WorldConfig
    data_files = ("eval", "backward_eval", "ratings")

    def prepare(self, run: Any, recipe: Any) -> dict[str, Any]:
        cfg, world = toy_world(recipe)
        io.write_jsonl(run.data("seed"), world.seed_pairs)
        io.write_jsonl(run.data("corpus"), [{"id": i, **row} for i, row in enumerate(world.corpus)])
        io.write_jsonl(run.data("eval"), world.eval_questions)
        io.write_jsonl(run.data("backward_eval"), world.backward_eval)
        io.write_jsonl(run.data("ratings"), world.rated_pairs)
        facts = sum(r["label"] == "fact" for r in world.corpus)
        return {
            "seed": len(world.seed_pairs),
            "corpus": len(world.corpus),
            "corpus_facts": facts,
            "noise_fraction": round(1 - facts / max(1, len(world.corpus)), 3),
            "eval_questions": len(world.eval_questions),
            "world": dataclasses.asdict(cfg),
        }

    def base(self, recipe: Any) -> Path:
        return toy_base(recipe)

    def shape(self, recipe: Any) -> Any:
        """Its tiny Llama (minibt/toy/base.py), without building it: vocab is its upper bound."""
        from minibt.memory import Shape

        cfg = recipe.world
        return Shape(cfg.vocab_size, cfg.hidden_size, cfg.hidden_size * 8 // 3, cfg.layers, cfg.heads, cfg.heads,
                     cfg.hidden_size // cfg.heads, tied=True, qkv_bias=False)

    def stages(self, recipe: Any) -> list[Any]:
        from minibt.stages.stage import Stage
        from minibt.toy.evaluate import EVAL_BATCH

        return [Stage("m1_uncurated", train_uncurated, adapter="m1_uncurated"),
                Stage("evaluate", evaluate, batch_size=EVAL_BATCH, spreads=True)]

    def evaluate(self, run: Any, engine: Any, recipe: Any, workers: Any = None) -> dict[str, Any]:
        from minibt.toy.evaluate import evaluate_toy

        return evaluate_toy(run, engine, recipe, workers)

    def prepare_lines(self, counts: dict[str, Any]) -> list[str]:
        return [f"seed: {counts['seed']} pairs from the toy world",
                f"corpus: {counts['corpus']} texts from the toy world, {counts['corpus_facts']} of them facts "
                f"(noise {counts['noise_fraction']:.0%})",
                f"eval: {counts['eval_questions']} held-out questions"]

    def describe(self, stage: str, counts: dict[str, Any]) -> str | None:
        if stage == "evaluate":
            return "metrics.json"
        if stage != "prepare":
            return None
        parts = [f"seed: {counts['seed']} pairs from the toy world"] if "seed" in counts else []
        parts += [f"corpus: {counts['corpus']} texts from the toy world"] if "corpus" in counts else []
        parts += [f"noise {counts['noise_fraction']:.0%}"] if "noise_fraction" in counts else []
        return "; ".join(parts)

    def metrics_lines(self, metrics: dict[str, Any]) -> list[str]:
        from minibt.toy.evaluate import format_metrics

        return format_metrics(metrics)

    def pair_truth(self, row: dict[str, Any]) -> bool | None:
        """Does the instruction ask for the fact the text states (toy pairs carry label, entity, attribute)?"""
        if "label" not in row or "entity" not in row:
            return None
        from minibt.toy.metrics import is_correct_pair

        return is_correct_pair(row)

    def report_lines(self, metrics: dict[str, Any]) -> list[str]:
        acc = metrics.get("forward_accuracy")
        if not isinstance(acc, dict):
            return []
        return (["Toy world, forward accuracy on held-out questions (%):", "", "| model | accuracy |", "|---|---:|"]
                + [f"| {k} | {v} |" for k, v in acc.items()] + [""])


WORLD = ToyWorld()
