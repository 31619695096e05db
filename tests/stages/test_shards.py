"""Sharded stages: finished shards are reused only while they match their recorded rows and sha256;
a damaged one is redone and named in the log; a full disk mid-shard loses that shard only."""

from __future__ import annotations

import logging

import pytest

from fault_injection import cut_last_line, drop_row, fill_disk, flip_bit
from minibt import io
from minibt.errors import MinibtError
from minibt.rundir import RunDir
from minibt.stages.shards import map_shards

ROWS = [{"id": i, "text": f"text number {i}"} for i in range(10)]  # shards of 4: 4 + 4 + 2


def run_dir(path) -> RunDir:
    rd = RunDir(path)
    rd.manifest.setdefault("stages", {})
    return rd


def shards(rd: RunDir) -> tuple[list, list[int]]:
    """map_shards over ROWS with a stand-in for the model; returns (result, shards computed)."""
    computed = []

    def fn(rows, k, bar):
        computed.append(k)
        bar.update(len(rows))
        return [{**r, "instruction": f"what is {r['text']}?"} for r in rows]

    return map_shards(rd, "augmented", ROWS, 4, fn, desc="test"), computed


def test_each_shard_is_recorded_and_reused_on_resume(tmp_path):
    want, computed = shards(run_dir(tmp_path))
    assert computed == [0, 1, 2] and len(want) == 10
    files = RunDir(tmp_path).manifest["files"]
    assert [files[f"data/augmented.shards/0000{k}.jsonl"]["rows"] for k in range(3)] == [4, 4, 2]
    got, computed = shards(run_dir(tmp_path))
    assert computed == [] and got == want
    assert io.read_jsonl(tmp_path / "data" / "augmented.jsonl") == want


@pytest.mark.parametrize("damage", [cut_last_line, flip_bit, drop_row])
def test_a_damaged_shard_is_redone_and_the_log_says_which(tmp_path, caplog, damage):
    want, _ = shards(run_dir(tmp_path))
    damage(tmp_path / "data" / "augmented.shards" / "00001.jsonl")
    with caplog.at_level(logging.INFO, logger="minibt"):
        got, computed = shards(run_dir(tmp_path))
    assert computed == [1], "only the damaged shard is redone"
    assert got == want
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "augmented: shard 00001.jsonl: " in said and ": redoing it" in said
    assert "redid 1 damaged shard(s): 00001.jsonl" in said and "reused 2 finished shard(s) of 3" in said


def test_a_shard_written_just_before_a_kill_is_checked_by_parsing(tmp_path):
    want, _ = shards(run_dir(tmp_path))
    rd = run_dir(tmp_path)
    for k in (1, 2):  # shards on disk whose record never reached the manifest
        del rd.manifest["files"][f"data/augmented.shards/0000{k}.jsonl"]
    rd.save()
    cut_last_line(tmp_path / "data" / "augmented.shards" / "00002.jsonl")
    got, computed = shards(run_dir(tmp_path))
    assert computed == [2], "the whole unrecorded shard is reused, the cut one redone"
    assert got == want
    assert "data/augmented.shards/00001.jsonl" in RunDir(tmp_path).manifest["files"], "recorded once checked"


def test_a_full_disk_mid_shard_keeps_the_finished_shards_and_resumes(tmp_path, monkeypatch):
    failed = fill_disk(monkeypatch, "00001.jsonl")
    with pytest.raises(MinibtError) as e:
        shards(run_dir(tmp_path))
    assert failed and "augmented.shards/00001.jsonl: No space left on device" in str(e.value)
    folder = tmp_path / "data" / "augmented.shards"
    assert sorted(p.name for p in folder.iterdir()) == ["00000.jsonl"], "no half shard, no temp file"
    assert RunDir(tmp_path).problem(folder / "00000.jsonl") is None
    monkeypatch.undo()
    got, computed = shards(run_dir(tmp_path))
    assert computed == [1, 2] and len(got) == 10
