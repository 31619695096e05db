"""The bench's training comparison: `Engine.train` vs a bare trl + peft script."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minibt.bench.bare import BareSide  # under unsloth, the bare side trains in a process without it
from minibt.bench.stats import spread, timed


def compare_training(engine: Any, model_dir: str, rows: Sequence[dict[str, str]], cfg: Any, work: Path,
                     pairs: int, keep: str) -> dict[str, Any]:
    """`Engine.train` vs the bare script as interleaved pairs (minibt, bare, bare, minibt, ...: the sides
    cost alike, so each goes first half the time); the median of the pairs' ratios.

    The first minibt run trains adapter `keep`, which stays on the engine (the bench uses it next).
    """
    minibt_runs: list[float] = []
    bare_runs: list[float] = []
    losses: dict[str, list[float]] = {"minibt": [], "bare": []}
    # warm-up, not measured: the first trainer in a process pays one-off costs (imports, allocator)
    warm = dataclasses.replace(cfg, max_steps=3)
    engine.train(f"{keep}_warmup", rows, warm, work / "warm")
    engine.delete_adapter(f"{keep}_warmup")
    bare = BareSide(model_dir, engine, rows)
    bare(warm, str(work / "warm_bare"))  # the worker's own warm-up, when there is one
    for k in range(pairs):
        order = ("minibt", "bare") if k % 2 == 0 else ("bare", "minibt")
        for side in order:
            if side == "minibt":
                name = keep if not minibt_runs else f"{keep}_rep{k}"
                res, s = timed(functools.partial(engine.train, name, rows, cfg, work / f"minibt{k}"))
                if name != keep:
                    engine.delete_adapter(name)
                minibt_runs.append(s)
                losses["minibt"].append(res["train_loss"])
            else:
                res = bare(cfg, str(work / f"bare{k}"))
                bare_runs.append(res["seconds"])
                losses["bare"].append(res["train_loss"])
    bare.close()
    ratios = [b / m for b, m in zip(bare_runs, minibt_runs)]
    return {
        "rows": len(rows),
        "bare_side": bare.where,
        "steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "seconds": {"minibt": [round(s, 3) for s in minibt_runs], "bare": [round(s, 3) for s in bare_runs]},
        "train_loss": losses,
        "ratio": round(float(np.median(ratios)), 3),
        "spread": spread(ratios),
        "ratio_measure": f"bare trl+peft time / Engine.train time (trainer set-up + training; bases loaded before), "
                         f"median over {pairs} interleaved pairs",
    }
