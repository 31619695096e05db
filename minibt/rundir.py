"""The run directory: resolved recipe, manifest of stages, data files and adapter folders.

```
recipe.yaml      the resolved recipe, as run
manifest.json    base_loads, and per stage: status, started, finished, seconds, counts
data/*.jsonl     seed, corpus, augmented, scored_r1, curated_r1, ...
adapters/<name>/ PEFT folders
```
Every file appears atomically; a stage is `done` only after all its files are written, so a killed
run redoes at most the stage (or, for sharded stages, the shard) that was in flight.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from minibt import io
from minibt.errors import MinibtError
from minibt.recipe import Recipe

# Sections whose change makes finished stages invalid. `run.threads` and batch sizes of inference
# stages change speed, not results, so a rerun may change them.
_RESULT_KEYS_IGNORED = {("run", "threads"), ("augment", "batch_size"), ("curate", "batch_size"),
                        ("backward", "report_to"), ("forward", "report_to"),  # where logs go, not results
                        ("backward", "save_steps"), ("forward", "save_steps")}  # when checkpoints are written


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    # --- creation / opening ---------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, recipe: Recipe, fresh: bool = False) -> "RunDir":
        """Start a run in `path`, or resume the one there if it was made by the same recipe."""
        path = Path(path)
        if fresh and path.exists():
            shutil.rmtree(path)
        run = cls(path)
        resolved = recipe.to_dict()
        if (path / "recipe.yaml").exists():
            old = yaml.safe_load((path / "recipe.yaml").read_text())
            diff = _first_difference(old, resolved)
            finished = any(s.get("status") == "done" for s in run.manifest.get("stages", {}).values())
            if diff and finished:  # nothing finished yet (a fixed typo, say): the new recipe simply applies
                raise MinibtError(
                    f"{path} holds a run made by a different recipe ({diff}); "
                    f"pass --fresh to start over there, or --out DIR for a new run"
                )
        elif path.exists() and any(path.iterdir()):
            raise MinibtError(f"{path} exists and is not a minibt run; choose another --out or empty it")
        path.mkdir(parents=True, exist_ok=True)
        io.write_text(path / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        run.manifest.setdefault("recipe", recipe.run.name)
        run.manifest.setdefault("created", _now())
        run.manifest.setdefault("stages", {})
        run.save()
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not (path / "manifest.json").is_file() or not (path / "recipe.yaml").is_file():
            raise MinibtError(f"{path} is not a minibt run directory (no manifest.json / recipe.yaml)")
        return cls(path)

    def recipe(self) -> Recipe:
        from minibt.recipe import from_dict

        return from_dict(yaml.safe_load((self.path / "recipe.yaml").read_text()), base_dir=self.path)

    # --- layout ---------------------------------------------------------------------------

    def data(self, name: str) -> Path:
        return self.path / "data" / f"{name}.jsonl"

    def shards(self, name: str) -> Path:
        return self.path / "data" / f"{name}.shards"

    def adapter(self, name: str) -> Path:
        return self.path / "adapters" / name

    def work(self, name: str) -> Path:
        return self.path / "work" / name

    def adapter_names(self) -> list[str]:
        root = self.path / "adapters"
        return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").exists()) if root.exists() else []

    # --- manifest -------------------------------------------------------------------------

    def save(self) -> None:
        io.write_json(self.manifest_path, self.manifest)

    def status(self, stage: str) -> str:
        return self.manifest["stages"].get(stage, {}).get("status", "pending")

    def done(self, stage: str) -> bool:
        return self.status(stage) == "done"

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a stage: records running -> done (with counts) or failed. Yields its counts dict."""
        entry = self.manifest["stages"].setdefault(name, {})
        counts: dict[str, Any] = entry.get("counts", {})
        entry.update(status="running", started=_now(), counts=counts)
        entry.pop("error", None)
        self.save()
        t0 = time.time()
        try:
            yield counts
        except BaseException as e:
            entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:500], seconds=round(time.time() - t0, 1))
            self.save()
            if isinstance(e, Exception):  # not on Ctrl-C: leave at once
                self.report()
            raise
        entry.update(status="done", finished=_now(), seconds=round(time.time() - t0, 1), counts=counts)
        self.save()
        self.report()

    def report(self) -> None:
        """Rebuild report.md (minibt/report.py); a failure is logged, never raised."""
        from minibt.report import safe_build_report

        safe_build_report(self.path)


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            sub = f"{key}.{k}" if key else k
            if tuple(sub.split(".")) in _RESULT_KEYS_IGNORED:
                continue
            d = _first_difference(old.get(k), new.get(k), sub)
            if d:
                return d
        return None
    return None if old == new else f"{key}: {old!r} before, {new!r} now"
