"""`minibt bench`: minibt's augmentation, curation and training measured side by side with the plain way.

Every comparison runs in one process, on the same model, adapter and data, as interleaved pairs
(fast side, slow side, fast, slow, ...; the fast side a few runs back to back, their mean, since one
run takes tenths of a second): each pair gives a ratio, the median of the pairs' ratios counts, and
their spread (min, quartiles, max) is reported beside it (`spread`), so a disturbed pair shows:

- generation: `Engine.generate` (batched, length-sorted, left-padded, KV cache, stop at EOS) vs a
  one-prompt-at-a-time loop of `model.generate`, on the same augmentation prompts with the recipe's
  sampling and max_new_tokens. Speed is generated tokens per second, the tokens of each returned
  text counted with the same tokenizer on both sides (samples differ, so lengths differ).
- curation: the paper's rubric read from the next-token distribution after "Score:" (one forward
  pass) vs the paper's own way, reasoning then "Score: N" generated and parsed, with a reasoning
  budget; both through `roles.score_pairs`, on the same augmented pairs. Also the Spearman
  rank agreement of the two scores (pairs with unparseable ratings are counted and left out).
  The toy corpus is 80 % noise, which a curator rates 1: on a plain sample three quarters of the
  generated ratings tie, and no tie-free score (the expected score) can then reach a Spearman above
  ~0.5-0.75 against them (`rank_agreement_ceiling`; a score whose classes match exactly reaches it).
  So the headline pairs are half noise, half fact texts, as they come (each text's instruction is
  myx's, right or wrong); the plain sample is measured too (`curation.natural`).
- training: `Engine.train` vs a bare trl `SFTTrainer` + peft script, same base, rows, config, steps.

The toy world supplies everything on a CPU (`--quick`: a few minutes). Its curator is taught the
rubric first: an adapter trained on the world's rated pairs in the rubric format, plus seed pairs and
myx's own augmented pairs (other corpus texts than those scored) rated by the world's rule, so that
both curation modes have something to agree on. On a GPU, `gpu_config` builds a random-weight
Llama of a real shape (bench/gpu.md): speeds are real, scores are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from minibt.bench_vllm import vllm_line

log = logging.getLogger("minibt.bench")

SCHEMA_VERSION = 1
CURATOR = "rater"  # the bench's curator adapter
# The goals of issue #5 for `--quick` on a 2-core CPU with the toy world.
GOALS = {
    "generation_speedup": (">=", 10.0),
    "curation_speedup": (">=", 4.0),
    "curation_rank_agreement": (">=", 0.8),
    "unparseable_rate_distribution": ("==", 0.0),
    "training_ratio": (">=", 0.95),
}

# Real shapes for GPU runs (random weights: no hub on the device machine). From the models' config.json.
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False),
}  # fmt: skip

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


@dataclasses.dataclass
class Settings:
    generate_prompts: int = 256  # augmentation prompts (corpus texts), each side
    curate_pairs: int = 256  # augmented pairs scored by each curation mode
    train_steps: int = 60  # steps of each training side, per pair
    curator_steps: int = 200  # teaching the curator the rubric (not part of any comparison)
    curator_batch: int = 8
    seed_ratings: int = 40  # seed pairs rated by the world's rule (x3: right, wrong, noise output)
    augmented_ratings: int = 300  # augmented pairs of other corpus texts, rated by the world's rule
    reasoning_tokens: int = 128  # the recipe's default budget for generated reasoning
    max_length: int = 768  # the rubric prompt is ~520 toy tokens; RoPE computes past pretraining length
    pairs: int = 5  # interleaved pairs per comparison (training: minibt, bare, bare, minibt, ...)
    fast_runs: int = 5  # back-to-back runs of the fast side in each pair (batched generation, distribution scoring)


# The curator's 300 steps of 6 rows (~90 s of the bench's ~130 s here): run seeds 0-3 gave agreement
# 0.84/0.84/0.83/0.86; 300 of 8 rows 0.84/0.87/0.82 (seeds 0-2) in a third more time; 150 of 8 at twice
# the learning rate, 0.71-0.86, and 400 of 4, 0.75-0.79 (seeds 0 and 2).
# Each pair's fast side 1-2 s (5 x ~0.2 s generation, 5 x ~0.37 s scoring) against a ~3-3.6 s slow side.
QUICK = Settings(generate_prompts=64, curate_pairs=96, train_steps=20, pairs=5, fast_runs=5, curator_steps=300,
                 curator_batch=6, reasoning_tokens=64)  # fmt: skip

# Random-weight models of real shapes never stop at EOS: every generation runs its whole budget, and
# the one-at-a-time loop on an 8B model costs ~25 ms per token. The curator only needs to exist.
GPU = Settings(generate_prompts=64, curate_pairs=128, train_steps=30, pairs=3, fast_runs=3, curator_steps=10,
               augmented_ratings=0, reasoning_tokens=128)  # fmt: skip


# --- statistics ------------------------------------------------------------------------------


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); None if undefined."""
    if len(a) != len(b):
        raise ValueError("spearman: sequences of different lengths")
    if len(a) < 2:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def tie_ceiling(b: Sequence[float]) -> float | None:
    """The highest Spearman any tie-free score can reach against `b`: that of a score ordering b's
    classes exactly (which order it gives inside a class of tied b changes nothing)."""
    return spearman([x + 1e-9 * i for i, x in enumerate(b)], b)


# --- measuring -------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Memory:
    """Peak memory per phase: CUDA peak allocation on a GPU (reset per phase), else the process's max RSS."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.phases[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            self.phases[name] = peak_rss_mib()  # monotone: the peak up to the end of this phase

    def report(self) -> dict[str, Any]:
        kind = "cuda_max_memory_allocated_mib" if torch.cuda.is_available() else "max_rss_mib_up_to_phase_end"
        return {"kind": kind, "phases": self.phases, "overall": max(self.phases.values(), default=peak_rss_mib())}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def interleaved_pairs(fast: Callable[[], Any], slow: Callable[[], Any], pairs: int,
                      fast_runs: int) -> tuple[Any, Any, list[float], list[float]]:
    """(fast's output, slow's output, fast seconds per run, slow seconds), one time of each per pair.

    After one untimed fast run (first-call costs), `pairs` times: the fast side `fast_runs` times back
    to back (their mean), then the slow side once. Both sides must be seeded (the same output each run)."""
    fast_out = fast()
    fast_s, slow_s, slow_out = [], [], None
    for _ in range(pairs):
        total = 0.0
        for _ in range(fast_runs):
            fast_out, s = timed(fast)
            total += s
        fast_s.append(total / fast_runs)
        slow_out, s = timed(slow)
        slow_s.append(s)
    return fast_out, slow_out, fast_s, slow_s


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Min, quartiles and max of the pairs' ratios: how far one pair can be from the median reported."""
    q = np.percentile(np.asarray(values, dtype=float), [0, 25, 50, 75, 100])
    return {"n": len(values), **{k: round(float(v), 3) for k, v in zip(("min", "q1", "median", "q3", "max"), q)}}


def count_tokens(engine: Any, texts: Sequence[str]) -> int:
    """Tokens in the returned texts: the same count for both sides of a generation comparison."""
    return sum(len(ids) for ids in engine.tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0


# --- generation ------------------------------------------------------------------------------


def generate_one_at_a_time(engine: Any, adapter: str, prompts: Sequence[str], max_new_tokens: int,
                           temperature: float, top_p: float, seed: int = 0) -> list[str]:
    """The plain way: model.generate on one prompt at a time (same model, adapter, inputs and sampling;
    prompt i samples from the stream of batch i, transformers' generate drawing from the global generator)."""
    from minibt.engine.sampling import batch_seed, seeded

    sample = temperature > 0
    outputs = []
    with engine.use(adapter), torch.no_grad():
        for i, ids in enumerate(engine.infer.encode(prompts, room=max_new_tokens)):
            input_ids = torch.tensor([ids], device=engine.device)
            with seeded(batch_seed(seed, i)) if sample else contextlib.nullcontext():
                out = engine.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                    do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                    top_k=None, pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id,
                )
            outputs.append(engine.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def compare_generation(engine: Any, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                       top_p: float, batch_size: int, seed: int = 0, pairs: int = 5, fast_runs: int = 5) -> dict[str, Any]:
    """Batched `Engine.generate` vs the one-at-a-time loop on the same prompts: tokens/s each side, as
    interleaved pairs (`interleaved_pairs`; both sides seeded, so each run returns the same texts)."""
    out, single, batched_s, single_s = interleaved_pairs(
        lambda: engine.generate(adapter, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, seed=seed),
        lambda: generate_one_at_a_time(engine, adapter, prompts, max_new_tokens, temperature, top_p, seed),
        pairs, fast_runs)
    b_tokens, s_tokens = count_tokens(engine, out), count_tokens(engine, single)
    ratios = [(b_tokens / b) / (s_tokens / s) for b, s in zip(batched_s, single_s)] if s_tokens else []
    return {
        "prompts": len(prompts),
        "outputs": {"batched": len(out), "one_at_a_time": len(single)},
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "tokens": {"batched": b_tokens, "one_at_a_time": s_tokens},
        "seconds": {"batched": [round(s, 3) for s in batched_s], "one_at_a_time": [round(s, 3) for s in single_s]},
        "tokens_per_second": {"batched": round(b_tokens / float(np.median(batched_s)), 1),
                              "one_at_a_time": round(s_tokens / float(np.median(single_s)), 1)},
        "speedup": round(float(np.median(ratios)), 2) if ratios else None,
        "spread": spread(ratios) if ratios else None,
        "speedup_measure": "generated tokens/s, each returned text re-tokenized by the same tokenizer on both sides; "
                           f"median over {pairs} interleaved pairs (batched side: mean of {fast_runs} runs per pair)",
        "_outputs": out,
    }


# --- curation --------------------------------------------------------------------------------


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


def curator_rows(engine: Any, rated: Sequence[dict]) -> list[dict[str, str]]:
    """Rows that teach an adapter the rubric: each rated pair in the rubric format, twice with a brief
    reasoning before "Score: N" (so that free generation reasons first) and once with the score alone
    (the distribution mode reads the score right after "Score:")."""
    from minibt.roles import RUBRIC_ANSWER_ROOM, rubric_prompt

    rows = []
    for r in rated:
        prompt = rubric_prompt(engine, r["instruction"], r["output"], RUBRIC_ANSWER_ROOM + 32)
        for reasoning in (True, True, False):
            rows.append({"prompt": prompt, "completion": rating_completion(r["score"], reasoning)})
    return rows


def compare_curation(engine: Any, recipe: Any, curator: str, pairs: list[dict[str, Any]], reasoning_tokens: int,
                     batch_size: int, timed_pairs: int = 5, fast_runs: int = 3) -> dict[str, Any]:
    """Distribution scoring vs generated reasoning + parsed score, through the curate stage's own code,
    as `timed_pairs` interleaved pairs (`interleaved_pairs`); 0 scores each way once, untimed (agreement only)."""
    from minibt.roles import score_pairs

    dist_recipe = dataclasses.replace(recipe, curate=dataclasses.replace(
        recipe.curate, method="rubric", mode="distribution", score="expected", batch_size=batch_size))
    gen_recipe = dataclasses.replace(recipe, curate=dataclasses.replace(
        recipe.curate, method="rubric", mode="generate", reasoning_tokens=reasoning_tokens, batch_size=batch_size))
    def distribution() -> list[dict[str, Any]]:
        return score_pairs(engine, dist_recipe, curator, pairs)

    def generate() -> list[dict[str, Any]]:
        return score_pairs(engine, gen_recipe, curator, pairs)

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
        "rank_agreement": _round(spearman([dist[i]["score"] for i in parsed], g)),
        "rank_agreement_pairs": len(parsed),
        "rank_agreement_ceiling": _round(tie_ceiling(g)),
        "rank_agreement_argmax": _round(spearman([dist[i]["argmax_score"] for i in parsed], g)),
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


# --- training --------------------------------------------------------------------------------


def bare_trl_train(model_dir: str, engine: Any, rows: Sequence[dict[str, str]], cfg: Any, work_dir: str) -> dict[str, Any]:
    """The same training as `Engine.train`, written as a plain trl + peft script: its own base, loaded
    as the engine loads one (before the clock starts), get_peft_model and SFTTrainer with minibt's
    LoRA config and trainer arguments."""
    from datasets import Dataset
    from trl import SFTTrainer

    from minibt.engine import load_base, sft_config
    from minibt.engine.adapters import wrap

    model, tokenizer = load_base(dataclasses.replace(engine.model_cfg, name=model_dir))

    def run() -> Any:
        peft_model = wrap(model, engine.lora, engine.seed)
        args = sft_config(cfg, engine.model_cfg.max_length, engine.dtype, engine.seed, work_dir, packing=False)
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(list(rows)),
                             processing_class=tokenizer)
        return trainer.train()

    result, seconds = timed(run)
    return {"seconds": seconds, "train_loss": round(float(result.training_loss), 4)}


def compare_training(engine: Any, model_dir: str, rows: Sequence[dict[str, str]], cfg: Any, work: Path,
                     pairs: int, keep: str) -> dict[str, Any]:
    """`Engine.train` vs the bare script as interleaved pairs (minibt, bare, bare, minibt, ...: the sides
    cost alike, so each goes first half the time); the median of the pairs' ratios.

    The first minibt run trains adapter `keep`, which stays on the engine (the bench uses it next).
    """
    minibt_runs, bare_runs, losses = [], [], {"minibt": [], "bare": []}
    # warm-up, not measured: the first trainer in a process pays one-off costs (imports, allocator)
    warm = dataclasses.replace(cfg, max_steps=3)
    engine.train(f"{keep}_warmup", rows, warm, work / "warm")
    engine.delete_adapter(f"{keep}_warmup")
    from minibt.bench_bare import BareSide  # under unsloth, the bare side trains in a process without it

    bare = BareSide(model_dir, engine, rows)
    bare(warm, str(work / "warm_bare"))  # the worker's own warm-up, when there is one
    for k in range(pairs):
        order = ("minibt", "bare") if k % 2 == 0 else ("bare", "minibt")
        for side in order:
            if side == "minibt":
                name = keep if not minibt_runs else f"{keep}_rep{k}"
                res, s = timed(lambda: engine.train(name, rows, cfg, work / f"minibt{k}"))
                if name != keep:
                    engine.delete_adapter(name)
                minibt_runs.append(s)
                losses["minibt"].append(res["train_loss"])
            else:
                res = bare(cfg, str(work / f"bare{k}"))
                bare_runs.append(res["seconds"])
                losses["bare"].append(res["train_loss"])
    bare.close()
    ratios = [b / m for b, m in zip(bare_runs, minibt_runs)]
    return {
        "rows": len(rows),
        "bare_side": bare.where,
        "steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "seconds": {"minibt": [round(s, 3) for s in minibt_runs], "bare": [round(s, 3) for s in bare_runs]},
        "train_loss": losses,
        "ratio": round(float(np.median(ratios)), 3),
        "spread": spread(ratios),
        "ratio_measure": f"bare trl+peft time / Engine.train time (trainer set-up + training; bases loaded before), "
                         f"median over {pairs} interleaved pairs",
    }


# --- set-up ----------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_random_model(name: str, tokenizer_dir: str, out_dir: Path) -> str:
    """A random-weight Llama with the real shapes of `name` (GPU_CONFIGS), saved with the toy tokenizer.

    The vocabulary keeps its real size (embedding and LM head cost what they do in the real model);
    the toy tokenizer only ever produces ids below its own size.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**GPU_CONFIGS[name], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(out_dir)


def default_recipe_path() -> Path:
    from minibt.recipes import builtin_path

    return builtin_path("toy")  # shipped in the package: an installed minibt benches without a clone


def run_bench(settings: Settings, recipe_path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
              gpu_config: str | None = None, backend: str = "auto", work_dir: str | os.PathLike | None = None,
              mode: str = "custom") -> dict[str, Any]:
    """Run every comparison; return the results (JSON-ready)."""
    from minibt.engine import Engine, has_gpu, import_backend
    from minibt.recipe import load_recipe

    t_start = time.perf_counter()
    load_start = load_average()
    if not has_gpu():
        torch.set_num_threads(1)  # two threads collapse on small shared VMs (STACK-NOTES)
    recipe_path = Path(recipe_path) if recipe_path else default_recipe_path()
    recipe = load_recipe(recipe_path, [f"model.max_length={settings.max_length}", f"model.backend={backend}", *overrides])
    if recipe.world is None:
        raise ValueError("minibt bench needs a recipe with a `toy` section (its world supplies data and ratings)")
    import_backend(recipe.model.backend)
    from minibt.stages.augment import write_instructions
    from minibt.stages.backward import MYX, backward_rows
    from minibt.toy.plugin import toy_base, toy_world
    from minibt.roles import build_prompts, clipped_backward_prompt

    memory = Memory()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="minibt-bench-"))
    _, world = toy_world(recipe)
    base_dir, base_s = timed(lambda: str(toy_base(recipe)))  # pretrained once, then cached
    model_dir = base_dir if gpu_config is None else build_random_model(gpu_config, base_dir, work / gpu_config)
    with memory.phase("load"):
        engine, load_s = timed(lambda: Engine.load(dataclasses.replace(recipe.model, name=model_dir), recipe.lora,
                                                   seed=recipe.run.seed))
    params = sum(p.numel() for p in engine.model.get_base_model().parameters())
    log.info("bench: %s (%s, %s), %d params", model_dir, engine.backend, recipe.model.quantization, params)

    # 1. training: the backward model myx, minibt's way and the bare way
    # no checkpoints in timed training (the bare script writes none either)
    train_cfg = dataclasses.replace(recipe.backward, max_steps=settings.train_steps, save_steps=0)
    with memory.phase("training"):
        training = compare_training(engine, model_dir, backward_rows(engine, world.seed_pairs), train_cfg,
                                    work / "train", settings.pairs, keep=MYX)

    # 2. augmentation: myx writes instructions for corpus texts (the recipe's sampling and budget)
    aug = recipe.augment
    corpus = world.corpus[: settings.generate_prompts]
    texts, corpus = build_prompts(corpus, lambda r: clipped_backward_prompt(engine, r["text"], aug.max_new_tokens), "t")
    with memory.phase("generation"):
        generation = compare_generation(engine, MYX, texts, aug.max_new_tokens, aug.temperature, aug.top_p,
                                        aug.batch_size, seed=recipe.run.seed, pairs=settings.pairs,
                                        fast_runs=settings.fast_runs)
    instructions = generation.pop("_outputs")

    # 3. the curator learns the rubric from rated pairs, then both curation modes score the same
    # augmented pairs. Its lessons use texts from the corpus's end; the scored pairs come from its start.
    def augment(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        return [p for p in write_instructions(engine, aug, rows, seed) if p["instruction"].strip()]

    lessons = world.corpus[len(world.corpus) - settings.augmented_ratings :] if settings.augmented_ratings else []
    scorable = world.corpus[: len(world.corpus) - len(lessons)]
    pool = [{**r, "instruction": i, "output": r["text"]} for r, i in zip(corpus, instructions) if i.strip()]
    seen, chunk = settings.generate_prompts, 2 * settings.curate_pairs
    while len(stratified(pool, settings.curate_pairs)) < settings.curate_pairs and seen < len(scorable):
        pool += augment(scorable[seen : seen + chunk], recipe.run.seed + 1 + seen)
        seen += chunk
    pairs, natural = stratified(pool, settings.curate_pairs), pool[: settings.curate_pairs]

    cur_cfg = dataclasses.replace(recipe.forward, max_steps=settings.curator_steps, batch_size=settings.curator_batch,
                                  save_steps=0)
    with memory.phase("curator_training"):
        rated = list(world.rated_pairs) + seed_ratings(world, settings.seed_ratings, recipe.run.seed)
        taught = augment(lessons, recipe.run.seed + 7) if lessons else []
        rated += [{"instruction": p["instruction"], "output": p["output"], "score": t}
                  for p, t in zip(taught, truth_scores(world, taught))]
        cur_res, cur_s = timed(lambda: engine.train(CURATOR, curator_rows(engine, rated), cur_cfg, work / "curator"))
    with memory.phase("curation"):
        curation = compare_curation(engine, recipe, CURATOR, pairs, settings.reasoning_tokens,
                                    recipe.curate.batch_size, timed_pairs=settings.pairs,
                                    fast_runs=settings.fast_runs)
        curation["natural"] = compare_curation(engine, recipe, CURATOR, natural, settings.reasoning_tokens,
                                               recipe.curate.batch_size, timed_pairs=0)
    curation["pairs_drawn"] = (f"{sum(p['label'] != 'fact' for p in pairs)} noise + {sum(p['label'] == 'fact' for p in pairs)} "
                               f"fact texts, in corpus order, with myx's instructions (curation.natural: the first "
                               f"{len(natural)} texts as they come)")
    for part, scored in ((curation, pairs), (curation["natural"], natural)):
        scores = part.pop("_scores")
        if gpu_config is None:
            truth = truth_scores(world, scored)
            parsed = [i for i, s in enumerate(scores["generate"]) if s is not None]
            part["truth_spearman"] = {
                "distribution": _round(spearman(scores["distribution"], truth)),
                "generate": _round(spearman([scores["generate"][i] for i in parsed], [truth[i] for i in parsed])),
                "note": "vs the toy world's ground truth (5 fact asked for, 2 fact under a wrong instruction, 1 noise)",
            }
    curation["curator"] = {"rated_pairs": len(rated), "from_world_rated_pairs": len(world.rated_pairs),
                           "from_augmented_pairs": len(taught), "rows": cur_res["examples"], "steps": cur_res["steps"],
                           "train_loss": cur_res["train_loss"], "seconds": round(cur_s, 1)}

    # 4. the vLLM engine beside the HF engine, same base, adapters, texts and pairs (minibt/bench_vllm.py)
    from minibt.bench_vllm import compare_vllm

    with memory.phase("vllm"):
        vllm_side = compare_vllm(engine, recipe, model_dir, MYX, CURATOR, texts, pairs, work, settings.pairs)

    result = {
        "bench": "minibt",
        "schema": SCHEMA_VERSION,
        "mode": mode if gpu_config is None else f"gpu:{gpu_config}",
        "generation_speedup": generation["speedup"],
        "curation_speedup": curation["speedup"],
        "curation_rank_agreement": curation["rank_agreement"],
        "unparseable_rate": curation["unparseable_rate"],
        "training_ratio": training["ratio"],
        "spread": {"generation_speedup": generation["spread"], "curation_speedup": curation["spread"],
                   "training_ratio": training["spread"]},
        "peak_memory_mib": memory.report(),
        "goals": {},
        "machine": {
            "device": torch.cuda.get_device_name(0) if has_gpu() else f"cpu ({platform.processor() or platform.machine()})",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": {"source": "toy base" if gpu_config is None else f"random weights, {gpu_config} shapes",
                  "parameters": params, "backend": engine.backend, "quantization": recipe.model.quantization,
                  "max_length": recipe.model.max_length, "load_seconds": round(load_s, 1),
                  "base_build_seconds": round(base_s, 1)},
        "generation": generation,
        "curation": curation,
        "training": training,
        "vllm": vllm_side,
        "settings": dataclasses.asdict(settings),
        "engine_truncated": engine.truncated,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    result["goals"] = check_goals(result)
    return result


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def check_goals(result: dict[str, Any]) -> dict[str, Any]:
    values = dict(result)
    values["unparseable_rate_distribution"] = result["unparseable_rate"]["distribution"]
    out = {}
    for key, (op, target) in GOALS.items():
        v = values.get(key)
        met = v is not None and (v >= target if op == ">=" else v == target)
        out[key] = {"value": v, "target": f"{op} {target}", "met": bool(met)}
    return out


def _range(spread: dict[str, Any] | None) -> str:
    return "" if not spread else f"(pairs {spread['min']}-{spread['max']}, IQR {spread['q1']}-{spread['q3']})"


def summary_lines(result: dict[str, Any]) -> list[str]:
    g, c, t = result["generation"], result["curation"], result["training"]
    lines = [
        f"model: {result['model']['source']}, {result['model']['parameters']:,} params, {result['model']['backend']}, "
        f"{result['model']['quantization']}; device {result['machine']['device']}, {result['machine']['torch_threads']} thread(s), "
        f"load average {result['machine']['load_average_start']} -> {result['machine']['load_average_end']}",
        f"generation  batched {g['tokens_per_second']['batched']} tok/s vs one-at-a-time {g['tokens_per_second']['one_at_a_time']} tok/s "
        f"({g['prompts']} prompts, max_new_tokens {g['max_new_tokens']}): x{g['speedup']} {_range(g['spread'])}",
        f"curation    distribution {c['seconds']['distribution']} s vs generate ({c['reasoning_tokens']} reasoning tokens) "
        f"{c['seconds']['generate']} s on {c['pairs']} pairs: x{c['speedup']} {_range(c['spread'])}; Spearman {c['rank_agreement']} "
        f"over {c['rank_agreement_pairs']} (tie ceiling {c['rank_agreement_ceiling']}, argmax {c['rank_agreement_argmax']}; "
        f"plain sample {c['natural']['rank_agreement']}, ceiling {c['natural']['rank_agreement_ceiling']}); "
        f"unparseable {c['unparseable_rate']}",
        f"training    bare trl {t['seconds']['bare']} s vs Engine.train {t['seconds']['minibt']} s "
        f"({t['steps']} steps): ratio {t['ratio']} {_range(t['spread'])}",
        f"memory      {result['peak_memory_mib']}",
        vllm_line(result.get("vllm", {})),
        "goals       " + ", ".join(f"{k} {v['value']} ({v['target']}: {'met' if v['met'] else 'NOT met'})"
                                   for k, v in result["goals"].items()),
        f"total       {result['seconds_total']} s",
    ]
    return lines


def main(quick: bool, as_json: bool, recipe_path: str | None, overrides: Sequence[str], gpu_config: str | None,
         backend: str, out: str | None) -> dict[str, Any]:
    """The CLI's entry: progress on stderr; a summary, or one JSON object on the last stdout line."""
    settings = QUICK if quick else GPU if gpu_config else Settings()
    if gpu_config and not torch.cuda.is_available():
        raise SystemExit("--gpu-config needs a CUDA GPU (random-weight models of real shapes are too slow on a CPU)")
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs: keep stdout for the result
        result = run_bench(settings, recipe_path, overrides, gpu_config, backend, mode="quick" if quick else "full")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        stdout.write(json.dumps(result) + "\n")
    else:
        stdout.write("\n".join(summary_lines(result)) + "\n")
    stdout.flush()
    return result
