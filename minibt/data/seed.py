"""Seed (instruction, output) pairs from a local JSONL / JSON / Parquet file or a hub dataset.

Formats: `pairs` (two columns, common names recognised), `oasst` (OpenAssistant message trees:
the paper's seed is the English first turns with the rank-0 reply), `messages` (chat rows).
Open Assistant comes in two layouts: flat message rows (the HF `OpenAssistant/oasst1` schema) and the
official export, one tree per line (`*.trees.jsonl[.gz]`); trees are flattened into the flat rows,
so one selection rule serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from minibt.data.common import BadRows, jsonl_rows, load_hub, open_binary
from minibt.errors import DataError
from minibt.recipe import SeedSection

Record = tuple[str, Any | None, str | None]  # (where, row, why it is broken)

# auto mode: the first (instruction, output) column pair present in the data wins
PAIR_COLUMNS = [("instruction", "output"), ("prompt", "response"), ("prompt", "completion"), ("question", "answer")]
OASST_COLUMNS = {"message_id", "parent_id", "role", "text"}
OASST_TREE_COLUMNS = {"message_tree_id", "prompt"}  # the export's tree: the root message under `prompt`
OASST_TREE_FIELDS = ("message_tree_id", "tree_state")  # kept on the tree in the export, on each row when flat
USER_ROLES = {"user", "human", "prompter"}  # prompter: oasst; human: ShareGPT
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}


class _BadRow(Exception):
    """A row that cannot give a pair: counted and skipped (the message says why)."""


def load_seed(section: SeedSection) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Rows {"instruction", "output"} in source order, and counts of what was read and dropped."""
    source, columns, records = _read(section)
    fmt = _detect(section, columns, source)
    if fmt == "oasst" and _is_tree_export(columns):
        records = _flatten_trees(records)  # "read" then counts messages, as for the flat layout
    bad = BadRows(source, "seed")
    counts = {"read": len(records), "bad_rows": 0, "kept": 0}
    if fmt == "oasst":
        pairs = _oasst_pairs(records, bad, counts)
    else:
        pairs = _row_pairs(records, bad, _pair_columns(section, columns, source) if fmt == "pairs" else None)
    counts["bad_rows"] = bad.count
    bad.check(len(records), section.max_bad_fraction)
    if not pairs:
        raise DataError(f"{source}: no usable {fmt} rows ({_describe(counts)})")
    pairs = pairs[: section.limit] if section.limit is not None else pairs
    counts["kept"] = len(pairs)
    return pairs, counts


# --- reading --------------------------------------------------------------------------------


def _read(section: SeedSection) -> tuple[str, set[str], list[Record]]:
    """(source name for messages, the column names seen, every record). Seeds are small: all in memory."""
    if section.dataset:
        ds = load_hub(section.dataset, None, section.split, streaming=False)
        records: list[Record] = [(f"row {i}", r, None) for i, r in enumerate(ds)]
        return f"{section.dataset}[{section.split}]", set(ds.column_names), records
    path = Path(section.path or "")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
        records = list(jsonl_rows(path))
    elif suffix == ".json":
        records = _json_records(path)
    elif suffix == ".parquet":
        records = _parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported seed file type {suffix or '(none)'} (use .jsonl, .jsonl.gz, .json, .parquet)")
    if not records:
        raise DataError(f"{path}: no rows")
    columns = set().union(*(r.keys() for _, r, _ in records if isinstance(r, dict)))
    return str(path), columns, records


def _json_records(path: Path) -> list[Record]:
    with open_binary(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except ValueError as e:
        if getattr(e, "msg", "") == "Extra data":  # one object per line under a .json name: JSON Lines
            return list(jsonl_rows(path))
        raise DataError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return [(f"row {i}", r, None) for i, r in enumerate(data)]


def _parquet_records(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    open_binary(path).close()  # the usual missing / empty file messages
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise DataError(f"{path}: unreadable Parquet file: {e}") from None
    return [(f"row {i}", r, None) for i, r in enumerate(rows)]


# --- formats ---------------------------------------------------------------------------------


def _detect(section: SeedSection, columns: set[str], source: str) -> str:
    if section.format != "auto":
        return section.format
    if section.columns:
        return "pairs"
    if OASST_COLUMNS <= columns or _is_tree_export(columns):
        return "oasst"
    if columns & {"messages", "conversations"}:
        return "messages"
    if any(set(p) <= columns for p in PAIR_COLUMNS):
        return "pairs"
    raise DataError(
        f"{source}: cannot tell the seed format from columns {sorted(columns)}; set seed.format and seed.columns"
    )


def _pair_columns(section: SeedSection, columns: set[str], source: str) -> dict[str, str | None]:
    instruction, output = next((p for p in PAIR_COLUMNS if set(p) <= columns), PAIR_COLUMNS[0])
    cols: dict[str, str | None] = {"instruction": instruction, "output": output, **section.columns}
    for target in ("instruction", "output"):
        if cols[target] not in columns:
            raise DataError(
                f"{source}: no column {cols[target]!r} for the {target} (columns: {sorted(columns)}); set seed.columns"
            )
    # alpaca: a non-empty `input` belongs to the instruction
    cols["input"] = "input" if cols["instruction"] == "instruction" and "input" in columns else None
    return cols


def _row_pairs(
    records: Iterable[Record], bad: BadRows, cols: dict[str, str | None] | None
) -> list[dict[str, str]]:
    """One pair per row: `cols` for the pairs format, None for chat messages."""
    pairs = []
    for where, row, why in records:
        try:
            row = _object(row, why)
            pairs.append(_messages_pair(row) if cols is None else _columns_pair(row, cols))
        except _BadRow as e:
            bad.add(where, str(e))
    return pairs


def _object(row: Any, why: str | None) -> dict:
    """The record as a JSON object, or _BadRow saying why it is not one."""
    if why:
        raise _BadRow(why)
    if not isinstance(row, dict):
        raise _BadRow(f"not an object but {type(row).__name__}")
    return row


def _columns_pair(row: dict, cols: dict[str, str | None]) -> dict[str, str]:
    instruction = _text(row, cols["instruction"])
    extra = row.get(cols["input"]) if cols["input"] else None
    if extra is not None and not isinstance(extra, str):
        raise _BadRow(f"{cols['input']!r} is {type(extra).__name__}, not a string")
    if extra and extra.strip():
        instruction = f"{instruction}\n\n{extra.strip()}"
    return {"instruction": instruction, "output": _text(row, cols["output"])}


def _messages_pair(row: dict) -> dict[str, str]:
    """The first user turn and the first assistant reply after it; system turns are dropped."""
    key = "conversations" if "conversations" in row and "messages" not in row else "messages"
    turns = row.get(key)
    if not isinstance(turns, list):
        raise _BadRow(f"{key!r} is missing or not a list")
    instruction = None
    for turn in turns:
        if not isinstance(turn, dict):
            raise _BadRow(f"a turn in {key!r} is not an object")
        text_key = "content" if "content" in turn else "value"  # ShareGPT: {from, value}
        role = str(turn.get("role", turn.get("from", ""))).lower()
        if instruction is None and role in USER_ROLES:
            instruction = _text(turn, text_key)
        elif instruction is not None and role in ASSISTANT_ROLES:
            return {"instruction": instruction, "output": _text(turn, text_key)}
    raise _BadRow("no user turn followed by an assistant reply")


def _is_tree_export(columns: set[str]) -> bool:
    return OASST_TREE_COLUMNS <= columns and not OASST_COLUMNS <= columns


def _flatten_trees(records: Iterable[Record]) -> list[Record]:
    """Each tree's messages as flat rows, depth first (as oasst_data's tree_to_messages writes them).
    A tree whose structure is broken becomes one bad record; a broken message inside a sound tree is
    left for the flat reader to judge, named by its place ("line 3 prompt.replies[1]")."""
    flat: list[Record] = []
    for where, tree, why in records:
        try:
            flat += _tree_rows(where, _object(tree, why))
        except _BadRow as e:
            flat.append((where, None, str(e)))
    return flat


def _tree_rows(where: str, tree: dict) -> list[Record]:
    root = tree.get("prompt")
    if not isinstance(root, dict):
        raise _BadRow(f"malformed tree: 'prompt' is {type(root).__name__}, not a message object")
    shared = {k: tree.get(k) for k in OASST_TREE_FIELDS}
    rows: list[Record] = []
    stack: list[tuple[dict, str | None, str]] = [(root, None, "prompt")]  # no recursion: trees can be deep
    while stack:
        node, parent_id, place = stack.pop()
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise _BadRow(f"malformed tree: {place}.replies is {type(replies).__name__}, not a list")
        # parent_id from the nesting (the export may omit it); never None below the root, so a reply
        # whose parent lacks an id cannot pass for a root
        message = {k: v for k, v in node.items() if k != "replies"}
        rows.append((f"{where} {place}", {**message, **shared, "parent_id": parent_id}, None))
        own_id = node.get("message_id")
        child_parent = own_id if isinstance(own_id, str) and own_id else f"{where} {place}"
        for i in reversed(range(len(replies))):
            if not isinstance(replies[i], dict):
                raise _BadRow(f"malformed tree: {place}.replies[{i}] is {type(replies[i]).__name__}, not an object")
            stack.append((replies[i], child_parent, f"{place}.replies[{i}]"))
    return rows


def _oasst_pairs(records: Iterable[Record], bad: BadRows, counts: dict[str, int]) -> list[dict[str, str]]:
    """The paper's seed: per English tree, the prompter root and its rank-0 assistant reply."""
    counts.update(skipped_deleted=0, trees=0, filtered_lang=0, no_rank0_reply=0)
    roots: list[dict[str, Any]] = []
    best_reply: dict[Any, dict[str, Any]] = {}  # parent id -> its rank-0 assistant reply
    for where, row, why in records:
        try:
            row = _object(row, why)
            msg = {k: _text(row, k) for k in ("message_id", "role", "text")}
        except _BadRow as e:
            bad.add(where, str(e))
            continue
        if row.get("deleted") or row.get("review_result") is False:
            counts["skipped_deleted"] += 1
        elif row.get("parent_id") is None and msg["role"] == "prompter":
            roots.append({**msg, "lang": row.get("lang")})
        elif msg["role"] == "assistant" and row.get("rank") == 0:
            best_reply.setdefault(row.get("parent_id"), {**msg, "lang": row.get("lang")})
    pairs = []
    for root in roots:
        reply = best_reply.get(root["message_id"])
        if root["lang"] != "en":
            counts["filtered_lang"] += 1
        elif reply is None or reply["lang"] != "en":
            counts["no_rank0_reply"] += 1
        else:
            pairs.append({"instruction": root["text"], "output": reply["text"]})
    counts["trees"] = len(roots)
    return pairs


def _text(row: dict, key: str | None) -> str:
    value = row.get(key) if key else None
    if value is None:
        raise _BadRow(f"missing {key!r}")
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise _BadRow(f"{key!r} is empty")
    return value.strip()


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if k != "kept")
