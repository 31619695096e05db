"""Seed loading: each format on the fixtures, the oasst first-turn selection, every error path."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest

from minibt.data import load_seed
from minibt.errors import DataError
from minibt.io import read_jsonl
from minibt.recipe import SeedSection

FIXTURES = Path(__file__).parent.parent / "fixtures"

OASST_PAIRS = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "Write a haiku about autumn.", "output": "Crimson leaves drifting\nacross the quiet river\nautumn breathes softly"},
    {"instruction": "How do I reverse a list in Python?",
     "output": "Use `my_list[::-1]` for a reversed copy, or `my_list.reverse()` to reverse in place."},
]
OASST_COUNTS = {"read": 22, "bad_rows": 0, "kept": 3, "skipped_deleted": 3, "trees": 7, "filtered_lang": 2, "no_rank0_reply": 2}


def seed(name: str, **kw) -> SeedSection:
    return SeedSection(path=str(FIXTURES / name), **kw)


# --- oasst -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "oasst"])
def test_oasst_first_turn_english_rank0(fmt):
    # kept: trees 1, 2, 8. Dropped: German and Spanish trees, a deleted root, a rank-0 reply that
    # failed review (its rank-1 sibling is not promoted), an unranked reply, and every deeper turn
    rows, counts = load_seed(seed("oasst_tiny.jsonl", format=fmt))
    assert rows == OASST_PAIRS
    assert counts == OASST_COUNTS


def test_oasst_from_hub_layout(hub_dir):
    # the same messages as a parquet shard in a hub-style folder, through the real load_dataset
    section = SeedSection(dataset=hub_dir(read_jsonl(FIXTURES / "oasst_tiny.jsonl")), split="train")
    rows, counts = load_seed(section)
    assert rows == OASST_PAIRS
    assert counts == OASST_COUNTS


def test_oasst_limit():
    rows, counts = load_seed(seed("oasst_tiny.jsonl", limit=2))
    assert rows == OASST_PAIRS[:2] and counts["kept"] == 2


# --- oasst tree export (one message tree per line, nested replies) ---------------------------


def _make_fixtures():
    """tests/fixtures/make_fixtures.py as a module: its flat -> tree nesting is the tests' oracle."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree_messages(node: dict, parent=None):
    """(message_id, parent, role, text, lang, rank, deleted, review_result) of a tree, walked here on
    its own so the twin check does not lean on the reader under test."""
    yield (node["message_id"], parent, *(node[k] for k in ("role", "text", "lang", "rank", "deleted", "review_result")))
    for reply in node.get("replies") or []:
        yield from _tree_messages(reply, node["message_id"])


def test_oasst_tree_fixture_is_the_flat_fixture_nested():
    flat = read_jsonl(FIXTURES / "oasst_tiny.jsonl")
    trees = read_jsonl(FIXTURES / "oasst_tiny.trees.jsonl")
    keys = ("message_id", "parent_id", "role", "text", "lang", "rank", "deleted", "review_result")
    assert sorted(m for t in trees for m in _tree_messages(t["prompt"])) == sorted(tuple(r[k] for k in keys) for r in flat)
    assert all(set(t) == {"message_tree_id", "tree_state", "prompt", "origin"} and "message_tree_id" not in t["prompt"] for t in trees)
    with gzip.open(FIXTURES / "oasst_tiny.trees.jsonl.gz", "rt", encoding="utf-8") as f:
        assert f.read() == (FIXTURES / "oasst_tiny.trees.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["auto", "oasst"])
@pytest.mark.parametrize("name", ["oasst_tiny.trees.jsonl", "oasst_tiny.trees.jsonl.gz"])
def test_oasst_tree_export_gives_the_flat_twins_pairs(name, fmt):
    rows, counts = load_seed(seed(name, format=fmt))
    assert (rows, counts) == load_seed(seed("oasst_tiny.jsonl"))
    assert rows == OASST_PAIRS and counts == OASST_COUNTS


def _one_tree(**edits) -> list[dict]:
    """Flat rows of one tree: an English prompter root, replies a (rank 0) and b (rank 1); `edits`
    maps a message name (root, a, b) to the fields to change."""
    base = {"parent_id": None, "lang": "en", "rank": None, "deleted": False, "review_result": True,
            "message_tree_id": "t", "tree_state": "ready_for_export", "emojis": None, "labels": {"name": [], "value": [], "count": []}}
    rows = {
        "root": {**base, "message_id": "root", "role": "prompter", "text": "Name a large cat."},
        "a": {**base, "message_id": "a", "parent_id": "root", "role": "assistant", "text": "A tiger.", "rank": 0},
        "b": {**base, "message_id": "b", "parent_id": "root", "role": "assistant", "text": "A lion.", "rank": 1},
    }
    for name, fields in edits.items():
        rows[name].update(fields)
    return list(rows.values())


TIGER, LION = {"instruction": "Name a large cat.", "output": "A tiger."}, {"instruction": "Name a large cat.", "output": "A lion."}


@pytest.mark.parametrize("edits, pairs, dropped_by", [
    ({}, [TIGER], None),
    ({"root": {"deleted": True}}, [], "skipped_deleted"),
    ({"root": {"review_result": False}}, [], "skipped_deleted"),
    ({"a": {"deleted": True}}, [], "no_rank0_reply"),  # the rank-1 reply is not promoted
    ({"a": {"review_result": False}}, [], "no_rank0_reply"),
    ({"root": {"lang": "de"}}, [], "filtered_lang"),
    ({"a": {"lang": "de"}}, [], "no_rank0_reply"),
    ({"a": {"rank": 1}, "b": {"rank": 0}}, [LION], None),
    ({"a": {"rank": None}}, [], "no_rank0_reply"),
    ({"a": {"rank": 2}}, [], "no_rank0_reply"),
])
def test_oasst_tree_skip_rules_match_the_flat_reader(tmp_path, edits, pairs, dropped_by):
    flat = _one_tree(**edits)
    flat_path, tree_path = tmp_path / "flat.jsonl", tmp_path / "one.trees.jsonl"
    flat_path.write_text("".join(json.dumps(r) + "\n" for r in flat))
    tree_path.write_text("".join(json.dumps(t) + "\n" for t in _make_fixtures().oasst_trees(flat)))
    section = dict(max_bad_fraction=1.0)
    if not pairs:  # nothing usable: the loader says so, naming the counter that took the tree
        for path in (flat_path, tree_path):
            with pytest.raises(DataError, match=rf"{path.name}: no usable oasst rows \(.*{dropped_by} 1"):
                load_seed(SeedSection(path=str(path), **section))
        return
    tree_rows, tree_counts = load_seed(SeedSection(path=str(tree_path), **section))
    assert (tree_rows, tree_counts) == load_seed(SeedSection(path=str(flat_path), **section))
    assert tree_rows == pairs and tree_counts["read"] == 3


def test_oasst_tree_malformed_lines_counted_and_named(tmp_path, caplog):
    good = (FIXTURES / "oasst_tiny.trees.jsonl").read_text().splitlines()
    reply = {"message_id": "r7a", "role": "assistant", "text": None, "lang": "en", "rank": 0}
    broken = {"message_tree_id": "r7", "prompt": {"message_id": "r7", "role": "prompter", "text": "Name a colour.",
                                                  "lang": "en", "replies": [reply]}}  # a broken message in a sound tree
    lines = good[:2] + [
        '{"message_tree_id": "x", "prompt": {"message_id": "y"',  # 3: cut short
        json.dumps({"message_tree_id": "x", "prompt": "What is 2 + 2?"}),  # 4: prompt not a message
        json.dumps({"message_tree_id": "x", "prompt": {"message_id": "r", "role": "prompter", "text": "Hi", "replies": {"a": 1}}}),  # 5
        json.dumps({"message_tree_id": "x", "prompt": {"message_id": "r", "role": "prompter", "text": "Hi", "replies": [7]}}),  # 6
        json.dumps(broken),  # 7
        json.dumps({"message_tree_id": "x"}),  # 8: no prompt
    ] + good[2:]
    path = tmp_path / "bad.trees.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="minibt.data"):
        rows, counts = load_seed(SeedSection(path=str(path), max_bad_fraction=0.5))
    # line 7's root is read, its only reply is the bad row: the tree gives no pair, the others are intact
    assert rows == OASST_PAIRS
    assert counts == {**OASST_COUNTS, "read": OASST_COUNTS["read"] + 5 + 2, "bad_rows": 6,  # 5 broken trees, line 7's 2 messages
                      "trees": OASST_COUNTS["trees"] + 1, "no_rank0_reply": OASST_COUNTS["no_rank0_reply"] + 1}
    warning = caplog.records[-1].getMessage()
    assert warning.startswith(f"{path}: skipped 6 of {counts['read']} rows malformed (line 3: not JSON")
    assert "line 4: malformed tree: 'prompt' is str, not a message object" in warning
    assert "line 5: malformed tree: prompt.replies is dict, not a list" in warning
    assert "line 6: malformed tree: prompt.replies[0] is int, not an object" in warning
    assert "line 7 prompt.replies[0]: missing 'text'" in warning


def test_oasst_tree_all_malformed_is_one_line_error(tmp_path):
    path = tmp_path / "bad.trees.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"message_tree_id": "x", "prompt": null}\n{"message_tree_id": "y", "prompt": []}\n'))
    with pytest.raises(DataError) as e:
        load_seed(SeedSection(path=str(path)))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"{path}: 2 of 2 rows malformed (line 1: malformed tree: 'prompt' is NoneType, not a message object; "
                   "line 2: malformed tree: 'prompt' is list, not a message object), more than seed.max_bad_fraction=0.05")


@pytest.mark.parametrize("content, why", [(b"plain text, not gzip\n", "Not a gzipped file"), (None, "ended before")])
def test_broken_gzip_is_one_line_error(tmp_path, content, why):
    path = tmp_path / "seed.trees.jsonl.gz"
    path.write_bytes(content if content is not None else (FIXTURES / "oasst_tiny.trees.jsonl.gz").read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: broken gzip file: .*{why}"):
        load_seed(SeedSection(path=str(path)))


def test_gzipped_flat_rows(tmp_path):
    path = tmp_path / "oasst.jsonl.gz"
    path.write_bytes(gzip.compress((FIXTURES / "oasst_tiny.jsonl").read_bytes()))
    assert load_seed(SeedSection(path=str(path))) == (OASST_PAIRS, OASST_COUNTS)


# --- pairs -----------------------------------------------------------------------------------


def test_pairs_auto_detects_prompt_response():
    rows, counts = load_seed(seed("pairs_prompt_response.jsonl"))
    assert counts == {"read": 8, "bad_rows": 0, "kept": 8}
    assert rows[3] == {"instruction": "What is 3 plus 3?", "output": "3 plus 3 is 6."}


def test_pairs_column_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"Q{i}?", "a": f"A{i}.", "prompt": "unused"}) + "\n" for i in range(3)))
    rows, _ = load_seed(SeedSection(path=str(path), columns={"instruction": "q", "output": "a"}))
    assert rows == [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(3)]


def test_pairs_column_map_names_missing_column():
    with pytest.raises(DataError, match=r"pairs_prompt_response\.jsonl: no column 'answer' for the output"):
        load_seed(seed("pairs_prompt_response.jsonl", columns={"output": "answer"}))


@pytest.mark.parametrize("names", [("question", "answer"), ("prompt", "completion")])
def test_pairs_common_names(tmp_path, names):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({names[0]: "Why?", names[1]: "Because."}) + "\n")
    assert load_seed(SeedSection(path=str(path)))[0] == [{"instruction": "Why?", "output": "Because."}]


def test_alpaca_json_appends_input():
    rows, counts = load_seed(seed("alpaca_tiny.json"))
    assert counts == {"read": 6, "bad_rows": 0, "kept": 6}
    assert rows[0] == {"instruction": "Translate to French.\n\nGood morning", "output": "Bonjour"}
    assert rows[1] == {"instruction": "Name three primary colors.", "output": "Red, blue and yellow."}  # empty input


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text((FIXTURES / "pairs_prompt_response.jsonl").read_text())
    assert load_seed(SeedSection(path=str(path)))[1]["kept"] == 8


def test_parquet_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "seed.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "Hi?", "output": "Hello."}, {"instruction": "Bye?", "output": None}]), path)
    rows, counts = load_seed(SeedSection(path=str(path), max_bad_fraction=0.5))
    assert rows == [{"instruction": "Hi?", "output": "Hello."}] and counts["bad_rows"] == 1


def test_malformed_lines_skipped_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="minibt.data"):
        rows, counts = load_seed(seed("pairs_bad.jsonl", max_bad_fraction=0.25))
    assert counts == {"read": 20, "bad_rows": 4, "kept": 16}
    assert [r["output"] for r in rows] == ["x" * i for i in range(1, 17)]
    warning = caplog.records[-1].getMessage()
    for where in ("line 4: not JSON", "line 8: missing 'output'", "line 12: 'output' is empty", "line 17: 'instruction' is int"):
        assert where in warning


def test_too_many_malformed_lines_is_one_line_error():
    with pytest.raises(DataError) as e:
        load_seed(seed("pairs_bad.jsonl"))  # 4 of 20 > 0.05
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(FIXTURES / "pairs_bad.jsonl") + ": 4 of 20 rows malformed (line 4:")
    assert "line 8" in msg and "line 12" in msg and "line 17" in msg and "seed.max_bad_fraction=0.05" in msg


def test_limit_caps_kept_rows():
    rows, counts = load_seed(seed("pairs_bad.jsonl", max_bad_fraction=0.25, limit=5))
    assert len(rows) == 5 and counts["kept"] == 5


# --- messages --------------------------------------------------------------------------------


def test_messages_first_user_turn_and_reply(caplog):
    with caplog.at_level(logging.WARNING, logger="minibt.data"):
        rows, counts = load_seed(seed("messages_tiny.jsonl", max_bad_fraction=0.4))
    assert rows == [
        {"instruction": "Say hi.", "output": "Hi."},  # system turn dropped
        {"instruction": "Count to three.", "output": "1, 2, 3."},  # later turns ignored
        {"instruction": "Name a bird.", "output": "A robin."},  # ShareGPT {from, value}
        {"instruction": "Spell cat.", "output": "C-A-T."},  # an opening assistant greeting is skipped
    ]
    assert counts == {"read": 6, "bad_rows": 2, "kept": 4}
    assert "line 5: no user turn followed by an assistant reply" in caplog.text
    assert "line 6: 'content' is list, not a string" in caplog.text


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_seed(SeedSection(path=str(tmp_path / "nope.jsonl")))


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_seed(SeedSection(path=str(tmp_path / "empty.jsonl")))


def test_blank_lines_only(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no rows"):
        load_seed(SeedSection(path=str(tmp_path / "blank.jsonl")))


def test_zero_usable_rows(tmp_path):
    path = tmp_path / "useless.jsonl"
    path.write_text(json.dumps({"instruction": "", "output": "x"}) + "\n")
    with pytest.raises(DataError, match=r"useless\.jsonl: no usable pairs rows \(read 1, bad_rows 1\)"):
        load_seed(SeedSection(path=str(path), max_bad_fraction=1.0))


def test_unknown_columns(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": "a", "bar": "b"}) + "\n")
    with pytest.raises(DataError, match=r"odd\.jsonl: cannot tell the seed format from columns \['bar', 'foo'\]"):
        load_seed(SeedSection(path=str(path)))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "seed.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"seed\.csv: unsupported seed file type \.csv"):
        load_seed(SeedSection(path=str(tmp_path / "seed.csv")))


def test_broken_json_file(tmp_path):
    (tmp_path / "broken.json").write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(DataError, match=r"broken\.json: not JSON \(Expecting value: line 2"):
        load_seed(SeedSection(path=str(tmp_path / "broken.json")))


def test_broken_parquet_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: unreadable Parquet file"):
        load_seed(SeedSection(path=str(tmp_path / "broken.parquet")))


def test_hub_call_and_failure(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"^OpenAssistant/oasst1: cannot load split 'train': FileNotFoundError: Dataset"):
        load_seed(SeedSection(dataset="OpenAssistant/oasst1"))
    assert calls == [("OpenAssistant/oasst1", None, "train", False)]


def test_hub_unknown_split(hub_dir):
    section = SeedSection(dataset=hub_dir(read_jsonl(FIXTURES / "oasst_tiny.jsonl")), split="validation")
    with pytest.raises(DataError, match=r"cannot load split 'validation': ValueError: Unknown split"):
        load_seed(section)
