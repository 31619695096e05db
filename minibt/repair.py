"""`minibt repair RUN_DIR`: rebuild a lost or corrupt manifest.json from the files of the run.

recipe.yaml says which stages the run has (pipeline.plan). A stage whose outputs (pipeline.outputs) are
all there and whole is recorded done, their rows and sha256 taken as they are now; the sharded stages
(augment, curate_rK) and the toy evaluation are left pending, since a rerun rebuilds them from their
shards in seconds, with their exact counts. The unreadable manifest is kept as manifest.json.corrupt.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from minibt import io
from minibt.errors import MinibtError
from minibt.rundir import RunDir

_REBUILT_ON_RERUN = ("augment", "curate_r", "evaluate")  # cheap to redo from their shards or the adapters


def repair(path: str | Path) -> list[str]:
    """Write a new manifest.json for the run in `path`; returns one line per stage saying what it found."""
    from minibt.pipeline import outputs, plan

    rd = RunDir(path, read_manifest=False)
    if not (rd.path / "recipe.yaml").is_file():
        raise MinibtError(f"{rd.path}: no recipe.yaml, so no minibt run to rebuild a manifest for")
    with rd.locked("or choose another --out DIR"):
        try:
            RunDir(rd.path)
        except MinibtError:
            pass  # unreadable, as expected
        else:
            if rd.manifest_path.exists():
                raise MinibtError(f"{rd.manifest_path} reads fine: nothing to repair")
        recipe = rd.recipe()
        lines = []
        if rd.manifest_path.exists():
            os.replace(rd.manifest_path, rd.manifest_path.with_name("manifest.json.corrupt"))
            lines.append(f"kept the unreadable manifest as {rd.manifest_path.with_name('manifest.json.corrupt')}")
        when = dt.datetime.fromtimestamp((rd.path / "recipe.yaml").stat().st_mtime, dt.timezone.utc)
        rd.manifest = {"recipe": recipe.run.name, "created": when.isoformat(timespec="seconds"), "stages": {},
                       "repaired": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        base = _base_model(rd)
        if base:
            rd.manifest["base_model"] = base
        for stage in plan(recipe):
            expected = outputs(rd, stage)
            files = [p for p in expected if p.is_file()]
            why = _not_done(rd, stage, expected, toy=recipe.toy is not None)
            if why:
                lines.append(f"{stage}: pending ({why})")
                continue
            for p in files:
                rd.record(p, save=False)
            rd.manifest["stages"][stage] = {"status": "done", "counts": {"rebuilt": True}, "outputs": [rd.rel(p) for p in files]}
            lines.append(f"{stage}: done ({', '.join(rd.rel(p) for p in files)})")
        rd.save()
    return lines


def _not_done(rd: RunDir, stage: str, expected: list[Path], toy: bool) -> str | None:
    """Why `stage` cannot be taken as done from the files it left (`expected`: its outputs); None if it can."""
    if stage.startswith(_REBUILT_ON_RERUN):
        return "a rerun rebuilds it from its shards" if stage != "evaluate" else "a rerun recomputes it"
    if stage == "prepare":
        needed = [p for p in expected if toy or p.stem in ("seed", "corpus")]  # the toy world's eval and ratings too
        missing = [rd.rel(p) for p in needed if not p.is_file()]
        if missing:
            return f"no {', '.join(missing)}"
        for p in needed:
            try:
                io.read_jsonl(p)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"{rd.rel(p)} has a line that is not JSON"
        return None
    (weights,) = expected
    if not weights.is_file() or not (weights.parent / "adapter_config.json").is_file():
        return f"no {rd.rel(weights)} with its adapter_config.json"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # any unreadable header: retrain rather than guess
        return f"{rd.rel(weights)} does not read as safetensors ({type(e).__name__})"
    return None


def _base_model(rd: RunDir) -> str | None:
    """The base the run's adapters were trained on, as their adapter_config.json names it."""
    for name in rd.adapter_names():
        try:
            base = json.loads((rd.adapter(name) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            continue
        if base:
            return base
    return None
