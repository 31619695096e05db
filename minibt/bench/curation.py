"""The bench's curation comparison: the rubric read from the next-token distribution vs generated
reasoning and a parsed score, their agreement, and the toy world's ratings that teach the curator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from minibt.bench.generation import count_tokens
from minibt.bench.stats import interleaved_pairs, round4, spearman, spread, tie_ceiling

if TYPE_CHECKING:
    from minibt.engine import Engine
    from minibt.engine.text import TextRules

# A brief reasoning before the score, as the rubric asks ("first provide a brief reasoning"). Each opens
# with "Verdict:" and then its conclusion, so free generation decides right after a label, as the
# distribution mode decides right after "Score:". Agreement at run seeds 0/1/2 (300 curator steps of 8
# rows): 0.84/0.87/0.82 this way; 0.80/0.86/0.72 opening with the conclusion ("Wrong question: ..."),
# whose single-letter first tokens a 2-layer curator learnt less reliably; 0.58-0.86 opening with
# "The answer states ...".
VERDICTS = {
    5: "Verdict: right question. The answer states exactly the fact that was asked for, as a helpful assistant would.",
    2: "Verdict: wrong question. The answer states a fact, but about another name or thing than the one asked for.",
    1: "Verdict: not an answer. It is web text that does not answer the question at all.",
}


def rating_completion(score: int, reasoning: bool) -> str:
    from minibt import prompts

    head = f"{VERDICTS[score]}\n" if reasoning else ""
    return f"{head}{prompts.SCORE_PREFIX} {score}"


def seed_ratings(world: Any, n: int, seed: int = 0, stream: str = "bench") -> list[dict[str, Any]]:
    """More rated pairs from the seed pairs, by the world's own rating rule (minibt.toy.world.rating): a
    seed pair as it is 5, its instruction with another seed pair's output 2, with a noise text 1.
    `stream` names the random stream, so each user of these ratings draws its own."""
    import random

    from minibt.toy.world import rating

    rng = random.Random(f"{stream}:{seed}")
    pairs = rng.sample(world.seed_pairs, min(n, len(world.seed_pairs)))
    noise = [r["text"] for r in world.corpus if r["label"] == "noise"]
    rows = []
    for p in pairs:
        other = rng.choice([q for q in world.seed_pairs if q["instruction"] != p["instruction"]])
        rows += [{"instruction": p["instruction"], "output": p["output"], "score": rating(fact=True, asked_for=True)},
                 {"instruction": p["instruction"], "output": other["output"], "score": rating(fact=True, asked_for=False)},
                 {"instruction": p["instruction"], "output": rng.choice(noise), "score": rating(fact=False, asked_for=False)}]
    return rows


def curator_rows(text: TextRules, rated: Sequence[dict]) -> list[dict[str, str]]:
    """Rows that teach an adapter the rubric: each rated pair in the rubric format, twice with a brief
    reasoning before "Score: N" (so that free generation reasons first) and once with the score alone
    (the distribution mode reads the score right after "Score:")."""
    from minibt.roles import RUBRIC_ANSWER_ROOM, rubric_prompt

    rows = []
    for r in rated:
        prompt = rubric_prompt(text, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM + 32)
        for reasoning in (True, True, False):
            rows.append({"prompt": prompt, "completion": rating_completion(r["score"], reasoning)})
    return rows


def compare_curation(engine: Engine, recipe: Any, curator: str, pairs: list[dict[str, Any]], reasoning_tokens: int,
                     batch_size: int, timed_pairs: int = 5, fast_runs: int = 3) -> dict[str, Any]:
    """Distribution scoring vs generated reasoning + parsed score, through the curate stage's own code,
    as `timed_pairs` interleaved pairs (`interleaved_pairs`); 0 scores each way once, untimed (agreement only)."""
    from minibt.roles import score_pairs

    dist_recipe = dataclasses.replace(recipe, curate=dataclasses.replace(
        recipe.curate, method="rubric", mode="distribution", score="expected", batch_size=batch_size))
    gen_recipe = dataclasses.replace(recipe, curate=dataclasses.replace(
        recipe.curate, method="rubric", mode="generate", reasoning_tokens=reasoning_tokens, batch_size=batch_size))
    def distribution() -> list[dict[str, Any]]:
        return score_pairs(engine.infer, dist_recipe, curator, pairs)

    def generate() -> list[dict[str, Any]]:
        return score_pairs(engine.infer, gen_recipe, curator, pairs)

    if timed_pairs:
        dist, gen, dist_s, gen_s = interleaved_pairs(distribution, generate, timed_pairs, fast_runs)
    else:
        dist, gen = distribution(), generate()
    out: dict[str, Any] = {"pairs": len(pairs), "reasoning_tokens": reasoning_tokens, "batch_size": batch_size}
    if timed_pairs:
        ratios = [g / d for d, g in zip(dist_s, gen_s)]
        out.update({
            "seconds": {"distribution": [round(s, 3) for s in dist_s], "generate": [round(s, 3) for s in gen_s]},
            "pairs_per_second": {"distribution": round(len(pairs) / float(np.median(dist_s)), 1),
                                 "generate": round(len(pairs) / float(np.median(gen_s)), 1)},
            "speedup": round(float(np.median(ratios)), 2),
            "spread": spread(ratios),
            "speedup_measure": f"generate seconds / distribution seconds, median over {timed_pairs} interleaved pairs "
                               f"(distribution side: mean of {fast_runs} runs per pair)",
        })
    out.update(agreement(dist, gen))
    out["generated_rating_tokens_mean"] = round(count_tokens(engine, [g["rating"] for g in gen]) / max(1, len(gen)), 1)
    out["example_rating"] = gen[0]["rating"] if gen else None
    out["_scores"] = {"distribution": [d["score"] for d in dist], "generate": [g["score"] for g in gen]}
    return out


def agreement(dist: Sequence[dict[str, Any]], gen: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the two modes' scores of the same pairs agree; unparseable generated ratings are left out."""
    from minibt.roles import TRUNCATED_FOR_RUBRIC

    parsed = [i for i, g in enumerate(gen) if g["score"] is not None]
    g = [gen[i]["score"] for i in parsed]
    return {
        "unparseable": {"distribution": sum(d["score"] is None for d in dist), "generate": len(gen) - len(parsed)},
        "unparseable_rate": {"distribution": round(sum(d["score"] is None for d in dist) / max(1, len(dist)), 4),
                             "generate": round((len(gen) - len(parsed)) / max(1, len(gen)), 4)},
        "rank_agreement": round4(spearman([dist[i]["score"] for i in parsed], g)),
        "rank_agreement_pairs": len(parsed),
        "rank_agreement_ceiling": round4(tie_ceiling(g)),
        "rank_agreement_argmax": round4(spearman([dist[i]["argmax_score"] for i in parsed], g)),
        TRUNCATED_FOR_RUBRIC: sum(bool(d.get(TRUNCATED_FOR_RUBRIC)) for d in dist),
        "score_histogram": {
            "distribution_argmax": {str(s): sum(d["argmax_score"] == s for d in dist) for s in range(1, 6)},
            "generate": {str(s): sum(x["score"] == s for x in gen) for s in range(1, 6)},
        },
    }


def stratified(pairs: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first n/2 noise and n - n/2 fact texts of `pairs` (the world's labels of the texts, not of
    the instructions), in their order; fewer when a kind runs out."""
    noise = [p for p in pairs if p["label"] != "fact"][: n // 2]
    facts = [p for p in pairs if p["label"] == "fact"][: n - n // 2]
    return noise + facts


def truth_scores(world: Any, pairs: Sequence[dict[str, Any]]) -> list[int]:
    """The toy world's ground truth for augmented pairs, on the rated pairs' scale: 5 a fact whose
    instruction asks for it, 2 a fact under a wrong instruction, 1 noise (minibt.toy.world.rating)."""
    from minibt.toy.world import instruction_asks_for, rating

    facts = [p["label"] == "fact" for p in pairs]
    return [rating(fact, fact and instruction_asks_for(p["instruction"], p["entity"], p["attribute"])) for p, fact in zip(pairs, facts)]
