"""What a run did, in one page: report.md (plus PNG plots under plots/) in the run directory.

Rebuilt after every stage (minibt/stages/stage.py's run_stage calls `safe_build_report`) and by
`minibt report RUN_DIR`. A run's world (minibt/worlds.py) adds its lines: the toy world splits the
score histograms by ground truth and tabulates its forward accuracies.
Everything comes from files the run already wrote:

    manifest.json            per-stage status, seconds and counts
    data/scored_r{k}.jsonl   every scored pair of curation round k -> score histogram, kept/dropped samples
    data/augmented.jsonl, data/curated_r{k}.jsonl   -> instruction and output length distributions
    logs/<adapter>.json      trl log_history -> training loss curves
    metrics.json             a world's ground truth (the toy's), `minibt eval` results (pairwise, IFEval)
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from minibt import io
from minibt.worlds import World, of_run

log = logging.getLogger("minibt.report")

SAMPLES = 4  # kept and dropped pairs shown per curation round
_CLIP = 160  # characters of a pair shown in the report


# --- stage summaries (also printed by `minibt run`) --------------------------------------------


def _nonzero(counts: dict[str, Any], skip: Sequence[str]) -> str:
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if k not in skip and isinstance(v, (int, float)) and v]
    return ", ".join(parts)


def _read_label(src: str, v: dict[str, Any]) -> str:
    """What the prepare stage read: rows (messages for oasst), documents, passages after segmentation."""
    read = v.get("read", "?")
    if src == "seed":
        return f"{read} messages read, {v['trees']} trees" if "trees" in v else f"{read} rows read"
    docs, passages = v.get("documents", read), v.get("passages")
    label = f"{docs} documents read" if docs == read else f"{read} rows read, {docs} documents"
    return label + (f", segmented into {passages} passages" if passages not in (None, docs) else "")


LEFT_OUT = {"empty_instructions": "empty", "copies": "copies of their text"}  # minibt/stages/augment.py's UNUSABLE


def _left_out(counts: dict[str, Any]) -> str:
    """The pairs myx made that no later stage uses, per reason ("" when none)."""
    parts = [f"{counts[k]} {label}" for k, label in LEFT_OUT.items() if counts.get(k)]
    return f"; left out: {', '.join(parts)}" if parts else ""


def describe_stage(name: str, counts: dict[str, Any], world: World | None = None) -> str:
    """One line: what a stage read, kept and dropped (per filter, per threshold); a run's `world`
    describes its prepare and its own stages."""
    c = counts or {}
    said = world.describe(name, c) if world is not None else None
    if said is not None:
        return said
    if name == "prepare":
        parts = []
        for src in ("seed", "corpus"):
            v = c.get(src)
            if isinstance(v, dict):  # a real recipe: the loaders' counts, each number named for what it counts
                dropped = _nonzero(v, ("read", "kept", "documents", "passages", "trees"))
                parts.append(f"{src}: {_read_label(src, v)} -> {v.get('kept', '?')} {'passages' if src == 'corpus' else 'pairs'} kept"
                             + (f" (dropped: {dropped})" if dropped else ""))
        return "; ".join(parts)
    if name == "augment":
        extra = _nonzero(c, ("texts", *LEFT_OUT))
        return f"{c.get('texts', '?')} texts -> instructions" + (f" ({extra})" if extra else "") + _left_out(c)
    if name.startswith("curate_r"):
        if "kept" not in c:
            return ""
        line = (f"{c.get('scored', '?')} scored by {c.get('curator', '?')}: {c['kept']} kept "
                f"(score >= {c.get('threshold', '?')}), {c.get('dropped', '?')} dropped")
        extra = _nonzero(c, ("pairs", "scored", "kept", "dropped", "threshold", "unparseable_rate", *LEFT_OUT))
        return line + _left_out(c) + (f"; also {extra}" if extra else "")
    if name.startswith("rewrite_r") and "rewritten" in c:
        return (f"{c.get('pairs', '?')} curated pairs rewritten by {c.get('adapter', '?')}: {c['rewritten']} rewrites used, "
                f"{c.get('kept_original', '?')} kept their text (the rewrite kept < {c.get('min_overlap', '?')} of its content words); "
                f"mean overlap {c.get('mean_overlap', '?')}" + (f"; truncated {c['truncated']}" if c.get("truncated") else ""))
    if "train_loss" in c:
        return f"{c.get('examples', '?')} examples, {c.get('steps', '?')} steps, final mean loss {c['train_loss']}"
    return json.dumps({k: v for k, v in c.items() if not isinstance(v, (dict, list))})


# --- data ------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return io.read_jsonl(path) if path.is_file() else []


def _rounds(run: Path) -> list[int]:
    found = [re.fullmatch(r"scored_r(\d+)\.jsonl", p.name) for p in (run / "data").glob("scored_r*.jsonl")]
    return sorted(int(m.group(1)) for m in found if m)


def _score(row: dict[str, Any]) -> float | None:
    s = row.get("score", row.get("expected_score"))
    return float(s) if isinstance(s, (int, float)) else None


def _words(text: Any) -> int:
    return len(str(text or "").split())


def _md(text: Any, clip: int = _CLIP) -> str:
    s = " ".join(str(text).split())
    s = s if len(s) <= clip else s[: clip - 1] + "…"
    return s.replace("|", "\\|")


# --- plots -----------------------------------------------------------------------------------


def _savefig(fig: Any, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")


def _plot_scores(rows: list[dict[str, Any]], threshold: Any, k: int, path: Path, world: World | None) -> None:
    import matplotlib.pyplot as plt

    scored = [(_score(r), world.pair_truth(r) if world else None) for r in rows]
    scores = [(s, c) for s, c in scored if s is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if scores:
        values = [s for s, _ in scores]
        bins = 30 if len(set(values)) > 10 else max(5, len(set(values)))
        lo, hi = min(values), max(values)
        edges = [lo + (hi - lo or 1) * i / bins for i in range(bins + 1)]
        if any(c is not None for _, c in scores):  # a world's pairs: split by ground truth
            ax.hist([[s for s, c in scores if c], [s for s, c in scores if not c]], bins=edges, stacked=True,
                    label=["correct pair (ground truth)", "wrong pair / noise"], color=["tab:green", "tab:gray"])
        else:
            ax.hist(values, bins=edges, color="tab:blue")
        if isinstance(threshold, (int, float)):
            ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        ax.legend(fontsize=8)
    ax.set_title(f"curation round {k}: scores of {len(scores)} pairs")
    ax.set_xlabel("score")
    ax.set_ylabel("pairs")
    _savefig(fig, path)
    plt.close(fig)


def _plot_lengths(sets: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, field in zip(axes, ("instruction", "output")):
        data = {name: [_words(r.get(field)) for r in rows] for name, rows in sets.items() if rows}
        if data:
            top = max(max(v) for v in data.values()) + 1
            edges = [x - 0.5 for x in range(top + 1)] if top <= 60 else [top * i / 40 for i in range(41)]
            for name, values in data.items():
                ax.hist(values, bins=edges, histtype="step", linewidth=1.5, weights=[1 / len(values)] * len(values),
                        label=f"{name} ({len(values)})")
            ax.legend(fontsize=8)
        ax.set_title(f"{field} length")
        ax.set_xlabel("words")
    axes[0].set_ylabel("share of pairs")
    _savefig(fig, path)
    plt.close(fig)


def _plot_losses(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, history in curves.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            ax.plot(*zip(*points), marker=".", label=name)
    if curves:
        ax.legend(fontsize=8)
    ax.set_title("training loss (completions only)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _savefig(fig, path)
    plt.close(fig)


# --- the report ------------------------------------------------------------------------------


def _stats(values: list[int]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{sum(v) / len(v):.1f} / {v[len(v) // 2]} / {v[min(len(v) - 1, int(0.9 * len(v)))]} / {v[-1]}"


def _claims(metrics: dict[str, Any]) -> list[str]:
    """The paper's claims next to the toy world's measurements."""
    acc = metrics.get("forward_accuracy", {})
    lines = ["| claim (Li et al. 2023) | measured here | holds |", "|---|---|---|"]

    def row(claim: str, left: str, right: str, a: Any, b: Any) -> None:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            lines.append(f"| {claim} | {left} {a} vs {right} {b} | {'yes' if a > b else 'no'} |")

    recorded = [c for c in metrics.get("claims") or [] if isinstance(c, dict) and "claim" in c]
    if recorded:  # the toy world's own verdicts (minibt/toy/evaluate.py: claims), with their margins
        lines += [f"| {_md(c['claim'], 300)} | {_md(c.get('numbers', ''), 300)} | {'yes' if c.get('holds') else 'no'} |" for c in recorded]
    else:
        row("self-training on curated data helps: m1 > m0", "m1", "m0", acc.get("m1"), acc.get("m0"))
        row("curation matters: m1 (curated) > m1 on all augmented data", "m1", "m1_uncurated", acc.get("m1"), acc.get("m1_uncurated"))
        row("curation raises data quality: curated > augmented (correct pairs, %)", "curated", "augmented",
            metrics.get("curated_correct_share"), metrics.get("augmented_correct_share"))
    for result in (metrics.get("pairwise") or {}).values():
        if isinstance(result, dict) and "win_rate" in result:
            lo, hi = result.get("ci95", [None, None])
            lines.append(f"| {result.get('a')} beats {result.get('b')} in pairwise judging (judge {result.get('judge')}) "
                         f"| win rate {result['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] over {result.get('n')} | "
                         f"{'yes' if lo > 0.5 else ('no' if hi < 0.5 else 'not significant')} |")
    return lines if len(lines) > 2 else []


def build_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/report.md and its plots under <run_dir>/plots/; return the report's path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    run = Path(run_dir)
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    world = of_run(yaml.safe_load((run / "recipe.yaml").read_text())) if (run / "recipe.yaml").is_file() else None
    plots = run / "plots"
    out = [f"# Run report: {manifest.get('recipe', run.name)}", ""]
    out.append(f"Run directory `{run}`; base `{manifest.get('base_model', '?')}` ({manifest.get('backend', '?')}), "
               f"loaded {manifest.get('base_loads', '?')}x; created {manifest.get('created', '?')}.")
    out.append("")

    # stages
    stages = manifest.get("stages", {})
    out += ["## Stages", "", "| stage | status | seconds | what it kept |", "|---|---|---:|---|"]
    for name, entry in stages.items():
        what = describe_stage(name, entry.get("counts", {}), world)
        if entry.get("status") == "failed":
            what = f"**{_md(entry.get('error', ''), 200)}**"
        out.append(f"| {name} | {entry.get('status', '?')} | {entry.get('seconds', 0):.1f} | {_md(what, 400)} |")
    total = sum(e.get("seconds", 0) for e in stages.values())
    out += [f"| total | | {total:.1f} | |", ""]

    # curation rounds
    curated_sets: dict[str, list[dict[str, Any]]] = {"augmented": _read_jsonl(run / "data" / "augmented.jsonl")}
    for k in _rounds(run):
        scored = _read_jsonl(run / "data" / f"scored_r{k}.jsonl")
        counts = stages.get(f"curate_r{k}", {}).get("counts", {})
        threshold = counts.get("threshold")
        curated_sets[f"curated r{k}"] = _read_jsonl(run / "data" / f"curated_r{k}.jsonl")
        out += [f"## Curation round {k}", ""]
        if counts:
            out += [describe_stage(f"curate_r{k}", counts), ""]
        _plot_scores(scored, threshold, k, plots / f"scores_r{k}.png", world)
        out += [f"![scores round {k}](plots/scores_r{k}.png)", ""]
        keep = [r for r in scored if r.get("kept")]  # curation's own decision, written on every scored row
        drop = [r for r in scored if not r.get("kept")]
        rng = random.Random(k)
        for title, rows in (("kept", keep), ("dropped", drop)):
            sample = rng.sample(rows, min(SAMPLES, len(rows)))
            if not sample:
                continue
            truth = world is not None and any(world.pair_truth(r) is not None for r in sample)
            out += [f"A sample of {title} pairs ({len(rows)} in all):", "",
                    "| score | instruction | output |" + (f" correct ({world.section}) |" if truth and world is not None else ""),
                    "|---:|---|---|" + ("---|" if truth else "")]
            for r in sorted(sample, key=lambda r: -(_score(r) or -1e9)):
                s = _score(r)
                cell = f"| {s if s is not None else 'unparsed'} | {_md(r.get('instruction', ''))} | {_md(r.get('output', ''))} |"
                out.append(cell + (f" {world.pair_truth(r)} |" if truth and world is not None else ""))
            out.append("")

    # lengths
    sets = {name: rows for name, rows in curated_sets.items() if rows}
    if sets:
        _plot_lengths(sets, plots / "lengths.png")
        out += ["## Lengths (words)", "", "![lengths](plots/lengths.png)", "",
                "| data | pairs | instruction mean / median / p90 / max | output mean / median / p90 / max |", "|---|---:|---|---|"]
        for name, rows in sets.items():
            out.append(f"| {name} | {len(rows)} | {_stats([_words(r.get('instruction')) for r in rows])} | "
                       f"{_stats([_words(r.get('output')) for r in rows])} |")
        out.append("")

    # training
    curves = {}
    for p in sorted((run / "logs").glob("*.json")) if (run / "logs").is_dir() else []:
        try:
            curves[p.stem] = json.loads(p.read_text())
        except ValueError:
            log.warning("report: %s is not JSON; skipped", p)
    if curves:
        _plot_losses(curves, plots / "loss.png")
        out += ["## Training", "", "![loss](plots/loss.png)", "", "| adapter | logged steps | first loss | last loss |", "|---|---:|---:|---:|"]
        for name, h in curves.items():
            losses = [x["loss"] for x in h if "loss" in x]
            if losses:
                out.append(f"| {name} | {len(losses)} | {losses[0]:.4f} | {losses[-1]:.4f} |")
        out.append("")

    # metrics
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        out += ["## Metrics", ""]
        claims = _claims(metrics)
        if claims:
            out += claims + [""]
        out += world.report_lines(metrics) if world else []
        for name, result in (metrics.get("ifeval") or {}).items():
            if isinstance(result, dict):
                scores = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.endswith("_acc") and isinstance(v, (int, float)))
                out += [f"IFEval ({result.get('runner', '?')}, {result.get('n', '?')} prompts from {result.get('data', '?')}), {name}: {scores}", ""]
        out += ["```json", json.dumps(metrics, indent=2), "```", ""]

    path = run / "report.md"
    io.write_text(path, "\n".join(out))
    return path


def safe_build_report(run_dir: str | Path) -> Path | None:
    """build_report, but a failure is a logged warning: a report never kills a run."""
    try:
        return build_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the report is a by-product
        log.warning("could not build %s/report.md: %s: %s", run_dir, type(e).__name__, e)
        return None
