"""Sharded processing: long stages write one file per shard, so a killed run loses one shard at most."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from minibt import io
from minibt.rundir import RunDir

log = logging.getLogger("minibt")


def map_shards(
    run: RunDir,
    name: str,
    rows: Sequence[dict[str, Any]],
    shard_size: int,
    fn: Callable[[list[dict[str, Any]], int, Any], list[dict[str, Any]]],
    desc: str,
) -> list[dict[str, Any]]:
    """Apply fn(rows_of_shard, shard_index, progress) shard by shard; finished shards are reused.

    Shard files are data/<name>.shards/00000.jsonl ...; the joined result goes to data/<name>.jsonl.
    """
    folder = run.shards(name)
    n_shards = (len(rows) + shard_size - 1) // shard_size
    out: list[dict[str, Any]] = []
    reused = 0
    with tqdm(total=len(rows), desc=desc, unit="row", dynamic_ncols=True) as bar:
        for k in range(n_shards):
            path = folder / f"{k:05d}.jsonl"
            part = rows[k * shard_size : (k + 1) * shard_size]
            if path.exists():
                done = io.read_jsonl(path)
                if len(done) == len(part):
                    out.extend(done)
                    reused += 1
                    bar.update(len(part))
                    continue
            result = fn(list(part), k, bar)
            io.write_jsonl(path, result)
            out.extend(result)
    if reused:
        log.info("%s: reused %d finished shard(s) of %d", name, reused, n_shards)
    io.write_jsonl(run.data(name), out)
    return out


def build_prompts(engine: Any, rows: list[dict[str, Any]], build: Callable[[dict[str, Any]], str], mark: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Prompts for rows, and the rows marked `<mark>: true` where a text had to be cut to fit.

    The mark travels with the row into its shard file, so counts survive a resumed run.
    """
    prompts, marked = [], []
    for r in rows:
        before = engine.truncated
        prompts.append(build(r))
        marked.append({**r, mark: True} if engine.truncated > before else r)
    return prompts, marked
