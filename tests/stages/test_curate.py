"""Self-curation (minibt/stages/curate.py): every usable pair scored (empty instructions and copies of
their text left out, each counted), `kept` the threshold rule on each row, the curated file exactly the
kept rows; calibration's threshold midway between the curator's mean scores on pairs rated good and bad."""

from __future__ import annotations

import types

import pytest

from minibt import io
from minibt.errors import MinibtError
from minibt.recipe import CurateSection, ModelSection, Recipe
from minibt.rundir import RunDir
from minibt.stages.curate import GOOD_RATING, calibrate, curate

PAIRS = [{"id": i, "instruction": f"What is the {a} of the {t}?", "output": f"The {a} of the {t} is {c}."}
         for i, (a, t, c) in enumerate([("color", "king", "red"), ("size", "queen", "small"), ("color", "river", "blue"),
                                         ("capital", "north", "old"), ("color", "city", "green"), ("size", "south", "large")])]
EMPTY = [{"id": 6, "instruction": "", "output": "myx wrote nothing."}, {"id": 7, "instruction": "  \n", "output": "Nor here."}]
COPY = [{"id": 8, "instruction": "The old river runs blue and cold past the city.", "output": "The old river runs blue and cold past the city. Boats sail on it."}]


def run_dir(path) -> RunDir:
    rd = RunDir(path)
    rd.manifest.setdefault("stages", {})
    return rd


def rubric(threshold: float) -> Recipe:
    return Recipe(model=ModelSection(max_length=256), curate=CurateSection(threshold=threshold, batch_size=4, shard_size=3))


def test_every_usable_pair_is_scored_and_kept_is_the_threshold_rule(stage_engine, tmp_path):
    first = curate(run_dir(tmp_path / "a"), stage_engine.infer, rubric(1.0), 1, "m0", PAIRS + EMPTY)
    scores = [r["score"] for r in io.read_jsonl(tmp_path / "a" / "data" / "scored_r1.jsonl")]
    assert first["kept"] == len(scores) == len(PAIRS) and len(set(scores)) > 1, scores
    # a threshold inside the scores' range, one pair's own score: the pairs below it are dropped, that one kept
    threshold = sorted(scores)[len(scores) // 2]
    counts = curate(run_dir(tmp_path / "b"), stage_engine.infer, rubric(threshold), 1, "m0", PAIRS + EMPTY + COPY)
    scored = io.read_jsonl(tmp_path / "b" / "data" / "scored_r1.jsonl")
    curated = io.read_jsonl(tmp_path / "b" / "data" / "curated_r1.jsonl")
    assert [r["id"] for r in scored] == [p["id"] for p in PAIRS], "every usable pair, in order; the empty ones and the copy left out"
    assert [r["score"] for r in scored] == scores, "the same curator scores the same pairs alike"
    for r in scored:  # the rubric in one forward pass: a distribution over 1-5, its expectation is the score
        assert len(r["score_probs"]) == 5 and sum(r["score_probs"]) == pytest.approx(1, abs=1e-4)
        assert r["score"] == r["expected_score"] == pytest.approx(sum(p * s for p, s in zip(r["score_probs"], range(1, 6))), abs=1e-3)
        assert r["kept"] == (r["score"] >= threshold)
    assert curated == [r for r in scored if r["kept"]] and 0 < len(curated) < len(scored)
    assert any(r["score"] == threshold and r["kept"] for r in scored), "a score at the threshold is kept"
    assert (counts["pairs"], counts["empty_instructions"], counts["copies"], counts["scored"]) == (9, 2, 1, 6)
    assert (counts["kept"], counts["dropped"], counts["threshold"], counts["curator"]) == (len(curated), 6 - len(curated), threshold, "m0")
    assert sum(counts["histogram"].values()) == 6


# --- calibration, on a curator whose scores are known ---------------------------------------------


class KnownCurator:
    """An engine whose likelihood curator gives each output a known score: the curator's mean
    log-probability minus the base's (0 here) is SCORES[output]."""

    adapters = ["m0"]

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.text = types.SimpleNamespace(render=lambda messages, add_generation_prompt=True: "\n".join(m["content"] for m in messages))

    def completion_logprobs(self, adapter, prompts, completions, batch_size=16, progress=None):
        return [0.0 if adapter == "base" else self.scores[c] for c in completions]


SCORES = {"five": 4.0, "four": 3.0, "three": 2.0, "one": 1.0, "also one": 1.5}
RATED = [{"instruction": "q", "output": o, "score": s} for o, s in (("five", 5), ("four", 4), ("three", 3), ("one", 1), ("also one", 1))]


def likelihood(**curate_keys) -> Recipe:
    return Recipe(curate=CurateSection(method="likelihood", **curate_keys))


def test_calibration_sets_the_threshold_midway_between_the_means_on_good_and_bad_ratings(tmp_path):
    io.write_jsonl(tmp_path / "ratings.jsonl", RATED)
    threshold, calibration = calibrate(run_dir(tmp_path), KnownCurator(SCORES), likelihood(ratings=str(tmp_path / "ratings.jsonl")), "m0")
    # good (rated >= 4): five 4.0, four 3.0 -> 3.5; bad: three 2.0, one 1.0, also one 1.5 -> 1.5; midway 2.5
    assert GOOD_RATING == 4 and threshold == 2.5
    assert calibration == {"ratings": 5, "good_mean": 3.5, "bad_mean": 1.5}
    # the run's own data/ratings.jsonl when curate.ratings is unset (a world writes it)
    io.write_jsonl(tmp_path / "run" / "data" / "ratings.jsonl", RATED[:2] + RATED[3:4])
    assert calibrate(run_dir(tmp_path / "run"), KnownCurator(SCORES), likelihood(), "m0")[0] == 2.25  # (3.5 + 1.0) / 2


def test_calibrated_curation_keeps_by_the_calibrated_threshold(tmp_path):
    io.write_jsonl(tmp_path / "ratings.jsonl", RATED)
    scores = {**SCORES, "at the threshold": 2.5}
    pairs = [{"instruction": "q", "output": o} for o in scores]
    counts = curate(run_dir(tmp_path), KnownCurator(scores), likelihood(calibrate=True, ratings=str(tmp_path / "ratings.jsonl"), threshold=1.0),
                    1, "m0", pairs)
    assert counts["threshold"] == 2.5 and counts["calibration"]["good_mean"] == 3.5  # not the recipe's 1.0
    curated = io.read_jsonl(tmp_path / "data" / "curated_r1.jsonl")
    assert [r["output"] for r in curated] == ["five", "four", "at the threshold"]


def test_calibration_refuses_ratings_it_cannot_use_in_one_line(tmp_path):
    with pytest.raises(MinibtError, match=r"^curate.calibrate: no ratings file .*ratings.jsonl \(set curate.ratings\)$"):
        calibrate(run_dir(tmp_path), KnownCurator(SCORES), likelihood(), "m0")
    io.write_jsonl(tmp_path / "good.jsonl", RATED[:2])
    with pytest.raises(MinibtError, match=r"good.jsonl needs pairs rated >= 4 and below it$"):
        calibrate(run_dir(tmp_path), KnownCurator(SCORES), likelihood(ratings=str(tmp_path / "good.jsonl")), "m0")
