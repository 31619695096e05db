"""Forward models m0, m1, ...: instruction -> output, on seed pairs plus curated augmented pairs.

With `forward.tags`, the paper's system prompts tell the two sources apart: seed pairs get
"Answer in the style of an AI Assistant.", augmented ones "Answer with knowledge from web search.".
At inference minibt uses the seed tag, as the paper does.
"""

from __future__ import annotations

from typing import Any

from minibt.engine import Engine
from minibt.recipe import Recipe
from minibt.roles import forward_prompt


def forward_rows(engine: Engine, recipe: Recipe, seed: list[dict], augmented: list[dict]) -> list[dict[str, str]]:
    rows = [{"prompt": forward_prompt(engine, recipe, r["instruction"]), "completion": r["output"]} for r in seed]
    rows += [{"prompt": forward_prompt(engine, recipe, r["instruction"], augmented=True), "completion": r["output"]} for r in augmented]
    return rows


def train_forward(engine: Engine, recipe: Recipe, name: str, seed: list[dict], augmented: list[dict], work_dir: Any) -> dict:
    return engine.train(name, forward_rows(engine, recipe, seed, augmented), recipe.forward, work_dir)
