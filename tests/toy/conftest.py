"""The reduced toy world through the real CLI, run once per test session and shared by the toy tests."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """MINIBT_CACHE for the toy tests: the caller's when set (CI caches it per run), else a temp dir."""
    old = os.environ.get("MINIBT_CACHE")
    if not old:
        os.environ["MINIBT_CACHE"] = str(tmp_path_factory.mktemp("minibt-cache"))
    yield os.environ["MINIBT_CACHE"]
    if old is None:
        os.environ.pop("MINIBT_CACHE", None)


@pytest.fixture(scope="session")
def good_run(toy_cache, tmp_path_factory) -> tuple[Path, dict]:
    """(run directory, metrics.json) of the reduced world's default run."""
    root = tmp_path_factory.mktemp("toy-run")
    return root / "good", run_toy(root, "good", small_recipe())
