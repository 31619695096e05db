"""Corpus: sources, segmentation bounds, each filter's count on the web shard, dedup, streaming."""

from __future__ import annotations

import inspect
import itertools
import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minibt.data import iter_documents, prepare_corpus
from minibt.data.corpus import Dedup, clean_passage, segment
from minibt.errors import DataError
from minibt.io import read_jsonl
from minibt.recipe import CorpusSection

FIXTURES = Path(__file__).parent.parent / "fixtures"
SHARD = FIXTURES / "web_shard.parquet"
# web_shard.parquet (see make_fixtures.web_docs) with min_chars=200, max_chars=2000
SHARD_COUNTS = {"read": 30, "bad_rows": 1, "documents": 29, "passages": 32, "too_short": 2, "too_long": 1,
                "low_quality": 3, "exact_duplicates": 3, "near_duplicates": 2, "kept": 21}
WORDS = "river stone cloud market ocean forest city music paper story garden window bridge valley harbor".split()


def shard_section(**kw) -> CorpusSection:
    return CorpusSection(**{"path": str(SHARD), "min_chars": 200, "max_chars": 2000, **kw})


def prose(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(sentences))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- the web shard: every filter ----------------------------------------------------------------


def test_web_shard_counts_and_output(tmp_path):
    out = tmp_path / "corpus.jsonl"
    assert prepare_corpus(shard_section(), out) == SHARD_COUNTS
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(21))
    assert all(200 <= len(r["text"]) <= 2000 for r in rows)
    assert len({r["text"] for r in rows}) == 21
    text = "\n".join(r["text"] for r in rows)
    # the cookie banner and breadcrumb lines of doc 23 are stripped, its prose kept
    assert "cookies" not in text and "Home > Articles" not in text and "Share this article" not in text
    assert "Home | About" not in text and "Sitemap" not in text and "| 0." not in text  # menus and the table are gone
    assert not set(rows[0]) - {"id", "text"}  # parquet rows carry only the text


def test_long_document_segments_cover_it(tmp_path):
    import pyarrow.parquet as pq

    long_doc = pq.read_table(SHARD).column("text")[26].as_py()
    pieces = segment(long_doc, 2000)
    assert len(pieces) == 3 and all(len(p) <= 2000 for p in pieces)
    assert "\n\n".join(pieces).split() == long_doc.split()  # nothing lost, nothing invented
    assert all(p.endswith(".") for p in pieces)  # cut at boundaries, never inside a sentence


def test_dedup_off_keeps_duplicates(tmp_path):
    counts = prepare_corpus(shard_section(dedup=False), tmp_path / "c.jsonl")
    assert counts["exact_duplicates"] == counts["near_duplicates"] == 0
    assert counts["kept"] == SHARD_COUNTS["kept"] + 5


def test_limit_stops_reading(tmp_path):
    counts = prepare_corpus(shard_section(limit=5), tmp_path / "c.jsonl")
    assert counts["kept"] == 5 and counts["read"] == 5
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 5


def test_no_bounds_keeps_long_and_short(tmp_path):
    counts = prepare_corpus(CorpusSection(path=str(SHARD)), tmp_path / "c.jsonl")
    assert counts["passages"] == counts["documents"] == 29  # max_chars 0: no segmentation
    assert counts["too_long"] == 0 and counts["too_short"] == 1  # only the empty document


# --- segmentation ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_chars", [300, 600, 1000, 3000])
def test_segment_bounds(max_chars):
    rng = random.Random(max_chars)
    for _ in range(20):
        text = "\n\n".join("\n".join(prose(rng, rng.randint(1, 6)) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 12)))
        pieces = segment(text, max_chars)
        assert all(0 < len(p) <= max_chars for p in pieces)
        assert " ".join(pieces).split() == text.split()


def test_segment_halves_a_text_just_over_the_limit():
    text = "\n\n".join(prose(random.Random(i), 3) for i in range(8))
    pieces = segment(text, len(text) - 10)
    assert len(pieces) == 2 and abs(len(pieces[0]) - len(pieces[1])) < len(text) / 4


def test_segment_falls_back_to_sentences_and_keeps_long_sentences_whole():
    sentence = "word " * 30 + "end."
    assert segment(" ".join([sentence] * 10), 400) == [" ".join([sentence] * 2)] * 5  # one paragraph: cut between sentences
    blob = "x" * 500
    assert segment(f"Short one. {blob}", 100) == ["Short one.", blob]  # a 500-char "sentence" is left whole
    assert segment("anything", 0) == ["anything"]


# --- quality -----------------------------------------------------------------------------------


def test_clean_passage_rules():
    good = prose(random.Random(0), 4)
    assert clean_passage(good) == good
    assert clean_passage(f"Home | About | Contact\n{good}\nAccept all cookies\nRead more »") == good
    assert clean_passage("Products\nServices\nPricing\nCareers\n" + "A short line of prose.") is None  # a menu
    assert clean_passage("| 1.0 | 2.0 | 3.0 |\n| --- | --- | --- |") is None  # symbols
    assert clean_passage("She wants to sign up for the race.") == "She wants to sign up for the race."
    assert clean_passage("Log in") is None
    assert clean_passage(f"Subscribe to our newsletter\n{good[:50]}", min_chars=100) is None  # too short once stripped


# --- dedup -------------------------------------------------------------------------------------


def test_dedup_exact_near_and_distinct():
    rng = random.Random(1)
    dedup = Dedup()
    base = prose(rng, 12)
    assert dedup.check(base) is None
    assert dedup.check("  " + base.upper().replace(" ", "  ")) == "exact_duplicates"
    words = base.split(" ")
    words[50] = "lighthouse"
    assert dedup.check(" ".join(words)) == "near_duplicates"  # Jaccard ~0.9
    assert dedup.check(base + " " + prose(rng, 1)) == "near_duplicates"
    half = base.split(" ")[: len(words) // 2] + prose(rng, 6).split(" ")  # Jaccard ~0.35
    assert dedup.check(" ".join(half)) is None
    assert all(dedup.check(prose(rng, 12)) is None for _ in range(50))


def test_short_facts_sharing_a_shingle_are_not_near_duplicates():
    # toy-world facts: 6 words, two 5-word shingles, one shared (Jaccard 1/3). A hash family that
    # orders shingles alike (a*x+b mod 2^61-1 on 32-bit inputs) flagged such pairs.
    dedup = Dedup()
    facts = [f"Voukron is the marble of {name}." for name in ("Gramevou", "Drugulain", "Baikoboun", "Lupi", "Lusa")]
    assert [dedup.check(f) for f in facts] == [None] * 5


# --- sources -----------------------------------------------------------------------------------


def test_jsonl_keeps_extra_fields_when_not_segmented(tmp_path):
    rng = random.Random(2)
    long_text = "\n\n".join(prose(rng, 4) for _ in range(6))
    path = write_jsonl(tmp_path / "toy.jsonl", [
        {"text": "Mount Arlo is in Vendra.", "label": "capital", "entity": "Vendra", "attribute": "mountain", "id": 7},
        {"text": long_text, "label": "x", "entity": "y", "attribute": "z"},
    ])
    out = tmp_path / "c.jsonl"
    counts = prepare_corpus(CorpusSection(path=str(path), max_chars=500), out)
    rows = read_jsonl(out)
    assert rows[0] == {"id": 0, "text": "Mount Arlo is in Vendra.", "label": "capital", "entity": "Vendra", "attribute": "mountain"}
    assert counts["kept"] == len(rows) > 2 and all(set(r) == {"id", "text"} for r in rows[1:])  # segmented: no labels


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First document,\nsecond line.\n\n\nSecond document.\n  \nThird document.")
    assert list(iter_documents(CorpusSection(path=str(path)))) == [
        "First document,\nsecond line.", "Second document.", "Third document."]


def test_jsonl_malformed_rows(tmp_path, caplog):
    rows = [{"text": f"Document number {i} is fine."} for i in range(40)]
    rows[3], rows[9] = "{broken", {"body": "no text"}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    counts = prepare_corpus(CorpusSection(path=str(path)), tmp_path / "out.jsonl")
    assert counts["bad_rows"] == 2 and counts["kept"] == 38
    assert "line 4: not JSON" in caplog.text and "line 10: no 'text' field" in caplog.text


def test_too_many_malformed_rows_writes_nothing(tmp_path):
    rows = [{"text": f"Document number {i} is fine."} for i in range(10)]
    rows[1], rows[6] = {"text": 5}, {"text": None}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as e:
        prepare_corpus(CorpusSection(path=str(path)), out)
    assert str(e.value) == (f"{path}: 2 of 10 rows malformed (line 2: 'text' is int, not a string; "
                            "line 7: 'text' is null, not a string), more than corpus.max_bad_fraction=0.05")
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))  # atomic: no partial file


def test_iter_documents_raises_on_too_many_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["nope", {"text": "fine"}])
    with pytest.raises(DataError, match=r"c\.jsonl: 1 of 2 rows malformed \(line 1: not JSON"):
        list(iter_documents(CorpusSection(path=str(path))))


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "file not found"),
    ("empty.jsonl", "", "file is empty"),
    ("empty.parquet", "", "file is empty"),
    ("corpus.csv", "a,b\n", "unsupported corpus file type .csv"),
    ("broken.parquet", "garbage", "unreadable Parquet file"),
    ("bad.txt", b"ok\n\xff\xfe\n", "line 2 is not UTF-8 text"),
])
def test_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        prepare_corpus(CorpusSection(path=str(path)), tmp_path / "out.jsonl")


def test_parquet_missing_column():
    with pytest.raises(DataError, match=r"web_shard\.parquet: no column 'content' \(columns: \['text', 'id', 'url'"):
        list(iter_documents(CorpusSection(path=str(SHARD), text_column="content")))


def test_nothing_survives(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match=r"c\.jsonl: no passage survived \(read 1, .* too_short 1"):
        prepare_corpus(CorpusSection(path=str(path), min_chars=100), tmp_path / "out.jsonl")


# --- hub path ----------------------------------------------------------------------------------


def test_hub_streaming_from_hub_layout(hub_dir, tmp_path):
    # the shard as a hub-style folder: the real load_dataset(..., streaming=True) reads it
    import pyarrow.parquet as pq

    section = shard_section(path=None, dataset=hub_dir(table=pq.read_table(SHARD)))
    assert prepare_corpus(section, tmp_path / "c.jsonl") == SHARD_COUNTS


def test_hub_call_arguments_and_missing_column(monkeypatch):
    import datasets

    calls = []
    real = datasets.Dataset.from_list([{"content": "One web page.", "url": "u"}]).to_iterable_dataset()

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return real

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    section = CorpusSection(dataset="HuggingFaceFW/fineweb", name="sample-10BT", split="train", text_column="content")
    assert list(iter_documents(section)) == ["One web page."]
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT", "train", True)]
    section.text_column = "text"
    with pytest.raises(DataError, match=r"^HuggingFaceFW/fineweb\[train\]: no column 'text' \(columns: \['content', 'url'\]\)"):
        list(iter_documents(section))


# --- streaming ---------------------------------------------------------------------------------


def test_iter_documents_is_lazy(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(1000)] + ["broken"])
    docs = iter_documents(CorpusSection(path=str(path)))
    assert inspect.isgenerator(docs)
    assert list(itertools.islice(docs, 3)) == ["doc 0", "doc 1", "doc 2"]  # no scan of the whole file first


def test_prepare_corpus_memory_is_flat(tmp_path):
    # 200k rows through a fresh process: streaming grew its peak RSS by ~0 MB when measured, while
    # holding just the 200k texts grows it by ~30 MB
    rng = random.Random(3)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=12)) + f" {i}.", "n": i}) + "\n")
    script = textwrap.dedent(f"""
        import resource, json
        from minibt.data import prepare_corpus
        from minibt.recipe import CorpusSection
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counts = prepare_corpus(CorpusSection(path={str(path)!r}, dedup=False), {str(tmp_path / "out.jsonl")!r})
        print(json.dumps([counts["kept"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))
    """)
    kept, grown_kb = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert kept == 200_000
    assert grown_kb < 10_000
