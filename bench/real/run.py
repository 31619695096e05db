"""The real-model bench: the built-in cpu-135m recipe on SmolLM2-135M-Instruct and human-written data with
ground truth (bench/real/data), every stage measured against that truth.

    python bench/real/run.py --seeds 0 1 2 [--out runs/real] [--ifeval-limit 30 --ifeval-max-tokens 128] [--eval-only]
        [--method-only] [--set KEY=VALUE ...]

Per run seed: `minibt run cpu-135m` with the local model and data as overrides (what users run is what is
measured), then, in one process on the run's adapters:
- backward: myx's instructions for the held-out responses (sampled, as the method used them) against the
  true instructions (ROUGE-L F, rouge-score, stemmed), and the share that are requests (non-empty, not a
  copy of the text: the pipeline's own predicate); baselines: the base asked zero-shot, and the text's
  first sentence.
- curation: the run's rubric scores (m0) against the corpus labels: precision, recall and AUC of keeping a
  good (human) response over a planted bad text, keep rates per label and kind, beside the clean share;
  the likelihood curator on the same pairs (AUC; precision/recall at the rubric's keep count); and the
  rubric on fixed labelled pairs (true, mismatched, planted) without myx in the loop.
- forward: base, m0, m1: mean NLL per token of test reference answers (pairs in neither seed nor corpus)
  and IFEval (the local 541 prompts, a subset and a generation cap, both stated).
Writes bench/results/real-s<seed>.json and bench/results/real.md (the table over the seeds run so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench" / "real" / "data"
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("prepare", "backward", "curation", "forward")
ZERO_SHOT = ("Here is a text:\n\n{text}\n\nWrite the instruction or question that this text is the answer to. "
             "Reply with the instruction only.")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def overrides(model: Path, seed: int) -> list[str]:
    """The cpu-135m recipe pointed at the local model and data; min_chars 40 lets the planted fragments in."""
    return [f"model.name={model}", f"run.seed={seed}",
            "seed.dataset=null", f"seed.path={DATA / 'seed.jsonl'}", "seed.format=pairs",
            "corpus.dataset=null", "corpus.name=null", f"corpus.path={DATA / 'corpus.jsonl'}",
            "corpus.limit=null", "corpus.min_chars=40"]


def run_method(model: Path, seed: int, out: Path, extra: tuple[str, ...] = ()) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "minibt.cli", "run", "cpu-135m", *overrides(model, seed), *extra, "--out", str(out)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t0


def train_uncurated(run_dir: Path) -> float:
    """The paper's ablation: m1 trained on the seed plus every usable augmented pair, none curated away."""
    from minibt import io
    from minibt.base_model import open_engine
    from minibt.rundir import RunDir
    from minibt.stages.augment import usable
    from minibt.stages.forward import train_forward

    run = RunDir.open(run_dir)
    if (run.adapter("m1_uncurated") / "adapter_config.json").is_file():
        return 0.0
    t0 = time.time()
    recipe = run.recipe()
    engine = open_engine(recipe, run.manifest.get("base_model"))
    augmented = [r for r in io.read_jsonl(run.data("augmented")) if usable(r)]
    train_forward(engine, recipe, "m1_uncurated", io.read_jsonl(run.data("seed")), augmented, run.work("m1_uncurated"))
    engine.save_adapter("m1_uncurated", run.adapter("m1_uncurated"))
    return time.time() - t0


def rouge_l(pairs: list[tuple[str, str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return round(statistics.fmean(scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in pairs), 4)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def auc(good: list[float], bad: list[float]) -> float | None:
    """P(a good item outscores a bad one), ties half."""
    if not good or not bad:
        return None
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return round(wins / (len(good) * len(bad)), 4)


def keep_stats(rows: list[dict[str, Any]], kept: list[bool]) -> dict[str, Any]:
    """Precision/recall of keeping good over bad (web texts apart), keep rates per label and kind."""
    tp = sum(k and r["label"] == "good" for r, k in zip(rows, kept))
    fp = sum(k and r["label"] == "bad" for r, k in zip(rows, kept))
    good = sum(r["label"] == "good" for r in rows)
    bad = sum(r["label"] == "bad" for r in rows)
    rate: dict[str, Any] = {}
    for key in ("label", "kind"):
        for value in sorted({r[key] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r[key] == value]
            rate[value] = {"n": len(idx), "kept": sum(kept[i] for i in idx)}
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else None, "recall": round(tp / good, 4) if good else None,
            "clean_share": round(good / (good + bad), 4) if good + bad else None, "kept": sum(kept), "n": len(rows),
            "keep_rates": rate}


def evaluate(run_dir: Path, ifeval_limit: int, ifeval_tokens: int, done: dict[str, Any] | None = None,
             sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """The sections asked for, each measured once: those in `done` (an earlier result) are kept."""
    import torch

    from minibt.engine import BASE
    from minibt.session import open_run

    torch.set_num_threads(1)
    out: dict[str, Any] = {"timings": {}, **(done or {})}
    todo = [name for name in sections if name not in out]
    if not todo:
        return out
    forward = [BASE, "m0", "m1"] + (["m1_uncurated"] if (run_dir / "adapters" / "m1_uncurated").is_dir() else [])
    session = open_run(run_dir, adapters=["myx", "m0"] + (forward[2:] if "forward" in todo else []))
    measure = {"prepare": prepare_metrics, "backward": backward_metrics, "curation": curation_metrics,
               "forward": lambda s, t: forward_metrics(s, t, forward, ifeval_limit, ifeval_tokens)}
    for name in todo:
        out[name] = measure[name](session, out["timings"])
    return out


def prepare_metrics(session: Any, timings: dict[str, float]) -> dict[str, Any]:
    """What the corpus filters (before any model) did to each label."""
    from minibt import io

    given = read_jsonl(DATA / "corpus.jsonl")
    kept_texts = {r["text"].strip() for r in io.read_jsonl(session.run.data("corpus"))}
    return {label: {"n": sum(r["label"] == label for r in given),
                    "kept": sum(r["label"] == label and r["text"].strip() in kept_texts for r in given)}
            for label in ("good", "web", "bad")}


def backward_metrics(session: Any, timings: dict[str, float]) -> dict[str, Any]:
    """myx's instructions for the held-out responses (they went into the corpus; their true instructions
    stayed aside) against the truth, beside the base asked zero-shot and the first sentence."""
    from minibt import io
    from minibt.engine import BASE
    from minibt.stages.augment import copies_output

    engine, recipe = session.engine, session.recipe
    truth = {r["output"].strip(): r["instruction"] for r in read_jsonl(DATA / "heldout.jsonl")}
    augmented = [r for r in io.read_jsonl(session.run.data("augmented"))
                 if r.get("kind") == "heldout" and r["output"].strip() in truth]
    pairs = [(truth[r["output"].strip()], r["instruction"]) for r in augmented]
    texts = [r["output"] for r in augmented]
    t0 = time.time()
    prompts = [engine.text.render([{"role": "user", "content": ZERO_SHOT.format(text=engine.text.clip_text(t, 400))}]) for t in texts]
    zero_shot = engine.generate(BASE, prompts, max_new_tokens=recipe.augment.max_new_tokens, batch_size=16)
    timings["zero_shot_s"] = round(time.time() - t0, 1)

    def requests(written: list[str]) -> float:
        return round(statistics.fmean(bool(w.strip()) and not copies_output(w, t) for w, t in zip(written, texts)), 4)

    return {
        "n": len(pairs),
        "rouge_l": {"myx": rouge_l(pairs), "base_zero_shot": rouge_l([(ref, z) for (ref, _), z in zip(pairs, zero_shot)]),
                    "first_sentence": rouge_l([(ref, first_sentence(t)) for (ref, _), t in zip(pairs, texts)])},
        "request_share": {"myx": requests([h for _, h in pairs]), "base_zero_shot": requests(zero_shot)},
        "examples": [{"true": ref, "myx": h, "base_zero_shot": z, "text": t[:200]}
                     for (ref, h), z, t in list(zip(pairs, zero_shot, texts))[:8]],
    }


def curation_metrics(session: Any, timings: dict[str, float]) -> dict[str, Any]:
    """The run's own rubric scores (curator m0) against the corpus labels; the likelihood curator on the
    same pairs; the rubric on fixed labelled pairs without myx in the loop."""
    from minibt import io
    from minibt.roles import keeps, round_threshold, score_pairs

    engine, recipe = session.engine, session.recipe
    scored = [r for r in io.read_jsonl(session.run.data("scored_r1")) if "label" in r]
    threshold = round_threshold(session.run, recipe, 1)
    kept = [keeps(r["score"], threshold) for r in scored]

    def separation(scores: list[float], rows: list[dict[str, Any]]) -> float | None:
        return auc([x for x, r in zip(scores, rows) if r["label"] == "good"], [x for x, r in zip(scores, rows) if r["label"] == "bad"])

    rubric = keep_stats(scored, kept)
    rubric.update(threshold=threshold, auc=separation([r["score"] for r in scored], scored),
                  mean_score={label: round(statistics.fmean(r["score"] for r in scored if r["label"] == label), 4)
                              for label in ("good", "web", "bad")})
    t0 = time.time()
    likelihood_recipe = dataclasses.replace(recipe, curate=dataclasses.replace(recipe.curate, method="likelihood"))
    lik = [r["score"] for r in score_pairs(engine, likelihood_recipe, "m0",
                                            [{"instruction": r["instruction"], "output": r["output"]} for r in scored])]
    cut = sorted(lik, reverse=True)[sum(kept) - 1] if sum(kept) else float("inf")
    likelihood = keep_stats(scored, [x >= cut for x in lik])
    likelihood.update(auc=separation(lik, scored), note="kept: the top pairs, as many as the rubric kept")
    timings["likelihood_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    fixed = read_jsonl(DATA / "curation_pairs.jsonl")
    fixed_scores = [r["score"] for r in score_pairs(engine, recipe, "m0", [{"instruction": r["instruction"], "output": r["output"]} for r in fixed])]
    fixed_stats = keep_stats(fixed, [keeps(x, threshold) for x in fixed_scores])
    fixed_stats.update(auc=separation(fixed_scores, fixed))
    timings["fixed_pairs_s"] = round(time.time() - t0, 1)
    return {"rubric": rubric, "likelihood": likelihood, "rubric_fixed_pairs": fixed_stats}


def forward_metrics(session: Any, timings: dict[str, float], adapters: list[str], ifeval_limit: int,
                    ifeval_tokens: int) -> dict[str, Any]:
    """Mean NLL per token of the test reference answers (pairs in neither seed nor corpus), and IFEval."""
    from minibt.ifeval import ifeval
    from minibt.roles import forward_prompt

    engine, recipe = session.engine, session.recipe
    test = read_jsonl(DATA / "test.jsonl")
    t0 = time.time()
    prompts = [forward_prompt(engine.text, recipe, r["instruction"]) for r in test]
    nll = {a: round(-float(engine.completion_logprobs(a, prompts, [r["output"] for r in test], batch_size=8).mean()), 4)
           for a in adapters}
    timings["nll_s"] = round(time.time() - t0, 1)
    out: dict[str, Any] = {"test_nll": {"n": len(test), **nll}, "ifeval": {}}
    for adapter in adapters:
        t0 = time.time()
        summary, _ = ifeval(session.run, adapter, data=DATA / "ifeval" / "input_data.jsonl", limit=ifeval_limit,
                            max_gen_toks=ifeval_tokens)
        out["ifeval"][adapter] = summary
        timings[f"ifeval_{adapter}_s"] = round(time.time() - t0, 1)
    return out


def claims(r: dict[str, Any]) -> dict[str, bool]:
    """The paper's claims as the toy world states them, on real data."""
    b, c, f = r["backward"]["rouge_l"], r["curation"]["rubric"], r["forward"]
    ife = f["ifeval"]
    return {
        "myx beats the base asked zero-shot (ROUGE-L)": b["myx"] > b["base_zero_shot"],
        "myx beats the first sentence (ROUGE-L)": b["myx"] > b["first_sentence"],
        "curation enriches good texts (precision > clean share)": (c["precision"] or 0) > (c["clean_share"] or 1),
        "m1 beats m0 on test NLL": f["test_nll"]["m1"] < f["test_nll"]["m0"],
        "m1 beats m0 on IFEval (prompt, loose)": ife["m1"]["prompt_level_loose_acc"] > ife["m0"]["prompt_level_loose_acc"],
        **({"curation matters: m1 beats m1_uncurated on test NLL": f["test_nll"]["m1"] < f["test_nll"]["m1_uncurated"]}
           if "m1_uncurated" in f["test_nll"] else {}),
    }


def stage_seconds(run_dir: Path) -> dict[str, float]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {k: round(v.get("seconds", 0.0), 1) for k, v in manifest["stages"].items()}


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table over the seeds run: each metric's value per seed, and the mean."""
    def row(name: str, get: Any, fmt: str = "{:.3f}") -> str:
        values = [get(r) for r in results]
        shown = [fmt.format(v) if isinstance(v, (int, float)) else "-" for v in values]
        nums = [v for v in values if isinstance(v, (int, float))]
        mean = fmt.format(statistics.fmean(nums)) if len(nums) > 1 else ""
        spread = f" ± {statistics.stdev(nums):.3f}" if len(nums) > 2 else ""
        return f"| {name} | " + " | ".join(shown) + f" | {mean}{spread} |"

    seeds = " | ".join(f"seed {r['seed']}" for r in results)
    lines = [f"| metric | {seeds} | mean |", "|---" * (len(results) + 2) + "|"]
    lines += [
        row("backward ROUGE-L: myx", lambda r: r["backward"]["rouge_l"]["myx"]),
        row("backward ROUGE-L: base zero-shot", lambda r: r["backward"]["rouge_l"]["base_zero_shot"]),
        row("backward ROUGE-L: first sentence", lambda r: r["backward"]["rouge_l"]["first_sentence"]),
        row("backward requests (not copies): myx", lambda r: r["backward"]["request_share"]["myx"]),
        row("curation rubric (m0): precision", lambda r: r["curation"]["rubric"]["precision"]),
        row("curation rubric (m0): recall", lambda r: r["curation"]["rubric"]["recall"]),
        row("curation rubric (m0): AUC good vs bad", lambda r: r["curation"]["rubric"]["auc"]),
        row("curation: clean share", lambda r: r["curation"]["rubric"]["clean_share"]),
        row("curation likelihood (m0): AUC", lambda r: r["curation"]["likelihood"]["auc"]),
        row("curation likelihood: precision at the rubric's count", lambda r: r["curation"]["likelihood"]["precision"]),
        row("rubric on fixed labelled pairs: AUC", lambda r: r["curation"]["rubric_fixed_pairs"]["auc"]),
    ]
    adapters = ("base", "m0", "m1", "m1_uncurated")
    for a in adapters:
        lines.append(row(f"test NLL per token: {a}", lambda r, a=a: r["forward"]["test_nll"].get(a)))
    for a in adapters:
        for m in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"):
            lines.append(row(f"IFEval {m.replace('_acc', '').replace('_', ' ')}: {a}",
                             lambda r, a=a, m=m: r["forward"]["ifeval"].get(a, {}).get(m)))
    lines.append(row("method wall (min)", lambda r: r["method_wall_s"] / 60, "{:.1f}"))
    for claim in dict.fromkeys(c for r in results for c in r["claims"]):
        verdicts = {True: "held", False: "FAILED", None: "not run"}
        lines.append(f"| claim: {claim} | " + " | ".join(verdicts[r["claims"].get(claim)] for r in results) + " | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real")
    parser.add_argument("--ifeval-limit", type=int, default=30)
    parser.add_argument("--ifeval-max-tokens", type=int, default=128)
    parser.add_argument("--eval-only", action="store_true", help="evaluate finished runs again, without running the method")
    parser.add_argument("--uncurated", action="store_true", help="also train m1_uncurated (seed + every usable augmented pair)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="one more recipe override (e.g. the GPU's: model.device=auto model.quantization=nf4)")
    parser.add_argument("--method-only", action="store_true", help="run the method and print its stage times; no evaluation")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to measure (with --eval-only, sections the result file holds are kept)")
    args = parser.parse_args()
    from minibt.bench.smollm2 import folder

    model = folder()
    for seed in args.seeds:
        run_dir = args.out / f"s{seed}"
        path = RESULTS / f"real-s{seed}.json"
        done = {}
        if args.eval_only and path.is_file():
            done = {k: v for k, v in json.loads(path.read_text()).items() if k in SECTIONS or k == "timings"}
        elif not args.eval_only:
            run_method(model, seed, run_dir, tuple(args.extra))
        if args.method_only:
            stages = stage_seconds(run_dir)
            print(json.dumps({"seed": seed, "run": str(run_dir), "stages_s": stages, "method_wall_s": round(sum(stages.values()), 1)}))
            continue
        uncurated_s = train_uncurated(run_dir) if args.uncurated else 0.0
        result = evaluate(run_dir, args.ifeval_limit, args.ifeval_max_tokens, done, tuple(args.sections))
        stages = {**stage_seconds(run_dir), **({"m1_uncurated": round(uncurated_s, 1)} if uncurated_s else {})}
        result.update(seed=seed, run=str(run_dir), stages_s=stages,
                      method_wall_s=round(sum(v for k, v in stages.items() if k != "m1_uncurated"), 1),
                      ifeval_subset=f"first {args.ifeval_limit} of 541 prompts", ifeval_max_tokens=args.ifeval_max_tokens)
        complete = all(k in result for k in SECTIONS)
        result["claims"] = claims(result) if complete else None
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({k: result.get(k) for k in ("backward", "claims")}, indent=1)[:3000], flush=True)
        finished = [r for r in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("real-s*.json"))) if r.get("claims")]
        if finished:
            (RESULTS / "real.md").write_text(table(finished), encoding="utf-8")

if __name__ == "__main__":
    main()
