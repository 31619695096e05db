"""The one stage protocol (minibt/stages/stage.py) and the stage declaration it executes (pipeline.stages):
done stages are skipped, outputs recorded and checked, failures recorded, training stages saved and
their checkpoints cleared, the engine loaded only when a stage needs it; a stage added to the
declaration is planned, run in its place and resumed like the method's own."""

from __future__ import annotations

import json

import pytest

from minibt import io
from minibt.rundir import WEIGHTS, RunDir
from minibt.stages.stage import Context, Stage, run_stage


def run_dir(tmp_path) -> RunDir:
    rd = RunDir(tmp_path)
    rd.manifest = {"stages": {}}
    return rd


class FakeEngine:
    """What the protocol asks of an engine around a training stage: its adapters, save, delete, load."""

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.calls: list[str] = []

    def load_adapter(self, name, path) -> None:
        self.calls.append(f"load {name}")
        self.adapters.append(name)

    def delete_adapter(self, name) -> None:
        self.calls.append(f"delete {name}")
        self.adapters.remove(name)

    def save_adapter(self, name, path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / WEIGHTS).write_bytes(b"weights of " + name.encode())
        (path / "adapter_config.json").write_text("{}")


def test_a_stage_runs_once_records_its_outputs_and_is_redone_when_they_are_damaged(tmp_path):
    rd, calls = run_dir(tmp_path), []

    def write(ctx):
        calls.append(1)
        io.write_jsonl(ctx.rd.data("made"), [{"n": i} for i in range(3)])
        return {"rows": 3}

    stage = Stage("make", write, outputs=("made",), uses="cpu")
    ctx = Context(rd, None, lambda: pytest.fail("a stage that uses no engine loaded one"))
    assert run_stage(ctx, stage) and calls == [1]
    entry = rd.manifest["stages"]["make"]
    assert entry["status"] == "done" and entry["counts"] == {"rows": 3} and entry["outputs"] == ["data/made.jsonl"]
    assert rd.manifest["files"]["data/made.jsonl"]["rows"] == 3
    assert not run_stage(ctx, stage) and calls == [1]  # done: skipped
    io.write_jsonl(rd.data("made"), [{"n": 0}])  # cut short after it was recorded
    assert run_stage(ctx, stage) and calls == [1, 1]


def test_a_failing_stage_is_recorded_failed_and_runs_again(tmp_path):
    rd = run_dir(tmp_path)

    def broken(ctx):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        run_stage(Context(rd, None, lambda: None), Stage("make", broken, uses="cpu"))
    entry = rd.manifest["stages"]["make"]
    assert entry["status"] == "failed" and "disk on fire" in entry["error"] and not rd.done("make")
    assert (tmp_path / "report.md").is_file()  # the report shows the failure
    assert run_stage(Context(rd, None, lambda: None), Stage("make", lambda ctx: {"ok": 1}, uses="cpu"))
    assert rd.done("make") and "error" not in rd.manifest["stages"]["make"]


def test_a_training_stage_saves_its_adapter_and_log_and_clears_its_checkpoints(tmp_path):
    rd, engine, loads = run_dir(tmp_path), FakeEngine(), []
    checkpoint = rd.work("m0") / "checkpoint-5"

    def train(ctx):
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        ctx.engine.adapters.append("m0")
        return {"steps": 5, "log_history": [{"step": 5, "loss": 0.5}]}

    ctx = Context(rd, None, lambda: loads.append(1) or engine)
    stage = Stage("m0", train, needs=("myx",), adapter="m0")
    engine.adapters.append("m0")  # half-trained by a failed attempt in this process
    assert run_stage(ctx, stage)
    assert engine.calls == ["load myx", "delete m0"] and loads == [1]  # the engine is loaded once, when needed
    assert (rd.adapter("m0") / WEIGHTS).is_file() and rd.manifest["stages"]["m0"]["outputs"] == ["adapters/m0/" + WEIGHTS]
    assert json.loads((rd.path / "logs" / "m0.json").read_text()) == [{"step": 5, "loss": 0.5}]
    assert rd.manifest["stages"]["m0"]["counts"] == {"steps": 5}
    assert not checkpoint.exists()  # checkpoints deleted once the stage is done
    checkpoint.mkdir(parents=True)  # left behind by a run killed just after the stage finished
    assert not run_stage(Context(rd, None, lambda: pytest.fail("a done stage loaded the engine")), stage)
    assert not checkpoint.exists()


def test_plan_is_the_declaration_and_memory_reads_it():
    from minibt.memory import estimate_stages, find_shape
    from minibt.pipeline import plan, stages
    from minibt.recipe import from_dict

    recipe = from_dict({"toy": {}, "forward": {"rounds": 2}})
    declared = stages(recipe)
    assert plan(recipe) == [s.name for s in declared] == [
        "prepare", "backward", "augment", "m0", "curate_r1", "m1", "curate_r2", "m2", "m1_uncurated", "evaluate"]
    assert [s.adapter for s in declared if s.adapter] == ["myx", "m0", "m1", "m2", "m1_uncurated"]
    shape, _ = find_shape(recipe)
    assert [m.stage for m in estimate_stages(recipe, shape, declared)] == plan(recipe)[1:]  # prepare loads no model


def test_a_stage_added_to_the_declaration_is_planned_run_and_resumed(tiny_model_dir, tmp_path, monkeypatch):
    """The real pipeline on a tiny model with one more stage after m1: it runs in its place, its output
    is recorded, a rerun skips it, and a damaged output makes the rerun redo it and nothing else."""
    import minibt.pipeline as pipeline
    from minibt.recipe import from_dict

    io.write_jsonl(tmp_path / "seed.jsonl", [{"instruction": f"What is {w}?", "output": f"{w} is red."} for w in ("a", "b", "c", "d")])
    io.write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"The {w} is blue."} for w in ("sky", "sea", "ink")])
    train = {"max_steps": 1, "batch_size": 4, "save_steps": 0}
    recipe = from_dict({"model": {"name": tiny_model_dir, "backend": "transformers", "max_length": 256, "device": "cpu"},
                        "lora": {"r": 4, "alpha": 8}, "seed": {"path": str(tmp_path / "seed.jsonl")},
                        "corpus": {"path": str(tmp_path / "corpus.jsonl"), "dedup": False},
                        "backward": train, "forward": train, "augment": {"max_new_tokens": 4}, "curate": {"threshold": 1.0}})
    ran = []

    def lengths(ctx):  # uses the engine and m1, reads what curate_r1 left
        ran.append(1)
        rows = [{"instruction": r["instruction"], "tokens": ctx.engine.text.count_tokens(r["output"])} for r in ctx.rows("scored_r1")]
        io.write_jsonl(ctx.rd.data("lengths"), rows)
        return {"rows": len(rows)}

    declared = pipeline.stages

    def with_lengths(recipe):
        method = declared(recipe)
        at = [s.name for s in method].index("m1") + 1
        return method[:at] + [Stage("lengths", lengths, outputs=("lengths",), needs=("m1",))] + method[at:]

    loads, load_engine = [], pipeline.load_engine
    monkeypatch.setattr(pipeline, "stages", with_lengths)
    monkeypatch.setattr(pipeline, "load_engine", lambda rd, recipe: loads.append(1) or load_engine(rd, recipe))
    rd = pipeline.run(recipe, tmp_path / "run")
    assert list(rd.manifest["stages"]) == pipeline.plan(recipe) == ["prepare", "backward", "augment", "m0", "curate_r1", "m1", "lengths"]
    assert rd.manifest["stages"]["lengths"]["counts"] == {"rows": 3} and rd.recorded(rd.data("lengths")) and ran == [1]
    assert loads == [1]
    rd = pipeline.run(recipe, tmp_path / "run")
    assert ran == [1] and loads == [1]  # everything done: every stage skipped, no base loaded
    io.write_jsonl(rd.data("lengths"), [])  # damaged
    m1_finished = rd.manifest["stages"]["m1"]["finished"]
    rd = pipeline.run(recipe, tmp_path / "run")
    assert ran == [1, 1] and loads == [1, 1] and rd.manifest["stages"]["m1"]["finished"] == m1_finished  # only it redone
