"""The run directory: resolved recipe, manifest of stages, data files and adapter folders.

```
recipe.yaml      the resolved recipe, as run
manifest.json    base_loads, and per stage: status, started, finished, seconds, counts
data/*.jsonl     seed, corpus, augmented, scored_r1, curated_r1, ...
adapters/<name>/ PEFT folders
.lock            held (flock) by the process writing the run: one run per folder
```
Every file appears atomically; a stage is `done` only after all its files are written, so a killed
run redoes at most the stage (or, for sharded stages, the shard) that was in flight. The manifest
records each output's rows and sha256 (`files`), so a file cut short or corrupted later is found on
resume and redone, never used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict, cast

import yaml

from minibt import io
from minibt.errors import MinibtError
from minibt.recipe import Recipe
from minibt.sections import VLLM_KEYS

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: no flock, runs are not locked there
    fcntl = None

log = logging.getLogger("minibt")

LOCK = ".lock"
WEIGHTS = "adapter_model.safetensors"

# Sections whose change makes finished stages invalid. `run.threads` and batch sizes of inference
# stages change speed, not results, so a rerun may change them.
_RESULT_KEYS_IGNORED = {("run", "threads"), ("augment", "batch_size"), ("curate", "batch_size"),
                        ("backward", "report_to"), ("forward", "report_to"),  # where logs go, not results
                        ("backward", "save_steps"), ("forward", "save_steps"),  # when checkpoints are written
                        ("inference", "workers"), ("inference", "ray_address"),  # where shards run (workers.py)
                        # which engine runs inference, and its settings: machine-dependent (engine auto picks by
                        # the GPU); each inference stage's counts name its engine
                        *(("inference", k) for k in ("engine", *VLLM_KEYS))}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StageEntry(TypedDict, total=False):
    """A stage in manifest.json, as `RunDir.stage` writes it."""

    status: str  # pending, running, done, failed
    started: str
    finished: str
    seconds: float
    counts: dict[str, Any]  # the stage's own counts (see each stage)
    outputs: list[str]  # its data files and adapter weights, relative to the run folder
    error: str


class Manifest(TypedDict, total=False):
    """manifest.json: what the run did. RunDir writes it: `stage` (each stage's entry), `record` (a file's
    rows and sha256), `note` (the run's facts: the base it loaded, its inference engines)."""

    recipe: str
    created: str
    repaired: str  # when `minibt repair` rebuilt it
    stages: dict[str, StageEntry]
    files: dict[str, dict[str, Any]]  # relative path -> rows, bytes, sha256
    base_model: str
    backend: str
    base_loads: int
    inference: dict[str, str]  # the inference engine and why it was picked
    inference_engines: list[dict[str, Any]]  # each start and stop of a separate engine: seconds, memory


class RunDir:
    def __init__(self, path: str | Path, read_manifest: bool = True):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self.manifest: Manifest = _read_manifest(self.manifest_path) if read_manifest else {}
        self._lock_fd: int | None = None
        self._digests: dict[tuple, dict[str, Any]] = {}  # (path, mtime, size) -> digest: each file hashed once
        self._told: set[str] = set()  # problems already logged

    # --- creation / opening ---------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, recipe: Recipe, fresh: bool = False) -> RunDir:
        """Start a run in `path`, or resume the one there if it was made by the same recipe.

        The folder stays locked until `unlock()` (or the process ends): a second run on it is refused.
        """
        path = Path(path)
        if not fresh and not (path / "recipe.yaml").exists() and path.exists() and any(p.name != LOCK for p in path.iterdir()):
            raise MinibtError(f"{path} exists and is not a minibt run; choose another --out or empty it")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path, "or choose another --out DIR")
        try:
            if fresh:
                for child in path.iterdir():
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            run = cls(path)
            run._lock_fd = lock_fd
            run._start(recipe)
        except BaseException:
            os.close(lock_fd)
            raise
        return run

    def _start(self, recipe: Recipe) -> None:
        resolved = recipe.to_dict()
        if (self.path / "recipe.yaml").exists():
            old = yaml.safe_load((self.path / "recipe.yaml").read_text())
            # a section or key minibt added since that run (e.g. rewrite, train.group_by_length) is absent
            # there: its default is what ran
            diff = _first_difference(_with_defaults(old, type(recipe)().to_dict()), resolved)
            finished = any(s.get("status") == "done" for s in self.manifest.get("stages", {}).values())
            if diff and finished:  # nothing finished yet (a fixed typo, say): the new recipe simply applies
                raise MinibtError(
                    f"{self.path} holds a run made by a different recipe ({diff}); "
                    f"pass --fresh to start over there, or --out DIR for a new run"
                )
        io.write_text(self.path / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        self.manifest.setdefault("recipe", recipe.run.name)
        self.manifest.setdefault("created", _now())
        self.manifest.setdefault("stages", {})
        self.save()

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / "recipe.yaml").is_file():
            raise MinibtError(f"{path} is not a minibt run directory (no recipe.yaml)")
        if not (path / "manifest.json").is_file():
            raise MinibtError(f"{path} has no manifest.json: rebuild it from the run's data files and adapters with: minibt repair {path}")
        return cls(path)

    # --- one writer per folder ----------------------------------------------------------------

    def lock(self, hint: str = "") -> None:
        """Hold the folder's lock (see `_lock`) until `unlock()`; no-op if this RunDir holds it already."""
        if self._lock_fd is None:
            self._lock_fd = _lock(self.path, hint)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self, hint: str = "") -> Iterator[RunDir]:
        self.lock(hint)
        try:
            yield self
        finally:
            self.unlock()

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

    def check_adapter(self, name: str) -> None:
        """Refuse an adapter folder without its weights, or whose weights differ from those saved."""
        weights = self.adapter(name) / WEIGHTS
        why = "missing (the folder has no weights)" if not weights.is_file() else self.problem(weights)
        if why:
            raise MinibtError(f"adapter {name!r}: {weights}: {why}; restore it, or delete {self.adapter(name)} "
                              f"and rerun the run's command to retrain it")

    # --- what each file held when it was written ------------------------------------------------

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder, as the manifest names files."""
        return Path(path).relative_to(self.path).as_posix()

    def _digest(self, path: Path) -> dict[str, Any]:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._digests:
            self._digests[key] = io.digest(path)
        return self._digests[key]

    def record(self, path: Path, save: bool = True) -> None:
        """Remember `path`'s rows and sha256 in the manifest (`files`), to check it on resume."""
        files = self.manifest.setdefault("files", {})
        rel, new = self.rel(path), self._digest(path)
        old = files.get(rel)
        if old and old["sha256"] != new["sha256"] and rel in self._told:  # redone after a problem, yet different
            log.warning("%s was redone with other content than before: what later stages built on it may differ", rel)
        files[rel] = new
        if save:
            self.save()

    def recorded(self, path: Path) -> bool:
        return self.rel(path) in self.manifest.get("files", {})

    def problem(self, path: Path) -> str | None:
        """How `path` departs from what was recorded when it was written; None if it does not (or was never recorded)."""
        want = self.manifest.get("files", {}).get(self.rel(path))
        if want is None:
            return None
        if not path.is_file():
            return "missing"
        return io.differs(want, self._digest(path))

    def tell(self, key: str, message: str) -> None:
        """Log a problem once per run, however often it is checked."""
        if key not in self._told:
            self._told.add(key)
            log.warning(message)

    # --- manifest -------------------------------------------------------------------------

    def save(self) -> None:
        io.write_json(self.manifest_path, self.manifest)

    def status(self, stage: str) -> str:
        return self.manifest["stages"].get(stage, {}).get("status", "pending")

    def done(self, stage: str) -> bool:
        """The stage finished and its outputs are as they were written: a data file that is not is
        redone with its stage (logged); an adapter whose weights are missing or changed is an error."""
        entry = self.manifest["stages"].get(stage, {})
        if entry.get("status") != "done":
            return False
        for rel in entry.get("outputs", []):
            path = self.path / rel
            if rel.startswith("adapters/"):
                if not path.parent.exists():
                    return False  # the whole folder deleted: retrain it
                self.check_adapter(path.parent.name)
            elif (why := self.problem(path)):
                self.tell(rel, f"{rel}: {why}: redoing {stage}")
                return False
        return True

    def note(self, **facts: Any) -> None:
        """Write the run's facts (`Manifest`'s keys) into the manifest, and save it."""
        unknown = set(facts) - set(Manifest.__annotations__)
        if unknown:
            raise KeyError(f"not a manifest key: {', '.join(sorted(unknown))}")
        cast(dict[str, Any], self.manifest).update(facts)
        self.save()

    def note_engine_started(self, entry: dict[str, Any]) -> None:
        """A separate inference engine started (minibt/inference.py): its seconds and memory."""
        self.note(inference_engines=[*self.manifest.get("inference_engines", []), entry])

    def note_engine_stopped(self, **facts: Any) -> None:
        """The last started inference engine stopped."""
        engines = self.manifest.get("inference_engines", [])
        self.note(inference_engines=[*engines[:-1], {**engines[-1], **facts}])

    @contextlib.contextmanager
    def stage(self, name: str, outputs: Iterable[Path] = ()) -> Iterator[dict[str, Any]]:
        """Run a stage: records running -> done (with counts, and the rows and sha256 of those of its
        `outputs` that exist) or failed. Yields its counts dict."""
        entry = self.manifest["stages"].setdefault(name, {})
        counts: dict[str, Any] = entry.get("counts", {})
        entry.update({"status": "running", "started": _now(), "counts": counts})
        entry.pop("error", None)
        t0 = time.time()
        try:
            self.save()  # inside: a Ctrl-C while it fsyncs (the new manifest already in place) still says failed
            yield counts
        except BaseException as e:
            entry.update({"status": "failed", "error": f"{type(e).__name__}: {e}"[:500], "seconds": round(time.time() - t0, 1)})
            with contextlib.suppress(MinibtError):  # a full disk: the error to show is `e`; "running" resumes too
                self.save()
            raise
        written = [p for p in outputs if Path(p).is_file()]
        for p in written:
            self.record(p, save=False)
        entry.update({"status": "done", "finished": _now(), "seconds": round(time.time() - t0, 1), "counts": counts,
                      "outputs": [self.rel(p) for p in written]})
        self.save()


def _read_manifest(path: Path) -> Manifest:
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = f"not valid JSON ({e})"
    else:
        if isinstance(manifest, dict) and isinstance(manifest.get("stages", {}), dict):
            return cast(Manifest, manifest)
        why = "not a minibt manifest"
    raise MinibtError(f"{path} is {why}: rebuild it from the run's data files and adapters with: minibt repair {path.parent}")


def _lock(path: Path, hint: str) -> int:
    """Take `path`/.lock (flock, exclusive) and write who holds it; the OS drops the lock when the process
    ends, however it ends, so a dead run never blocks. A second holder is refused at once, by name."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without locks (some FUSE mounts)
            log.warning("%s: cannot lock this folder (%s); nothing stops a second run on it", path, e.strerror)
            return fd
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise MinibtError(f"{path} is in use by {holder}: wait for that run to end (or stop it) and rerun{', ' + hint if hint else ''}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
    return fd


def _with_defaults(old: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`old` (a saved recipe) with every section and key it lacks taken from `defaults`."""
    out = {**defaults, **old}
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            out[k] = _with_defaults(old[k], v)
    return out


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
