"""Checkpoints inside a training stage: a killed training resumes where it was.

work_dir/checkpoint-<step>/ holds ONE adapter's state: adapter_model.safetensors (+ adapter_config.json:
a PEFT folder), the Trainer's own optimizer.pt, scheduler.pt, [scaler.pt,] rng_state.pth and
trainer_state.json, then minibt_checkpoint.json (the fingerprint of the settings and the loss
accounting). It is written in a temporary folder renamed into place, so it appears whole or not at
all; only the newest is kept.

What transformers' own `save_strategy="steps"` + `train(resume_from_checkpoint=...)` does is used as
it is: when to save, the optimizer, scheduler, scaler and RNG files, the trainer state, the restore of
all of them and the skipping of consumed batches. What it cannot do is overridden here, in two private
Trainer methods (tests/engine/test_checkpoints.py fails the day their signatures change):
- `_save_checkpoint`: it saves EVERY adapter of the PeftModel, not atomically, and no loss accounting;
- `_load_from_checkpoint`: it reloads each adapter folder it finds with peft's dtype autocast.
A public callback (`on_train_begin`) puts back the loss accounting the loop has just reset, so a
resumed run's train_loss and log lines equal an uninterrupted one's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minibt.engine.adapters import load_weights
from minibt.sections import TrainSection

log = logging.getLogger("minibt.engine")

VERSION = 1
PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR, so folders read checkpoint-<step>
INFO = "minibt_checkpoint.json"
FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", INFO)
_NAME = re.compile(rf"{PREFIX}-(\d+)")
_TEMP = re.compile(rf"\.{PREFIX}-\d+\..*\.tmp")
# the TrainSection keys that change what training does (not save_steps, report_to, gradient_checkpointing)
TRAIN_KEYS = ("epochs", "learning_rate", "batch_size", "grad_accum", "max_steps", "warmup_ratio", "lr_scheduler",
              "weight_decay", "packing", "group_by_length")
_FLOAT_KEYS = {"epochs", "learning_rate", "warmup_ratio", "weight_decay"}


@dataclasses.dataclass
class Checkpoints:
    """Where one training run's checkpoints go, how often, under which fingerprint, and which to resume."""

    dir: Path
    adapter: str
    every: int  # optimizer steps between checkpoints
    fingerprint: str
    settings: dict[str, Any]  # what the fingerprint covers, kept readable for the log line of a mismatch
    resume: Path | None = None


def settings(name: str, rows_digest: str, count: int, cfg: TrainSection, identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides how training goes: a checkpoint resumes only under the same settings.
    `identity`: the engine's part (model, revision, backend, quantization, dtype, max_length, lora, seed)."""
    return {
        "version": VERSION,
        "adapter": name,
        "rows": rows_digest,
        "examples": count,
        **identity,
        # numbers as the recipe types them (epochs: 3 and 3.0 are one setting)
        **{key: float(v) if isinstance(v, int) and key in _FLOAT_KEYS else v
           for key, v in ((key, getattr(cfg, key)) for key in TRAIN_KEYS)},
    }


def plan(name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work: Path,
         identity: dict[str, Any]) -> tuple[TrainSection, Checkpoints | None]:
    """The training config to use and where its checkpoints go, resuming the newest matching one.

    A checkpoint made after an out-of-memory retry (half the batch, twice the accumulation) is
    resumed with that smaller batch, so a rerun does not run out of memory again first.
    """
    if cfg.save_steps <= 0:
        return cfg, None
    digest = rows_digest(rows)
    found = list_checkpoints(work)
    variants = [cfg]
    while variants[-1].batch_size > 1:
        last = variants[-1]
        variants.append(dataclasses.replace(last, batch_size=last.batch_size // 2, grad_accum=last.grad_accum * 2))
    for variant in variants:
        wanted = settings(name, digest, len(rows), variant, identity)
        key = fingerprint(wanted)
        for step, path, info in found:
            if info.get("fingerprint") == key:
                if variant is not cfg:
                    log.info("%s: an earlier attempt ran out of memory; resuming with batch_size %d x grad_accum %d",
                             name, variant.batch_size, variant.grad_accum)
                log.info("resuming %s from step %d (%s)", name, step, path)
                return variant, Checkpoints(work, name, variant.save_steps, key, wanted, resume=path)
    wanted = settings(name, digest, len(rows), cfg, identity)
    if found:
        step, path, info = found[0]
        why = first_change(info.get("settings", {}), wanted) or "another version of minibt"
        log.warning("%s: not resuming %s from %s, made with other settings (%s): training from the start",
                    name, name, path.name, why)
    return cfg, Checkpoints(work, name, cfg.save_steps, fingerprint(wanted), wanted)


def rows_digest(rows: Sequence[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["completion"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def first_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            if key == "rows":
                return "other training rows"
            return f"{key}: {old.get(key)!r} before, {new.get(key)!r} now"
    return None


def list_checkpoints(work: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """The complete checkpoints in `work`, newest first: (step, folder, its minibt_checkpoint.json)."""
    found: list[tuple[int, Path, dict[str, Any]]] = []
    if not work.is_dir():
        return found
    for path in work.iterdir():
        m = _NAME.fullmatch(path.name)
        if not m or not path.is_dir() or not all((path / f).is_file() for f in FILES):
            continue
        try:
            info = json.loads((path / INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append((int(m.group(1)), path, info))
    return sorted(found, key=lambda t: -t[0])


def _is_checkpoint(path: Path) -> bool:
    return bool(_NAME.fullmatch(path.name) or _TEMP.fullmatch(path.name))


def clear_checkpoints(work_dir: str | os.PathLike) -> None:
    """Delete the training checkpoints in `work_dir` (and half-written ones), once the adapter is saved."""
    work = Path(work_dir)
    if work.is_dir():
        for path in work.iterdir():
            if _is_checkpoint(path):
                shutil.rmtree(path, ignore_errors=True)


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) else x


def write_checkpoint(trainer: Any, ck: Checkpoints) -> Path:
    """Write `ck.adapter`'s checkpoint at the trainer's current step, atomically; drop older ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers.trainer_callback import ExportableState

    step = trainer.state.global_step
    ck.dir.mkdir(parents=True, exist_ok=True)
    final = ck.dir / f"{PREFIX}-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=ck.dir))
    try:
        trainer.store_flos()
        weights = get_peft_model_state_dict(trainer.model, adapter_name=ck.adapter)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        trainer.model.peft_config[ck.adapter].save_pretrained(str(tmp))
        trainer._save_optimizer_and_scheduler(str(tmp))
        trainer._save_scaler(str(tmp))
        trainer._save_rng_state(str(tmp))
        # as Trainer._save_checkpoint does: stateful callbacks and the control go into the trainer state
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(cb.state())
            else:
                trainer.state.stateful_callbacks[name] = cb.state()
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        metrics = getattr(trainer, "_metrics", {}).get("train", {})  # trl's running means between two log lines
        info = {
            "adapter": ck.adapter,
            "step": step,
            "fingerprint": ck.fingerprint,
            "settings": ck.settings,
            # the loss accounting a resumed run continues, so its train_loss and log lines equal an uninterrupted run's
            "trainer": {
                "total_loss": trainer._total_loss_scalar,
                "pending_loss": _plain(trainer._tr_loss),
                "last_logged": trainer._globalstep_last_logged,
                "train_tokens": _plain(getattr(trainer, "_total_train_tokens", 0)),
                "metrics": {k: [_plain(v) for v in vs] for k, vs in metrics.items()},
            },
        }
        (tmp / INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for other in ck.dir.iterdir():
        if other != final and _is_checkpoint(other):
            shutil.rmtree(other, ignore_errors=True)
    log.info("%s: checkpoint at step %d", ck.adapter, step)
    return final


@contextlib.contextmanager
def quiet_resume() -> Iterator[None]:
    """Hide accelerate's "dataset had no length" lines: the dataloader that skips consumed batches reports no
    remainder at the end of the resumed epoch; one process gathers nothing, so there is nothing to drop."""
    logger = logging.getLogger("accelerate.accelerator")

    def quiet(record: logging.LogRecord) -> bool:
        return "had no length" not in record.getMessage()

    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _restorer(trainer: Any) -> Any:
    """A callback that, when a resumed training begins, applies this run's logging/save steps (the loaded
    trainer state carries the checkpoint's) and continues the checkpoint's loss accounting, which the
    training loop has just reset (transformers' Trainer._inner_training_loop resets it, then calls
    on_train_begin)."""
    from transformers import TrainerCallback

    class RestoreLossAccounting(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            saved, trainer.minibt_restore = trainer.minibt_restore, None
            if saved is None:
                return
            state.compute_steps(args, state.max_steps)
            trainer._total_loss_scalar = saved["total_loss"]
            trainer._tr_loss.fill_(saved["pending_loss"])
            trainer._globalstep_last_logged = saved["last_logged"]
            if hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = saved["train_tokens"]
            if hasattr(trainer, "_metrics"):
                trainer._metrics["train"].clear()
                trainer._metrics["train"].update(saved["metrics"])

    return RestoreLossAccounting()


if TYPE_CHECKING:  # what the mixin is mixed into (resumable_trainer): a transformers Trainer (trl's SFTTrainer)
    from transformers import Trainer as _TrainerBase
else:
    _TrainerBase = object


class _ResumableMixin(_TrainerBase):
    """Checkpoint-and-resume for a trl SFTTrainer that trains one adapter of a multi-adapter PeftModel."""

    minibt_checkpoints: Checkpoints | None = None
    minibt_restore: dict[str, Any] | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        ck = self.minibt_checkpoints
        if ck is None:
            return super()._save_checkpoint(model, trial)
        if self.state.global_step >= self.state.max_steps:
            return  # training is over: the caller saves the finished adapter
        write_checkpoint(self, ck)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        ck = self.minibt_checkpoints
        if ck is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint)
        load_weights(self.model, ck.adapter, folder / "adapter_model.safetensors")
        self.minibt_restore = json.loads((folder / INFO).read_text(encoding="utf-8"))["trainer"]


_RESUMABLE: dict[type, type] = {}


def resumable_trainer(trainer_cls: type, checkpoints: Checkpoints | None, **kwargs: Any) -> Any:
    """A `trainer_cls` (trl's SFTTrainer, or the one unsloth patched in) that writes and resumes `checkpoints`."""
    if trainer_cls not in _RESUMABLE:
        _RESUMABLE[trainer_cls] = type(f"Resumable{trainer_cls.__name__}", (_ResumableMixin, trainer_cls), {})
    trainer = _RESUMABLE[trainer_cls](**kwargs)
    trainer.minibt_checkpoints = checkpoints
    trainer.add_callback(_restorer(trainer))
    return trainer
