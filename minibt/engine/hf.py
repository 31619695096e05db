"""The HF engine: ONE base model, loaded once, its role adapters, their training and inference.

It composes the rooms of minibt/engine/: the loaded base (load.py), the adapters on it (adapters.py),
training a role (train.py, checkpoints.py) and inference (infer.py, the `interface.Inference` seam).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from minibt.engine.adapters import Adapters, wrap
from minibt.engine.infer import HFInference
from minibt.engine import load
from minibt.engine.load import compute_dtype, resolve_backend
from minibt.engine.sampling import seeded
from minibt.engine.train import RoleTrainer
from minibt.sections import LoraSection, ModelSection, TrainSection


class Engine:
    """The base model and its adapters. Build it with `Engine.load(model_section, lora_section)`."""

    name = "hf"  # the inference engine (`interface.Inference`): transformers + peft, minibt's decode loop

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
        # prefix_cache: compute a prefix shared by every prompt once (off only to check it changes nothing)
        self.infer = HFInference(model, tokenizer, model_cfg, backend, self.roles, seed, prefix_cache)

    @classmethod
    def load(cls, model_cfg: ModelSection, lora: LoraSection, seed: int = 0, prefix_cache: bool = True) -> "Engine":
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

    # --- inference (`interface.Inference`, by infer.HFInference) ---------------------------

    @property
    def truncated(self) -> int:
        return self.infer.truncated

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.infer.render(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return self.infer.count_tokens(text)

    def clip(self, text: str, max_tokens: int) -> tuple[str, bool]:
        return self.infer.clip(text, max_tokens)

    def clip_text(self, text: str, max_tokens: int) -> str:
        return self.infer.clip_text(text, max_tokens)

    def generate(self, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, seed: int | None = None, progress: Any = None) -> list[str]:
        return self.infer.generate(adapter, prompts, max_new_tokens, temperature, top_p, batch_size, seed, progress)

    def stream(self, adapter: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
               on_text: Callable[[str], None]) -> str:
        return self.infer.stream(adapter, prompt, max_new_tokens, temperature, top_p, on_text)

    def choice_ids(self, prefix: str, choices: Sequence[str]) -> list[int]:
        return self.infer.choice_ids(prefix, choices)

    def next_token_probs(self, adapter: str, prompts: Sequence[str], prefix: str, choices: Sequence[str],
                         batch_size: int = 16, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
        return self.infer.next_token_probs(adapter, prompts, prefix, choices, batch_size, progress)

    def completion_logprobs(self, adapter: str, prompts: Sequence[str], completions: Sequence[str],
                            batch_size: int = 16, progress: Any = None) -> np.ndarray:
        return self.infer.completion_logprobs(adapter, prompts, completions, batch_size, progress)
