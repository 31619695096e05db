"""`minibt prepare`: the prepare stage alone, no model loaded, its counts per filter printed; a later
`minibt run` on the same folder goes on from it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import minibt.engine
import minibt.pipeline
import minibt.toy.base
from minibt import io
from minibt.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
TOY = Path(__file__).parent.parent / "recipes" / "toy.yaml"

PROSE = [
    "Otters hold hands while they sleep so that the current does not carry them apart.",
    "The first bridge across the river was built of timber and burned down twice in a decade.",
    "Bread rises because yeast turns sugar into carbon dioxide, which the dough traps in small pockets.",
    "A violin's sound post is a small dowel inside the body that carries vibrations to the back plate.",
    "Glaciers move slowly downhill under their own weight, grinding the rock beneath them into fine silt.",
]
PARAGRAPH_A = " ".join(["Lighthouses once needed keepers who trimmed the wicks and wound the clockwork every few hours."] * 3)
PARAGRAPH_B = " ".join(["Today most lights are automatic, and the old keepers' cottages have become museums or holiday homes."] * 3)
# Rows for each filter, so every count below is known: 10 rows, 1 malformed, 9 documents, the last one
# segmented into two passages at max_chars 400: 10 passages; 1 too short, 1 navigation, 1 duplicate: 7 kept
CORPUS = ([{"text": t} for t in PROSE] + [{"text": PROSE[0]}, {"text": "Too short."}, {"text": "Home | About | Contact | Login"},
          {"body": "no text field"}, {"text": f"{PARAGRAPH_A}\n\n{PARAGRAPH_B}"}])
EXPECTED_CORPUS = {"read": 10, "bad_rows": 1, "documents": 9, "passages": 10, "too_short": 1, "too_long": 0,
                   "low_quality": 1, "exact_duplicates": 1, "near_duplicates": 0, "kept": 7}


def write_recipe(folder: Path, model: str, extra: str = "") -> Path:
    path = folder / "r.yaml"
    path.write_text(f"""
model: {{name: {model}, quantization: none, max_length: 256, device: cpu}}
seed: {{path: seed.jsonl, max_bad_fraction: 0.5}}
corpus: {{path: corpus.jsonl, min_chars: 20, max_chars: 400, max_bad_fraction: 0.2}}
backward: {{max_steps: 1, batch_size: 2}}
forward: {{max_steps: 1, batch_size: 2}}
{extra}
""")
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or building the toy base fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("prepare loaded a model")

    monkeypatch.setattr(minibt.engine.Engine, "load", classmethod(refuse))
    monkeypatch.setattr(minibt.engine.load, "load_base", refuse)
    monkeypatch.setattr(minibt.toy.base, "build_base", refuse)


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def counted(output: str, label: str) -> int:
    """The number printed after `label` in prepare's table."""
    m = re.search(rf"^  {re.escape(label)} +(\d+)$", output, re.M)
    assert m, f"no line {label!r} in:\n{output}"
    return int(m.group(1))


def test_prepare_writes_the_data_prints_each_filters_count_and_loads_no_model(tmp_path, monkeypatch, nothing_loads):
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIXTURES / "pairs_bad.jsonl", tmp_path / "seed.jsonl")  # 20 rows, 4 malformed
    io.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    write_recipe(tmp_path, "no-such-org/no-such-model")  # a hub id that does not exist: never looked up

    result = cli("prepare", "r.yaml", "--out", "out")
    assert result.exit_code == 0, result.output + repr(result.exception)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = manifest["stages"]["prepare"]
    assert entry["status"] == "done" and list(manifest["stages"]) == ["prepare"]
    assert "base_model" not in manifest and "base_loads" not in manifest
    assert entry["counts"]["seed"] == {"read": 20, "bad_rows": 4, "kept": 16}
    assert entry["counts"]["corpus"] == EXPECTED_CORPUS
    assert len(io.read_jsonl(tmp_path / "out" / "data" / "seed.jsonl")) == 16
    assert len(io.read_jsonl(tmp_path / "out" / "data" / "corpus.jsonl")) == 7

    out = result.output
    assert "prepare: done in" in out
    assert (counted(out, "rows read"), counted(out, "malformed rows, skipped"), counted(out, "pairs kept")) == (20, 4, 16)
    printed = {key: counted(out.split("corpus (")[1], label) for key, label in [
        ("read", "rows read"), ("bad_rows", "malformed rows, skipped"), ("documents", "documents"),
        ("passages", "passages after segmentation (corpus.max_chars)"), ("too_short", "dropped: shorter than corpus.min_chars"),
        ("too_long", "dropped: one sentence longer than corpus.max_chars"),
        ("low_quality", "dropped: boilerplate or symbols (quality filter)"), ("exact_duplicates", "dropped: exact duplicates"),
        ("near_duplicates", "dropped: near duplicates (MinHash)"), ("kept", "passages kept")]}
    assert printed == EXPECTED_CORPUS

    # again on the same folder: nothing redone, the same counts from the manifest
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "data").iterdir()}
    again = cli("prepare", "r.yaml", "--out", "out")
    assert again.exit_code == 0, again.output
    assert "already done" in again.output and counted(again.output.split("corpus (")[1], "passages kept") == 7
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "data").iterdir()} == before


def test_run_after_prepare_goes_on_from_it(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    io.write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "What is red?", "output": "A color."}] * 4)
    io.write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in PROSE[:2]])
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_recipe(tmp_path, "./model")
    prepared = cli("prepare", "r.yaml", "--out", "out")
    assert prepared.exit_code == 0, prepared.output
    data = tmp_path / "out" / "data"
    files = {name: ((data / name).read_bytes(), (data / name).stat().st_mtime_ns) for name in ("seed.jsonl", "corpus.jsonl")}
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]["prepare"]

    def refuse(*args, **kwargs):
        raise AssertionError("run redid the prepare stage")

    monkeypatch.setattr(minibt.pipeline, "prepare", refuse)
    result = cli("run", "r.yaml", "--out", "out")
    assert result.exit_code == 0, result.output + repr(result.exception)
    stages = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert list(stages) == minibt.pipeline.plan(minibt.recipe.load_recipe("r.yaml"))
    assert all(s["status"] == "done" for s in stages.values())
    assert stages["prepare"] == entry  # done once: the same start, finish and counts
    assert {name: ((data / name).read_bytes(), (data / name).stat().st_mtime_ns) for name in files} == files


def test_toy_prepare_writes_the_worlds_files_without_its_base(tmp_path, nothing_loads):
    result = cli("prepare", str(TOY), "--out", str(tmp_path / "toy"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    counts = json.loads((tmp_path / "toy" / "manifest.json").read_text())["stages"]["prepare"]["counts"]
    data = tmp_path / "toy" / "data"
    assert len(io.read_jsonl(data / "seed.jsonl")) == counts["seed"] > 0
    assert len(io.read_jsonl(data / "corpus.jsonl")) == counts["corpus"] > 0
    assert len(io.read_jsonl(data / "eval.jsonl")) == counts["eval_questions"] > 0
    assert io.read_jsonl(data / "backward_eval.jsonl") and io.read_jsonl(data / "ratings.jsonl")
    assert f"seed: {counts['seed']} pairs from the toy world" in result.output
    assert f"corpus: {counts['corpus']} texts from the toy world, {counts['corpus_facts']} of them facts" in result.output


def test_a_bad_recipe_stops_prepare_with_one_line(tmp_path, nothing_loads):
    result = cli("prepare", str(TOY), "corpus.path=corpus.jsonl", "--out", str(tmp_path / "toy"))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: corpus.path: the toy world makes its own corpus; remove the key or the toy section"
    assert not (tmp_path / "toy").exists()
