"""The engine: ONE base model, loaded once (4-bit NF4 by default), and the named LoRA adapters on it.

Every role of the method is an adapter on this one base: `myx` (backward), `m0`, `m1`, ... (forward;
the curator of round k is m_{k-1}). Switching roles is `set_adapter`, never a reload. This is the
only module that imports unsloth or bitsandbytes.

Backends: `unsloth` (the GPU fast path; default when a GPU and unsloth are present), `transformers`
(transformers + peft + bitsandbytes; GPU, or CPU 4-bit), and quantization `none` for full precision.
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
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from minibt import stack_guards as guards
from minibt.errors import MinibtError
from minibt.prompts import CHAT_TEMPLATE
from minibt.recipe import LoraSection, ModelSection, TrainSection

log = logging.getLogger("minibt.engine")

BASE = "base"  # the adapter name that means "no adapter"
_PLACEHOLDER = "default"  # the backends' first adapter; deleted once a role adapter exists
# attention implementations whose kernels read packed-row boundaries from position_ids (trl 1.14's list)
_FLASH_ATTENTION = {"flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3"}


def has_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if has_gpu():
        import importlib.util

        if importlib.util.find_spec("unsloth") is not None:
            return "unsloth"
    return "transformers"


def import_backend(requested: str) -> None:
    """Import unsloth before anything imports transformers, when unsloth will be used (it patches them)."""
    if resolve_backend(requested) == "unsloth":
        import unsloth  # noqa: F401


def compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if not has_gpu():
        return torch.float32
    # torch counts emulated bf16 as supported (a T4 says yes): ask for the real thing
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


class Engine:
    """The base model and its adapters. Build it with `Engine.load(model_section, lora_section)`."""

    name = "hf"  # the inference engine (`interface.Inference`): transformers + peft, minibt's decode loop

    def __init__(self, model: Any, tokenizer: Any, backend: str, model_cfg: ModelSection, lora: LoraSection, seed: int):
        self.model = model  # a peft PeftModel wrapping the one base
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_cfg = model_cfg
        self.lora = lora
        self.seed = seed
        self.dtype = compute_dtype(model_cfg.dtype)
        self.base_loads = 1
        self.truncated = 0  # texts and prompts cut to fit the context, over the engine's life
        self.prefix_cache = True  # generate, next_token_probs: compute a prefix shared by every prompt once
        self.role = BASE  # the adapter the last `use` block made active (named by the finiteness check)

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, model_cfg: ModelSection, lora: LoraSection, seed: int = 0) -> "Engine":
        backend = resolve_backend(model_cfg.backend)
        if backend == "unsloth" and model_cfg.quantization != "nf4":
            raise MinibtError("model.backend: unsloth here runs 4-bit bases only; set model.quantization=nf4")
        if model_cfg.trust_remote_code:
            log.warning("model.trust_remote_code is true: the model's own Python code from %s will run", model_cfg.name)
        torch.manual_seed(seed)
        t0 = time.time()
        loader = _load_unsloth if backend == "unsloth" else _load_transformers
        try:
            model, tokenizer = loader(model_cfg, lora, seed)
        except OSError as e:  # not on the hub, no network, gated repo, missing files
            raise MinibtError(f"model.name: cannot load {model_cfg.name}: {str(e).splitlines()[0]}") from None
        _set_chat_template(tokenizer, model_cfg)
        log.info("loaded %s (%s, %s) in %.1fs", model_cfg.name, backend, model_cfg.quantization, time.time() - t0)
        return cls(model, tokenizer, backend, model_cfg, lora, seed)

    @property
    def adapters(self) -> list[str]:
        return [a for a in self.model.peft_config if a != _PLACEHOLDER]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add_adapter(self, name: str) -> None:
        """A fresh LoRA adapter `name` (initialised from the run seed and the name, so reproducible)."""
        self._check_new(name)
        torch.manual_seed(self.seed + sum(map(ord, name)))
        self.model.add_adapter(name, _lora_config(self.lora))
        self._drop_placeholder()

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        """Load a PEFT adapter folder as `name`. Safetensors only."""
        path = Path(path)
        if not (path / "adapter_model.safetensors").is_file():
            raise MinibtError(f"{path}: no adapter_model.safetensors (minibt loads safetensors adapters only)")
        self._check_new(name)
        self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable, autocast_adapter_dtype=False)
        # peft upcasts loaded weights; keep the dtype training left (trl trains QLoRA weights in bf16),
        # so a reloaded adapter scores exactly as it did before it was saved
        saved = _saved_dtype(path / "adapter_model.safetensors")
        for pname, p in self.model.named_parameters():
            if _adapter_of(pname) == name:
                p.data = p.data.to(saved)
        if saved != self.dtype:  # peft loaded them in the base's dtype: fp32 weights were rounded, read them again
            _load_adapter_weights(self.model, name, path / "adapter_model.safetensors")
        self._drop_placeholder()

    def save_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Write adapter `name` as a PEFT folder (plus the tokenizer and its chat template), atomically."""
        self._require(name)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
            saved = tmp / name  # peft writes non-default adapters into a subfolder
            self.tokenizer.save_pretrained(str(saved))
            if path.exists():
                shutil.rmtree(path)
            os.replace(saved, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if len(self.model.peft_config) == 1:  # peft breaks without any adapter: keep a placeholder
            self.model.add_adapter(_PLACEHOLDER, _lora_config(self.lora))
        self.model.delete_adapter(name)

    # --- roles ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str, trainable: bool = False) -> Iterator[None]:
        """Make adapter `name` (or "base": no adapter) the active one for the block."""
        self.role = name
        if name == BASE:
            if trainable:
                raise MinibtError("the base model is frozen; train an adapter")
            self._freeze_all()
            self._mode(training=False)
            with self.model.disable_adapter():
                yield
            return
        self._require(name)
        self.model.set_adapter(name)
        self._set_trainable(name if trainable else None)
        self._mode(training=trainable)
        yield

    def _set_trainable(self, name: str | None) -> None:
        # peft's set_adapter/delete_adapter mark adapters trainable on their own, and peft has had
        # bugs leaving the wrong one trainable: set requires_grad ourselves, then check it.
        for pname, p in self.model.named_parameters():
            p.requires_grad = name is not None and _adapter_of(pname) == name
        self.check_trainable(name)

    def _freeze_all(self) -> None:
        for p in self.model.parameters():
            p.requires_grad = False

    def check_trainable(self, name: str | None) -> None:
        """Raise unless exactly adapter `name`'s LoRA weights (or nothing, for None) require grad."""
        wrong = [n for n, p in self.model.named_parameters() if p.requires_grad != (name is not None and _adapter_of(n) == name)]
        if wrong:
            raise RuntimeError(f"trainable parameters do not match adapter {name!r}: e.g. {wrong[0]}")
        if name is not None and not any(p.requires_grad for p in self.model.parameters()):
            raise RuntimeError(f"adapter {name!r} has no trainable parameters")

    def _mode(self, training: bool) -> None:
        if self.backend == "unsloth":
            from unsloth import FastLanguageModel

            (FastLanguageModel.for_training if training else FastLanguageModel.for_inference)(self.model)
        self.model.train(training)
        self.tokenizer.padding_side = "right" if training else "left"

    # --- training ------------------------------------------------------------------------

    def train(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work_dir: str | os.PathLike) -> dict:
        """Train adapter `name` on prompt/completion rows with trl's SFTTrainer: loss on completions only.

        A new trainer per call, so every role starts with a fresh optimizer and touches only its own
        adapter. Returns the trainer's log history and summary numbers.

        Every `cfg.save_steps` optimizer steps a checkpoint of this adapter alone (its LoRA weights as
        safetensors, the optimizer, scheduler, RNG and trainer state) replaces the previous one in
        `work_dir`. When `work_dir` holds one made with the same settings and rows (a fingerprint), a
        new call resumes from it: same sampler seed and epoch, consumed batches skipped.
        """
        if not rows:
            raise MinibtError(f"no training rows for adapter {name}")
        cfg, checkpoints = self._checkpoints(name, rows, cfg, Path(work_dir))
        try:
            return self._train_once(name, rows, cfg, work_dir, checkpoints)
        except torch.cuda.OutOfMemoryError:
            if cfg.batch_size == 1:
                raise MinibtError(f"out of memory training {name} at batch size 1: lower model.max_length") from None
        # retried out of the handler: its traceback held the failed trainer, optimizer and activations
        # (tests/test_engine_hazards.py checks they are gone before the retry starts)
        smaller = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2, grad_accum=cfg.grad_accum * 2)
        log.warning("out of memory training %s: retrying with batch_size %d x grad_accum %d", name, smaller.batch_size, smaller.grad_accum)
        self.delete_adapter(name)  # the same effective batch in smaller steps, from a fresh adapter
        guards.free_memory()
        return self.train(name, rows, smaller, work_dir)

    def _train_settings(self, name: str, rows_digest: str, count: int, cfg: TrainSection) -> dict[str, Any]:
        """Everything that decides how training goes: a checkpoint resumes only under the same settings."""
        return {
            "version": _CHECKPOINT_VERSION,
            "adapter": name,
            "rows": rows_digest,
            "examples": count,
            "model": self.model_cfg.name,
            "revision": self.model_cfg.revision,
            "backend": self.backend,
            "quantization": self.model_cfg.quantization,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.model_cfg.max_length,
            "lora": dataclasses.asdict(self.lora),
            "seed": self.seed,
            # numbers as the recipe types them (epochs: 3 and 3.0 are one setting)
            **{key: float(v) if isinstance(v, int) and key in _FLOAT_KEYS else v
               for key, v in ((key, getattr(cfg, key)) for key in _TRAIN_KEYS)},
        }

    def _checkpoints(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work: Path) -> tuple[TrainSection, "_Checkpoints | None"]:
        """The training config to use and where its checkpoints go, resuming the newest matching one.

        A checkpoint made after an out-of-memory retry (half the batch, twice the accumulation) is
        resumed with that smaller batch, so a rerun does not run out of memory again first.
        """
        if cfg.save_steps <= 0:
            return cfg, None
        digest = _rows_digest(rows)
        found = _list_checkpoints(work)
        variants = [cfg]
        while variants[-1].batch_size > 1:
            last = variants[-1]
            variants.append(dataclasses.replace(last, batch_size=last.batch_size // 2, grad_accum=last.grad_accum * 2))
        for variant in variants:
            settings = self._train_settings(name, digest, len(rows), variant)
            fingerprint = _fingerprint(settings)
            for step, path, info in found:
                if info.get("fingerprint") == fingerprint:
                    if variant is not cfg:
                        log.info("%s: an earlier attempt ran out of memory; resuming with batch_size %d x grad_accum %d",
                                 name, variant.batch_size, variant.grad_accum)
                    log.info("resuming %s from step %d (%s)", name, step, path)
                    return variant, _Checkpoints(work, name, variant.save_steps, fingerprint, settings, resume=path)
        settings = self._train_settings(name, digest, len(rows), cfg)
        if found:
            step, path, info = found[0]
            why = _first_change(info.get("settings", {}), settings) or "another version of minibt"
            log.warning("%s: not resuming %s from %s, made with other settings (%s): training from the start",
                        name, name, path.name, why)
        return cfg, _Checkpoints(work, name, cfg.save_steps, _fingerprint(settings), settings)

    def packing(self, requested: bool) -> bool:
        """Whether training packs rows (trl `packing`, strategy bfd), given the recipe's `packing` switch.

        trl 1.14's bfd packing is padding-free: each batch becomes ONE row, the examples' boundaries
        marked only by position_ids restarting at 0, with no attention mask. Flash-attention varlen
        kernels and unsloth's packed attention (GPU) read those boundaries. sdpa and eager depend on
        transformers deriving a block-diagonal mask from position_ids, which it skips whenever a KV
        cache object exists (config.use_cache=True, as minibt loads for generation): packed examples
        then attend to each other (measured on the toy base: logits off by ~10, tests/test_bench.py),
        and even where the mask is built it spans the whole flattened batch (quadratic, no speedup).
        So packing runs on the unsloth backend on a GPU or a flash-attention model only; otherwise
        the switch is ignored with a warning and batches are padded. (On the unsloth backend,
        unsloth itself also turns padding-free batching on when it measures it faster.)
        """
        if not requested:
            return False
        attn = str(getattr(self.model.config, "_attn_implementation", "") or "").split("@")[0].split(":")[0]
        if (self.backend == "unsloth" and has_gpu()) or attn in _FLASH_ATTENTION:
            return True
        log.warning("packing: off (attention %r would let packed examples see each other; packing needs "
                    "flash-attention or unsloth on a GPU): training on padded batches", attn)
        return False

    def _train_once(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work_dir: str | os.PathLike,
                    checkpoints: "_Checkpoints | None" = None) -> dict:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        if name not in self.adapters:
            self.add_adapter(name)
        gpu = has_gpu()
        args = SFTConfig(
            output_dir=str(work_dir),
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio
            weight_decay=cfg.weight_decay,
            max_length=self.model_cfg.max_length,
            packing=self.packing(cfg.packing),
            completion_only_loss=True,
            gradient_checkpointing=cfg.gradient_checkpointing and gpu,
            bf16=self.dtype == torch.bfloat16,  # autocast on a CPU too (the GPU path's mechanism, testable here)
            fp16=gpu and self.dtype == torch.float16,
            use_cpu=not gpu,
            optim="adamw_torch",
            logging_steps=max(1, min(10, cfg.max_steps if cfg.max_steps > 0 else 10)),
            # checkpoints of this adapter alone, written by _ResumableMixin (not the Trainer's own format)
            save_strategy="steps" if checkpoints is not None else "no",
            save_steps=checkpoints.every if checkpoints is not None else 500,
            report_to=cfg.report_to,  # tensorboard writes under output_dir (the run's work dir)
            run_name=name,
            seed=self.seed,
            data_seed=self.seed,
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        t0 = time.time()
        embeddings = guards.embedding_sums(self.model)
        with self.use(name, trainable=True):
            trainer = _resumable(SFTTrainer)(model=self.model, args=args, train_dataset=dataset, processing_class=self.tokenizer)
            trainer.minibt_checkpoints = checkpoints
            if args.fp16:
                # trl casts trainable QLoRA weights to bf16 whatever the precision; fp16's gradient scaler
                # cannot unscale bf16 gradients, and mixed precision wants fp32 master weights anyway
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
            # check again after the trainer touched the weights
            self.check_trainable(name)
            resume = checkpoints.resume if checkpoints is not None else None
            try:
                with _quiet_resume() if resume is not None else contextlib.nullcontext():
                    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
            finally:  # scoring and decoding after training run the model as loaded, not under autocast
                guards.drop_mixed_precision_wrapper(self.model)
            self.check_trainable(name)  # a resumed adapter was loaded into the same parameters
        self._mode(training=False)
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

    # --- inference -----------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def clip_text(self, text: str, max_tokens: int) -> str:
        """Cut `text` to at most `max_tokens` tokens, counting the cut in `self.truncated`."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        self.truncated += 1
        return self.tokenizer.decode(ids[:max_tokens])

    def _encode(self, prompts: Sequence[str], room: int) -> list[list[int]]:
        """Token ids per prompt, left-truncated to leave `room` tokens for what comes after."""
        limit = max(1, self.model_cfg.max_length - room)
        out = []
        for ids in self.tokenizer(list(prompts))["input_ids"]:
            if len(ids) > limit:
                self.truncated += 1
                ids = ids[-limit:]
            out.append(ids)
        return out

    def _fit(self, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
        """Token ids and a generation budget per prompt (`generation_budget`); clipped prompts are
        counted in `self.truncated` and reported in one warning line."""
        encoded, budgets, clipped = [], [], 0
        for ids in self.tokenizer(list(prompts))["input_ids"]:
            keep, new = generation_budget(len(ids), max_new_tokens, self.model_cfg.max_length)
            if keep < len(ids):
                clipped += 1
                ids = ids[-keep:]  # the end holds the question and the assistant's turn
            encoded.append(ids)
            budgets.append(new)
        if clipped:
            self.truncated += clipped
            log.warning("%d of %d prompts were longer than model.max_length=%d leaves room for: kept the last "
                        "tokens of each, %d new tokens at most", clipped, len(encoded), self.model_cfg.max_length,
                        min(budgets))
        return encoded, budgets

    def _each_batch(self, encoded: list[list[int]], batch_size: int, step: Callable[[int, list[int]], None], progress: Any) -> None:
        """Call step(batch_number, indices) over length-sorted batches (little padding is wasted).

        On CUDA out-of-memory the batch is halved and retried, and later batches keep the smaller
        size: a long shard never dies for a batch size guessed too large.
        """
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        start, number = 0, 0
        while start < len(order):
            idx = order[start : start + batch_size]
            try:
                step(number, idx)
                failed = False
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise MinibtError("out of memory at batch size 1: lower model.max_length or use a smaller model") from None
                failed = True
            if failed:  # out of the handler, whose traceback held the failed batch's activations
                batch_size //= 2
                guards.free_memory()
                log.warning("out of memory: retrying with batch size %d", batch_size)
                continue
            start, number = start + len(idx), number + 1
            if progress is not None:
                progress.update(len(idx))

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    @torch.no_grad()
    def generate(
        self,
        adapter: str,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        seed: int | None = None,
        progress: Any = None,
    ) -> list[str]:
        """Complete rendered prompts with `adapter` ("base" for none): batched, left-padded, stop at EOS.

        Each prompt gets min(max_new_tokens, the context left after it) new tokens (`generation_budget`)."""
        encoded, budgets = self._fit(prompts, max_new_tokens)
        outputs: list[str] = [""] * len(encoded)
        sample = temperature > 0

        prefix: list[tuple[int, Any]] = []  # the prompts' shared head (a system prompt), computed once

        def step(b: int, idx: list[int]) -> None:
            ids, mask = self._left_pad([encoded[i][prefix[0][0]:] for i in idx])
            rows_budget = [budgets[i] for i in idx]
            if sample:
                torch.manual_seed((self.seed if seed is None else seed) * 100_003 + b)
            if self.backend == "transformers":
                for i, tokens in zip(idx, self._decode(ids, mask, rows_budget, temperature, top_p, prefix[0])):
                    outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                return
            out = self.model.generate(  # unsloth: its own fast generation; each row cut to its budget below
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(rows_budget),
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            for row, i in enumerate(idx):
                new_tokens = out[row, ids.shape[1] : ids.shape[1] + budgets[i]]
                outputs[i] = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

        with self.use(adapter):
            prefix.append(self._shared_head(encoded))
            self._each_batch(encoded, batch_size, step, progress)
        return outputs

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, budgets: Sequence[int], temperature: float,
                top_p: float, head: tuple[int, Any] = (0, None)) -> list[list[int]]:
        """Sample (or greedily pick) up to budgets[row] tokens per row with a KV cache, dropping rows from
        the batch as they reach EOS or their budget. `generate` keeps computing finished rows until the longest is done,
        which wastes most of a batch when lengths vary (2x throughput measured on the toy world);
        greedy outputs equal `generate`'s (tests/test_engine.py)."""
        from transformers import DynamicCache

        eos = self.tokenizer.eos_token_id
        mask, positions, cache = _after_head(mask, head)  # `ids` are the rows after the head (`_shared_head`)
        cache = cache if cache is not None else DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, **self._last_logits_only())
        position = positions[:, -1:]
        alive = torch.arange(ids.shape[0], device=ids.device)  # batch row -> input row
        limit = torch.tensor(list(budgets), device=ids.device)
        tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for t in range(max(budgets)):
            guards.check_finite(out.logits[:, -1, :], self.role, "decoding", self.dtype)
            next_ids = _pick(out.logits[:, -1, :].float(), temperature, top_p)
            for row, tok in zip(alive.tolist(), next_ids.tolist()):
                if tok != eos:
                    tokens[row].append(tok)
            running = ((next_ids != eos) & (limit[alive] > t + 1)).nonzero().squeeze(-1)
            if len(running) == 0:
                break
            if len(running) < len(alive):  # compact: finished rows leave the batch and the cache
                cache.batch_select_indices(running)
                alive, mask, position, next_ids = alive[running], mask[running], position[running], next_ids[running]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            position = position + 1
            out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True)
        return tokens

    def stream(self, adapter: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
               on_text: Callable[[str], None]) -> str:
        """Generate one reply, handing each new piece of text to `on_text` as it is decoded."""
        import threading

        from transformers import TextIteratorStreamer

        encoded, budgets = self._fit([prompt], max_new_tokens)
        ids, mask = self._left_pad(encoded)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=budgets[0], do_sample=sample,
                      temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, streamer=streamer)
        pieces = []
        with self.use(adapter):
            worker = threading.Thread(target=self.model.generate, kwargs=kwargs)
            worker.start()
            for piece in streamer:
                on_text(piece)
                pieces.append(piece)
            worker.join()
        return "".join(pieces).strip()

    def choice_ids(self, prefix: str, choices: Sequence[str]) -> list[int]:
        """The token id of each choice as it follows "<prefix> " in running text.

        Byte-level BPEs write " 3" as one token; Llama-3 and SentencePiece split off the space. Either
        way, "<prompt><prefix> <choice>" minus its last token is the prompt, and the last is the choice.
        """
        seqs = [self.tokenizer(f"x\n{prefix} {c}", add_special_tokens=False)["input_ids"] for c in choices]
        for c, seq in zip(choices, seqs):
            if self.tokenizer.decode(seq[-1:]).strip() != c or seq[:-1] != seqs[0][:-1]:
                raise MinibtError(f"the tokenizer does not write score {c!r} as one token after {prefix!r}; use curate.mode=generate")
        return [seq[-1] for seq in seqs]

    @torch.no_grad()
    def next_token_probs(
        self,
        adapter: str,
        prompts: Sequence[str],
        prefix: str,
        choices: Sequence[str],
        batch_size: int = 16,
        progress: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """P(choice | prompt + prefix) for each prompt, from one forward pass per batch: no decoding.

        Returns (probabilities renormalised over the choices, [n, k]; the raw mass the choices got, [n]).
        """
        ids = self.choice_ids(prefix, choices)
        encoded = [e[:-1] for e in self._encode([f"{p}{prefix} {choices[0]}" for p in prompts], room=0)]
        probs = np.zeros((len(encoded), len(ids)), dtype=np.float64)
        choice_index = torch.tensor(ids, device=self.device)
        head: list[tuple[int, Any]] = []  # the rubric, the same text before every pair (`_shared_head`)

        def step(_: int, idx: list[int]) -> None:
            input_ids, mask = self._left_pad([encoded[i][head[0][0]:] for i in idx])
            mask, position_ids, cache = _after_head(mask, head[0])
            extra = {"past_key_values": cache} if cache is not None else {}
            # only the last position's logits: the LM head over every prompt position is wasted work
            # (with a 128k vocabulary, [batch, 1024, 128256] fp32 logits alone are 8 GB at batch 16);
            # use_cache=False: no cache of these rows is reused (a head cache given is still read)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                **extra, **self._last_logits_only()).logits[:, -1, :]
            guards.check_finite(logits, adapter, "scoring", self.dtype)
            probs[idx] = torch.softmax(logits.float(), dim=-1)[:, choice_index].cpu().numpy()

        with self.use(adapter):
            head.append(self._shared_head(encoded))
            self._each_batch(encoded, batch_size, step, progress)
        mass = probs.sum(axis=1)
        return probs / np.maximum(mass[:, None], 1e-12), mass

    @torch.no_grad()
    def completion_logprobs(
        self, adapter: str, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16, progress: Any = None
    ) -> np.ndarray:
        """Mean log-probability per token of each completion given its prompt (EOS included)."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        comp = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in completions]
        comp = [c[: self.model_cfg.max_length - 1] for c in comp]
        start = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id]
        heads = [self._encode([p], room=len(c))[0] or start for p, c in zip(prompts, comp)]
        seqs = [h + c for h, c in zip(heads, comp)]
        out = np.zeros(len(seqs))

        def step(_: int, idx: list[int]) -> None:
            input_ids, mask = self._left_pad([seqs[i] for i in idx])
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            # use_cache=False: nothing reuses a cache here (the config's default would build one)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            guards.check_finite(logits, adapter, "completion log-likelihoods", self.dtype)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(idx):
                out[i] = token_logp[row, -len(comp[i]) :].mean().item()

        with self.use(adapter):
            self._each_batch(seqs, batch_size, step, progress)
        return out

    # --- helpers -------------------------------------------------------------------------

    def _shared_head(self, encoded: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """(n, a batch-1 KV cache of them): the n tokens every prompt starts with (a system prompt, the
        rubric), computed once so that each batch runs only the tokens after them; (0, None) when fewer
        than _MIN_SHARED_PREFIX, with `prefix_cache = False`, or on unsloth (its fast forward manages
        caches its own way). Call it with the adapter active."""
        shared = _common_prefix(encoded) if self.prefix_cache and self.backend == "transformers" else 0
        if shared < _MIN_SHARED_PREFIX:
            return 0, None
        ids = torch.tensor([list(encoded[0][:shared])], device=self.device)
        return shared, self.model(input_ids=ids, use_cache=True, **self._last_logits_only()).past_key_values

    def _last_logits_only(self) -> dict[str, int]:
        """{"logits_to_keep": 1} when the base model's forward takes it (transformers >= 4.50), else {}."""
        if not hasattr(self, "_logits_kwarg"):
            import inspect

            base = self.model.get_base_model()
            self._logits_kwarg = "logits_to_keep" in inspect.signature(base.forward).parameters
        return {"logits_to_keep": 1} if self._logits_kwarg else {}

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            have = ", ".join(self.adapters) or "none"
            raise MinibtError(f"adapter {name!r} does not exist (have: {have}; 'base' means no adapter)")

    def _check_new(self, name: str) -> None:
        if name in (BASE, _PLACEHOLDER, "forward") or not name.isidentifier():
            # "forward" collides with nn.Module.forward inside peft
            raise MinibtError(f"adapter name {name!r} is reserved or not an identifier")
        if name in self.adapters:
            raise MinibtError(f"adapter {name!r} already exists")

    def _drop_placeholder(self) -> None:
        if _PLACEHOLDER in self.model.peft_config and len(self.model.peft_config) > 1:
            with warnings.catch_warnings():  # "Adapter default was active which is now deleted": by design
                warnings.filterwarnings("ignore", message="Adapter default was active")
                self.model.delete_adapter(_PLACEHOLDER)
            self._freeze_all()  # peft marks the adapter it activates trainable


MIN_NEW_TOKENS = 16  # what a prompt too long for the context still leaves for generation


def generation_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) for one prompt in a context of `context` tokens: the whole
    prompt and min(max_new_tokens, the room after it); only a prompt that leaves less than
    MIN_NEW_TOKENS (or max_new_tokens, if smaller) is clipped, from the left, to leave that much.
    The rule of every engine: a prompt is never cut to make room for generation that does not fit."""
    floor = max(1, min(max_new_tokens, MIN_NEW_TOKENS, context // 2))
    if prompt_tokens + floor <= context:
        return prompt_tokens, min(max_new_tokens, context - prompt_tokens)
    return context - floor, floor


_MIN_SHARED_PREFIX = 16  # tokens: shorter shared prefixes are not worth a cache


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all `seqs` share, leaving every sequence at least one token after it."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _after_head(mask: torch.Tensor, head: tuple[int, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(attention mask, position ids, KV cache or None) for left-padded rows that follow a shared head
    (`Engine._shared_head`): the pads sit between the head and each row's rest, masked out, and the
    positions stay exact. Without a head: the mask as it is, its positions, no cache."""
    shared, head_cache = head
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + shared
    if not shared:
        return mask, positions, None
    rows = mask.shape[0]
    return torch.cat([mask.new_ones(rows, shared), mask], dim=1), positions, _repeat_cache(head_cache, rows)


def _repeat_cache(cache: Any, n: int) -> Any:
    """A fresh copy of a batch-1 KV cache, repeated to batch `n` (a forward pass appends to its cache)."""
    import copy

    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


# Nucleus sampling looks among the k likeliest tokens first: a full sort of the vocabulary every step
# was 14 % of augmentation time on the toy world (64 rows x 1,600 tokens), and more with a 128k one.
_NUCLEUS_CANDIDATES = 64


def _pick(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling (the smallest set of tokens
    whose probability reaches top_p).

    torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) over the row; drawing q the same way
    over the whole vocabulary makes every sample exactly the one a full sort then multinomial gives."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    top, order = probs.topk(min(_NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # sorted, likeliest first
    if not bool((top.sum(-1) > top_p).all()):  # some row's nucleus reaches past the candidates
        top, order = probs.sort(dim=-1, descending=True)
    top[(top.cumsum(-1) - top) > top_p] = 0  # the top token always stays
    return order.gather(-1, (top / q[:, : top.shape[-1]]).argmax(-1, keepdim=True)).squeeze(-1)


def _adapter_of(param_name: str) -> str | None:
    """The adapter a LoRA parameter belongs to: '...q_proj.lora_A.m1.weight' -> 'm1'."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _saved_dtype(path: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


# --- checkpoints inside a training stage ----------------------------------------------------
#
# work_dir/checkpoint-<step>/ holds ONE adapter's state: adapter_model.safetensors (+ adapter_config.json:
# a PEFT folder), and the Trainer's own optimizer.pt, scheduler.pt, [scaler.pt,] rng_state.pth and
# trainer_state.json, then minibt_checkpoint.json (the fingerprint and the loss accounting). It is written
# in a temporary folder renamed into place, so it appears whole or not at all; only the newest is kept.
# transformers' own checkpointing is not used: it saves every adapter of the PeftModel, and on resume
# reloads each adapter folder it finds (peft upcasting their dtypes).

_CHECKPOINT_VERSION = 1
_CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR, so folders read checkpoint-<step>
_CHECKPOINT_INFO = "minibt_checkpoint.json"
_CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                     _CHECKPOINT_INFO)
_CHECKPOINT_NAME = re.compile(rf"{_CHECKPOINT_PREFIX}-(\d+)")
_CHECKPOINT_TEMP = re.compile(rf"\.{_CHECKPOINT_PREFIX}-\d+\..*\.tmp")
# the TrainSection keys that change what training does (not save_steps, report_to, gradient_checkpointing)
_TRAIN_KEYS = ("epochs", "learning_rate", "batch_size", "grad_accum", "max_steps", "warmup_ratio", "lr_scheduler",
               "weight_decay", "packing")
_FLOAT_KEYS = {"epochs", "learning_rate", "warmup_ratio", "weight_decay"}


@dataclasses.dataclass
class _Checkpoints:
    """Where one training run's checkpoints go, how often, under which fingerprint, and which to resume."""

    dir: Path
    adapter: str
    every: int  # optimizer steps between checkpoints
    fingerprint: str
    settings: dict[str, Any]  # what the fingerprint covers, kept readable for the log line of a mismatch
    resume: Path | None = None


def _rows_digest(rows: Sequence[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt"], r["completion"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _first_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            if key == "rows":
                return "other training rows"
            return f"{key}: {old.get(key)!r} before, {new.get(key)!r} now"
    return None


def _list_checkpoints(work: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """The complete checkpoints in `work`, newest first: (step, folder, its minibt_checkpoint.json)."""
    found = []
    if not work.is_dir():
        return found
    for path in work.iterdir():
        m = _CHECKPOINT_NAME.fullmatch(path.name)
        if not m or not path.is_dir() or not all((path / f).is_file() for f in _CHECKPOINT_FILES):
            continue
        try:
            info = json.loads((path / _CHECKPOINT_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append((int(m.group(1)), path, info))
    return sorted(found, key=lambda t: -t[0])


def _is_checkpoint(path: Path) -> bool:
    return bool(_CHECKPOINT_NAME.fullmatch(path.name) or _CHECKPOINT_TEMP.fullmatch(path.name))


def clear_checkpoints(work_dir: str | os.PathLike) -> None:
    """Delete the training checkpoints in `work_dir` (and half-written ones), once the adapter is saved."""
    work = Path(work_dir)
    if work.is_dir():
        for path in work.iterdir():
            if _is_checkpoint(path):
                shutil.rmtree(path, ignore_errors=True)


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) else x


def _write_checkpoint(trainer: Any, ck: _Checkpoints) -> Path:
    """Write `ck.adapter`'s checkpoint at the trainer's current step, atomically; drop older ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers.trainer_callback import ExportableState

    step = trainer.state.global_step
    ck.dir.mkdir(parents=True, exist_ok=True)
    final = ck.dir / f"{_CHECKPOINT_PREFIX}-{step}"
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
        (tmp / _CHECKPOINT_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
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


def _load_adapter_weights(model: Any, name: str, path: Path) -> None:
    """Copy adapter `name`'s weights from a checkpoint into its own parameters (their dtypes stay), nothing else."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path))
    want = get_peft_model_state_dict(model, adapter_name=name)
    if set(weights) != set(want) or any(weights[k].shape != want[k].shape for k in want):
        raise MinibtError(f"{path}: does not hold adapter {name}'s weights; delete {path.parent} to train {name} from the start")
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise MinibtError(f"{path}: weights {result.unexpected_keys[0]} ... do not fit adapter {name}")


@contextlib.contextmanager
def _quiet_resume() -> Iterator[None]:
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


class _ResumableMixin:
    """Checkpoint-and-resume for a trl SFTTrainer that trains one adapter of a multi-adapter PeftModel.

    Optimizer, scheduler, scaler, RNG states, trainer state and skipping consumed batches are the Trainer's
    own code (`train(resume_from_checkpoint=...)`); model weights are this adapter's alone.
    """

    minibt_checkpoints: _Checkpoints | None = None
    _minibt_restore: dict[str, Any] | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        ck = self.minibt_checkpoints
        if ck is None:
            return super()._save_checkpoint(model, trial)
        if self.state.global_step >= self.state.max_steps:
            return  # training is over: the caller saves the finished adapter
        _write_checkpoint(self, ck)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        ck = self.minibt_checkpoints
        if ck is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint)
        _load_adapter_weights(self.model, ck.adapter, folder / "adapter_model.safetensors")
        self._minibt_restore = json.loads((folder / _CHECKPOINT_INFO).read_text(encoding="utf-8"))["trainer"]

    def _init_training_state(self, max_steps: int, *args: Any, **kwargs: Any) -> Any:
        out = super()._init_training_state(max_steps, *args, **kwargs)
        if self._minibt_restore is not None:  # this run's logging/save steps, not the checkpoint's
            self.state.compute_steps(self.args, max_steps)
        return out

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        saved, self._minibt_restore = self._minibt_restore, None
        if saved is not None:  # the training loop has just reset its loss accounting: continue the checkpoint's
            self._total_loss_scalar = saved["total_loss"]
            self._tr_loss.fill_(saved["pending_loss"])
            self._globalstep_last_logged = saved["last_logged"]
            if hasattr(self, "_total_train_tokens"):
                self._total_train_tokens = saved["train_tokens"]
            if hasattr(self, "_metrics"):
                self._metrics["train"].clear()
                self._metrics["train"].update(saved["metrics"])
        return super()._run_epoch(*args, **kwargs)


_RESUMABLE: dict[type, type] = {}


def _resumable(trainer_cls: type) -> type:
    """`trainer_cls` (trl's SFTTrainer, or the one unsloth patched in) with minibt's checkpoints."""
    if trainer_cls not in _RESUMABLE:
        _RESUMABLE[trainer_cls] = type(f"Resumable{trainer_cls.__name__}", (_ResumableMixin, trainer_cls), {})
    return _RESUMABLE[trainer_cls]


def _lora_config(lora: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _set_chat_template(tokenizer: Any, cfg: ModelSection) -> None:
    if cfg.chat_template == "minibt" or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        raise MinibtError(f"model.name: the tokenizer of {cfg.name} has no EOS token, so generations cannot stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _bnb_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def guard_bnb_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU kernel (STACK-NOTES, silent).

    On CPUs with AVX512-BF16 the first no-grad eval forward repacks every Linear4bit in place, and LoRA
    gradients computed afterwards are wrong (17-41 % off) with only a warning. Returns the count guarded.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _require_safetensors(name: str) -> None:
    """Pickled weights can run code when loaded: a local base must come as safetensors."""
    path = Path(name).expanduser()
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise MinibtError(f"model.name: {name} has no .safetensors weights (minibt loads safetensors only)")


def _load_transformers(cfg: ModelSection, lora: LoraSection, seed: int) -> tuple[Any, Any]:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = compute_dtype(cfg.dtype)
    _require_safetensors(cfg.name)
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.name, **common)
    kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, device_map={"": "cuda:0" if has_gpu() else "cpu"})
    baked = guards.prequantized(AutoConfig.from_pretrained(cfg.name, **common))
    if baked is not None:  # its own config is used whatever is passed; checked here, its compute dtype set below
        guards.check_prequantized(cfg.name, baked, cfg.quantization)
    elif cfg.quantization == "nf4":
        kwargs["quantization_config"] = _bnb_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs, **common)
    if cfg.quantization == "nf4":
        guards.force_compute_dtype(model, dtype)
        if not has_gpu():
            guard_bnb_cpu(model)
    guards.use_safe_sdpa(model)
    model.config.use_cache = True
    return get_peft_model(model, _lora_config(lora)), tokenizer


def _load_unsloth(cfg: ModelSection, lora: LoraSection, seed: int) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # patches transformers/trl on import

    dtype = compute_dtype(cfg.dtype)
    _require_safetensors(cfg.name)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.name,
        max_seq_length=cfg.max_length,
        dtype=dtype,
        load_in_4bit=True,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    # unsloth's CPU fallback quietly loads 16-bit weights when bitsandbytes 4-bit fails on this CPU
    # (or UNSLOTH_CPU_LOAD_IN_4BIT=0); this backend promises a 4-bit base, so refuse instead
    import bitsandbytes as bnb

    if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise MinibtError(f"model.backend: unsloth loaded {cfg.name} without 4-bit layers; use model.backend=transformers")
    if not has_gpu():
        guard_bnb_cpu(model)  # unsloth's CPU fallback does this too; harmless to repeat
    guards.force_compute_dtype(model, dtype)  # a pre-quantized repo's own compute dtype would win (stack_guards)
    # unsloth cannot name this adapter; it becomes the placeholder that role adapters replace
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        # on CPU "unsloth" is plain recomputation: only costs time (the transformers backend skips it too)
        use_gradient_checkpointing="unsloth" if has_gpu() else False,
        random_state=seed,
    )
    return model, tokenizer
