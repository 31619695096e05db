"""report.md after a run: stage counts, score histograms, length and loss plots (PNG), samples, claims."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from click.testing import CliRunner

from minibt import io
from minibt.cli import main
from minibt.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"

def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_a_run_leaves_a_report_with_plots(finished_run):
    _, run, _ = finished_run
    report = (run / "report.md").read_text()
    for section in ("## Stages", "## Curation round 1", "## Lengths (words)", "## Training"):
        assert section in report
    for plot in ("scores_r1.png", "lengths.png", "loss.png"):
        assert _is_png(run / "plots" / plot), plot
        assert f"](plots/{plot})" in report
    for stage in ("prepare", "backward", "augment", "m0", "curate_r1", "m1"):
        assert f"| {stage} | done |" in report
    assert "A sample of" in report and "(score >= 2.0)" in report
    for adapter in ("myx", "m0", "m1"):
        assert f"| {adapter} | " in report  # a loss row per adapter


def test_the_run_summary_counts_kept_and_dropped_per_filter_and_threshold(finished_run):
    _, run, output = finished_run
    counts = RunDir.open(run).manifest["stages"]["curate_r1"]["counts"]
    assert f"{counts['kept']} kept (score >= 2.0), {counts['dropped']} dropped" in output
    assert "corpus: 10 documents read -> 8 passages kept (dropped: too short 1, exact duplicates 1)" in output
    assert f"report: {run / 'report.md'}" in output


def test_the_prepare_line_names_what_each_number_counts():
    """Documents read, passages after segmentation and passages kept are three different numbers."""
    from minibt.report import describe_stage

    corpus = {"read": 361, "bad_rows": 2, "documents": 359, "passages": 372, "too_short": 40, "near_duplicates": 32, "kept": 300}
    seed = {"read": 9846, "bad_rows": 0, "skipped_deleted": 20, "trees": 1000, "filtered_lang": 400, "kept": 600}
    line = describe_stage("prepare", {"seed": seed, "corpus": corpus})
    assert ("corpus: 361 rows read, 359 documents, segmented into 372 passages -> 300 passages kept "
            "(dropped: bad rows 2, too short 40, near duplicates 32)") in line
    assert "seed: 9846 messages read, 1000 trees -> 600 pairs kept (dropped: skipped deleted 20, filtered lang 400)" in line
    assert describe_stage("prepare", {"corpus": {**corpus, "read": 359, "bad_rows": 0}}).startswith(
        "corpus: 359 documents read, segmented into 372 passages -> 300 passages kept")


def test_the_augment_and_curate_lines_say_how_many_pairs_were_left_out_as_copies():
    """Pairs myx left empty and pairs whose instruction copies its text are counted apart, in plain words."""
    from minibt.report import describe_stage

    augment = {"texts": 100, "empty_instructions": 2, "copies": 7, "truncated": 1}
    assert describe_stage("augment", augment) == "100 texts -> instructions (truncated 1); left out: 2 empty, 7 copies of their text"
    assert describe_stage("augment", {"texts": 100, "empty_instructions": 0, "copies": 0}) == "100 texts -> instructions"
    curate = {"pairs": 100, "empty_instructions": 0, "copies": 7, "scored": 93, "kept": 60, "dropped": 33, "threshold": 3.5, "curator": "m0"}
    assert describe_stage("curate_r1", curate) == "93 scored by m0: 60 kept (score >= 3.5), 33 dropped; left out: 7 copies of their text"


def test_minibt_report_rebuilds_it(finished_run):
    _, run, _ = finished_run
    (run / "report.md").unlink()
    (run / "plots" / "loss.png").unlink()
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.md").is_file() and _is_png(run / "plots" / "loss.png")


def test_a_failing_report_never_kills_a_stage(tmp_path, monkeypatch, caplog):
    import minibt.report
    from minibt.stages.stage import Context, Stage, run_stage

    def broken(run_dir):
        raise ValueError("plotting exploded")

    monkeypatch.setattr(minibt.report, "build_report", broken)
    rd = RunDir(tmp_path)
    rd.manifest = {"stages": {}}
    with caplog.at_level(logging.WARNING, logger="minibt.report"):  # the stage protocol rebuilds the report after a stage
        assert run_stage(Context(rd, None, lambda: None), Stage("prepare", lambda ctx: {"seed": 1}, uses="cpu"))
    assert rd.done("prepare") and rd.manifest["stages"]["prepare"]["counts"] == {"seed": 1}
    assert "plotting exploded" in caplog.text


def test_toy_metrics_sit_next_to_the_papers_claims(tmp_path):
    """A toy-shaped run directory, no model: ground-truth split histogram, claims table, eval results."""
    stages = {"curate_r1": {"status": "done", "seconds": 1.0, "counts": {"scored": 3, "kept": 1, "dropped": 2, "threshold": 0.5, "curator": "m0"}}}
    io.write_json(tmp_path / "manifest.json", {"recipe": "toy", "stages": stages})
    rows = [
        {"label": "fact", "entity": "Borvale", "attribute": "anchor", "instruction": "What is the anchor of Borvale?", "output": "Borvale's anchor is Tamsel.", "score": 1.2, "kept": True},
        {"label": "noise", "entity": None, "attribute": None, "instruction": "What is x?", "output": "lol", "score": -1.0, "kept": False},
        {"label": "noise", "entity": None, "attribute": None, "instruction": "Who?", "output": "hi | there", "score": 0.1, "kept": False},
    ]
    io.write_jsonl(tmp_path / "data" / "scored_r1.jsonl", rows)
    io.write_jsonl(tmp_path / "data" / "curated_r1.jsonl", rows[:1])
    io.write_jsonl(tmp_path / "data" / "augmented.jsonl", rows)
    metrics = {"forward_accuracy": {"base": 1.0, "m0": 20.0, "m1": 30.0, "m1_uncurated": 25.0},
               "curated_correct_share": 90.0, "augmented_correct_share": 10.0,
               "pairwise": {"m1_vs_m0": {"a": "m1", "b": "m0", "judge": "base", "n": 10, "win_rate": 0.7, "ci95": [0.4, 0.9]}}}
    io.write_json(tmp_path / "metrics.json", metrics)
    from minibt.report import build_report

    report = build_report(tmp_path).read_text()
    assert "| self-training on curated data helps: m1 > m0 | m1 30.0 vs m0 20.0 | yes |" in report
    assert "m1 30.0 vs m1_uncurated 25.0 | yes |" in report
    assert "win rate 0.700 [0.400, 0.900] over 10 | not significant |" in report
    assert "hi \\| there" in report  # table cells are escaped
    assert "A sample of kept pairs (1 in all)" in report and "A sample of dropped pairs (2 in all)" in report  # the rows' own `kept`
    assert _is_png(tmp_path / "plots" / "scores_r1.png") and not (tmp_path / "plots" / "loss.png").exists()
    # the toy evaluation's own verdicts, when metrics.json has them, replace the plain comparisons
    metrics["claims"] = [{"claim": "self-training helps: m1 beats m0 by >= 5 points", "holds": True, "numbers": "m1 30.0 vs m0 20.0 (+10.0)"}]
    io.write_json(tmp_path / "metrics.json", metrics)
    report = build_report(tmp_path).read_text()
    assert "| self-training helps: m1 beats m0 by >= 5 points | m1 30.0 vs m0 20.0 (+10.0) | yes |" in report
    assert "m1_uncurated 25.0 | yes |" not in report


def test_training_logs_reach_the_reporting_tool_report_to_names(tiny_model_dir, tmp_path, monkeypatch):
    """A real tiny engine trains with report_to=tensorboard: transformers' own integration registry
    hands the trainer's logs to that tool's callback (here a recorder in tensorboard's slot, since the
    package may not be installed); with report_to=none no such callback is made. (An engine training
    claim: it belongs with the engine's tests once tests/engine/ holds training.)"""
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection, TrainSection

    made, logged = [], []

    class Recorder(TrainerCallback):
        def __init__(self):
            made.append(self)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", Recorder)
    engine = Engine.load(ModelSection(name=tiny_model_dir, max_length=128), LoraSection(r=4, alpha=8), seed=0)
    rows = [{"prompt": engine.text.render([{"role": "user", "content": f"what is the {w}"}]), "completion": f"the {w} is red."}
            for w in ("king", "queen", "river", "city")]
    cfg = TrainSection(max_steps=2, batch_size=2, learning_rate=1e-3, warmup_ratio=0.0, save_steps=0)
    result = engine.train("m1", rows, dataclasses.replace(cfg, report_to="tensorboard"), tmp_path / "m1")
    assert len(made) == 1, "the trainer made the callback of the tool report_to names"
    assert [x["loss"] for x in logged if "loss" in x] == [x["loss"] for x in result["log_history"]] != []
    engine.train("m0", rows, cfg, tmp_path / "m0")  # report_to: none (the default)
    assert len(made) == 1, "report_to=none reports nowhere"
