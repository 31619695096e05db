"""The `minibt` command: make a run (runs.py), use its adapters (adapters.py), measure it (measure.py)."""

from __future__ import annotations

import click

from minibt.cli import adapters, measure, runs


@click.group()
@click.version_option(package_name="minibt")
def main() -> None:
    """Instruction backtranslation (Humpback) on one 4-bit base with QLoRA role adapters."""


for command in (runs.run, runs.prepare, runs.report, runs.repair, runs.recipes, adapters.chat, adapters.generate,
                adapters.serve_, adapters.export, measure.eval_, measure.bench):
    main.add_command(command)
