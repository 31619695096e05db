"""Atomic writes: a full disk is one line naming the file, the previous version stays, no temp file is left."""

from __future__ import annotations

import errno
import json

import pytest

from fault_injection import cut_last_line, drop_row, fill_disk, flip_bit
from minibt import io
from minibt.errors import MinibtError

ROWS = [{"id": i, "text": f"row number {i} of the file"} for i in range(20)]


@pytest.mark.parametrize("write", [
    lambda p: io.write_jsonl(p, ROWS),
    lambda p: io.write_json(p, {"rows": ROWS}),
    lambda p: io.write_text(p, "x" * 5000),
])
def test_full_disk_is_one_line_naming_the_file_and_the_old_version_stays(tmp_path, monkeypatch, write):
    path = tmp_path / "data" / "augmented.jsonl"
    io.write_jsonl(path, ROWS[:3])
    before = path.read_bytes()
    failed = fill_disk(monkeypatch, "augmented.jsonl")
    with pytest.raises(MinibtError) as e:
        write(path)
    assert failed, "the write never reached the full disk"
    message = str(e.value)
    assert str(path) in message and "No space left on device" in message and "\n" not in message
    assert "rerun" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["augmented.jsonl"], "the temp file is removed"
    monkeypatch.undo()  # space is back
    write(path)
    assert path.read_bytes() != before


def test_other_os_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import minibt.io

    def broken_open(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(minibt.io, "open", broken_open, raising=False)
    with pytest.raises(OSError) as e:
        io.write_text(tmp_path / "x.txt", "hello")
    assert not isinstance(e.value, MinibtError) and e.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    def rows():
        yield ROWS[0]
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        io.write_jsonl(tmp_path / "x.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_readers_see_the_old_version_until_the_new_one_is_whole(tmp_path):
    """Atomic: while rows are written, and after a writer fails midway, the file holds the previous version."""
    path = tmp_path / "augmented.jsonl"
    io.write_jsonl(path, ROWS[:3])
    old, seen = path.read_bytes(), []

    def rows(fail: bool):
        for i, row in enumerate(ROWS):
            yield row
            if i == 10:
                seen.append(path.read_bytes())  # a reader in the middle of the write
                if fail:
                    raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        io.write_jsonl(path, rows(fail=True))
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["augmented.jsonl"]
    assert io.write_jsonl(path, rows(fail=False)) == 20
    assert seen == [old, old], "a reader mid-write saw a partial file"
    assert io.read_jsonl(path) == ROWS


def test_digest_counts_rows_and_tells_each_kind_of_damage(tmp_path):
    path = tmp_path / "shard.jsonl"
    io.write_jsonl(path, ROWS)
    want = io.digest(path)
    assert want["rows"] == 20 and want["complete"] and want["bytes"] == path.stat().st_size
    assert io.differs(want, io.digest(path)) is None

    cut_last_line(path)
    why = io.differs(want, io.digest(path))
    assert "19 complete rows where 20 were written, the last one cut short" == why

    io.write_jsonl(path, ROWS)
    drop_row(path, 5)
    assert io.differs(want, io.digest(path)) == "19 complete rows where 20 were written"

    io.write_jsonl(path, ROWS)
    flip_bit(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] != ROWS  # still JSON, other content
    assert io.differs(want, io.digest(path)) == "same size as written but different bytes (corrupted)"


def test_digest_of_a_binary_file_has_no_rows(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"\x00\x01\n" * 10)
    d = io.digest(path)
    assert "rows" not in d and d["bytes"] == 30
    path.write_bytes(b"\x00\x01\n" * 9)
    assert io.differs(d, io.digest(path)) == "27 bytes where 30 were written"
