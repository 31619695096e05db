"""A reduced toy world through the real pipeline (the CLI, 4-bit base, every stage), and the same run
with one stage broken on purpose: the ground-truth metrics must show the break.

One good run and two broken ones share one small pretrained base (~20 s, cached under MINIBT_CACHE
for the test session); the broken runs train their forward models only briefly, since what they
check happens before.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from reduced_world import run_toy, small_recipe  # tests/toy is on sys.path (pytest's prepend import mode)

from minibt.cli import main
from minibt.toy.evaluate import claims


@pytest.fixture(scope="module")
def good(good_run) -> dict:  # good_run, toy_cache: tests/toy/conftest.py, shared with test_inference.py
    return good_run[1]


def test_small_world_run_writes_sane_metrics(good):
    for key in ("backward_accuracy", "augmented_correct_share", "curated_correct_share", "curation_precision",
                "curation_recall", "noise_fraction", "clean_share"):
        assert 0.0 <= good[key] <= 100.0, key
    assert set(good["forward_accuracy"]) == {"base", "m0", "m1", "m1_uncurated"}
    assert all(0.0 <= v <= 100.0 for v in good["forward_accuracy"].values())
    assert good["noise_fraction"] == pytest.approx(80.0, abs=1.0)
    # The method works at all on the small world, which is much weaker than the default one. Measured
    # over world seeds 0-2 x run seeds 0-1 (bench/toy/reduced_spread.py -> bench/results/reduced-spread.json):
    # backward 6.7-22.2 % (mean 13.9, of 90 held-out facts; the wrong-way run below: 0.0 every time);
    # correct pairs augmented 1.5-5.0 % -> curated 14.0-39.2 %, curated/augmented 6.9-9.3x, curated -
    # augmented 12.5-34.5 points; precision 100 % against a 20 % clean share every time. Float
    # differences between machines move these as a seed does, so each threshold sits well below the
    # worst seed, and the curation claim is asserted as a ratio, which moves least.
    assert good["backward_accuracy"] >= 3.0  # worst 6.7
    assert good["curated_correct_share"] >= 3 * good["augmented_correct_share"]  # worst 6.9x
    assert good["curated_correct_share"] >= good["augmented_correct_share"] + 5.0  # worst +12.5
    assert good["curation_precision"] >= good["clean_share"] + 10.0  # +80 at every seed
    assert [c["claim"] for c in good["claims"]] == [c for c, _, _ in claims(good)]


def forward_not_reversed(engine, seed):
    """The broken backward stage: myx trained instruction -> output (the seed NOT reversed)."""
    from minibt.stages import backward

    return [{"prompt": backward.backward_prompt(engine.text, r["instruction"], 64), "completion": r["output"]} for r in seed]


def test_backward_trained_the_wrong_way_shows(good, toy_cache, tmp_path_factory, monkeypatch):
    """myx trained instruction -> output (the seed NOT reversed): it no longer writes instructions."""
    from minibt.stages import backward

    monkeypatch.setattr(backward, "backward_rows", forward_not_reversed)
    broken = run_toy(tmp_path_factory.mktemp("toy-run"), "wrong-way", small_recipe(forward={"max_steps": 20}))
    # measured (6 seed pairs, reduced-spread.json): broken backward 0.0 and correct pairs 0.0 -> 0.0
    # every time; good - broken backward 6.7-22.2 points, curated 14.0-39.2 points
    assert broken["backward_accuracy"] <= 3.0 and broken["backward_accuracy"] <= good["backward_accuracy"] - 3.0
    assert broken["augmented_correct_share"] <= good["augmented_correct_share"] / 2  # 0 against 1.5-5.0
    assert broken["curated_correct_share"] < good["curated_correct_share"] - 5  # worst 14.0 points apart


def test_curation_keeping_everything_shows(good, toy_cache, tmp_path_factory):
    """A threshold below every score: curated pairs are the augmented pairs, precision the clean share."""
    broken = run_toy(tmp_path_factory.mktemp("toy-run"), "keep-all",
                     small_recipe(curate={"threshold": -1.0e9}, forward={"max_steps": 20}))
    # measured (6 seed pairs): curated = augmented and precision = clean share (to 0.1) every time; the
    # good run's curated share 6.9-9.3x this one's, 12.5-34.5 points above it
    assert broken["curated_correct_share"] == pytest.approx(broken["augmented_correct_share"], abs=1.0)
    assert good["curated_correct_share"] >= 3 * broken["curated_correct_share"]
    assert broken["curated_correct_share"] < good["curated_correct_share"] - 5
    assert broken["curation_precision"] == pytest.approx(broken["clean_share"], abs=1.0)
    assert broken["curation_recall"] == 100.0


def test_pairwise_eval_m1_vs_m0_on_the_toy_world(good_run):
    """`minibt eval` on a real toy run: m1 vs m0 on the world's held-out questions, both orders."""
    run, _ = good_run
    result = CliRunner().invoke(main, ["eval", str(run), "--judge", "m1", "--limit", "24", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((run / "metrics.json").read_text())
    pairwise = metrics["pairwise"]["m1_vs_m0"]
    assert pairwise["instructions"] == "data/eval.jsonl" and pairwise["n"] == 24
    low, high = pairwise["ci95"]
    assert 0.0 <= low <= pairwise["win_rate"] <= high <= 1.0
    assert "forward_accuracy" in metrics  # the toy metrics survive the merge
