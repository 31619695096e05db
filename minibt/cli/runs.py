"""The commands that make a run: run a recipe, prepare its data, rebuild its report or manifest, list the recipes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from minibt.cli.common import friendly, setup


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[section.key=value]...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved recipe, the stage plan and a memory estimate; load nothing.")
@click.option("--fresh", is_flag=True, help="Delete the run directory first instead of resuming it.")
@friendly
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
    setup(recipe.run.threads)
    if recipe.model.trust_remote_code:
        click.echo(f"note: model.trust_remote_code is true: code from {recipe.model.name} will run", err=True)
    from minibt.pipeline import run as run_pipeline

    rd = run_pipeline(recipe, out, fresh=fresh)
    click.echo(summary(rd))


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[section.key=value]...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--fresh", is_flag=True, help="Delete the run directory first instead of resuming it.")
@friendly
def prepare(recipe_path: Path, overrides: tuple[str, ...], out: Path | None, fresh: bool) -> None:
    """Only the prepare stage, no model loaded: data/seed.jsonl and data/corpus.jsonl, with the counts
    per filter. `minibt run` on the same folder goes on from there."""
    from minibt.pipeline import prepare_only
    from minibt.recipe import load_recipe
    from minibt.recipes import resolve
    from minibt.stages.prepare import format_counts

    recipe = load_recipe(resolve(recipe_path), overrides)
    out = out or Path("runs") / recipe.run.name
    setup()
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


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@friendly
def report(run_dir: Path) -> None:
    """Rebuild RUN_DIR/report.md and its plots (the run rebuilds them after every stage)."""
    from minibt.report import build_report
    from minibt.rundir import RunDir

    path = build_report(RunDir.open(run_dir).path)
    click.echo(f"wrote {path}")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@friendly
def repair(run_dir: Path) -> None:
    """Rebuild a lost or corrupt RUN_DIR/manifest.json from the run's data files and adapters."""
    from minibt.repair import repair as rebuild

    for line in rebuild(run_dir):
        click.echo(line)
    click.echo(f"wrote {Path(run_dir) / 'manifest.json'}; rerun the run's command (minibt run RECIPE --out {run_dir}) to finish it")


@click.group(invoke_without_command=True)
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
@friendly
def copy_recipe(name: str, dest: Path | None, force: bool) -> None:
    """Write built-in recipe NAME to DEST (a file or a folder; default: ./NAME.yaml) to edit and run."""
    from minibt import recipes as builtin

    path = builtin.copy(name, dest, force=force)
    click.echo(f"wrote {path}; run it with: minibt run {path}")
