"""The toy world's claims (what the report lists next to the paper's) and threshold calibration, without a model."""

from __future__ import annotations

import pytest

from minibt import io
from minibt.errors import MinibtError, RecipeError
from minibt.recipe import from_dict
from minibt.toy.evaluate import claims, format_metrics

GOOD = {
    "backward_accuracy": 50.0, "augmented_correct_share": 12.0, "curated_correct_share": 70.0,
    "curation_precision": 100.0, "curation_recall": 80.0, "clean_share": 20.0, "noise_fraction": 80.0,
    "forward_accuracy": {"base": 18.0, "m0": 30.0, "m1": 40.0, "m1_uncurated": 33.0},
}  # fmt: skip


def test_claims_hold_and_fail_on_the_numbers():
    assert [h for _, h, _ in claims(GOOD)] == [True, True, True, True]
    assert "m1 40.0 vs m0 30.0 (+10.0)" in claims(GOOD)[0][2]
    weak = {**GOOD, "forward_accuracy": {"m0": 30.0, "m1": 33.0, "m1_uncurated": 34.0}, "curated_correct_share": 20.0,
            "curation_precision": 25.0}
    assert [h for _, h, _ in claims(weak)] == [False, False, False, False]
    two = {**GOOD, "forward_accuracy": {**GOOD["forward_accuracy"], "m2": 39.0}}
    assert claims(two)[-1][:2] == ("another round helps: m2 beats m1", False)
    assert claims({}) == []  # nothing measured, nothing claimed


def test_format_metrics_is_a_few_readable_lines():
    m = {**GOOD, "claims": [{"claim": c, "holds": h, "numbers": n} for c, h, n in claims(GOOD)]}
    lines = format_metrics(m)
    assert any("forward accuracy (held-out): base 18.0%, m0 30.0%, m1 40.0%" in x for x in lines)
    assert sum("[holds]" in x for x in lines) == 4 and all(len(x) < 160 for x in lines)
    assert format_metrics({"pairwise": {}}) == []  # not a toy run: the CLI prints JSON instead


def test_calibration_takes_the_midpoint_of_the_rated_classes(tmp_path, monkeypatch):
    from minibt.stages import curate

    rated = [{"instruction": "q", "output": "a", "score": s} for s in (5, 5, 2, 1, 1, 1)]
    io.write_jsonl(tmp_path / "ratings.jsonl", rated)
    recipe = from_dict({"toy": {}, "curate": {"method": "likelihood", "calibrate": True,
                                              "ratings": str(tmp_path / "ratings.jsonl")}})
    # a curator whose score is the rating itself: good mean 5, bad mean 1.25 -> threshold 3.125
    monkeypatch.setattr(curate, "score_pairs", lambda engine, recipe, curator, rows: [{**r, "score": float(r["rated"])} for r in rows])
    threshold, info = curate.calibrate(None, None, recipe, "m0")
    assert threshold == 3.125 and info == {"ratings": 6, "good_mean": 5.0, "bad_mean": 1.25}

    io.write_jsonl(tmp_path / "ratings.jsonl", [r for r in rated if r["score"] < 4])
    with pytest.raises(MinibtError, match="rated >= 4"):
        curate.calibrate(None, None, recipe, "m0")


def test_calibration_needs_ratings_outside_the_toy_world(tmp_path):
    io.write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "q", "output": "a"}])
    base = {"model": {"name": "some/model"}, "seed": {"path": str(tmp_path / "seed.jsonl")},
            "corpus": {"path": str(tmp_path / "seed.jsonl")}}
    with pytest.raises(RecipeError, match="curate.calibrate: needs curate.ratings"):
        from_dict({**base, "curate": {"calibrate": True}})
    with pytest.raises(RecipeError, match="curate.ratings: file"):
        from_dict({**base, "curate": {"calibrate": True, "ratings": str(tmp_path / "missing.jsonl")}})
