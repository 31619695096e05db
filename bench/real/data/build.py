"""Builds the real-model bench data from dolly-subset.jsonl (human-written) and planted-texts.json (written
for this project). Deterministic: one random.Random(0), stdlib only, no network.

    python bench/real/data/build.py [--out DIR]     # DIR defaults to this folder

Writes seed.jsonl, heldout.jsonl, test.jsonl, corpus.jsonl and curation_pairs.jsonl (SOURCES.md says what
each is for and how many rows of each kind it holds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
DOLLY = HERE / "dolly-subset.jsonl"
PLANTED = HERE / "planted-texts.json"

OPEN_CATEGORIES = ("open_qa", "general_qa", "brainstorming", "creative_writing", "classification")
WIKI_CATEGORIES = ("closed_qa", "information_extraction", "summarization")
SEED_N, HELDOUT_N, FRAGMENT_N, WIKI_N = 150, 250, 12, 40
SEED_MIN_CHARS, HELDOUT_MIN_CHARS = 80, 120
MAX_CHARS = 1500  # the cpu-135m recipe's corpus.max_chars: a longer text would be cut into passages
MIN_CHARS = 40  # bench/real/run.py runs the recipe with corpus.min_chars=40: nothing shorter in the corpus
WIKI_MIN_CHARS = 200
FRAGMENT_WORDS = (5, 12)
CURATION_N = {"true": 100, "mismatched": 60, "planted": 40}
SENTENCE_END = re.compile(r"[.!?:;]['\")\]]*$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    counts = build(args.out)
    for name, n in counts.items():
        print(f"{name}: {n}")


def build(out: Path) -> dict[str, int]:
    """Write every file under `out`; return the row count of each."""
    rng = random.Random(0)
    rows = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines()]
    for i, r in enumerate(rows):
        r["id"] = f"dolly-{i:04d}"  # the row's line in dolly-subset.jsonl (upstream order)
    pairs = _open_pairs(rows)

    long = [p for p in pairs if HELDOUT_MIN_CHARS <= len(p["output"]) <= MAX_CHARS]
    rng.shuffle(long)
    heldout = long[:HELDOUT_N]
    taken = {p["id"] for p in heldout}
    rest = [p for p in pairs if SEED_MIN_CHARS <= len(p["output"]) <= MAX_CHARS and p["id"] not in taken]
    rng.shuffle(rest)
    seed, rest = rest[:SEED_N], rest[SEED_N:]
    fragments, test = _fragments(rest, rng)

    wiki = _wiki(rows, rng)
    planted = _planted(fragments)
    corpus = ([{"text": p["output"], "id": p["id"], "kind": "heldout", "label": "good"} for p in heldout]
              + [{"text": w["text"], "id": w["id"], "kind": "wiki", "label": "web"} for w in wiki]
              + [{"text": t["text"], "id": t["id"], "kind": t["kind"], "label": "bad"} for t in planted])
    rng.shuffle(corpus)
    curation = _curation_pairs(heldout, planted, rng)

    files = {"seed.jsonl": sorted(seed, key=_key), "heldout.jsonl": sorted(heldout, key=_key),
             "test.jsonl": sorted(test, key=_key), "corpus.jsonl": corpus, "curation_pairs.jsonl": curation}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_jsonl(out / name, data)
    return {name: len(data) for name, data in files.items()}


def _open_pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Context-free rows as pairs; a repeated instruction or response keeps only its first row, so no text
    lands in two splits."""
    seen: set[str] = set()
    pairs = []
    for r in rows:
        instruction, output = r["instruction"].strip(), r["response"].strip()
        if r["context"].strip() or r["category"] not in OPEN_CATEGORIES or not instruction or not output:
            continue
        keys = {"i:" + instruction.casefold(), "o:" + output.casefold()}
        if keys & seen:
            continue
        seen |= keys
        pairs.append({"instruction": instruction, "output": output, "category": r["category"], "id": r["id"]})
    return pairs


def _fragments(rest: list[dict[str, str]], rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """FRAGMENT_N responses cut after their first 5-12 words, mid-sentence; the unused rest is the test split."""
    fragments, test = [], []
    for p in rest:
        cut = _cut(p["output"], rng) if len(fragments) < FRAGMENT_N else None
        if cut:
            fragments.append({"text": cut, "id": p["id"] + "-fragment", "kind": "fragment"})
        else:
            test.append(p)
    return fragments, test


def _cut(text: str, rng: random.Random) -> str | None:
    """The text's first n words (n drawn in FRAGMENT_WORDS) where the cut falls inside a sentence and the
    piece is at least MIN_CHARS long; None when no n in range gives one."""
    words = text.split("\n")[0].split()  # the cut stays on the first line, with words after it
    first = rng.randint(*FRAGMENT_WORDS)
    for n in [first, *range(FRAGMENT_WORDS[0], FRAGMENT_WORDS[1] + 1)]:
        piece = " ".join(words[:n])
        if n < len(words) and not SENTENCE_END.search(piece) and len(piece) >= MIN_CHARS:
            return piece
    return None


def _wiki(rows: list[dict[str, Any]], rng: random.Random) -> list[dict[str, str]]:
    """WIKI_N distinct reference passages (the `context` of closed QA, extraction and summarization rows)."""
    seen: set[str] = set()
    passages = []
    for r in rows:
        text = r["context"].strip()
        if r["category"] in WIKI_CATEGORIES and WIKI_MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            passages.append({"text": text, "id": r["id"] + "-context"})
    return rng.sample(passages, WIKI_N)


def _planted(fragments: list[dict[str, str]]) -> list[dict[str, str]]:
    planted = []
    for kind, texts in json.loads(PLANTED.read_text(encoding="utf-8")).items():
        planted += [{"text": t, "id": f"planted-{kind}-{i:02d}", "kind": kind} for i, t in enumerate(texts)]
    return planted + fragments


def _curation_pairs(heldout: list[dict[str, str]], planted: list[dict[str, str]],
                    rng: random.Random) -> list[dict[str, str]]:
    """True pairs, responses under another pair's instruction, planted texts under a held-out instruction."""
    true = rng.sample(heldout, CURATION_N["true"])
    swapped = rng.sample(heldout, 2 * CURATION_N["mismatched"])
    questions, answers = swapped[: CURATION_N["mismatched"]], swapped[CURATION_N["mismatched"]:]
    bad = rng.sample(planted, CURATION_N["planted"])
    askers = rng.sample(heldout, CURATION_N["planted"])
    pairs = ([{"instruction": p["instruction"], "output": p["output"], "label": "good", "kind": "true"} for p in true]
             + [{"instruction": q["instruction"], "output": a["output"], "label": "bad", "kind": "mismatched"}
                for q, a in zip(questions, answers)]
             + [{"instruction": q["instruction"], "output": t["text"], "label": "bad", "kind": t["kind"]}
                for q, t in zip(askers, bad)])
    rng.shuffle(pairs)
    return pairs


def _key(row: dict[str, str]) -> str:
    return row["id"]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomic: a temporary file in the same folder, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    main()
