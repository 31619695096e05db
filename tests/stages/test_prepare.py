"""The prepare stage (minibt/stages/prepare.py) on local files: data/seed.jsonl holds the well-formed
pairs, data/corpus.jsonl the passages every filter let through, the counts say what each dropped, and
`format_counts` prints them one labelled number a line in the filters' order. (The `minibt prepare`
command around it: tests/test_cli_prepare.py; a world's own prepare: tests/test_worlds.py.)"""

from __future__ import annotations

import re

import pytest

from minibt import io
from minibt.recipe import load_recipe
from minibt.rundir import RunDir
from minibt.stages.prepare import CORPUS_LINES, format_counts, prepare

SEED = [{"instruction": "What is red?", "output": "A color."}, {"instruction": "Name a river.", "output": "The Nile."},
        {"instruction": "", "output": "an empty instruction"}, {"prompt": "no instruction field"}]
KEPT_TEXTS = ["The king of the north is red and old.", "A river runs through the small city in the south."]
CORPUS = [{"text": KEPT_TEXTS[0]}, {"text": KEPT_TEXTS[0]}, {"text": "Short."}, {"text": KEPT_TEXTS[1]}]
# the corpus filters in the order minibt/data/corpus.py applies them, from what was read to what was kept
FILTER_ORDER = ["read", "bad_rows", "documents", "passages", "too_short", "too_long", "low_quality",
                "exact_duplicates", "near_duplicates", "kept"]


@pytest.fixture
def prepared(tmp_path):
    io.write_jsonl(tmp_path / "seed.jsonl", SEED)
    io.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    (tmp_path / "r.yaml").write_text("model: {name: some-org/some-model}\nseed: {path: seed.jsonl, max_bad_fraction: 0.6}\n"
                                     "corpus: {path: corpus.jsonl, min_chars: 10}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    rd = RunDir(tmp_path / "run")
    rd.manifest = {"stages": {}}
    return rd, recipe, prepare(rd, recipe)


def test_prepare_writes_the_kept_pairs_and_passages_and_counts_each_drop(prepared):
    rd, _, counts = prepared
    assert io.read_jsonl(rd.data("seed")) == SEED[:2]  # the empty instruction and the row without one are malformed
    assert [r["text"] for r in io.read_jsonl(rd.data("corpus"))] == KEPT_TEXTS  # the duplicate and the short text dropped
    assert counts["seed"] == {"read": 4, "bad_rows": 2, "kept": 2}
    c = counts["corpus"]
    assert (c["read"], c["documents"], c["passages"], c["too_short"], c["exact_duplicates"], c["kept"]) == (4, 4, 4, 1, 1, 2)
    assert c["passages"] - sum(v for k, v in c.items() if k in dict(CORPUS_LINES) and k not in ("read", "bad_rows", "documents", "passages", "kept")) == c["kept"]


def test_format_counts_labels_every_count_in_the_filters_order(prepared):
    _, recipe, counts = prepared
    lines = format_counts(recipe, counts)
    seed_at, corpus_at = lines.index(f"seed ({recipe.seed.path}):"), lines.index(f"corpus ({recipe.corpus.path}):")
    rows = [re.fullmatch(r"  (.+?) +(\d+)", line) for line in lines]
    seed = [(m.group(1), int(m.group(2))) for m in rows[seed_at + 1:corpus_at]]
    corpus = [(m.group(1), int(m.group(2))) for m in rows[corpus_at + 1:]]
    assert seed == [("rows read", 4), ("malformed rows, skipped", 2), ("pairs kept", 2)]
    assert [label for label, _ in corpus] == [dict(CORPUS_LINES)[key] for key in FILTER_ORDER]  # every filter, in the order it applies
    assert dict(corpus)["dropped: exact duplicates"] == 1 and dict(corpus)["dropped: shorter than corpus.min_chars"] == 1
    assert corpus[-1] == ("passages kept", 2)


def test_format_counts_keeps_an_unlabelled_count_and_says_when_a_limit_cut(prepared):
    _, recipe, counts = prepared
    recipe.seed.limit = 2  # kept == limit: the limit, not the data, decided how many
    counts = {**counts, "corpus": {**counts["corpus"], "new_filter": 3}}
    lines = format_counts(recipe, counts)
    assert "  (limited by seed.limit=2)" in lines
    assert re.search(r"^  new_filter +3$", "\n".join(lines), re.M), "a count with no label yet is still printed"
    oasst = format_counts(recipe, {"seed": {"read": 9, "trees": 2, "kept": 2}, "corpus": counts["corpus"]})
    assert any(re.fullmatch(r"  messages read +9", line) for line in oasst) and not any("rows read" in x for x in oasst[:4])
