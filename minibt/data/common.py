"""What the seed and corpus loaders share: opening user files, reading JSONL line by line,
tallying malformed rows, loading from the hub.

Row locations: "line N" (1-based) in JSONL and text files; "row N" (0-based, as `dataset[N]`) in
JSON arrays, Parquet files and hub datasets.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from minibt.errors import DataError

log = logging.getLogger("minibt.data")

SHOWN_BAD_ROWS = 5  # locations named in a warning or error: enough to find the pattern, still one line


class BadRows:
    """Counts malformed rows and remembers where the first few were."""

    def __init__(self, source: str, key: str):
        self.source, self.key = source, key  # key: the recipe section, for the error message
        self.count = 0
        self.first: list[str] = []

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.first) < SHOWN_BAD_ROWS:
            self.first.append(f"{where}: {why}")

    def check(self, read: int, max_fraction: float) -> None:
        """Warn about skipped rows; raise DataError when their share is above `max_fraction`."""
        if not self.count:
            return
        more = "; ..." if self.count > len(self.first) else ""
        detail = f"{self.count} of {read} rows malformed ({'; '.join(self.first)}{more})"
        if self.count > max_fraction * read:
            raise DataError(f"{self.source}: {detail}, more than {self.key}.max_bad_fraction={max_fraction}")
        log.warning("%s: skipped %s", self.source, detail)


def open_binary(path: Path) -> BinaryIO:
    """Open a user file, turning the usual failures into one-line DataErrors."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if Path(path).stat().st_size == 0:
        f.close()
        raise DataError(f"{path}: file is empty")
    return f


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any | None, str | None]]:
    """Yield (where, parsed value, None) per non-blank line, or (where, None, why) for a broken one.
    A name ending in .gz is read through gzip (the Open Assistant export ships as .jsonl.gz)."""
    # bytes, so one line of bad UTF-8 is one bad row rather than an unreadable file
    with open_binary(path) as raw_file:
        f = gzip.GzipFile(fileobj=raw_file) if Path(path).name.lower().endswith(".gz") else raw_file
        try:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(raw), None
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    yield f"line {n}", None, f"not JSON ({str(e).split(':')[0]})"
        except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt: the whole file is suspect
            if f is raw_file:
                raise
            raise DataError(f"{path}: broken gzip file: {e}") from None


def field_rows(path: str | Path, field: str, nonempty: bool = False) -> list[dict[str, Any]]:
    """The rows of a JSONL file of objects with a string `field` (`nonempty`: not blank either), checked before
    any model loads; a bad row is a DataError naming the file and line."""
    path = Path(path)
    need = f"a non-empty string field {field!r}" if nonempty else f"a string field {field!r}"
    rows: list[dict[str, Any]] = []
    for where, row, why in jsonl_rows(path):
        if why is None and not (isinstance(row, dict) and isinstance(row.get(field), str) and (row[field].strip() or not nonempty)):
            why = f"needs {need}"
        if why is not None:
            raise DataError(f"{path}: {where}: {why}")
        assert isinstance(row, dict)  # checked above: a row without a problem is a dict
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_hub(dataset: str, name: str | None, split: str, streaming: bool) -> Any:
    """`datasets.load_dataset`, with any failure (unknown id, split, no network) as one DataError."""
    import datasets  # slow import: only when a hub dataset is asked for

    try:
        return datasets.load_dataset(dataset, name, split=split, streaming=streaming)
    except Exception as e:  # the hub fails in many ways; the user needs the id and the reason
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{dataset}: cannot load split {split!r}: {type(e).__name__}: {reason}") from None
