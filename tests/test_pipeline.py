"""The whole method on a tiny 4-bit Llama, through the CLI as a user runs it: run, rerun, inspect, infer.

The corpus is crafted so that curation has something to drop: a third of its texts are the seed's own
answers, which m0 has learned, the rest look alike but m0 never saw them. The likelihood curator (how much
the instruction raises m0's likelihood of the text over the base's) scores the first ~0.85-0.93 and the
rest ~0.62-0.67 on this tiny model, so round 1's threshold of 0.75 keeps the seed answers and drops the
others. (The rubric curator's scores on a model this small differ in the fourth decimal: no threshold
splits them for a reason; the rubric path through the pipeline is tested by conftest's finished_run.)"""

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
ANSWERS = list(dict.fromkeys(r["output"] for r in SEED))  # 4 texts m0 trains on
OTHERS = [f"The {t} of the {p} is {c}." for t in ("color", "capital") for p in ("north", "south") for c in ("red", "blue")]  # 8 it never sees
CORPUS = [{"text": t} for t in ANSWERS + OTHERS]
THRESHOLD = 0.75


def recipe_text(model_dir: str) -> str:
    train = "{max_steps: 4, batch_size: 4, learning_rate: 1.0e-3}"  # myx: only its instructions' form matters here
    return f"""
run: {{name: tiny, seed: 0}}
model: {{name: {model_dir}, backend: transformers, quantization: nf4, max_length: 2048, device: cpu}}
lora: {{r: 4, alpha: 8}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, dedup: false}}
backward: {train}
augment: {{max_new_tokens: 8, batch_size: 4, shard_size: 5}}
curate: {{method: likelihood, threshold: {THRESHOLD}, batch_size: 4, shard_size: 5}}
forward: {{max_steps: 30, batch_size: 4, learning_rate: 1.0e-2, rounds: 2}}
"""


TRAINED: dict[str, list[dict[str, str]]] = {}  # adapter -> the rows it trained on, in the run below


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, CliRunner]:
    """One full run, shared by the tests below (they only read it, or rerun it); what each adapter
    trained on is recorded in TRAINED."""
    from minibt.engine import Engine

    root = tmp_path_factory.mktemp("pipeline")
    io.write_jsonl(root / "seed.jsonl", SEED)
    io.write_jsonl(root / "corpus.jsonl", CORPUS)
    (root / "tiny.yaml").write_text(recipe_text(tiny_model_dir))
    runner = CliRunner()
    real_train = Engine.train

    def recording(self, name, rows, *args, **kwargs):
        TRAINED[name] = [dict(r) for r in rows]
        return real_train(self, name, rows, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "train", recording)
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
    assert len(scored) == len(CORPUS) and all(isinstance(r["score"], float) for r in scored)
    assert rd.manifest["stages"]["curate_r2"]["counts"]["curator"] == "m1"  # each round's model curates the next
    assert rd.manifest["stages"]["curate_r1"]["counts"]["unparseable"] == 0
    assert json.loads((out / "logs" / "m1.json").read_text()), "the loss curve is logged"
    cfg = json.loads((out / "adapters" / "m1" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_curation_drops_pairs_and_each_model_trains_on_the_seed_plus_exactly_the_kept_ones(tiny_run):
    _, out, _ = tiny_run
    rd = RunDir.open(out)
    augmented = io.read_jsonl(rd.data("augmented"))
    for k in (1, 2):
        scored, curated = io.read_jsonl(rd.data(f"scored_r{k}")), io.read_jsonl(rd.data(f"curated_r{k}"))
        assert [r["output"] for r in scored] == [r["output"] for r in augmented]  # every pair scored, in order
        assert all(r["kept"] == (r["score"] >= THRESHOLD) for r in scored), "kept is the threshold rule, row by row"
        assert curated == [r for r in scored if r["kept"]]
        counts = rd.manifest["stages"][f"curate_r{k}"]["counts"]
        assert (counts["kept"], counts["dropped"], counts["threshold"]) == (len(curated), len(scored) - len(curated), THRESHOLD)
        # m_k: the seed pairs under the seed tag, then exactly round k's kept pairs under the augmented tag
        rows, recipe = TRAINED[f"m{k}"], rd.recipe()
        assert [r["completion"] for r in rows] == [p["output"] for p in SEED] + [p["output"] for p in curated]
        tags = [recipe.forward.seed_tag] * len(SEED) + [recipe.forward.augmented_tag] * len(curated)
        instructions = [p["instruction"] for p in SEED + curated]
        assert all(tag in r["prompt"] and i in r["prompt"] for r, tag, i in zip(rows, tags, instructions))
        assert rd.manifest["stages"][f"m{k}"]["counts"]["examples"] == len(SEED) + len(curated)
    # round 1 dropped pairs, and the right ones: m0 keeps the texts it learned (the seed's answers), drops the others
    kept = [r["output"] for r in io.read_jsonl(rd.data("curated_r1"))]
    assert sorted(kept) == sorted(ANSWERS), [(r["score"], r["output"]) for r in io.read_jsonl(rd.data("scored_r1"))]
    assert [r["completion"] for r in TRAINED["m0"]] == [p["output"] for p in SEED]  # m0: the seed alone


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


def test_a_run_made_before_minibt_added_a_key_resumes(tiny_run, monkeypatch):
    """A run's recipe.yaml from an older minibt lacks keys added since (train.group_by_length): their defaults
    are what ran, so the run resumes instead of being refused as another recipe's."""
    import yaml

    from minibt.engine import Engine

    root, out, runner = tiny_run
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    del saved["backward"]["group_by_length"], saved["forward"]["group_by_length"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    monkeypatch.setattr(Engine, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a finished stage ran again")))
    result = runner.invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(out), "backward.group_by_length=true"])
    assert result.exit_code == 2 and "backward.group_by_length: False before, True now" in result.output


def test_generate_with_swapped_adapters(tiny_run):
    root, out, runner = tiny_run
    io.write_jsonl(root / "in.jsonl", [{"instruction": "What is the color of the king?"}])
    io.write_jsonl(root / "texts.jsonl", [{"text": "The king is red."}])
    said = {}
    for adapter, path in (("m1", "in.jsonl"), ("base", "in.jsonl"), ("m0", "in.jsonl"), ("myx", "texts.jsonl")):
        result = runner.invoke(main, ["generate", str(out), "--adapter", adapter, "-i", str(root / path), "-o", str(root / f"{adapter}.jsonl"), "--max-new-tokens", "12"])
        assert result.exit_code == 0, result.output
        (row,) = io.read_jsonl(root / f"{adapter}.jsonl")
        assert row["instruction" if path == "in.jsonl" else "text"] and isinstance(row["generated"], str)
        said[adapter] = row["generated"]
    assert len({said["m1"], said["base"], said["m0"]}) == 3, f"each adapter answers the same question its own way: {said}"


def test_chat_streams_and_switches_adapters(tiny_run):
    _, out, runner = tiny_run
    result = runner.invoke(main, ["chat", str(out), "--adapter", "m1", "--max-new-tokens", "4"], input="hello\n/adapter m0\nhi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "talking to m1" in result.output and "now talking to m0" in result.output


def test_python_api_switches_adapters_on_one_base(tiny_run, monkeypatch):
    import minibt
    from minibt.engine import Engine

    _, out, _ = tiny_run
    loads = []
    real = Engine.load.__func__  # each call loads a base
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    s = minibt.open_run(out)
    assert sorted(s.adapters) == ["m0", "m1", "m2", "myx"]
    asked = ["What is the color of the king?", "Tell me about the north."]
    a = s.generate(asked, adapter="m1", max_new_tokens=12)
    b = s.generate(asked, adapter="m0", max_new_tokens=12)
    assert len(a) == len(b) == 2 and a != b, "switching the adapter changes the answers"
    assert s.generate(asked, adapter="m1", max_new_tokens=12) == a, "switching back gives m1's answers again"
    assert len(s.backtranslate("The king is red.", max_new_tokens=5)) == 1
    scored = {r["output"]: r for r in io.read_jsonl(out / "data" / "scored_r1.jsonl")}  # m0 curated round 1
    got = s.score([r["instruction"] for r in scored.values()], list(scored), adapter="m0")
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in scored.values()], abs=2e-3)
    assert [g["kept"] for g in got] == [r["kept"] for r in scored.values()]  # the run's threshold and its decision
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
