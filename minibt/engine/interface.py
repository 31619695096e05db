"""The inference seam: what augment, curate, rewrite, pairwise eval, `minibt generate` and the Python
API ask of an engine. The HF engine (one base, PEFT adapters, minibt's own decode loop) and the vLLM
engine (LoRA requests on one vLLM base) each implement it; stages depend on this, not on either.

Adapters are named ("base" means none). Prompts are rendered chat text (`text.render`). Budgets follow
`generation_budget`: a prompt keeps every token unless it alone leaves fewer than MIN_NEW_TOKENS.
The type checker holds both engines to this Protocol (minibt/engine/__init__.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from minibt.engine.text import TextRules

BASE = "base"  # the adapter name that means "no adapter"


class Inference(Protocol):
    name: str  # "hf" or "vllm": written into each inference stage's counts
    text: TextRules  # prompts rendered, counted, clipped and fitted to the context: the same rules on every engine

    @property
    def adapters(self) -> list[str]: ...

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the PEFT folder `path` as adapter `name` (a name loaded before is replaced)."""

    def delete_adapter(self, name: str) -> None: ...

    def generate(self, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, seed: int | None = None,
                 progress: Any = None) -> list[str]:
        """One completion per prompt, EOS-stopped, stripped. Sampling (temperature > 0) is reproducible
        from `seed` (a shard's seed), whatever else the engine ran before."""

    def stream(self, adapter: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
               on_text: Callable[[str], None]) -> str: ...

    def next_token_probs(self, adapter: str, prompts: Sequence[str], prefix: str, choices: Sequence[str],
                         batch_size: int = 16, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """P(choice | prompt + prefix + " "), renormalised over the choices [n, k], and the raw mass [n]."""

    def completion_logprobs(self, adapter: str, prompts: Sequence[str], completions: Sequence[str],
                            batch_size: int = 16, progress: Any = None) -> np.ndarray:
        """Mean log-probability per token of each completion (EOS included) given its prompt."""
