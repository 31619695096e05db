"""Backward model M_yx: learns to write the instruction for an output (seed pairs reversed)."""

from __future__ import annotations

from typing import Any

from minibt.engine import Engine
from minibt.recipe import Recipe
from minibt.roles import MYX, backward_prompt

INSTRUCTION_BUDGET = 64  # tokens kept free after the output for the instruction it answers


def backward_rows(engine: Engine, seed: list[dict[str, str]]) -> list[dict[str, str]]:
    """Seed pairs reversed: the prompt shows the output, the completion is the instruction."""
    room = max(INSTRUCTION_BUDGET, max(engine.text.count_tokens(r["instruction"]) for r in seed) + 2)
    return [{"prompt": backward_prompt(engine.text, r["output"], room), "completion": r["instruction"]} for r in seed]


def train_myx(engine: Engine, recipe: Recipe, seed: list[dict[str, str]], work_dir: Any) -> dict:
    return engine.train(MYX, backward_rows(engine, seed), recipe.backward, work_dir)
