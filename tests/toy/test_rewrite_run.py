"""The rewrite stage in the reduced toy world, through the real CLI: `rewrite.enabled=true` adds
rewrite_r1 between curate_r1 and m1, a Ctrl-C inside it resumes at the shard in flight, the guard's
counts match the rows, m1 trains on the rewritten pairs, and the toy metrics measure the rewrites."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from reduced_world import small_recipe  # tests/toy is on sys.path (pytest's prepend import mode)

from minibt import io, pipeline
from minibt.cli import main
from minibt.stages import rewrite as rw
from minibt.toy.world import answer_is_correct


def test_rewrite_stage_runs_resumes_and_feeds_m1(toy_cache, tmp_path, monkeypatch):
    # short forward training: what is checked happens in the data, not in m1's accuracy
    recipe = {**small_recipe(forward={"max_steps": 20}), "rewrite": {"enabled": True, "max_new_tokens": 24, "shard_size": 16}}
    path = tmp_path / "rewrite.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"

    real, calls = rw.rewrite_pairs, []

    def ctrl_c_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rw, "rewrite_pairs", ctrl_c_in_the_second_shard)
    first = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert first.exit_code == 130, first.output + repr(first.exception)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["curate_r1"]["status"] == "done" and manifest["stages"]["rewrite_r1"]["status"] != "done"
    assert "m1" not in manifest["stages"]

    trained = {}
    real_train = pipeline.train_forward

    def train_forward(engine, recipe, name, seed, augmented, work_dir, rated=()):
        trained[name] = augmented
        return real_train(engine, recipe, name, seed, augmented, work_dir, rated)

    shard0 = out / "data" / "rewritten_r1.shards" / "00000.jsonl"
    written = shard0.read_bytes()
    calls.clear()
    monkeypatch.setattr(rw, "rewrite_pairs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(pipeline, "train_forward", train_forward)
    second = CliRunner().invoke(main, ["run", str(path), "--out", str(out)])
    assert second.exit_code == 0, second.output + repr(second.exception)
    n_shards = len(list(shard0.parent.iterdir()))
    assert n_shards >= 2 and len(calls) == n_shards - 1, "the finished shard is reused, the others computed"
    assert shard0.read_bytes() == written
    assert "rewrites used" in second.output  # the run's summary line for rewrite_r1

    manifest = json.loads((out / "manifest.json").read_text())
    stages = list(manifest["stages"])
    assert stages.index("curate_r1") < stages.index("rewrite_r1") < stages.index("m1")
    counts = manifest["stages"]["rewrite_r1"]["counts"]
    curated = io.read_jsonl(out / "data" / "curated_r1.jsonl")
    rewritten = io.read_jsonl(out / "data" / "rewritten_r1.jsonl")
    assert counts["pairs"] == len(curated) == len(rewritten) and counts["adapter"] == "m0"
    assert [r["original_output"] for r in rewritten] == [r["output"] for r in curated]  # nothing lost
    assert counts["rewritten"] == sum(r["rewrite_used"] for r in rewritten)
    assert counts["kept_original"] == len(rewritten) - counts["rewritten"]
    for r in rewritten:  # the guard's rule, row by row
        assert r["rewrite_used"] == (bool(r["rewrite"].strip()) and rw.content_overlap(r["original_output"], r["rewrite"]) >= 0.7)
        assert r["output"] == (r["rewrite"] if r["rewrite_used"] else r["original_output"])
    assert 0 < counts["rewritten"], "m0 rewrites some pairs keeping their content"

    # m1 trained on the rewritten pairs; the ablation m1_uncurated on the augmented pairs as before
    assert trained["m1"] == rewritten
    assert manifest["stages"]["m1"]["counts"]["examples"] == len(io.read_jsonl(out / "data" / "seed.jsonl")) + len(rewritten)

    metrics = json.loads((out / "metrics.json").read_text())
    measured = metrics["rewrite"]
    facts = [r for r in rewritten if r["label"] == "fact"]
    assert measured["fact_rows"] == len(facts) > 0
    keeps = sum(answer_is_correct(r["rewrite"], r["value"]) for r in facts)
    assert measured["keeps_value"] == pytest.approx(100 * keeps / len(facts), abs=0.05)
    assert set(metrics["forward_answer_form_share"]) == set(metrics["forward_accuracy"])

