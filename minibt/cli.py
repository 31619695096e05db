"""The `minibt` command: run a recipe, chat with or generate from a run's adapters."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

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
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved recipe and the stage plan; load nothing.")
@click.option("--fresh", is_flag=True, help="Delete the run directory first instead of resuming it.")
@_friendly
def run(recipe_path: Path, overrides: tuple[str, ...], out: Path | None, dry_run: bool, fresh: bool) -> None:
    """Run the whole method from a recipe. Rerunning resumes: finished stages are skipped."""
    import yaml

    from minibt.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    out = out or Path("runs") / recipe.run.name
    from minibt.pipeline import plan

    if dry_run:
        click.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
        click.echo(f"\nrun directory: {out}")
        click.echo("stages: " + " -> ".join(plan(recipe)))
        return
    _setup(recipe.run.threads)
    if recipe.model.trust_remote_code:
        click.echo(f"note: model.trust_remote_code is true: code from {recipe.model.name} will run", err=True)
    from minibt.pipeline import run as run_pipeline

    rd = run_pipeline(recipe, out, fresh=fresh)
    click.echo(summary(rd))


def summary(rd) -> str:
    """A few lines: what each stage kept, and the toy world's metrics when there are any."""
    lines = [f"run: {rd.path}  (base loaded {rd.manifest.get('base_loads', '?')}x, backend {rd.manifest.get('backend', '?')})"]
    for name, entry in rd.manifest["stages"].items():
        c = entry.get("counts", {})
        keep = {k: c[k] for k in ("kept", "dropped", "texts", "train_loss", "steps", "unparseable") if k in c}
        lines.append(f"  {name:<14} {entry['status']:<8} {entry.get('seconds', 0):>7.1f}s  {json.dumps(keep) if keep else ''}")
    metrics = rd.path / "metrics.json"
    if metrics.exists():
        lines.append("metrics: " + json.dumps(json.loads(metrics.read_text()), sort_keys=False))
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", default="m1", show_default=True, help="Adapter of the run, or 'base'.")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@_friendly
def chat(run_dir: Path, adapter: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
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
            adapter = line.split(maxsplit=1)[1].strip() if " " in line.strip() else adapter
            session._attach(adapter)
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
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@_friendly
def generate(run_dir: Path, adapter: str, input_path: Path, output_path: Path, max_new_tokens: int,
             temperature: float, top_p: float, batch_size: int) -> None:
    """Batch generation with one adapter: each input row gets a 'generated' field."""
    from minibt import io
    from minibt.session import open_run

    field = "text" if adapter == "myx" else "instruction"
    rows = _read_rows(input_path, field)
    _setup(1)
    session = open_run(run_dir, adapters=[adapter] if adapter != "base" else [])
    fn = session.backtranslate if adapter == "myx" else session.generate
    out = fn([r[field] for r in rows], adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, batch_size=batch_size)
    io.write_jsonl(output_path, [{**r, "generated": g} for r, g in zip(rows, out)])
    click.echo(f"wrote {len(out)} rows to {output_path}")


def _read_rows(path: Path, field: str) -> list[dict]:
    """Input rows for `generate`, checked before any model loads."""
    from minibt.data.common import jsonl_rows
    from minibt.errors import DataError

    rows = []
    for where, row, why in jsonl_rows(path):
        if why is None and not (isinstance(row, dict) and isinstance(row.get(field), str)):
            why = f"needs a string field {field!r}"
        if why is not None:
            raise DataError(f"{path}: {where}: {why}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


if __name__ == "__main__":
    main()
