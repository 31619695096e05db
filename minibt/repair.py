"""`minibt repair RUN_DIR`: rebuild a lost or corrupt manifest.json from the files of the run.

recipe.yaml says which stages the run has (pipeline.stages). A stage whose outputs (Stage.files) are
all there and whole is recorded done, their rows and sha256 taken as they are now; the inference stages
(augment, curate_rK, the toy evaluation) are left pending, since a rerun rebuilds them from their
shards in seconds, with their exact counts. The unreadable manifest is kept as manifest.json.corrupt.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from minibt import io
from minibt.errors import MinibtError
from minibt.rundir import RunDir


def repair(path: str | Path) -> list[str]:
    """Write a new manifest.json for the run in `path`; returns one line per stage saying what it found."""
    from minibt.pipeline import stages

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
            rd.manifest["base_model"] = base  # saved with the stages below
        for stage in stages(recipe):
            expected = stage.files(rd)
            files = [p for p in expected if p.is_file()]
            why = _not_done(rd, stage, expected)
            if why:
                lines.append(f"{stage.name}: pending ({why})")
                continue
            for p in files:
                rd.record(p, save=False)
            rd.manifest["stages"][stage.name] = {"status": "done", "counts": {"rebuilt": True}, "outputs": [rd.rel(p) for p in files]}
            lines.append(f"{stage.name}: done ({', '.join(rd.rel(p) for p in files)})")
        rd.save()
    return lines


def _not_done(rd: RunDir, stage: Any, expected: list[Path]) -> str | None:
    """Why `stage` (a pipeline Stage) cannot be taken as done from the files it left (`expected`: its
    outputs); None if it can."""
    if not stage.adapter and stage.uses != "cpu":  # inference: cheap to redo from its shards or the adapters
        return "a rerun rebuilds it from its shards" if stage.outputs else "a rerun recomputes it"
    if not stage.adapter:  # prepare: the seed and corpus (and a world's own files)
        needed = expected
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
