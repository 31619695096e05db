"""The run's base model: the recipe's, or its world's own base, loaded once as the run's engine.

Training (minibt/pipeline.py), inference (minibt/session.py) and the shard workers all open it here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minibt.engine import Engine
from minibt.gguf import converted_folder, is_gguf
from minibt.recipe import Recipe
from minibt.sections import ModelSection
from minibt.worlds import world_of


def model_of(recipe: Recipe, recorded: str | None = None) -> ModelSection:
    """The recipe's model section; for a world's recipe, named for the run's own base (`recorded`, the
    folder its manifest names, so later changes to the world's code cannot swap it), else the world's;
    for a `.gguf` file, named for its converted folder."""
    world = world_of(recipe)
    if world is None:
        if is_gguf(recipe.model.name):  # a llama.cpp file: its safetensors conversion, made once
            return dataclasses.replace(recipe.model, name=str(converted_folder(recipe.model.name)))
        return recipe.model
    own = recorded if recorded and Path(recorded).is_dir() else None
    return dataclasses.replace(recipe.model, name=own or str(world.base(recipe)))


def open_engine(recipe: Recipe, recorded: str | None = None) -> Engine:
    """Load the recipe's base model (see `model_of`) with its LoRA settings."""
    return Engine.load(model_of(recipe, recorded), recipe.lora, seed=recipe.run.seed)
