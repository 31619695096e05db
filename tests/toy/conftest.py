"""The reduced toy world through the real CLI, run once per test session and shared by the toy tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reduced_world import run_toy, small_recipe  # tests/toy is on sys.path (pytest's prepend import mode)


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
