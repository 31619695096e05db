"""The unlabelled corpus, streamed: documents in, clean deduplicated passages out.

`prepare_corpus` applies, in order: segmentation of long documents, length filters, quality
heuristics, exact dedup, near dedup (MinHash + LSH), the passage limit. Nothing holds the corpus in
memory; dedup keeps only hashes (see `Dedup`).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minibt.data.common import BadRows, jsonl_rows, load_hub, open_binary
from minibt.errors import DataError
from minibt.io import write_jsonl
from minibt.recipe import CorpusSection

PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: small next to any row group, flat memory

# Segmentation boundaries, coarsest first: a text is cut at the coarsest level that brings its
# pieces under max_chars, and never inside a sentence (a "sentence" longer than max_chars is kept
# whole and then dropped as too long: such runs are tables, code or encoded blobs, not prose).
BOUNDARIES = [(re.compile(r"\n\s*\n"), "\n\n"), (re.compile(r"\n"), "\n"), (re.compile(r"(?<=[.!?])\s+"), " ")]

# Quality heuristics. A boilerplate line is navigation ("Home | About | Contact"), a short line with
# a site-chrome phrase, or a line that is nothing but a chrome word ("Log in", "Read more"); such lines
# are stripped from passages that are otherwise prose. The phrases are specific ("subscribe to our",
# not "subscribe") so that a plain sentence such as "She wants to sign up for the race." survives.
# Both match lowercased lines: an IGNORECASE alternation is ~5x slower, and this runs on every line.
CHROME_PHRASES = re.compile(
    r"cookie (policy|settings|preferences|consent)|(accept|we use|site uses) (all )?cookies|subscribe to (our|the)"
    r"|our newsletter|privacy policy|terms (of|and) (use|service|conditions)|all rights reserved"
    r"|skip to (main )?content|back to top|follow us on|share this (article|post|page|story)"
    r"|share on (facebook|twitter|linkedin)|click here to"
)
CHROME_LINES = re.compile(
    r"^\W*(©|copyright\b"
    r"|(log ?in|log ?out|sign (in|up|out)|register|read more|subscribe|menu|search|home|next|previous)\W*$)"
)
BOILERPLATE_MAX_LINE_CHARS = 100  # a longer line that mentions "privacy policy" is prose, not chrome
NAV_SEPARATORS = re.compile(r"\s[|•·»›>/]\s")
NAV_MIN_SEPARATORS = 2  # "A | B | C": three menu items make a navigation bar, two may be a title
NAV_MAX_ITEM_WORDS = 3  # menu items are a word or three; longer parts are a real sentence
SHORT_LINE_MAX_WORDS = 3  # "Products", "Contact us": menu entries listed one per line...
MIN_LINES_FOR_SHORT = 3  # ...count as junk only in a run of lines (a lone short passage is a title)
MAX_JUNK_SHARE = 0.5  # passages with more than half their characters in junk lines are navigation
MAX_SYMBOL_RATIO = 0.3  # non-alphanumeric share of non-space characters: prose ~0.05, tables and markup far above

# Near dedup: MinHash over word 5-grams (shingle size of common web dedup pipelines), LSH with
# 16 bands of 12 rows: a pair becomes a duplicate with probability 1-(1-J^12)^16, which is
# 0.5 near Jaccard J = (1/16)^(1/12) ~ 0.79, 0.2 at J = 0.7, 0.995 at J = 0.9.
SHINGLE_WORDS = 5
BANDS, ROWS = 16, 12
MINHASH_SEED = 1234
# The BANDS*ROWS hash functions are splitmix64's finalizer applied to (shingle hash XOR a random
# seed). Not a*x+b mod 2^61-1 on 32-bit hashes: there a*x rarely wraps, so most functions order
# shingles alike, and two 6-word facts sharing one of two shingles came out as near duplicates.
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_WORD = re.compile(r"\w+")
_SYMBOL = re.compile(r"[^\w\s]|_")  # neither letter, digit nor space
_SPACE = re.compile(r"\s")

COUNTS = ("read", "bad_rows", "documents", "passages", "too_short", "too_long", "low_quality",
          "exact_duplicates", "near_duplicates", "kept")


def iter_documents(section: CorpusSection) -> Iterator[str]:
    """Every document's text (stripped), streamed; malformed rows are skipped and reported at the end."""
    counts = dict.fromkeys(COUNTS, 0)
    bad = BadRows(_source(section), "corpus")
    for text, _ in _documents(section, counts, bad):
        yield text
    bad.check(counts["read"], section.max_bad_fraction)


def prepare_corpus(section: CorpusSection, out_path: Path) -> dict[str, int]:
    """Write passages as {"id", "text", ...} JSONL atomically; return what each step removed.

    Extra fields of local JSONL rows (e.g. the toy world's labels) are kept on a passage that is
    its whole document; segmented pieces carry only id and text.
    """
    counts = dict.fromkeys(COUNTS, 0)
    source = _source(section)
    bad = BadRows(source, "corpus")

    def rows() -> Iterator[dict[str, Any]]:
        yield from _passages(section, counts, bad)
        # checked before write_jsonl renames the file into place: a failed corpus leaves nothing
        bad.check(counts["read"], section.max_bad_fraction)
        if not counts["kept"]:
            raise DataError(f"{source}: no passage survived ({', '.join(f'{k} {v}' for k, v in counts.items())})")

    write_jsonl(out_path, rows())
    return counts


def _passages(section: CorpusSection, counts: dict[str, int], bad: BadRows) -> Iterator[dict[str, Any]]:
    dedup = Dedup() if section.dedup else None
    min_chars = max(1, section.min_chars)  # an empty passage is always too short
    for text, extras in _documents(section, counts, bad):
        counts["documents"] += 1
        pieces = segment(text, section.max_chars)
        for piece in pieces:
            counts["passages"] += 1
            if len(piece) < min_chars:
                counts["too_short"] += 1
                continue
            if section.max_chars and len(piece) > section.max_chars:
                counts["too_long"] += 1
                continue
            cleaned = clean_passage(piece, min_chars)
            if cleaned is None:
                verdict: str | None = "low_quality"
            else:
                verdict = dedup.check(cleaned) if dedup else None
            if verdict:
                counts[verdict] += 1
                continue
            row = {"id": counts["kept"], "text": cleaned, **(extras if len(pieces) == 1 else {})}
            counts["kept"] += 1
            yield row
            if section.limit is not None and counts["kept"] >= section.limit:
                return


# --- sources ---------------------------------------------------------------------------------


def _source(section: CorpusSection) -> str:
    return f"{section.dataset}[{section.split}]" if section.dataset else str(section.path)


def _documents(section: CorpusSection, counts: dict[str, int], bad: BadRows) -> Iterator[tuple[str, dict[str, Any]]]:
    """(text, extra fields) per valid row; malformed rows go to `bad`. Counts rows read."""
    col = section.text_column
    for where, row, why in _rows(section):
        counts["read"] += 1
        text = row.get(col) if isinstance(row, dict) else None
        if why or not isinstance(text, str):
            if why:
                problem = why
            elif not isinstance(row, dict) or col not in row:
                problem = f"no {col!r} field"
            else:
                problem = f"{col!r} is {'null' if text is None else type(text).__name__}, not a string"
            bad.add(where, problem)
            counts["bad_rows"] += 1
            continue
        assert isinstance(row, dict)  # text is a string only when read from a dict row
        yield text.strip(), {k: v for k, v in row.items() if k not in (col, "id", "text")}


def _rows(section: CorpusSection) -> Iterator[tuple[str, Any | None, str | None]]:
    if section.dataset:
        yield from _hub_rows(section)
        return
    path = Path(section.path or "")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path, section.text_column)
    elif suffix == ".txt":
        yield from _text_rows(path, section.text_column)
    else:
        raise DataError(f"{path}: unsupported corpus file type {suffix or '(none)'} (use .jsonl, .parquet, .txt)")


def _hub_rows(section: CorpusSection) -> Iterator[tuple[str, Any | None, str | None]]:
    assert section.dataset is not None  # _rows comes here only for a hub dataset
    ds = load_hub(section.dataset, section.name, section.split, streaming=True)
    columns = ds.column_names  # None when the hub does not declare features
    if columns is not None and section.text_column not in columns:
        raise DataError(
            f"{_source(section)}: no column {section.text_column!r} (columns: {columns}); set corpus.text_column"
        )
    for i, row in enumerate(ds):
        # hub rows can carry large extra fields (html, metadata): only the text travels on
        yield f"row {i}", {section.text_column: row.get(section.text_column)}, None


def _parquet_rows(path: Path, column: str) -> Iterator[tuple[str, Any | None, str | None]]:
    import pyarrow.parquet as pq

    open_binary(path).close()  # the usual missing / empty file messages
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise DataError(f"{path}: unreadable Parquet file: {e}") from None
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names}); set corpus.text_column")
    i = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        for text in batch.column(0).to_pylist():
            yield f"row {i}", {column: text}, None
            i += 1


def _text_rows(path: Path, column: str) -> Iterator[tuple[str, Any | None, str | None]]:
    """Plain text: documents are separated by blank lines."""
    lines: list[str] = []
    start = 0
    with open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {n} is not UTF-8 text") from None
            if line.strip():
                start = start if lines else n
                lines.append(line)
            elif lines:
                yield f"line {start}", {column: "\n".join(lines)}, None
                lines = []
    if lines:
        yield f"line {start}", {column: "\n".join(lines)}, None


# --- segmentation and quality ------------------------------------------------------------------


def segment(text: str, max_chars: int) -> list[str]:
    """Cut a text into passages of at most max_chars at paragraph, line, then sentence boundaries.

    Pieces are packed greedily toward an even size (len / number of passages needed), so a text just
    over the limit gives two halves rather than a full passage and a scrap.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    target = len(text) / math.ceil(len(text) / max_chars)
    passages, current = [], ""
    for sep, unit in _units(text, max_chars, 0):
        if current and (len(current) >= target or len(current) + len(sep) + len(unit) > max_chars):
            passages.append(current)
            current = unit
        else:
            current = f"{current}{sep}{unit}" if current else unit
    return passages + [current] if current else passages


def _units(text: str, max_chars: int, level: int) -> list[tuple[str, str]]:
    """(separator before it, unit) pairs, each unit <= max_chars unless it is one sentence."""
    if len(text) <= max_chars or level == len(BOUNDARIES):
        return [("", text)]
    pattern, sep = BOUNDARIES[level]
    out: list[tuple[str, str]] = []
    for piece in pattern.split(text):
        if piece.strip():
            sub = _units(piece.strip(), max_chars, level + 1)
            out.append((sep if out else "", sub[0][1]))  # the piece's first unit follows this level's separator
            out.extend(sub[1:])
    return out


def clean_passage(text: str, min_chars: int = 1) -> str | None:
    """The passage without boilerplate lines, or None when it is mostly chrome, symbols, or too short after."""
    lines = text.split("\n")
    content = [line for line in lines if line.strip()]
    boiler = {i for i, line in enumerate(lines) if _is_boilerplate(line)}
    menu_like = len(content) >= MIN_LINES_FOR_SHORT
    junk = sum(len(line) for i, line in enumerate(lines) if i in boiler or (menu_like and _is_short(line)))
    if junk > MAX_JUNK_SHARE * sum(len(line) for line in content):
        return None
    kept = "\n".join(line for i, line in enumerate(lines) if i not in boiler)
    kept = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", kept).strip()  # stripped lines leave no blank runs
    visible = len(kept) - len(_SPACE.findall(kept))
    if len(kept) < min_chars or len(_SYMBOL.findall(kept)) > MAX_SYMBOL_RATIO * visible:
        return None
    return kept


def _is_boilerplate(line: str) -> bool:
    line = line.strip()
    if not line:
        return False
    parts = NAV_SEPARATORS.split(line)
    if len(parts) > NAV_MIN_SEPARATORS and all(len(p.split()) <= NAV_MAX_ITEM_WORDS for p in parts):
        return True
    if len(line) > BOILERPLATE_MAX_LINE_CHARS:
        return False
    line = line.lower()
    return CHROME_LINES.match(line) is not None or CHROME_PHRASES.search(line) is not None


def _is_short(line: str) -> bool:
    words = line.split()
    return 0 < len(words) <= SHORT_LINE_MAX_WORDS and not line.rstrip().endswith((".", "!", "?", ":"))


# --- dedup -----------------------------------------------------------------------------------


class Dedup:
    """Exact and near-duplicate memory: 8-byte digests, no text.

    Per kept passage: one exact digest and BANDS band keys, Python ints in sets (~1.5 KB), so
    memory grows with passages kept, never with their length; `corpus.limit` bounds it.
    """

    def __init__(self) -> None:
        self.exact: set[int] = set()
        self.bands: set[int] = set()
        self.seeds = np.random.default_rng(MINHASH_SEED).integers(0, 1 << 64, size=BANDS * ROWS, dtype=np.uint64)

    def check(self, text: str) -> str | None:
        """None for a new passage (remembered), else the name of the duplicate kind."""
        words = _WORD.findall(text.lower())
        norm = " ".join(words)  # case, punctuation and spacing do not make a text new
        digest = _digest(norm.encode())
        if digest in self.exact:
            return "exact_duplicates"
        self.exact.add(digest)
        keys = self._band_keys(words)
        if any(k in self.bands for k in keys):
            return "near_duplicates"
        self.bands.update(keys)
        return None

    def _band_keys(self, words: list[str]) -> list[int]:
        if not words:
            return []
        n = min(SHINGLE_WORDS, len(words))
        shingles = {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
        z = x[:, None] ^ self.seeds  # one column per hash function; uint64 arithmetic wraps
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        signature = (z ^ (z >> np.uint64(31))).min(axis=0)
        return [_digest(bytes([i]) + band.tobytes()) for i, band in enumerate(signature.reshape(BANDS, ROWS))]


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
