"""`minibt bench`: minibt's augmentation, curation and training measured side by side with the plain way.

Every comparison runs in one process, on the same model, adapter and data, as interleaved pairs
(fast side, slow side, fast, slow, ...; the fast side a few runs back to back, their mean, since one
run takes tenths of a second): each pair gives a ratio, the median of the pairs' ratios counts, and
their spread (min, quartiles, max) is reported beside it (`spread`), so a disturbed pair shows:

- generation: the HF engine's `generate` (batched, length-sorted, left-padded, KV cache, stop at EOS) vs a
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
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minibt.bench.bare import bare_trl_train
from minibt.bench.curation import (
    VERDICTS,
    agreement,
    compare_curation,
    curator_rows,
    rating_completion,
    seed_ratings,
    stratified,
    truth_scores,
)
from minibt.bench.generation import (
    compare_generation,
    count_tokens,
    generate_one_at_a_time,
)
from minibt.bench.random_model import GPU_CONFIGS, build_random_model
from minibt.bench.stats import (
    Memory,
    interleaved_pairs,
    load_average,
    peak_rss_mib,
    rankdata,
    round4,
    spearman,
    spread,
    tie_ceiling,
    timed,
)
from minibt.bench.training import compare_training
from minibt.bench.vllm import vllm_line

# the names importers use as `minibt.bench.X` (each defined in its submodule)
__all__ = [
    "CURATOR", "GOALS", "GPU", "GPU_CONFIGS", "QUICK", "SCHEMA_VERSION", "VERDICTS", "Memory", "Settings",
    "agreement", "bare_trl_train", "build_random_model", "check_goals", "compare_curation", "compare_generation",
    "compare_training", "count_tokens", "curator_rows", "default_recipe_path", "generate_one_at_a_time",
    "interleaved_pairs", "load_average", "main", "peak_rss_mib", "rankdata", "rating_completion", "run_bench",
    "seed_ratings", "spearman", "spread", "stratified", "summary_lines", "tie_ceiling", "timed", "truth_scores",
]

log = logging.getLogger("minibt.bench")

SCHEMA_VERSION = 1
CURATOR = "rater"  # the bench's curator adapter
# The goals for `--quick` on a 2-core CPU with the toy world.
GOALS = {
    "generation_speedup": (">=", 10.0),
    "curation_speedup": (">=", 4.0),
    "curation_rank_agreement": (">=", 0.8),
    "unparseable_rate_distribution": ("==", 0.0),
    "training_ratio": (">=", 0.95),
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


# --- set-up ----------------------------------------------------------------------------------


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
        torch.set_num_threads(1)  # two threads collapse on small shared VMs
    recipe_path = Path(recipe_path) if recipe_path else default_recipe_path()
    recipe = load_recipe(recipe_path, [f"model.max_length={settings.max_length}", f"model.backend={backend}", *overrides])
    if recipe.world is None:
        raise ValueError("minibt bench needs a recipe with a `toy` section (its world supplies data and ratings)")
    import_backend(recipe.model.backend)
    from minibt.roles import build_prompts, clipped_backward_prompt
    from minibt.stages.augment import write_instructions
    from minibt.stages.backward import MYX, backward_rows
    from minibt.toy.plugin import toy_base, toy_world

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
    texts, corpus = build_prompts(corpus, lambda r: clipped_backward_prompt(engine.text, r["text"], aug.max_new_tokens), "t")
    with memory.phase("generation"):
        generation = compare_generation(engine, MYX, texts, aug.max_new_tokens, aug.temperature, aug.top_p,
                                        aug.batch_size, seed=recipe.run.seed, pairs=settings.pairs,
                                        fast_runs=settings.fast_runs)
    instructions = generation.pop("_outputs")

    # 3. the curator learns the rubric from rated pairs, then both curation modes score the same
    # augmented pairs. Its lessons use texts from the corpus's end; the scored pairs come from its start.
    def augment(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        return [p for p in write_instructions(engine.infer, aug, rows, seed) if p["instruction"].strip()]

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
        cur_res, cur_s = timed(lambda: engine.train(CURATOR, curator_rows(engine.text, rated), cur_cfg, work / "curator"))
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
                "distribution": round4(spearman(scores["distribution"], truth)),
                "generate": round4(spearman([scores["generate"][i] for i in parsed], [truth[i] for i in parsed])),
                "note": "vs the toy world's ground truth (5 fact asked for, 2 fact under a wrong instruction, 1 noise)",
            }
    curation["curator"] = {"rated_pairs": len(rated), "from_world_rated_pairs": len(world.rated_pairs),
                           "from_augmented_pairs": len(taught), "rows": cur_res["examples"], "steps": cur_res["steps"],
                           "train_loss": cur_res["train_loss"], "seconds": round(cur_s, 1)}

    # 4. the vLLM engine beside the HF engine, same base, adapters, texts and pairs (minibt/bench/vllm.py)
    from minibt.bench.vllm import compare_vllm

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
        "engine_truncated": engine.text.truncated,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    result["goals"] = check_goals(result)
    return result


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
