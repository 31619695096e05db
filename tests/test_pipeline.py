"""The whole method on a tiny 4-bit Llama, through the CLI as a user runs it: run, rerun, inspect, infer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from minibt import io
from minibt.cli import main
from minibt.rundir import RunDir

SEED = [
    {"instruction": f"What is the color of the {thing}?", "output": f"The {thing} is {color}."}
    for thing, color in [("king", "red"), ("queen", "blue"), ("river", "green"), ("city", "yellow")] * 3
]
CORPUS = [{"text": f"The {t} of the {p} is {c}."} for t in ("color", "capital") for p in ("north", "south", "east") for c in ("red", "blue")]


def recipe_text(model_dir: str) -> str:
    train = "{max_steps: 4, batch_size: 4, learning_rate: 1.0e-3}"
    return f"""
run: {{name: tiny, seed: 0}}
model: {{name: {model_dir}, backend: transformers, quantization: nf4, max_length: 2048, device: cpu}}
lora: {{r: 4, alpha: 8}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, dedup: false}}
backward: {train}
augment: {{max_new_tokens: 8, batch_size: 4, shard_size: 5}}
curate: {{threshold: 1.0, batch_size: 4, shard_size: 5}}
forward: {{max_steps: 4, batch_size: 4, learning_rate: 1.0e-3, rounds: 2}}
"""


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, CliRunner]:
    """One full run, shared by the tests below (they only read it, or rerun it)."""
    root = tmp_path_factory.mktemp("pipeline")
    io.write_jsonl(root / "seed.jsonl", SEED)
    io.write_jsonl(root / "corpus.jsonl", CORPUS)
    (root / "tiny.yaml").write_text(recipe_text(tiny_model_dir))
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(root / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root, root / "run", runner


def test_a_run_writes_every_stage_and_loads_the_base_once(tiny_run):
    _, out, _ = tiny_run
    rd = RunDir.open(out)
    assert rd.manifest["base_loads"] == 1
    assert list(rd.manifest["stages"]) == ["prepare", "backward", "augment", "m0", "curate_r1", "m1", "curate_r2", "m2"]
    assert all(s["status"] == "done" and s["finished"] for s in rd.manifest["stages"].values())
    assert rd.adapter_names() == ["m0", "m1", "m2", "myx"]
    augmented = io.read_jsonl(rd.data("augmented"))
    assert len(augmented) == len(CORPUS) and all({"instruction", "output"} <= set(r) for r in augmented)
    assert len(list(rd.shards("augmented").glob("*.jsonl"))) == 3  # 12 texts in shards of 5
    scored = io.read_jsonl(rd.data("scored_r2"))
    assert all(len(r["score_probs"]) == 5 and 1 <= r["expected_score"] <= 5 for r in scored)
    assert rd.manifest["stages"]["curate_r2"]["counts"]["curator"] == "m1"  # each round's model curates the next
    assert rd.manifest["stages"]["curate_r1"]["counts"]["unparseable"] == 0
    assert json.loads((out / "logs" / "m1.json").read_text()), "the loss curve is logged"
    cfg = json.loads((out / "adapters" / "m1" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_a_rerun_skips_finished_stages(tiny_run, monkeypatch):
    root, out, runner = tiny_run
    before = json.loads((out / "manifest.json").read_text())["stages"]
    from minibt.engine import Engine

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(Engine, "train", no_training)
    result = runner.invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    after = json.loads((out / "manifest.json").read_text())["stages"]
    assert {k: v["finished"] for k, v in after.items()} == {k: v["finished"] for k, v in before.items()}


def test_a_run_made_by_another_recipe_is_refused(tiny_run):
    root, out, runner = tiny_run
    result = runner.invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(out), "lora.r=8"])
    assert result.exit_code == 2
    assert "different recipe (lora.r: 4 before, 8 now)" in result.output and "--fresh" in result.output


def test_generate_with_swapped_adapters(tiny_run):
    root, out, runner = tiny_run
    io.write_jsonl(root / "in.jsonl", [{"instruction": "What is the color of the king?"}])
    io.write_jsonl(root / "texts.jsonl", [{"text": "The king is red."}])
    for adapter, path in (("m1", "in.jsonl"), ("base", "in.jsonl"), ("myx", "texts.jsonl")):
        result = runner.invoke(main, ["generate", str(out), "--adapter", adapter, "-i", str(root / path), "-o", str(root / f"{adapter}.jsonl"), "--max-new-tokens", "5"])
        assert result.exit_code == 0, result.output
        (row,) = io.read_jsonl(root / f"{adapter}.jsonl")
        assert isinstance(row["generated"], str)


def test_chat_streams_and_switches_adapters(tiny_run):
    _, out, runner = tiny_run
    result = runner.invoke(main, ["chat", str(out), "--adapter", "m1", "--max-new-tokens", "4"], input="hello\n/adapter m0\nhi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "talking to m1" in result.output and "now talking to m0" in result.output


def test_python_api_switches_adapters_on_one_base(tiny_run, monkeypatch):
    import minibt
    from minibt import engine as engine_mod

    _, out, _ = tiny_run
    loads = []
    real = engine_mod._load_transformers
    monkeypatch.setattr(engine_mod, "_load_transformers", lambda *a: loads.append(1) or real(*a))
    s = minibt.open_run(out)
    assert sorted(s.adapters) == ["m0", "m1", "m2", "myx"]
    a = s.generate("What is the color of the king?", adapter="m1", max_new_tokens=5)
    b = s.generate("What is the color of the king?", adapter="m0", max_new_tokens=5)
    assert len(a) == len(b) == 1
    assert len(s.backtranslate("The king is red.", max_new_tokens=5)) == 1
    score = s.score("What is the color of the king?", "The king is red.", adapter="m0")
    assert 1 <= score["expected_score"] <= 5 and abs(sum(score["score_probs"]) - 1) < 1e-4
    assert score["score"] == score["expected_score"] and score["kept"] == (score["score"] >= 1.0)  # the run's threshold
    assert loads == [1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "{root}"], "is not a minibt run directory"),
        (["generate", "{out}", "--adapter", "m9", "-i", "{root}/in.jsonl", "-o", "{root}/x.jsonl"], "adapter 'm9' does not exist"),
        (["generate", "{out}", "--adapter", "myx", "-i", "{root}/in.jsonl", "-o", "{root}/x.jsonl"], "needs a string field 'text'"),
    ],
)
def test_inference_errors_are_one_line(tiny_run, args, message):
    root, out, runner = tiny_run
    io.write_jsonl(root / "in.jsonl", [{"instruction": "x"}])
    result = runner.invoke(main, [a.format(root=root, out=out) for a in args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
