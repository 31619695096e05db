"""The run directory: one writer at a time (an OS lock), outputs checked against their recorded
checksums before they are used again, a corrupt manifest named with the way to rebuild it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fault_injection import cut_last_line, drop_row, flip_bit
from minibt import io
from minibt.cli import main
from minibt.errors import MinibtError
from minibt.rundir import LOCK, RunDir


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a run in progress would."""
    code = textwrap.dedent(f"""
        import time
        from minibt.rundir import RunDir
        RunDir({str(path)!r}, read_manifest=False).lock()
        print("locked", flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def held_run(finished_run):
    """The shared finished run, its lock held by another process for the duration of a test."""
    root, run, _ = finished_run
    holder = hold_lock(run)
    yield root, run, holder
    if holder.poll() is None:
        holder.kill()
        holder.wait()


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_holder(held_run):
    root, run, holder = held_run
    before = (run / "manifest.json").read_bytes()
    t0 = time.time()
    result = invoke("run", str(root / "tiny.yaml"), "--out", str(run))
    assert result.exit_code == 2, result.output
    assert time.time() - t0 < 10
    message = result.output.strip()
    assert "\n" not in message and message.startswith("error: ")
    assert f"pid {holder.pid} on {socket.gethostname()}" in message
    assert "wait for that run to end" in message and "--out" in message
    assert (run / "manifest.json").read_bytes() == before, "the refused run wrote nothing"


def test_readers_work_while_a_run_holds_the_folder_and_eval_waits(held_run, tmp_path):
    root, run, holder = held_run
    assert invoke("report", str(run)).exit_code == 0
    questions = tmp_path / "q.jsonl"
    io.write_jsonl(questions, [{"instruction": "What is the color of the king?"}])
    result = invoke("generate", str(run), "--adapter", "m1", "-i", str(questions), "-o", str(tmp_path / "a.jsonl"),
                    "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert len(io.read_jsonl(tmp_path / "a.jsonl")) == 1
    result = invoke("chat", str(run), "--adapter", "m0", input="/exit\n")
    assert result.exit_code == 0, result.output
    result = invoke("export", str(run), "--adapter", "m1", "--adapter-only", "--out", str(tmp_path / "m1"))
    assert result.exit_code == 0, result.output

    result = invoke("eval", str(run), "--no-pairwise", "--toy")  # eval writes metrics.json: it takes the lock
    assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output


def test_a_lock_left_by_a_killed_process_does_not_block(held_run):
    root, run, holder = held_run
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run / LOCK).read_text().startswith(f"pid {holder.pid} "), "the dead holder's note is still there"
    result = invoke("run", str(root / "tiny.yaml"), "--out", str(run))  # finished: checks its files, loads nothing
    assert result.exit_code == 0, result.output
    with RunDir.open(run).locked() as rd:  # and the run released it when it ended
        assert (run / LOCK).read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(MinibtError, match=f"in use by pid {os.getpid()}"):
            RunDir.open(run).lock()  # a second holder, even in the same process
    assert rd._lock_fd is None


def test_a_new_run_is_not_created_inside_a_folder_of_other_files(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "r.yaml").write_text(f"model: {{name: {tiny_model_dir}, device: cpu}}\nseed: {{path: r.yaml}}\n"
                                     f"corpus: {{path: r.yaml}}\n")
    result = invoke("run", str(tmp_path / "r.yaml"), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is not a minibt run" in result.output, result.output
    assert not (tmp_path / LOCK).exists(), "nothing written into a folder that is not a run"


# --- a corrupt manifest -------------------------------------------------------------------------


def test_a_corrupt_manifest_is_one_line_saying_how_to_rebuild_it(finished_run, tmp_path):
    _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 2])  # cut short
    result = invoke("report", str(copy))
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "manifest.json is not valid JSON" in line and f"minibt repair {copy}" in line
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(MinibtError, match="not a minibt manifest"):
        RunDir.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(MinibtError, match="has no manifest.json: rebuild it .* minibt repair"):
        RunDir.open(copy)


# --- outputs checked before use ------------------------------------------------------------------


def finished_stage(tmp_path: Path, stage: str, files: dict[str, bytes | list]) -> RunDir:
    rd = RunDir(tmp_path)
    rd.manifest = {"stages": {}}
    with rd.stage(stage, [tmp_path / rel for rel in files]):
        for rel, content in files.items():
            if isinstance(content, list):
                io.write_jsonl(tmp_path / rel, content)
            else:
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / rel).write_bytes(content)
    return RunDir(tmp_path)  # as a later run reads it


ROWS = [{"id": i, "instruction": f"question {i}", "output": f"answer {i}"} for i in range(6)]


def test_the_manifest_records_each_outputs_sha256_size_and_rows(tmp_path):
    import hashlib

    rd = finished_stage(tmp_path, "augment", {"data/augmented.jsonl": ROWS, "data/blob.bin": b"\x00\x01" * 7})
    files = rd.manifest["files"]
    for rel in ("data/augmented.jsonl", "data/blob.bin"):
        data = (tmp_path / rel).read_bytes()
        assert files[rel]["sha256"] == hashlib.sha256(data).hexdigest() and files[rel]["bytes"] == len(data)
    assert files["data/augmented.jsonl"]["rows"] == len(ROWS) and "rows" not in files["data/blob.bin"]
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == files, "saved as recorded"
    assert rd.problem(tmp_path / "data" / "blob.bin") is None
    (tmp_path / "data" / "blob.bin").write_bytes(b"\x00\x02" * 7)
    assert rd.problem(tmp_path / "data" / "blob.bin") == "same size as written but different bytes (corrupted)"


@pytest.mark.parametrize("damage", [cut_last_line, flip_bit, drop_row, Path.unlink])
def test_a_damaged_data_file_of_a_finished_stage_is_redone_and_logged(tmp_path, caplog, damage):
    rd = finished_stage(tmp_path, "augment", {"data/augmented.jsonl": ROWS})
    assert rd.manifest["stages"]["augment"]["outputs"] == ["data/augmented.jsonl"]
    assert rd.manifest["files"]["data/augmented.jsonl"]["rows"] == 6
    assert rd.done("augment")
    damage(rd.data("augmented"))
    rd = RunDir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="minibt"):
        assert not rd.done("augment")
        assert not rd.done("augment")  # asked again: the same answer, logged once
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("data/augmented.jsonl: ") and said[0].endswith(": redoing augment"), said


def test_an_adapter_without_its_weights_is_an_error_naming_them(tmp_path):
    weights = "adapters/m0/adapter_model.safetensors"
    rd = finished_stage(tmp_path, "m0", {weights: b"weights" * 10, "adapters/m0/adapter_config.json": b"{}"})
    assert rd.done("m0")
    (tmp_path / weights).unlink()
    for check in (lambda: rd.done("m0"), lambda: rd.check_adapter("m0")):
        with pytest.raises(MinibtError) as e:
            check()
        assert str(tmp_path / weights) in str(e.value) and "missing" in str(e.value)
        assert f"delete {tmp_path / 'adapters/m0'}" in str(e.value)
    (tmp_path / weights).write_bytes(b"weightz" * 10)  # the same size, other bytes
    with pytest.raises(MinibtError, match="different bytes"):
        rd.check_adapter("m0")
    shutil.rmtree(tmp_path / "adapters/m0")
    assert not rd.done("m0"), "a deleted adapter folder is retrained"


def test_session_refuses_an_adapter_folder_without_weights(finished_run, tmp_path):
    import minibt

    _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "adapters/m0/adapter_model.safetensors").unlink()
    with pytest.raises(MinibtError, match=r"adapter 'm0': .*adapters/m0/adapter_model.safetensors: missing"):
        minibt.open_run(copy, adapters=["m0"])
    result = invoke("run", str(finished_run[0] / "tiny.yaml"), "--out", str(copy))  # on resume too
    assert result.exit_code == 2 and "adapters/m0/adapter_model.safetensors: missing" in result.output, result.output
