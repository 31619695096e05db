"""The toy world as a World (minibt/toy/plugin.py): its stages, and its evaluation writing only its own
part of metrics.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

from minibt import io
from minibt.recipe import from_dict
from minibt.rundir import RunDir
from minibt.stages.stage import Context, run_stage
from minibt.toy.plugin import WORLD


def test_the_toy_stages_follow_the_method():
    from minibt.pipeline import plan

    recipe = from_dict({"toy": {}, "forward": {"rounds": 2}})
    assert [s.name for s in WORLD.stages(recipe)] == ["m1_uncurated", "evaluate"] == plan(recipe)[-2:]
    assert WORLD.shape(recipe).vocab == recipe.world.vocab_size


def test_the_evaluate_stage_merges_its_metrics_and_keeps_the_other_parts(tmp_path, monkeypatch):
    recipe = from_dict({"toy": {}})
    rd = RunDir(tmp_path)
    rd.manifest = {"stages": {}}
    pairwise = {"m1_vs_m0": {"a": "m1", "b": "m0", "win_rate": 0.6}}
    io.write_json(tmp_path / "metrics.json", {"pairwise": pairwise, "backward_accuracy": 1.0})  # `minibt eval`'s, and an old one
    monkeypatch.setattr(WORLD, "evaluate", lambda run, engine, recipe, workers: {"backward_accuracy": 50.0, "claims": []})
    (evaluate,) = [s for s in WORLD.stages(recipe) if s.name == "evaluate"]
    assert run_stage(Context(rd, recipe, lambda: SimpleNamespace(infer=SimpleNamespace(name="hf"))), evaluate)  # the engine: not used
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"pairwise": pairwise, "backward_accuracy": 50.0, "claims": []}
    assert rd.manifest["stages"]["evaluate"]["counts"] == {"backward_accuracy": 50.0, "claims": [], "engine": "hf"}
