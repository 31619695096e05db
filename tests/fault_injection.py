"""Faults on purpose, for the tests: a disk that fills up mid-write, files damaged after they were written."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingFile:
    """A real file that takes `room` more characters, then fails as a full disk does (what fit stays written)."""

    def __init__(self, f, room: int, failed: list[str]):
        self._f, self._room, self._failed = f, room, failed

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            self._failed.append(self._f.name)
            raise _no_space()
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, name_part: str, room: int = 40) -> list[str]:
    """minibt.io's writes to files whose name contains `name_part` fail with ENOSPC after `room` characters.
    Returns the list the failing temp files' names are appended to; `monkeypatch.undo()` gives the space back."""
    import minibt.io

    failed: list[str] = []

    def open_(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FillingFile(f, room, failed) if "w" in mode and name_part in Path(file).name else f

    monkeypatch.setattr(minibt.io, "open", open_, raising=False)
    return failed


def fill_disk_for_adapters(monkeypatch, adapter: str) -> list[str]:
    """peft's safetensors save of adapter `adapter` writes a few bytes, then fails with ENOSPC."""
    import peft.peft_model

    real = peft.peft_model.safe_save_file
    failed: list[str] = []

    def save(tensors, filename, *args, **kwargs):
        if f".{adapter}." in str(filename):  # Engine.save_adapter writes into a temp folder .<name>.XXXX
            Path(filename).write_bytes(b"\0" * 16)
            failed.append(str(filename))
            raise _no_space()
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    return failed


def cut_last_line(path: Path) -> None:
    """A half-written last line (the file as a crash mid-write would leave it without atomic writes)."""
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n")
    path.write_bytes(data[: last + 1 + (len(data) - last) // 2])


def flip_bit(path: Path, offset: int | None = None) -> None:
    """One bit flipped, in a letter inside the file: it stays valid JSON, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    i = offset if offset is not None else next(k for k in range(len(data) // 2, len(data)) if chr(data[k]).isalpha())
    data[i] ^= 0x20  # a letter's case: a->A
    path.write_bytes(bytes(data))


def drop_row(path: Path, index: int = 0) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[index]
    path.write_bytes(b"".join(lines))
