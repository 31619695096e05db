"""`minibt eval`: how good are the run's models? Results merge into metrics.json and the report.

pairwise   two adapters (default m1 vs m0) answer held-out instructions; a judge (an adapter of the
           same run, or any local model loaded on its own) reads both answers and its next-token
           distribution over "A"/"B" is the verdict: one forward pass, nothing to parse. Each pair is
           judged in both orders, so a judge that prefers a position cancels out; an instruction is a
           win when both orders prefer the model, a tie when they disagree (counted as half). The win
           rate comes with a 95 % Wilson interval.
ifeval     IFEval's strict/loose instruction-following accuracy through lm-evaluation-harness (the
           optional extra `minibt[eval]`), on the base with one adapter, offline (minibt/ifeval.py).
toy        the run's world's own metrics (the toy world's ground truth), recomputed (minibt/worlds.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minibt import io, prompts
from minibt.engine import BASE, BaseOnly, HFInference, Inference, load_base
from minibt.errors import MinibtError
from minibt.ifeval import ifeval, require_ifeval
from minibt.rundir import RunDir
from minibt.worlds import world_of

log = logging.getLogger("minibt.eval")

# --- statistics ------------------------------------------------------------------------------


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (fractional successes allowed: ties count half).

    It always contains successes / n, and stays inside [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


# --- metrics.json ----------------------------------------------------------------------------


def merge_metrics(run_path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into <run>/metrics.json (sections such as "pairwise" merge key by key)."""
    path = Path(run_path) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(metrics.get(key), dict) and key in ("pairwise", "ifeval"):
            metrics[key] = {**metrics[key], **value}
        else:
            metrics[key] = value
    io.write_json(path, metrics)
    return metrics


# --- held-out instructions -------------------------------------------------------------------


def read_instructions(run: RunDir, path: str | Path | None, limit: int | None = None) -> tuple[list[str], str]:
    """Instructions from a JSONL file (rows with "instruction"), or the toy world's data/eval.jsonl."""
    from minibt.data.common import jsonl_rows
    from minibt.errors import DataError

    if path is None:
        path = run.data("eval")
        if not path.is_file():
            raise MinibtError(f"{run.path} has no held-out instructions (data/eval.jsonl is the toy world's); "
                              "give --instructions FILE.jsonl with an 'instruction' field per row")
    path = Path(path)
    rows = []
    for where, row, why in jsonl_rows(path):
        if why is None and not (isinstance(row, dict) and isinstance(row.get("instruction"), str) and row["instruction"].strip()):
            why = "needs a non-empty string field 'instruction'"
        if why is not None:
            raise DataError(f"{path}: {where}: {why}")
        rows.append(row["instruction"])
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows[:limit] if limit else rows, str(path)


# --- a judge loaded on its own -----------------------------------------------------------------


def load_judge(name: str, quantization: str = "none", trust_remote_code: bool = False,
               revision: str | None = None) -> HFInference:
    """Any local causal LM (or hub id in the cache) as a judge: loaded as the engine loads a base, no
    adapters ("base" only), the engine's scoring code; its context is the model's, at most 4096 tokens."""
    from minibt.sections import ModelSection

    cfg = ModelSection(name=name, backend="transformers", quantization=quantization, trust_remote_code=trust_remote_code,
                       revision=revision)
    model, tokenizer = load_base(cfg)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    cfg = dataclasses.replace(cfg, max_length=min(int(context), 4096))
    return HFInference(model, tokenizer, cfg, "transformers", BaseOnly(model, tokenizer), seed=0)


# --- pairwise --------------------------------------------------------------------------------


def judge_prompts(judge: Inference, instruction: str, first: str, second: str) -> str:
    """The rendered judge prompt, each answer clipped so the whole fits the judge's context."""
    text = judge.text
    overhead = text.count_tokens(text.render(prompts.judge_messages(instruction, "", ""))) + 8
    budget = max(16, (text.max_length - overhead) // 2)
    return text.render(prompts.judge_messages(instruction, text.clip_text(first, budget), text.clip_text(second, budget)))


def prefer_first(judge: Inference, adapter: str, triples: Sequence[tuple[str, str, str]], batch_size: int = 8,
                 progress: Any = None) -> np.ndarray:
    """P(the judge prefers answer A) for each (instruction, A, B), renormalised over "A"/"B"."""
    texts = [judge_prompts(judge, i, a, b) for i, a, b in triples]
    probs, _ = judge.next_token_probs(adapter, texts, prompts.JUDGE_PREFIX, prompts.JUDGE_CHOICES,
                                      batch_size=batch_size, progress=progress)
    return probs[:, 0]


def pairwise(engine: Inference, recipe: Any, instructions: Sequence[str], a: str, b: str, *, max_new_tokens: int,
             judge: Inference | None = None, judge_adapter: str = BASE, judge_name: str | None = None,
             batch_size: int = 8) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Win rate of adapter `a` over adapter `b` on `instructions`; returns (summary, per-instruction rows)."""
    from tqdm.auto import tqdm

    from minibt.roles import forward_prompt

    judge = judge or engine
    rendered = [forward_prompt(engine.text, recipe, i) for i in instructions]
    answers = {}
    for name in (a, b):
        with tqdm(total=len(rendered), desc=f"eval: {name} answers", unit="row", dynamic_ncols=True) as bar:
            answers[name] = engine.generate(name, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=bar)
    # both orders: a first, then b first; P(a better) = P(A) in the first, P(B) in the second
    triples = [(i, x, y) for i, x, y in zip(instructions, answers[a], answers[b])]
    triples += [(i, y, x) for i, x, y in zip(instructions, answers[a], answers[b])]
    with tqdm(total=len(triples), desc=f"eval: judge {judge_name or judge_adapter}", unit="pair", dynamic_ncols=True) as bar:
        p_first = prefer_first(judge, judge_adapter, triples, batch_size=batch_size, progress=bar)
    n = len(instructions)
    p_a_shown_first, p_a_shown_second = p_first[:n], 1 - p_first[n:]

    def verdict(p: float) -> float:
        return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5

    rows, outcomes = [], []
    for k, instruction in enumerate(instructions):
        v1, v2 = verdict(p_a_shown_first[k]), verdict(p_a_shown_second[k])
        outcome = (v1 + v2) / 2  # 1 win, 0.5 tie (the orders disagree), 0 loss
        outcomes.append(outcome)
        rows.append({"instruction": instruction, f"answer_{a}": answers[a][k], f"answer_{b}": answers[b][k],
                     f"p_{a}_better_shown_first": round(float(p_a_shown_first[k]), 5),
                     f"p_{a}_better_shown_second": round(float(p_a_shown_second[k]), 5), "outcome": outcome})
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    rate = (wins + 0.5 * ties) / max(1, n)
    lo, hi = wilson(wins + 0.5 * ties, n)
    summary = {
        "a": a, "b": b, "judge": judge_name or judge_adapter, "n": n,
        "wins": wins, "ties": ties, "losses": n - wins - ties,
        "win_rate": round(rate, 4), "ci95": [round(lo, 4), round(hi, 4)], "ci_method": "wilson, ties count half",
        "soft_win_rate": round(float(np.mean((p_a_shown_first + p_a_shown_second) / 2)) if n else 0.5, 4),
        "orders": 2,
        "judge_prefers_position_a": round(float(np.mean(p_first)), 4) if n else 0.5,  # 0.5: no position bias
        "order_consistent": round(sum(o != 0.5 for o in outcomes) / max(1, n), 4),
        "identical_answers": sum(x == y for x, y in zip(answers[a], answers[b])),
        "max_new_tokens": max_new_tokens,
    }
    return summary, rows


# --- the command ---------------------------------------------------------------------------------


def run_eval(run_dir: str | Path, compare: tuple[str, str] | None = ("m1", "m0"), instructions: str | Path | None = None,
             judge: str | None = None, judge_model: str | None = None, judge_quantization: str = "none",
             limit: int | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
             ifeval_adapters: Sequence[str] = (), ifeval_data: str | Path | None = None, ifeval_limit: int | None = None,
             ifeval_max_tokens: int = 1280, toy: bool = False) -> dict[str, Any]:
    """Everything `minibt eval` does; returns what it merged into metrics.json."""
    from minibt.report import safe_build_report

    run = RunDir.open(run_dir)
    if judge and judge_model:
        raise MinibtError("give --judge ADAPTER or --judge-model PATH, not both")
    if ifeval_adapters:
        require_ifeval(ifeval_data)  # say what is missing before anything loads
    world = world_of(run.recipe()) if toy else None
    if toy and world is None:
        raise MinibtError("--toy: this run was not made by a toy-world recipe")
    updates: dict[str, Any] = {}
    if compare or toy:
        from minibt.session import open_run

        questions = read_instructions(run, instructions, limit)[0] if compare else []
        judge_adapter = judge or BASE
        wanted = [x for x in (*(compare or ()), judge_adapter if not judge_model else BASE) if x != BASE]
        session = open_run(run.path, adapters=list(dict.fromkeys(wanted)))
        if compare:
            a, b = compare
            judge_engine, judge_name = None, judge_adapter
            if judge_model:
                judge_engine, judge_name = load_judge(judge_model, judge_quantization), judge_model
            elif judge is None:
                log.info("judge: the run's base model (no adapter); --judge-model PATH brings a stronger judge")
            summary, rows = pairwise(session.engine, session.recipe, questions, a, b, judge=judge_engine,
                                     judge_adapter=BASE if judge_model else judge_adapter, judge_name=judge_name,
                                     max_new_tokens=max_new_tokens or session.answer_tokens, batch_size=batch_size)
            summary["instructions"] = str(instructions) if instructions else "data/eval.jsonl"
            io.write_jsonl(run.path / "eval" / f"pairwise_{a}_vs_{b}.jsonl", rows)
            updates["pairwise"] = {f"{a}_vs_{b}": summary}
            merge_metrics(run.path, updates)
        if world is not None:  # the world's own metrics (minibt/worlds.py), merged like every other part
            part = world.evaluate(run, session.engine, session.recipe)
            merge_metrics(run.path, part)
            updates.update(part)
        del session
        _free_memory()
    for adapter in ifeval_adapters:
        summary, rows = ifeval(run, adapter, data=ifeval_data, limit=ifeval_limit, max_gen_toks=ifeval_max_tokens,
                               batch_size=batch_size)
        io.write_jsonl(run.path / "eval" / f"ifeval_{adapter}.jsonl", rows)
        updates.setdefault("ifeval", {})[adapter] = summary
        merge_metrics(run.path, {"ifeval": {adapter: summary}})
    safe_build_report(run.path)
    return updates


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
