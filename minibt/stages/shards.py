"""Sharded processing: long stages write one file per shard, so a killed run loses one shard at most.

Each shard's rows and sha256 go to the manifest as it is written; on resume a shard is reused only
if it still matches them (a shard written just before a kill, not yet recorded, only if it parses
whole with the right number of rows). Any other shard is redone, and the log names it and why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minibt import io
from minibt.roles import build_prompts  # noqa: F401 - its home is roles now; stages written before the move import it here
from minibt.rundir import RunDir

log = logging.getLogger("minibt")


def map_shards(
    run: RunDir,
    name: str,
    rows: Sequence[dict[str, Any]],
    shard_size: int,
    fn: Callable[[list[dict[str, Any]], int, Any], list[dict[str, Any]]] | Any,
    desc: str,
) -> list[dict[str, Any]]:
    """Apply fn(rows_of_shard, shard_index, progress) shard by shard; finished shards are reused.

    `fn` may instead be a runner (minibt/workers.py: `compute(jobs, progress)` yields (shard index,
    rows) as shards finish, on several workers at once); this process writes every shard either way.
    Shard files are data/<name>.shards/00000.jsonl ...; the joined result goes to data/<name>.jsonl.
    """
    folder = run.shards(name)
    n_shards = (len(rows) + shard_size - 1) // shard_size
    parts = [rows[k * shard_size : (k + 1) * shard_size] for k in range(n_shards)]
    paths = [folder / f"{k:05d}.jsonl" for k in range(n_shards)]
    finished = [finished_shard(run, path, len(part)) for path, part in zip(paths, parts)]  # checked before any work
    reused = sum(done is not None for done, _ in finished)
    damaged = [path.name for path, (_, why) in zip(paths, finished) if why]
    for path, (_, why) in zip(paths, finished):
        if why:
            run.tell(run.rel(path), f"{name}: shard {path.name}: {why}: redoing it")
    if reused:
        log.info("%s: reused %d finished shard(s) of %d", name, reused, n_shards)
    results = {k: done for k, (done, _) in enumerate(finished) if done is not None}
    jobs = [(k, list(part)) for k, part in enumerate(parts) if k not in results]
    compute = getattr(fn, "compute", None) or (lambda jobs, bar: ((k, fn(part, k, bar)) for k, part in jobs))
    with tqdm(total=len(rows), desc=desc, unit="row", dynamic_ncols=True) as bar:
        bar.update(sum(len(parts[k]) for k in results))
        for k, done in compute(jobs, bar):  # in the order shards finish: each written as it comes
            io.write_jsonl(paths[k], done)
            run.record(paths[k])
            results[k] = done
    out = [row for k in range(n_shards) for row in results[k]]
    if damaged:
        log.warning("%s: redid %d damaged shard(s): %s", name, len(damaged), ", ".join(damaged))
    io.write_jsonl(run.data(name), out)
    return out


def finished_shard(run: RunDir, path: Path, n_rows: int) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(the shard's rows, None) if it can be reused; else (None, why not), why being None for no file."""
    if not path.exists():
        return None, None
    why = run.problem(path)  # against the rows and sha256 recorded when it was written
    if why:
        return None, why
    try:
        done = io.read_jsonl(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "a line is not JSON (half-written?)"
    if len(done) != n_rows:
        return None, f"{len(done)} rows where {n_rows} belong"
    if not run.recorded(path):
        run.record(path)  # written just before a kill, before its record: whole (atomic), so now recorded
    return done, None
