"""The commands that measure: evaluate a run's adapters, bench minibt against the plain way."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import click

from minibt.cli.common import friendly, setup


@click.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--compare", nargs=2, default=("m1", "m0"), show_default=True, metavar="A B",
              help="Pairwise: the win rate of adapter A over adapter B.")
@click.option("--no-pairwise", is_flag=True, help="Skip the pairwise comparison.")
@click.option("--instructions", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL of held-out rows with 'instruction' (default: the toy world's data/eval.jsonl).")
@click.option("--judge", help="Judge: an adapter of this run, or 'base' (the default).")
@click.option("--judge-model", help="Judge: any causal LM (local folder or cached hub id), loaded on its own.")
@click.option("--judge-quantization", type=click.Choice(["none", "nf4"]), default="none", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N instructions.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length for the pairwise comparison [default: from the run: 1.5x its longest seed answer, "
                   "at most half of model.max_length].")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--ifeval", "ifeval_adapters", multiple=True, metavar="ADAPTER",
              help="Run IFEval (lm-evaluation-harness, pip install 'minibt[eval]') on this adapter; repeatable.")
@click.option("--ifeval-data", type=click.Path(dir_okay=False, path_type=Path),
              help="A local JSONL in IFEval's format instead of google/IFEval from the hub.")
@click.option("--ifeval-limit", type=click.IntRange(min=1), help="Use the first N IFEval prompts.")
@click.option("--ifeval-max-tokens", default=1280, show_default=True)
@click.option("--toy", is_flag=True, help="Recompute the toy world's ground-truth metrics.")
@friendly
def eval_(run_dir: Path, compare: tuple[str, str], no_pairwise: bool, instructions: Path | None, judge: str | None,
          judge_model: str | None, judge_quantization: Literal["none", "nf4"], limit: int | None, max_new_tokens: int | None, batch_size: int,
          ifeval_adapters: tuple[str, ...], ifeval_data: Path | None, ifeval_limit: int | None, ifeval_max_tokens: int,
          toy: bool) -> None:
    """Evaluate a run: pairwise win rate (both answer orders), IFEval, toy metrics -> metrics.json, report.md."""
    from minibt.evaluate import EvalRequest, run_eval
    from minibt.rundir import RunDir

    request = EvalRequest(run_dir, compare=None if no_pairwise else compare, instructions=instructions, judge=judge,
                          judge_model=judge_model, judge_quantization=judge_quantization, limit=limit,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, ifeval_adapters=ifeval_adapters,
                          ifeval_data=ifeval_data, ifeval_limit=ifeval_limit, ifeval_max_tokens=ifeval_max_tokens, toy=toy)
    setup(1)
    with RunDir.open(run_dir).locked():  # it writes metrics.json: not while a run is writing the folder
        updates = run_eval(request)
    for r in updates.get("pairwise", {}).values():
        click.echo(f"pairwise {r['a']} vs {r['b']} (judge {r['judge']}, {r['n']} instructions, both orders): "
                   f"win rate {r['win_rate']:.3f}, 95% CI [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                   f"({r['wins']} wins, {r['ties']} ties, {r['losses']} losses)")
    for adapter, r in updates.get("ifeval", {}).items():
        click.echo(f"ifeval {adapter} ({r['n']} prompts): prompt-level strict {r['prompt_level_strict_acc']:.3f}, "
                   f"instruction-level strict {r['inst_level_strict_acc']:.3f}")
    if "forward_accuracy" in updates:
        click.echo("toy metrics: " + json.dumps({k: v for k, v in updates.items() if k not in ("pairwise", "ifeval")}))
    click.echo(f"results merged into {Path(run_dir) / 'metrics.json'} and {Path(run_dir) / 'report.md'}")


@click.command()
@click.option("--quick", is_flag=True, help="CPU, toy world, a few minutes: the figures in docs/results.md.")
@click.option("--json", "as_json", is_flag=True, help="Print ONE JSON object (every figure) as the last line.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="A recipe with a `toy` section: a file or a built-in name (default: the built-in toy).")
@click.option("--set", "overrides", multiple=True, metavar="section.key=value", help="Recipe overrides (repeatable).")
@click.option("--gpu-config", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
              help="GPU only: a random-weight Llama of this real shape instead of the toy base (bench/gpu.md).")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "transformers"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
@friendly
def bench(quick: bool, as_json: bool, recipe_path: str | None, overrides: tuple[str, ...], gpu_config: str | None,
          backend: str, out: str | None) -> None:
    """Measure minibt side by side with the plain way: generation, curation, training (bench/results/README.md)."""
    setup(1)
    if as_json:
        logging.getLogger().setLevel(logging.WARNING)
    from minibt.bench import main as bench_main
    from minibt.recipes import resolve

    recipe_path = str(resolve(recipe_path)) if recipe_path else None
    bench_main(quick, as_json, recipe_path, overrides, gpu_config, backend, out)
