"""The real-model bench data (bench/real/data): rebuilt identically, splits disjoint, counts as SOURCES.md
states them, and read by minibt's own seed and corpus loaders with the bench's settings."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minibt.data.corpus import prepare_corpus
from minibt.data.seed import load_seed
from minibt.recipe import CorpusSection, SeedSection

DATA = Path(__file__).resolve().parents[2] / "bench" / "real" / "data"
BUILT = ("seed.jsonl", "heldout.jsonl", "test.jsonl", "corpus.jsonl", "curation_pairs.jsonl")
PAIR_FILES = ("seed.jsonl", "heldout.jsonl", "test.jsonl")
LABELS = {"heldout": "good", "wiki": "web", "boilerplate": "bad", "link_list": "bad", "promo": "bad",
          "forum": "bad", "fragment": "bad"}
# bench/real/run.py runs the cpu-135m recipe with corpus.min_chars=40; the recipe's max_chars is 1500
MIN_CHARS, MAX_CHARS = 40, 1500


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def stated(stage: str) -> dict[tuple[str, ...], list[int]]:
    """SOURCES.md's table rows for `stage` (a file name, or prepare_corpus): their text cells -> their numbers."""
    found = {}
    for line in (DATA / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == stage and cells[-1].isdigit():  # a counts row, not the table of files
            found[tuple(c for c in cells if not c.isdigit())] = [int(c) for c in cells if c.isdigit()]
    assert found, f"SOURCES.md has no table rows for {stage}"
    return found


def load_build():
    spec = importlib.util.spec_from_file_location("real_data_build", DATA / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(DATA / "build.py"), "--out", str(tmp_path / "cli")], check=True,
                   capture_output=True)
    load_build().build(tmp_path / "inproc")
    for name in BUILT:
        committed = (DATA / name).read_bytes()
        assert (tmp_path / "cli" / name).read_bytes() == committed, f"{name}: build.py no longer makes this file"
        assert (tmp_path / "inproc" / name).read_bytes() == committed, name


def test_dolly_subset_is_upstream_rows_with_the_four_keys():
    lines = (DATA / "dolly-subset.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # whole lines only
    for n, line in enumerate(lines[:-1]):
        assert set(json.loads(line)) == {"instruction", "context", "response", "category"}, f"line {n}"
    assert stated("dolly-subset.jsonl") == {("dolly-subset.jsonl", "row", "-"): [len(lines) - 1]}


def test_counts_are_those_sources_md_states():
    for name in PAIR_FILES:
        assert stated(name) == {(name, "pair", "-"): [len(rows(name))]}
    for name in ("corpus.jsonl", "curation_pairs.jsonl"):
        counts = collections.Counter((name, r["kind"], r["label"]) for r in rows(name))
        assert stated(name) == {k: [n] for k, n in counts.items()}, name


def test_splits_are_disjoint_by_instruction_and_output():
    seen: dict[str, str] = {}
    for name in PAIR_FILES:
        for r in rows(name):
            assert set(r) == {"instruction", "output", "category", "id"}
            for key in ("i:" + r["instruction"].casefold(), "o:" + r["output"].casefold()):
                assert key not in seen, f"{name} {r['id']}: also in {seen.get(key)}"
                seen[key] = name


def test_lengths():
    assert all(len(r["output"]) >= 80 for r in rows("seed.jsonl"))
    assert all(120 <= len(r["output"]) <= MAX_CHARS for r in rows("heldout.jsonl"))
    for r in rows("corpus.jsonl"):
        assert MIN_CHARS <= len(r["text"]) <= MAX_CHARS, r["id"]


def test_corpus_ids_labels_and_heldout_responses():
    corpus = rows("corpus.jsonl")
    assert len({r["id"] for r in corpus}) == len(corpus)
    assert all(set(r) == {"text", "id", "kind", "label"} and LABELS[r["kind"]] == r["label"] for r in corpus)
    by_text = collections.Counter((r["text"], r["label"]) for r in corpus)
    for r in rows("heldout.jsonl"):
        assert by_text[(r["output"], "good")] == 1, r["id"]
        assert sum(n for (text, _), n in by_text.items() if text == r["output"]) == 1, r["id"]
    assert sum(r["label"] == "good" for r in corpus) == len(rows("heldout.jsonl"))


def test_fragments_are_cut_mid_sentence_from_unused_rows():
    used = {r["id"] for name in PAIR_FILES for r in rows(name)}
    dolly = rows("dolly-subset.jsonl")
    fragments = [r for r in rows("corpus.jsonl") if r["kind"] == "fragment"]
    assert fragments
    for f in fragments:
        source = f["id"].removesuffix("-fragment")
        assert source not in used, f["id"]
        response = dolly[int(source.removeprefix("dolly-"))]["response"].strip()
        assert response.startswith(f["text"]) and len(response) > len(f["text"]), f["id"]
        assert 5 <= len(f["text"].split()) <= 12 and not re.search(r"[.!?]$", f["text"]), f["id"]


def test_curation_pairs():
    heldout = {r["output"]: r["instruction"] for r in rows("heldout.jsonl")}
    bad_texts = {r["text"]: r["kind"] for r in rows("corpus.jsonl") if r["label"] == "bad"}
    for p in rows("curation_pairs.jsonl"):
        assert set(p) == {"instruction", "output", "label", "kind"}
        assert p["instruction"] in heldout.values()
        if p["kind"] == "true":
            assert heldout[p["output"]] == p["instruction"] and p["label"] == "good"
        elif p["kind"] == "mismatched":
            assert heldout[p["output"]] != p["instruction"] and p["label"] == "bad"
        else:
            assert bad_texts[p["output"]] == p["kind"] and p["label"] == "bad"


@pytest.mark.parametrize("name", ["seed.jsonl", "test.jsonl"])
def test_minibt_seed_loader_reads_the_pairs(name):
    pairs, counts = load_seed(SeedSection(path=str(DATA / name), format="pairs"))
    expected = rows(name)
    assert counts == {"read": len(expected), "bad_rows": 0, "kept": len(expected)}
    assert pairs == [{"instruction": r["instruction"], "output": r["output"]} for r in expected]


def test_minibt_corpus_step_keeps_what_sources_md_states(tmp_path):
    section = CorpusSection(path=str(DATA / "corpus.jsonl"), text_column="text", min_chars=MIN_CHARS,
                            max_chars=MAX_CHARS)
    counts = prepare_corpus(section, tmp_path / "corpus.jsonl")
    corpus = rows("corpus.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    for step in ("bad_rows", "too_short", "too_long", "exact_duplicates", "near_duplicates"):
        assert counts[step] == 0, step
    assert counts["read"] == len(corpus) and counts["kept"] + counts["low_quality"] == len(corpus)
    assert all(LABELS[r["kind"]] == r["label"] for r in kept)  # the labels ride along to the curator
    total = collections.Counter(r["kind"] for r in corpus)
    survived = collections.Counter(r["kind"] for r in kept)
    assert stated("prepare_corpus") == {("prepare_corpus", k): [survived[k], total[k] - survived[k]] for k in total}
