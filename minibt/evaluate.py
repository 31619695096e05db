"""`minibt eval`: how good are the run's models? Results merge into metrics.json and the report.

pairwise   two adapters (default m1 vs m0) answer held-out instructions and a judge picks (minibt/pairwise.py).
ifeval     IFEval's strict/loose instruction-following accuracy through lm-evaluation-harness (the
           optional extra `minibt[eval]`), on the base with one adapter, offline (minibt/ifeval.py).
toy        the run's world's own metrics (the toy world's ground truth), recomputed (minibt/worlds.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from minibt import io
from minibt.engine import BASE
from minibt.errors import MinibtError
from minibt.ifeval import ifeval, require_ifeval
from minibt.pairwise import load_judge, pairwise
from minibt.rundir import RunDir
from minibt.stack_guards import free_memory
from minibt.worlds import world_of

log = logging.getLogger("minibt.eval")

# --- metrics.json ----------------------------------------------------------------------------


def merge_metrics(run_path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into <run>/metrics.json (sections such as "pairwise" merge key by key)."""
    path = Path(run_path) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(metrics.get(key), dict) and key in ("pairwise", "ifeval"):
            metrics[key] = {**metrics[key], **value}
        else:
            metrics[key] = value
    io.write_json(path, metrics)
    return metrics


# --- held-out instructions -------------------------------------------------------------------


def read_instructions(run: RunDir, path: str | Path | None, limit: int | None = None) -> tuple[list[str], str]:
    """Instructions from a JSONL file (rows with "instruction"), or the toy world's data/eval.jsonl."""
    from minibt.data.common import field_rows

    if path is None:
        path = run.data("eval")
        if not path.is_file():
            raise MinibtError(f"{run.path} has no held-out instructions (data/eval.jsonl is the toy world's); "
                              "give --instructions FILE.jsonl with an 'instruction' field per row")
    rows = [r["instruction"] for r in field_rows(path, "instruction", nonempty=True)]
    return rows[:limit] if limit else rows, str(path)


# --- the command ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What `minibt eval` is asked: each field is one of its options."""

    run_dir: str | Path
    compare: tuple[str, str] | None = ("m1", "m0")  # pairwise: adapter a against adapter b; None: no pairwise
    instructions: str | Path | None = None  # held-out instructions (JSONL); default the toy world's data/eval.jsonl
    judge: str | None = None  # an adapter of the run as the judge (default: the base)
    judge_model: str | None = None  # any causal LM as the judge, loaded on its own
    judge_quantization: Literal["none", "nf4"] = "none"
    limit: int | None = None  # the first N instructions
    max_new_tokens: int | None = None  # answer length (default: the run's answer_tokens)
    batch_size: int = 8
    ifeval_adapters: Sequence[str] = ()
    ifeval_data: str | Path | None = None
    ifeval_limit: int | None = None
    ifeval_max_tokens: int = 1280
    toy: bool = False  # recompute the run's world's own metrics


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Everything `minibt eval` does; returns what it merged into metrics.json."""
    from minibt.report import safe_build_report

    run = RunDir.open(req.run_dir)
    if req.judge and req.judge_model:
        raise MinibtError("give --judge ADAPTER or --judge-model PATH, not both")
    if req.ifeval_adapters:
        require_ifeval(req.ifeval_data)  # say what is missing before anything loads
    world = world_of(run.recipe()) if req.toy else None
    if req.toy and world is None:
        raise MinibtError("--toy: this run was not made by a toy-world recipe")
    updates: dict[str, Any] = {}
    if req.compare or world is not None:
        updates.update(_pairwise_and_world(run, req, world))
        free_memory()
    for adapter in req.ifeval_adapters:
        summary, rows = ifeval(run, adapter, data=req.ifeval_data, limit=req.ifeval_limit, max_gen_toks=req.ifeval_max_tokens,
                               batch_size=req.batch_size)
        io.write_jsonl(run.path / "eval" / f"ifeval_{adapter}.jsonl", rows)
        updates.setdefault("ifeval", {})[adapter] = summary
        merge_metrics(run.path, {"ifeval": {adapter: summary}})
    safe_build_report(run.path)
    return updates


def _pairwise_and_world(run: RunDir, req: EvalRequest, world: Any) -> dict[str, Any]:
    """The parts that need the run's base and adapters, on one session: pairwise judging and the world's metrics."""
    from minibt.session import open_run

    updates: dict[str, Any] = {}
    questions = read_instructions(run, req.instructions, req.limit)[0] if req.compare else []
    judge_adapter = req.judge or BASE
    wanted = [x for x in (*(req.compare or ()), judge_adapter if not req.judge_model else BASE) if x != BASE]
    session = open_run(run.path, adapters=list(dict.fromkeys(wanted)))
    if req.compare:
        a, b = req.compare
        judge_engine, judge_name = None, judge_adapter
        if req.judge_model:
            judge_engine, judge_name = load_judge(req.judge_model, req.judge_quantization), req.judge_model
        elif req.judge is None:
            log.info("judge: the run's base model (no adapter); --judge-model PATH brings a stronger judge")
        summary, rows = pairwise(session.engine, session.recipe, questions, a, b, judge=judge_engine,
                                 judge_adapter=BASE if req.judge_model else judge_adapter, judge_name=judge_name,
                                 max_new_tokens=req.max_new_tokens or session.answer_tokens, batch_size=req.batch_size)
        summary["instructions"] = str(req.instructions) if req.instructions else "data/eval.jsonl"
        io.write_jsonl(run.path / "eval" / f"pairwise_{a}_vs_{b}.jsonl", rows)
        updates["pairwise"] = {f"{a}_vs_{b}": summary}
        merge_metrics(run.path, updates)
    if world is not None:  # the world's own metrics (minibt/worlds.py), merged like every other part
        part = world.evaluate(run, session.engine, session.recipe)
        merge_metrics(run.path, part)
        updates.update(part)
    return updates
