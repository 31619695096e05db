"""The reduced toy world's recipe and runner: one definition for tests/toy (conftest.py, the tests)
and bench/toy/reduced_spread.py, which measures the spread of what the tests assert."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from minibt.cli import main
from minibt.toy.world import small_world_config

TRAIN = {"batch_size": 16, "learning_rate": 2.0e-3, "warmup_ratio": 0.0}


def small_recipe(**sections) -> dict:
    recipe = {
        "run": {"name": "toy-small", "seed": 0, "threads": 1},
        "model": {"backend": "transformers", "quantization": "nf4", "max_length": 128},
        "lora": {"r": 32, "alpha": 64},
        "backward": {**TRAIN, "max_steps": 80},
        "augment": {"max_new_tokens": 24, "batch_size": 64, "shard_size": 1024},
        "curate": {"method": "likelihood", "threshold": 0.5, "batch_size": 64, "shard_size": 2048},
        "forward": {**TRAIN, "max_steps": 60},
        "toy": dataclasses.asdict(small_world_config()),
    }
    for key, values in sections.items():
        recipe[key] = {**recipe[key], **values}
    return recipe


def run_toy(root: Path, name: str, recipe: dict) -> dict:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(root / name)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "forward accuracy (held-out)" in result.output  # the readable summary
    return json.loads((root / name / "metrics.json").read_text())
