"""Atomic files: everything minibt writes appears whole or not at all (temp name, then rename).

A full disk is one line naming the file being written; its previous version stays as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minibt.errors import MinibtError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}  # no space left, quota exceeded: the user can free space and rerun


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing `path` into one MinibtError naming it; other errors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise MinibtError(f"{path}: {e.strerror or os.strerror(e.errno)} while writing it (the files written before "
                          f"are intact): free some space, then rerun the same command to resume") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def cache_dir() -> Path:
    """minibt's cache (toy bases, converted GGUF files, dequantized bases, nltk data): MINIBT_CACHE, else ~/.cache/minibt."""
    return Path(os.environ.get("MINIBT_CACHE") or Path.home() / ".cache" / "minibt")


def built_folder(final: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """`final`, made once by `build(tmp)` in a new folder beside it that is then renamed into place: the
    folder appears whole or not at all, and when another process made it first, that one is used."""
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file minibt wrote (user files go through minibt.data, which reports bad rows)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def digest(path: str | os.PathLike) -> dict[str, Any]:
    """What a file held when it was written, to tell later whether it still does: sha256, size, and
    for JSONL its rows (complete lines) and whether its last line is complete."""
    sha, size, lines, last = hashlib.sha256(), 0, 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
            lines += block.count(b"\n")
            last = block[-1:]
    out: dict[str, Any] = {"sha256": sha.hexdigest(), "bytes": size}
    if Path(path).suffix == ".jsonl":
        out.update(rows=lines, complete=last == b"\n" or size == 0)
    return out


def differs(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    """How a file's digest `got` departs from the recorded `want`, in words (None: it does not)."""
    if got["sha256"] == want["sha256"]:
        return None
    if "rows" in want and got.get("rows") != want["rows"]:
        cut = "" if got.get("complete", True) else ", the last one cut short"
        return f"{got['rows']} complete rows where {want['rows']} were written{cut}"
    if got["bytes"] != want["bytes"]:
        return f"{got['bytes']} bytes where {want['bytes']} were written"
    return "same size as written but different bytes (corrupted)"
