"""The HF engine: ONE base model, loaded once, its role adapters, their training and inference.

It composes the rooms of minibt/engine/: the loaded base (load.py), the adapters on it (adapters.py),
training a role (train.py, checkpoints.py) and inference (`Engine.infer`: infer.py, an `interface.Inference`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from minibt.engine import load
from minibt.engine.adapters import Adapters, wrap
from minibt.engine.infer import HFInference
from minibt.engine.load import compute_dtype, resolve_backend
from minibt.engine.sampling import seeded
from minibt.engine.train import RoleTrainer
from minibt.sections import LoraSection, ModelSection, TrainSection


class Engine:
    """The base model and its adapters. Build it with `Engine.load(model_section, lora_section)`."""

    def __init__(self, model: Any, tokenizer: Any, backend: str, model_cfg: ModelSection, lora: LoraSection, seed: int,
                 prefix_cache: bool = True):
        self.model = model  # a peft PeftModel wrapping the one base
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_cfg = model_cfg
        self.lora = lora
        self.seed = seed
        self.dtype = compute_dtype(model_cfg.dtype)
        self.base_loads = 1
        self.roles = Adapters(model, tokenizer, backend, lora, seed, self.dtype)
        self.trainer = RoleTrainer(self.roles, model_cfg, lora, seed, backend)
        # inference on this base and its adapters: what the inference stages are handed (`interface.Inference`);
        # prefix_cache: compute a prefix shared by every prompt once (off only to check it changes nothing)
        self.infer = HFInference(model, tokenizer, model_cfg, backend, self.roles, seed, prefix_cache)
        self.text = self.infer.text  # the prompts training rows are written with are the ones inference reads

    @classmethod
    def load(cls, model_cfg: ModelSection, lora: LoraSection, seed: int = 0, prefix_cache: bool = True) -> Engine:
        backend = resolve_backend(model_cfg.backend)
        if backend == "unsloth":
            with seeded(seed):  # unsloth's placeholder adapter draws from the global generator
                model, tokenizer = load.load_unsloth(model_cfg, lora, seed)
        else:
            base, tokenizer = load.load_base(model_cfg)
            model = wrap(base, lora, seed)
        return cls(model, tokenizer, backend, model_cfg, lora, seed, prefix_cache)

    # --- adapters --------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return self.roles.adapters

    @property
    def role(self) -> str:
        return self.roles.role

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add_adapter(self, name: str) -> None:
        self.roles.add(name)

    def load_adapter(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        self.roles.load(name, path, trainable)

    def save_adapter(self, name: str, path: str | os.PathLike) -> None:
        self.roles.save(name, path)

    def delete_adapter(self, name: str) -> None:
        self.roles.delete(name)

    @contextlib.contextmanager
    def use(self, name: str, trainable: bool = False) -> Iterator[None]:
        with self.roles.use(name, trainable):
            yield

    def check_trainable(self, name: str | None) -> None:
        self.roles.check_trainable(name)

    # --- training --------------------------------------------------------------------------

    def train(self, name: str, rows: Sequence[dict[str, str]], cfg: TrainSection, work_dir: str | os.PathLike) -> dict:
        """Train adapter `name` on prompt/completion rows (`train.RoleTrainer.train`)."""
        return self.trainer.train(name, rows, cfg, work_dir)

    def packing(self, requested: bool) -> bool:
        return self.trainer.packing(requested)
