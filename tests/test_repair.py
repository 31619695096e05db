"""`minibt repair`: a run whose manifest.json is corrupt gets a new one from its files, and a rerun
finishes it to the same result without retraining any adapter."""

from __future__ import annotations

import logging
import shutil

from click.testing import CliRunner

from minibt import io
from minibt.cli import main
from minibt.rundir import RunDir


def test_repair_rebuilds_the_manifest_and_the_rerun_retrains_nothing(finished_run, tmp_path, caplog):
    root, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = {n: io.digest(copy / "adapters" / n / "adapter_model.safetensors") for n in ("myx", "m0", "m1")}
    (copy / "manifest.json").write_text('{"stages": {"prepare": {"status": "do')  # cut mid-write

    result = CliRunner().invoke(main, ["repair", str(copy)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"kept the unreadable manifest as {copy / 'manifest.json.corrupt'}" in lines
    # (test_eval may have put a data/eval.jsonl into the shared finished run: prepare lists it then)
    assert any(line.startswith("prepare: done (data/seed.jsonl, data/corpus.jsonl") for line in lines), lines
    for stage, adapter in (("backward", "myx"), ("m0", "m0"), ("m1", "m1")):
        assert f"{stage}: done (adapters/{adapter}/adapter_model.safetensors)" in lines
    assert "augment: pending (a rerun rebuilds it from its shards)" in lines
    assert "curate_r1: pending (a rerun rebuilds it from its shards)" in lines
    rd = RunDir.open(copy)
    assert rd.manifest["files"]["data/seed.jsonl"]["rows"] == len(io.read_jsonl(copy / "data" / "seed.jsonl"))
    finished = {s: e for s, e in rd.manifest["stages"].items()}

    result = CliRunner().invoke(main, ["repair", str(copy)])
    assert result.exit_code == 2 and "reads fine: nothing to repair" in result.output

    with caplog.at_level(logging.INFO, logger="minibt"):
        result = CliRunner().invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(copy)])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records]
    assert "augmented: reused 1 finished shard(s) of 1" in said and "scored_r1: reused 1 finished shard(s) of 1" in said, said
    after = RunDir.open(copy).manifest
    assert {s: e["status"] for s, e in after["stages"].items()} == {s: "done" for s in after["stages"]}
    for stage in ("backward", "m0", "m1"):
        assert after["stages"][stage] == finished[stage], f"{stage} was redone"
    for n, d in weights.items():
        assert io.digest(copy / "adapters" / n / "adapter_model.safetensors") == d
    for name in ("augmented", "scored_r1", "curated_r1"):
        assert io.read_jsonl(copy / "data" / f"{name}.jsonl") == io.read_jsonl(run / "data" / f"{name}.jsonl")
    # the counts come back exact from the shards
    original = RunDir.open(run).manifest["stages"]
    for stage in ("augment", "curate_r1"):
        assert after["stages"][stage]["counts"] == original[stage]["counts"]


def test_repair_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    result = CliRunner().invoke(main, ["repair", str(tmp_path)])
    assert result.exit_code == 2 and "no recipe.yaml" in result.output
