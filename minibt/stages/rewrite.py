"""Response rewriting (Back-and-Forth Translation, Nguyen et al. 2024, arXiv 2408.04614), optional.

After curate_r{k}, an adapter (by default the round's curator m_{k-1}) reads each kept pair's
instruction and web text and writes an answer in the assistant's style that keeps the text's content;
m_k then trains on the rewritten pairs. A guard keeps the original text where a rewrite loses the
content: a rewrite is used only if it holds at least `rewrite.min_overlap` of the text's distinct content
words (`content_overlap`). Every row keeps its text as `original_output`, the generated text as
`rewrite`, and the guard's decision (`rewrite_used`, `rewrite_overlap`), so the counts survive a resume.

Only the inference seam (minibt/engine/interface.py) is used: it runs on any engine.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from minibt import prompts
from minibt.engine import BASE
from minibt.engine.interface import Inference
from minibt.engine.text import TextRules
from minibt.recipe import Recipe
from minibt.rundir import RunDir
from minibt.stages.forward import forward_prompt
from minibt.stages.shards import build_prompts, map_shards
from minibt.workers import InProcess, Task, Work, Workers

TRUNCATED = "truncated_for_rewrite"  # the pair's text was cut to fit the rewrite prompt

# Words that carry no content of their own: a rewrite may drop or add them freely.
_STOPWORDS = frozenset("""
a an and are as at be been but by can could did do does for from had has have he her his how i if in
into is it its me my no not of on or our she so than that the their them then there these they this
those to us was we were what when where which who why will with would you your yes also just about
""".split())


def content_words(text: str) -> set[str]:
    """The distinct content words of a text: lowercased words and numbers, stopwords and one-letter words left out."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1 and w not in _STOPWORDS}


def content_overlap(original: str, rewrite: str) -> float:
    """Share of the original's distinct content words that the rewrite keeps (1.0 when it has none)."""
    words = content_words(original)
    return len(words & content_words(rewrite)) / len(words) if words else 1.0


def rewrite_adapter(recipe: Recipe, round_: int) -> str:
    """The adapter that rewrites in round k: the round's curator m_{k-1}, or the recipe's fixed one."""
    a = recipe.rewrite.adapter
    return f"m{round_ - 1}" if a == "curator" else a


def rewrite_prompt(rules: TextRules, recipe: Recipe, instruction: str, text: str) -> str:
    return clipped_rewrite_prompt(rules, recipe, instruction, text)[0]


def clipped_rewrite_prompt(rules: TextRules, recipe: Recipe, instruction: str, text: str) -> tuple[str, bool]:
    """The rewrite request as a forward prompt (with the seed tag when tags are on: the assistant's
    style), and whether the text was cut to fit. The text is clipped only if the prompt would leave too little room for an answer as long
    as the text (at most max_new_tokens); the engine's generation budget gives each prompt the rest."""
    head = rules.count_tokens(forward_prompt(rules, recipe, prompts.rewrite_request(instruction, "")))
    answer = min(recipe.rewrite.max_new_tokens, rules.count_tokens(text) + 8)
    budget = max(16, rules.max_length - head - answer)
    clipped, cut = rules.clip(text, budget)
    return forward_prompt(rules, recipe, prompts.rewrite_request(instruction, clipped)), cut


def guard(row: dict[str, Any], rewrite: str, min_overlap: float) -> dict[str, Any]:
    """The row with its rewrite, if the rewrite keeps the text's content; else with its original text."""
    original = row["output"]
    overlap = content_overlap(original, rewrite)
    used = bool(rewrite.strip()) and overlap >= min_overlap
    return {**row, "output": rewrite if used else original, "original_output": original, "rewrite": rewrite,
            "rewrite_used": used, "rewrite_overlap": round(overlap, 4)}


def rewrite_pairs(engine: Inference, recipe: Recipe, adapter: str, rows: list[dict[str, Any]], seed: int,
                  progress: Any = None) -> list[dict[str, Any]]:
    """Each row rewritten by `adapter` and passed through the guard."""
    cfg = recipe.rewrite
    texts, rows = build_prompts(rows, lambda r: clipped_rewrite_prompt(engine.text, recipe, r["instruction"], r["output"]), TRUNCATED)
    written = engine.generate(adapter, texts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, batch_size=cfg.batch_size, seed=seed, progress=progress)
    return [guard(r, w, cfg.min_overlap) for r, w in zip(rows, written)]


def rewrite(run: RunDir, engine: Inference, recipe: Recipe, round_: int, curated: list[dict[str, Any]],
            workers: Workers | None = None) -> dict[str, Any]:
    """Rewrite round k's curated pairs in shards on the run's `workers` (default: `engine`, in this
    process): data/rewritten_r{k}.jsonl; returns the manifest's counts.

    Each shard samples from its own seed, so a resumed run writes what an uninterrupted one would.
    """
    cfg = recipe.rewrite
    adapter = rewrite_adapter(recipe, round_)
    name = f"rewritten_r{round_}"
    workers = workers or InProcess(engine)
    work = Work(f"rewrite_r{round_}", rewrite_shard, recipe, adapters={} if adapter == BASE else {adapter: str(run.adapter(adapter))},
                args={"adapter": adapter, "name": name})
    done = map_shards(run, name, curated, cfg.shard_size, workers.runner(work), desc=f"rewrite r{round_} ({adapter})")
    used = sum(r["rewrite_used"] for r in done)
    return {
        "pairs": len(done),
        "rewritten": used,  # pairs whose output is now the rewrite
        "kept_original": len(done) - used,  # the guard kept the text: the rewrite lost its content (or was empty)
        "empty_rewrites": sum(not r["rewrite"].strip() for r in done),
        "mean_overlap": round(sum(r["rewrite_overlap"] for r in done) / max(1, len(done)), 4),
        "min_overlap": cfg.min_overlap,
        "truncated": sum(bool(r.get(TRUNCATED)) for r in done),
        "adapter": adapter,
        "engine": engine.name,
        **workers.counts(work.kind),
    }


def rewrite_shard(engine: Inference, task: Task, progress: Any) -> list[dict[str, Any]]:
    """One shard of rewriting, on any worker's engine (minibt/workers.py): its seed comes from its index."""
    recipe, args = task.work.recipe, task.work.args
    seed = zlib.crc32(f"{recipe.run.seed}:{args['name']}:{task.shard}".encode())
    return rewrite_pairs(engine, recipe, args["adapter"], task.rows, seed=seed, progress=progress)
