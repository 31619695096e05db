"""Training a role adapter with trl's SFTTrainer: loss on completions only, a fresh trainer per role.

`sft_config` is THE SFTConfig of minibt's training (the engine's, and the bench's bare trl side).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minibt import stack_guards as guards
from minibt.engine import checkpoints as ckpt
from minibt.engine.adapters import Adapters
from minibt.engine.load import has_gpu
from minibt.errors import MinibtError
from minibt.sections import LoraSection, ModelSection, TrainSection

log = logging.getLogger("minibt.engine")

# attention implementations whose kernels read packed-row boundaries from position_ids (trl 1.14's list)
FLASH_ATTENTION = {"flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                   "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3"}


def sft_config(cfg: TrainSection, max_length: int, dtype: torch.dtype, seed: int, output_dir: str | os.PathLike,
               packing: bool, save_steps: int | None = None, run_name: str | None = None) -> Any:
    """The trainer's arguments for one role's training. `save_steps`: checkpoint every that many optimizer
    steps (through checkpoints.py, not the Trainer's own format); None: no checkpoints."""
    from trl import SFTConfig

    gpu = has_gpu()
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        weight_decay=cfg.weight_decay,
        max_length=max_length,
        packing=packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        completion_only_loss=True,
        gradient_checkpointing=cfg.gradient_checkpointing and gpu,
        bf16=dtype == torch.bfloat16,  # autocast on a CPU too (the GPU path's mechanism, testable here)
        fp16=gpu and dtype == torch.float16,
        use_cpu=not gpu,
        optim="adamw_torch",
        logging_steps=max(1, min(10, cfg.max_steps if cfg.max_steps > 0 else 10)),
        save_strategy="steps" if save_steps is not None else "no",
        save_steps=save_steps if save_steps is not None else 500,
        report_to=cfg.report_to,  # tensorboard writes under output_dir (the run's work dir)
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def packing_allowed(model: Any, backend: str, requested: bool) -> bool:
    """Whether training packs rows (trl `packing`, strategy bfd), given the recipe's `packing` switch.

    trl 1.14's bfd packing is padding-free: each batch becomes ONE row, the examples' boundaries
    marked only by position_ids restarting at 0, with no attention mask. Flash-attention varlen
    kernels and unsloth's packed attention (GPU) read those boundaries. sdpa and eager depend on
    transformers deriving a block-diagonal mask from position_ids, which it skips whenever a KV
    cache object exists (config.use_cache=True, as minibt loads for generation): packed examples
    then attend to each other (measured on the toy base: logits off by ~10, tests/engine/test_train.py),
    and even where the mask is built it spans the whole flattened batch (quadratic, no speedup).
    So packing runs on the unsloth backend on a GPU or a flash-attention model only; otherwise
    the switch is ignored with a warning and batches are padded. (On the unsloth backend,
    unsloth itself also turns padding-free batching on when it measures it faster.)
    """
    if not requested:
        return False
    attn = str(getattr(model.config, "_attn_implementation", "") or "").split("@")[0].split(":")[0]
    if (backend == "unsloth" and has_gpu()) or attn in FLASH_ATTENTION:
        return True
    log.warning("packing: off (attention %r would let packed examples see each other; packing needs "
                "flash-attention or unsloth on a GPU): training on padded batches", attn)
    return False


class RoleTrainer:
    """Trains the role adapters of `roles`, one fresh trl trainer per call, with mid-stage checkpoints."""

    def __init__(self, roles: Adapters, model_cfg: ModelSection, lora: LoraSection, seed: int, backend: str):
        self.roles, self.model_cfg, self.lora, self.seed, self.backend = roles, model_cfg, lora, seed, backend
        self.model, self.dtype = roles.model, roles.dtype

    def identity(self) -> dict[str, Any]:
        """The engine's part of a checkpoint's fingerprint (checkpoints.settings)."""
        return {
            "model": self.model_cfg.name,
            "revision": self.model_cfg.revision,
            "backend": self.backend,
            "quantization": self.model_cfg.quantization,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.model_cfg.max_length,
            "lora": dataclasses.asdict(self.lora),
            "seed": self.seed,
        }

    def packing(self, requested: bool) -> bool:
        return packing_allowed(self.model, self.backend, requested)

    def train(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work_dir: str | os.PathLike) -> dict:
        """Train adapter `name` on prompt/completion rows: loss on completions only.

        A new trainer per call, so every role starts with a fresh optimizer and touches only its own
        adapter. Returns the trainer's log history and summary numbers.

        Every `cfg.save_steps` optimizer steps a checkpoint of this adapter alone replaces the previous
        one in `work_dir`; when `work_dir` holds one made with the same settings and rows (a
        fingerprint), a new call resumes from it: same sampler seed and epoch, consumed batches skipped.
        """
        if not rows:
            raise MinibtError(f"no training rows for adapter {name}")
        cfg, checkpoints = ckpt.plan(name, rows, cfg, Path(work_dir), self.identity())
        try:
            return self._train_once(name, rows, cfg, work_dir, checkpoints)
        except torch.cuda.OutOfMemoryError:
            if cfg.batch_size == 1:
                raise MinibtError(f"out of memory training {name} at batch size 1: lower model.max_length") from None
        # retried out of the handler: its traceback held the failed trainer, optimizer and activations
        # (tests/engine/test_train.py checks they are gone before the retry starts)
        smaller = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, grad_accum=cfg.grad_accum * 2)
        log.warning("out of memory training %s: retrying with batch_size %d x grad_accum %d", name, smaller.batch_size, smaller.grad_accum)
        self.roles.delete(name)  # the same effective batch in smaller steps, from a fresh adapter
        guards.free_memory()
        return self.train(name, rows, smaller, work_dir)

    def _train_once(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work_dir: str | os.PathLike,
                    checkpoints: ckpt.Checkpoints | None = None) -> dict:
        from datasets import Dataset
        from trl import SFTTrainer

        if name not in self.roles.adapters:
            self.roles.add(name)
        args = sft_config(cfg, self.model_cfg.max_length, self.dtype, self.seed, work_dir, self.packing(cfg.packing),
                          save_steps=checkpoints.every if checkpoints is not None else None, run_name=name)
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        t0 = time.time()
        embeddings = guards.embedding_sums(self.model)
        with self.roles.use(name, trainable=True):
            trainer = ckpt.resumable_trainer(SFTTrainer, checkpoints, model=self.model, args=args, train_dataset=dataset,
                                             processing_class=self.roles.tokenizer)
            if args.fp16:
                # trl casts trainable QLoRA weights to bf16 whatever the precision; fp16's gradient scaler
                # cannot unscale bf16 gradients, and mixed precision wants fp32 master weights anyway
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
            # check again after the trainer touched the weights
            self.roles.check_trainable(name)
            resume = checkpoints.resume if checkpoints is not None else None
            try:
                with ckpt.quiet_resume() if resume is not None else contextlib.nullcontext():
                    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
            finally:  # scoring and decoding after training run the model as loaded, not under autocast
                guards.drop_mixed_precision_wrapper(self.model)
            self.roles.check_trainable(name)  # a resumed adapter was loaded into the same parameters
        self.roles.mode(training=False)
        if not all(torch.equal(a, b) for a, b in zip(embeddings, guards.embedding_sums(self.model))):
            raise RuntimeError(f"the base's embeddings changed while {name} trained (unsloth's fix_untrained_tokens?): "
                               "every adapter shares them; rerun from a fresh process")
        history = [h for h in trainer.state.log_history if "loss" in h]
        return {
            "train_loss": round(float(result.training_loss), 4),
            "steps": int(trainer.state.global_step),
            "examples": len(rows),
            "seconds": round(time.time() - t0, 1),
            "log_history": history,
        }
