"""Measure every stage of a toy-world run against the world's ground truth: metrics.json.

`claims(metrics)` sets the measurements next to the paper's claims (m1 > m0, curated > uncurated,
curation raises data quality); metrics.json carries them too, and the run report lists them.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from tqdm.auto import tqdm

from minibt import io
from minibt.engine import BASE, Inference
from minibt.recipe import Recipe
from minibt.roles import MYX, backward_prompt, forward_prompt, round_threshold
from minibt.rundir import RunDir
from minibt.toy import metrics
from minibt.workers import InProcess, Task, Work, Workers

ANSWER_TOKENS = 32  # a toy answer is one sentence
EVAL_BATCH = 64  # prompts per generation batch (the memory estimate reads it from the evaluate stage)

# What "holds" means for the toy world's claims: m1 must beat m0 by this many points, and
# curation must lift precision this far above the clean share and the correct-pair share this far.
M1_OVER_M0 = 5.0
PRECISION_OVER_CLEAN = 10.0
CURATED_OVER_AUGMENTED = 20.0


def forward_answers(engine: Inference, recipe: Recipe, adapter: str, questions: list[dict[str, Any]],
                    augmented_tag: bool = False) -> list[str]:
    prompts = [forward_prompt(engine.text, recipe, q["instruction"], augmented=augmented_tag) for q in questions]
    return engine.generate(adapter, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=EVAL_BATCH)


def forward_accuracy(engine: Inference, recipe: Recipe, adapter: str, questions: list[dict[str, Any]]) -> float:
    return metrics.forward_accuracy(forward_answers(engine, recipe, adapter, questions), questions)


def evaluate_toy(rd: RunDir, engine: Inference, recipe: Recipe, workers: Workers | None = None) -> dict[str, Any]:
    """The ground-truth metrics of a finished toy run: its part of metrics.json (the caller merges it).
    Its generations (each model's answers, myx's instructions) run on the run's `workers` (default:
    `engine`, in this process), one model's at a time per worker."""
    backward_eval = io.read_jsonl(rd.data("backward_eval"))
    questions = io.read_jsonl(rd.data("eval"))
    augmented = io.read_jsonl(rd.data("augmented"))
    seed_attributes = {r["attribute"] for r in backward_eval} - {q["attribute"] for q in questions}
    rounds = recipe.forward.rounds
    last = f"m{rounds}"
    adapters = [BASE, "m0", *(f"m{k}" for k in range(1, rounds + 1)), "m1_uncurated"]

    asked = [forward_prompt(engine.text, recipe, q["instruction"]) for q in questions]
    asks = {MYX: (MYX, [backward_prompt(engine.text, r["text"], 64) for r in backward_eval], 64),
            **{a: (a, asked, ANSWER_TOKENS) for a in adapters}}
    if recipe.forward.tags:  # the paper's tags: the last model prompted with the augmented-data tag instead of the seed tag
        asks["tagged"] = (last, [forward_prompt(engine.text, recipe, q["instruction"], augmented=True) for q in questions], ANSWER_TOKENS)
    said = _generate(rd, recipe, asks, workers or InProcess(engine))

    written = said[MYX]
    seen = [i for i, r in enumerate(backward_eval) if r["attribute"] in seed_attributes]
    unseen = [i for i, r in enumerate(backward_eval) if r["attribute"] not in seed_attributes]
    out: dict[str, Any] = {
        "backward_accuracy": metrics.backward_accuracy(written, backward_eval),
        # myx on held-out entities, split by whether the seed ever asked about the attribute
        "backward_accuracy_seed_attributes": metrics.backward_accuracy([written[i] for i in seen], [backward_eval[i] for i in seen]),
        "backward_accuracy_unseen_attributes": metrics.backward_accuracy([written[i] for i in unseen], [backward_eval[i] for i in unseen]),
        "noise_fraction": round(100 * sum(r["label"] == "noise" for r in augmented) / max(1, len(augmented)), 1),
        "augmented_correct_share": metrics.correct_share(augmented),
    }
    for k in range(1, rounds + 1):
        scored = io.read_jsonl(rd.data(f"scored_r{k}"))
        threshold = round_threshold(rd, recipe, k)
        kept = [r["kept"] for r in scored]  # curation's own decision, written on every scored row
        precision, recall = metrics.curation_precision_recall(scored, kept)
        suffix = "" if k == 1 else f"_r{k}"
        out[f"curated_correct_share{suffix}"] = metrics.correct_share([r for r, keep in zip(scored, kept) if keep])
        out[f"curation_precision{suffix}"] = precision
        out[f"curation_recall{suffix}"] = recall
        out[f"curated_pairs{suffix}"] = sum(kept)
        out[f"curation_threshold{suffix}"] = round(threshold, 4)
        if recipe.rewrite.enabled:  # the rewrites against the truth: kept values, answer forms, the guard
            out[f"rewrite{suffix}"] = metrics.rewrite_measures(io.read_jsonl(rd.data(f"rewritten_r{k}")))
    out["clean_share"] = round(100 - out["noise_fraction"], 1)

    answers = {a: said[a] for a in adapters}
    out["forward_accuracy"] = {a: metrics.forward_accuracy(ans, questions) for a, ans in answers.items()}
    # answers that are questions: the forum-style echo that uncurated web noise teaches
    out["forward_echo_share"] = {a: metrics.echo_share(ans) for a, ans in answers.items()}
    # answers in one of the seed's answer forms: the assistant's style that rewriting aims at
    out["forward_answer_form_share"] = {a: metrics.answer_form_share(ans) for a, ans in answers.items()}
    if "tagged" in said:
        out["forward_accuracy_augmented_tag"] = {last: metrics.forward_accuracy(said["tagged"], questions)}
    out["claims"] = [{"claim": c, "holds": h, "numbers": n} for c, h, n in claims(out)]
    return out


def _generate(rd: RunDir, recipe: Recipe, asks: dict[str, tuple[str, list[str], int]], workers: Workers) -> dict[str, list[str]]:
    """{name: its completions} for asks {name: (adapter, prompts, max_new_tokens)}, each one task; the
    adapters load where the tasks run."""
    names = list(asks)
    work = Work("evaluate", generate_task, recipe, adapters={a: str(rd.adapter(a)) for a, _, _ in asks.values() if a != BASE})
    jobs = [(k, [{"adapter": asks[n][0], "max_new_tokens": asks[n][2], "prompt": p} for p in asks[n][1]]) for k, n in enumerate(names)]
    with tqdm(total=sum(len(rows) for _, rows in jobs), desc="evaluate", unit="row", dynamic_ncols=True) as bar:
        done = dict(workers.runner(work).compute(jobs, bar))
    return {n: [r["text"] for r in done[k]] for k, n in enumerate(names)}


def generate_task(engine: Inference, task: Task, progress: Any) -> list[dict[str, Any]]:
    """One model's generations of the evaluation, on any worker's engine (minibt/workers.py): greedy."""
    first = task.rows[0]
    texts = engine.generate(first["adapter"], [r["prompt"] for r in task.rows], max_new_tokens=first["max_new_tokens"],
                            batch_size=EVAL_BATCH, progress=progress)
    return [{"text": t} for t in texts]


def claims(m: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The paper's claims as the toy world measures them: (claim, holds, the numbers behind it).

    Claims whose numbers are missing from `m` are left out.
    """
    out: list[tuple[str, bool, str]] = []
    acc = m.get("forward_accuracy") or {}

    def num(x: Any) -> TypeGuard[float]:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    m0, m1, unc = acc.get("m0"), acc.get("m1"), acc.get("m1_uncurated")
    if num(m1) and num(m0):
        out.append((f"self-training helps: m1 beats m0 by >= {M1_OVER_M0:g} points (held-out questions, unseen attributes)",
                    m1 - m0 >= M1_OVER_M0, f"m1 {m1} vs m0 {m0} ({m1 - m0:+.1f})"))
    if num(m1) and num(unc):
        out.append(("curation matters: m1 (curated) beats m1 trained on every augmented pair",
                    m1 > unc, f"m1 {m1} vs m1_uncurated {unc} ({m1 - unc:+.1f})"))
    prec, clean = m.get("curation_precision"), m.get("clean_share")
    if num(prec) and num(clean):
        out.append((f"the curator finds the clean texts: precision >= clean share + {PRECISION_OVER_CLEAN:g}",
                    prec >= clean + PRECISION_OVER_CLEAN,
                    f"precision {prec} vs clean share {clean}; recall {m.get('curation_recall')}"))
    cur, aug = m.get("curated_correct_share"), m.get("augmented_correct_share")
    if num(cur) and num(aug):
        out.append((f"curation raises data quality: correct pairs curated >= augmented + {CURATED_OVER_AUGMENTED:g} points",
                    cur >= aug + CURATED_OVER_AUGMENTED, f"curated {cur}% vs augmented {aug}%"))
    rounds = sorted(int(k[1:]) for k in acc if k[1:].isdigit() and k.startswith("m") and int(k[1:]) >= 2)
    for k in rounds:
        a, b = acc.get(f"m{k}"), acc.get(f"m{k - 1}")
        if num(a) and num(b):
            out.append((f"another round helps: m{k} beats m{k - 1}", a > b, f"m{k} {a} vs m{k - 1} {b} ({a - b:+.1f})"))
    return out


def format_metrics(m: dict[str, Any]) -> list[str]:
    """A few readable lines for the end of `minibt run`: the toy metrics, then the claims."""
    lines = []
    if "backward_accuracy" in m:
        lines.append(f"  backward (myx) accuracy {m['backward_accuracy']}%  (seed attributes "
                     f"{m.get('backward_accuracy_seed_attributes', '?')}%, unseen {m.get('backward_accuracy_unseen_attributes', '?')}%)")
    if "augmented_correct_share" in m:
        lines.append(f"  correct pairs: augmented {m['augmented_correct_share']}% -> curated {m.get('curated_correct_share', '?')}%"
                     f"  ({m.get('curated_pairs', '?')} kept, threshold {m.get('curation_threshold', '?')})")
    if "curation_precision" in m:
        lines.append(f"  curation: precision {m['curation_precision']}% (clean share {m.get('clean_share', '?')}%), "
                     f"recall {m.get('curation_recall', '?')}%")
    rw = m.get("rewrite")
    if isinstance(rw, dict):
        lines.append(f"  rewrite: {rw['keeps_value']}% of fact rewrites keep the true value, {rw['answer_form']}% in the "
                     f"seed's answer form; the guard used {rw['used']}% (of those {rw['used_keeps_value']}% keep the value)")
    acc = m.get("forward_accuracy")
    if isinstance(acc, dict):
        lines.append("  forward accuracy (held-out): " + ", ".join(f"{k} {v}%" for k, v in acc.items()))
    tagged = m.get("forward_accuracy_augmented_tag")
    if isinstance(tagged, dict):
        lines.append("  with the augmented-data tag: " + ", ".join(f"{k} {v}%" for k, v in tagged.items()))
    for c in m.get("claims") or []:
        lines.append(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']}: {c['numbers']}")
    return lines
