"""Forward models m0, m1, ...: instruction -> output, on seed pairs plus curated augmented pairs.

With `forward.tags`, the paper's system prompts tell the two sources apart: seed pairs get
"Answer in the style of an AI Assistant.", augmented ones "Answer with knowledge from web search.".
At inference minibt uses the seed tag, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minibt import io, prompts
from minibt.engine import Engine
from minibt.recipe import Recipe
from minibt.roles import RUBRIC_ANSWER_ROOM, forward_prompt, rubric_prompt


def forward_rows(engine: Engine, recipe: Recipe, seed: list[dict], augmented: list[dict], rated: Sequence[dict] = ()) -> list[dict[str, str]]:
    rows = [{"prompt": forward_prompt(engine.text, recipe, r["instruction"]), "completion": r["output"]} for r in seed]
    rows += [{"prompt": forward_prompt(engine.text, recipe, r["instruction"], augmented=True), "completion": r["output"]} for r in augmented]
    return rows + rating_rows(engine, rated)


def rating_rows(engine: Engine, rated: Sequence[dict]) -> list[dict[str, str]]:
    """Rated pairs (curate.teach) as the curator is asked them: the rubric prompt, completion "Score: N"."""
    return [{"prompt": rubric_prompt(engine.text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM),
             "completion": f"{prompts.SCORE_PREFIX} {r['score']}"} for r in rated]


def taught(ctx: Any) -> list[dict]:
    """The rated pairs every forward model also trains on with curate.teach: curate.ratings, else the run's data/ratings.jsonl."""
    cfg = ctx.recipe.curate
    return io.read_jsonl(cfg.ratings or ctx.rd.data("ratings")) if cfg.teach else []


def train_forward(engine: Engine, recipe: Recipe, name: str, seed: list[dict], augmented: list[dict], work_dir: Any,
                  rated: Sequence[dict] = ()) -> dict:
    return engine.train(name, forward_rows(engine, recipe, seed, augmented, rated), recipe.forward, work_dir)
