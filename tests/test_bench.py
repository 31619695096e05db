"""`minibt bench`'s pieces on a tiny model: correctness, not wall time."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from minibt import bench, prompts
from minibt.engine import Engine
from minibt.recipe import LoraSection, ModelSection, Recipe, TrainSection
from minibt.roles import TRUNCATED_FOR_RUBRIC

# A speedup is rounded to 2 decimals (off by up to 0.005) and the spread's values to 3 (up to 0.0005):
# a median equal to the smallest pair can read 0.0055 below the rounded minimum (seen in CI: 2.76 vs 2.765).
ROUNDING = 0.005 + 0.0005


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    e = Engine.load(ModelSection(name=tiny_model_dir, max_length=256), LoraSection(r=8, alpha=16), seed=0)
    e.add_adapter("myx")
    e.add_adapter("rater")
    with torch.no_grad():  # a LoRA that changes the outputs (fresh ones are zero)
        for name, p in e.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return e


# --- Spearman --------------------------------------------------------------------------------


def test_rankdata_averages_ties():
    assert bench.rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert bench.rankdata([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_spearman_matches_hand_computed_values():
    # no ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8
    assert bench.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: Pearson = 4.5 / sqrt(4.5 * 5)
    assert bench.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert bench.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert bench.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert bench.spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined
    assert bench.spearman([1], [2]) is None
    with pytest.raises(ValueError):
        bench.spearman([1, 2], [1])


# --- side-by-side pieces ---------------------------------------------------------------------


def test_generation_sides_make_one_output_per_prompt(engine):
    texts = [engine.text.render(prompts.backward_messages(f"the {w} is red.")) for w in ("king", "river", "city", "north", "a")]
    g = bench.compare_generation(engine, "myx", texts, max_new_tokens=5, temperature=0.7, top_p=0.9, batch_size=2,
                                 pairs=3, fast_runs=2)
    assert g["outputs"] == {"batched": 5, "one_at_a_time": 5}
    assert len(g["_outputs"]) == 5
    assert len(g["seconds"]["batched"]) == len(g["seconds"]["one_at_a_time"]) == 3  # one time per pair and side
    assert all(isinstance(g["tokens"][side], int) and g["tokens"][side] > 0 for side in ("batched", "one_at_a_time"))
    assert g["spread"]["n"] == 3 and g["spread"]["min"] - ROUNDING <= g["speedup"] <= g["spread"]["max"] + ROUNDING


def test_pairs_interleave_the_sides_after_an_untimed_fast_run():
    calls = []
    fast_out, slow_out, fast_s, slow_s = bench.interleaved_pairs(lambda: calls.append("A") or "a",
                                                                 lambda: calls.append("B") or "b", pairs=3, fast_runs=2)
    assert "".join(calls) == "A" + "AAB" * 3
    assert (fast_out, slow_out) == ("a", "b") and len(fast_s) == len(slow_s) == 3


def test_spread_is_the_pairs_quartiles():
    assert bench.spread([3.0, 1.0, 2.0, 10.0, 4.0]) == {"n": 5, "min": 1.0, "q1": 2.0, "median": 3.0, "q3": 4.0, "max": 10.0}


def test_greedy_generation_is_the_same_batched_and_one_at_a_time(engine):
    texts = [engine.text.render(prompts.backward_messages(t)) for t in ("the king.", "a small old river is north.", "red")]
    batched = engine.infer.generate("myx", texts, max_new_tokens=6, batch_size=3)
    single = bench.generate_one_at_a_time(engine, "myx", texts, max_new_tokens=6, temperature=0.0, top_p=1.0)
    assert batched == single  # same work on both sides: left padding changes nothing


def test_curation_sides_score_the_same_pairs(engine):
    recipe = Recipe()
    pairs = [{"instruction": f"what is the {w}", "output": f"the {w} is {c}."}
             for w, c in [("king", "red"), ("river", "blue"), ("city", "old"), ("queen", "new")]]
    c = bench.compare_curation(engine, recipe, "rater", pairs, reasoning_tokens=6, batch_size=2, timed_pairs=2, fast_runs=1)
    assert c["pairs"] == 4
    assert len(c["_scores"]["distribution"]) == len(c["_scores"]["generate"]) == 4
    assert c["unparseable"]["distribution"] == 0 and c["unparseable_rate"]["distribution"] == 0.0
    assert all(1 <= s <= 5 for s in c["_scores"]["distribution"])
    assert all(s is None or 1 <= s <= 5 for s in c["_scores"]["generate"])
    assert len(c["seconds"]["generate"]) == 2 and c["spread"]["min"] - ROUNDING <= c["speedup"] <= c["spread"]["max"] + ROUNDING


def rated(scores, argmax=None, truncated=()):
    """Distribution-mode rows: expected scores, their argmax (default: rounded), rubric truncation flags."""
    argmax = argmax or [round(s) for s in scores]
    return [{"score": s, "argmax_score": a, **({TRUNCATED_FOR_RUBRIC: True} if i in truncated else {})}
            for i, (s, a) in enumerate(zip(scores, argmax))]


def generated(scores):
    return [{"score": s} for s in scores]


def test_agreement_is_one_when_both_modes_order_the_pairs_alike_and_minus_one_when_reversed():
    gen = generated([1, 3, 5, 2, 4])
    assert bench.agreement(rated([1.1, 2.9, 4.7, 2.2, 3.5]), gen)["rank_agreement"] == 1.0  # other values, same order
    assert bench.agreement(rated([4.9, 3.1, 1.2, 4.0, 2.0]), gen)["rank_agreement"] == -1.0
    one_swap = bench.agreement(rated([1.1, 2.2, 4.7, 2.9, 3.5]), gen)  # the 2nd and 4th pairs swapped: rho = 1 - 6 * 2 / 120
    assert one_swap["rank_agreement"] == pytest.approx(0.9) and one_swap["rank_agreement_pairs"] == 5


def test_agreement_leaves_unparseable_ratings_out_and_counts_them():
    # the pair generate could not rate (None) is the one the distribution orders wrongly: left out, the rest agree
    dist = rated([1.2, 4.8, 0.5, 3.9, 2.1])
    gen = generated([1, 5, None, 4, 2])
    a = bench.agreement(dist, gen)
    assert a["rank_agreement"] == 1.0 and a["rank_agreement_pairs"] == 4
    assert a["unparseable"] == {"distribution": 0, "generate": 1} and a["unparseable_rate"] == {"distribution": 0.0, "generate": 0.2}
    assert a["score_histogram"]["generate"] == {"1": 1, "2": 1, "3": 0, "4": 1, "5": 1}  # the unparsed one in no bin
    nothing = bench.agreement(rated([1.0, 2.0]), generated([None, None]))
    assert nothing["rank_agreement"] is None and nothing["rank_agreement_pairs"] == 0 and nothing["unparseable_rate"]["generate"] == 1.0


def test_agreement_of_the_argmax_reads_the_argmax_not_the_expectation():
    gen = generated([1, 2, 3, 4, 5])
    a = bench.agreement(rated([5.0, 4.0, 3.0, 2.0, 1.0], argmax=[1, 2, 3, 4, 5]), gen)  # expectations reversed, argmax right
    assert a["rank_agreement"] == -1.0 and a["rank_agreement_argmax"] == 1.0
    assert a["score_histogram"]["distribution_argmax"] == {str(s): 1 for s in range(1, 6)}


def test_agreement_reaches_its_ceiling_when_the_distribution_orders_the_tied_classes():
    gen = generated([1, 1, 1, 5, 5, 2])  # ties cap every tie-free score below 1
    a = bench.agreement(rated([1.3, 1.1, 1.2, 4.6, 4.9, 2.5]), gen)
    assert a["rank_agreement_ceiling"] < 1.0 and a["rank_agreement"] == pytest.approx(a["rank_agreement_ceiling"], abs=1e-4)
    assert bench.agreement(rated([1.3, 2.6, 1.2, 4.6, 4.9, 2.5]), gen)["rank_agreement"] < a["rank_agreement_ceiling"]  # one out of its class
    assert bench.agreement(rated([1.0, 2.0, 3.0]), generated([1, 2, 3]))["rank_agreement_ceiling"] == 1.0  # no ties: no cap


def test_agreement_counts_the_pairs_cut_for_the_rubric():
    a = bench.agreement(rated([1.0, 2.0, 3.0, 4.0], truncated=(1, 3)), generated([1, 2, 3, 4]))
    assert a[TRUNCATED_FOR_RUBRIC] == 2


def test_untimed_curation_gives_agreement_only(engine):
    pairs = [{"instruction": "what is the king", "output": "the king is red."}] * 2
    c = bench.compare_curation(engine, Recipe(), "rater", pairs, reasoning_tokens=4, batch_size=2, timed_pairs=0)
    assert "seconds" not in c and "speedup" not in c
    assert len(c["_scores"]["distribution"]) == len(c["_scores"]["generate"]) == 2


def test_tie_ceiling_is_what_a_score_ordering_the_classes_reaches():
    generated = [1, 1, 1, 1, 1, 1, 2, 2, 5, 5]  # many ties, as a curator's 1-5 ratings of mostly noise
    ceiling = bench.tie_ceiling(generated)
    exact = [0.1, 0.3, 0.2, 0.05, 0.4, 0.35, 2.1, 2.4, 4.7, 4.9]  # any order inside a class
    assert bench.spearman(exact, generated) == pytest.approx(ceiling)
    assert bench.spearman(sorted(exact), generated) == pytest.approx(ceiling)
    assert ceiling < 0.95  # six tied ratings of ten cap every tie-free score well below 1
    swapped = exact[:5] + [2.2] + exact[6:]  # one pair out of its class: below the ceiling
    assert bench.spearman(swapped, generated) < ceiling
    assert bench.spearman([1, 1, 1, 1, 1, 1, 2, 2, 5, 5], generated) == pytest.approx(1.0)  # ties matched exactly
    assert bench.tie_ceiling([1, 2, 3]) == pytest.approx(1.0)


def test_stratified_takes_half_noise_half_facts_in_order():
    pairs = [{"label": lab, "i": i} for i, lab in enumerate("nnnnfnnfnnnf")]
    picked = bench.stratified([{**p, "label": "fact" if p["label"] == "f" else "noise"} for p in pairs], 4)
    assert [p["i"] for p in picked] == [0, 1, 4, 7]
    assert len(bench.stratified([{"label": "noise"}] * 5, 4)) == 2  # facts ran out: fewer, never padded


def test_curator_rows_reason_then_score():
    class FakeText:  # curator_rows only renders and clips
        max_length = 4096

        def render(self, messages):
            return messages[0]["content"]

        def count_tokens(self, text):
            return len(text.split())

        def clip(self, text, n):
            return text, False

    rows = bench.curator_rows(FakeText(), [{"instruction": "q?", "output": "a.", "score": 2}])
    assert [prompts.parse_score(r["completion"]) for r in rows] == [2, 2, 2]
    assert rows[0]["completion"].startswith(bench.VERDICTS[2]) and rows[2]["completion"] == "Score: 2"
    assert "<instruction>\nq?\n</instruction>" in rows[0]["prompt"]


def test_training_sides_run_the_same_steps(engine, tiny_model_dir, tmp_path):
    rows = [{"prompt": engine.text.render([{"role": "user", "content": f"what is the {w}"}]), "completion": f"the {w}."}
            for w in ("king", "queen", "river", "city")]
    cfg = TrainSection(max_steps=2, batch_size=2, learning_rate=1e-3, warmup_ratio=0.0)
    t = bench.compare_training(engine, tiny_model_dir, rows, cfg, tmp_path, pairs=2, keep="kept")
    assert len(t["seconds"]["minibt"]) == len(t["seconds"]["bare"]) == 2
    assert t["steps"] == 2 and t["spread"]["n"] == 2 and 0 < t["spread"]["min"] <= t["ratio"] <= t["spread"]["max"]
    assert "kept" in engine.adapters and not any(a.startswith("kept_") for a in engine.adapters)
    engine.delete_adapter("kept")


# --- the command -----------------------------------------------------------------------------


def fake_result() -> dict:
    result = {key: 1.0 for key in ("generation_speedup", "curation_speedup", "curation_rank_agreement", "training_ratio")}
    result.update(unparseable_rate={"distribution": 0.0, "generate": 0.1}, peak_memory_mib={"overall": 1.0},
                  generation={"tokens_per_second": {"batched": 1, "one_at_a_time": 1}, "prompts": 1,
                              "max_new_tokens": 1, "speedup": 1.0},
                  curation={"seconds": {"distribution": 1, "generate": 1}, "reasoning_tokens": 1, "pairs": 1,
                            "speedup": 1.0, "rank_agreement": 1.0, "rank_agreement_pairs": 1,
                            "rank_agreement_ceiling": 1.0, "rank_agreement_argmax": 1.0,
                            "natural": {"rank_agreement": 0.7, "rank_agreement_ceiling": 0.7},
                            "unparseable_rate": {"distribution": 0.0, "generate": 0.1}},
                  training={"seconds": {"bare": [1.0], "minibt": [1.0]}, "steps": 1, "ratio": 1.0},
                  spread={k: bench.spread([1.0]) for k in ("generation_speedup", "curation_speedup", "training_ratio")},
                  model={"source": "x", "parameters": 1, "backend": "transformers", "quantization": "nf4"},
                  machine={"device": "cpu", "torch_threads": 1, "load_average_start": [0, 0, 0], "load_average_end": [0, 0, 0]},
                  seconds_total=1.0)
    result["goals"] = bench.check_goals(result)
    return result


REQUIRED = {"generation_speedup": (int, float), "curation_speedup": (int, float), "curation_rank_agreement": (int, float, type(None)),
            "unparseable_rate": dict, "training_ratio": (int, float), "peak_memory_mib": dict, "goals": dict,
            "machine": dict, "generation": dict, "curation": dict, "training": dict, "spread": dict}


def check_schema(result: dict) -> None:
    for key, types in REQUIRED.items():
        assert isinstance(result[key], types), key
    assert set(result["unparseable_rate"]) == {"distribution", "generate"}
    assert set(result["goals"]) == set(bench.GOALS)
    assert all({"value", "target", "met"} <= set(g) for g in result["goals"].values())
    assert set(result["spread"]) == {"generation_speedup", "curation_speedup", "training_ratio"}
    for key, pairs in result["spread"].items():  # each goal's ratio is the median of its pairs (rounded to 2-3 places)
        assert pairs["min"] - ROUNDING <= result[key] <= pairs["max"] + ROUNDING, key


def test_json_flag_prints_one_object_on_the_last_line(monkeypatch):
    from minibt.cli import main

    def fake_run(*args, **kwargs):
        print("trainer chatter that must not reach stdout")
        return fake_result()

    monkeypatch.setattr(bench, "run_bench", fake_run)
    result = CliRunner().invoke(main, ["bench", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    check_schema(json.loads(last))
    assert "chatter" not in result.stdout


@pytest.mark.slow
def test_bench_end_to_end_on_a_small_world(tmp_path, monkeypatch):
    """run_bench on the reduced toy world with tiny settings: the real result's schema."""
    from minibt.toy.world import small_world_config

    monkeypatch.setenv("MINIBT_CACHE", os.environ.get("MINIBT_CACHE") or str(tmp_path / "cache"))
    recipe = tmp_path / "small.yaml"
    recipe.write_text(json.dumps({
        "model": {"backend": "transformers", "quantization": "nf4"}, "lora": {"r": 4, "alpha": 8},
        "backward": {"batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0},
        "forward": {"batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0},
        "augment": {"max_new_tokens": 6, "batch_size": 4}, "curate": {"batch_size": 4},
        "toy": dataclasses.asdict(small_world_config()),
    }))
    settings = bench.Settings(generate_prompts=4, curate_pairs=5, train_steps=2, pairs=1, curator_steps=2,
                              curator_batch=2, seed_ratings=2, augmented_ratings=4, reasoning_tokens=6, fast_runs=1)
    result = bench.run_bench(settings, recipe, work_dir=tmp_path / "work")
    check_schema(result)
    json.dumps(result)  # JSON-ready
    assert result["generation"]["outputs"] == {"batched": 4, "one_at_a_time": 4}
    assert result["curation"]["pairs"] == 5 and result["curation"]["natural"]["pairs"] == 5
    assert result["curation"]["curator"]["from_augmented_pairs"] > 0
    assert result["unparseable_rate"]["distribution"] == 0.0
