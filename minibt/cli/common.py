"""What every `minibt` command shares: logging and threads set up once, bad input as one line."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from minibt.errors import MinibtError


def setup(threads: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)


def friendly(fn):
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
