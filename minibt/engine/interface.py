"""The inference seam: what augment, curate, rewrite, pairwise eval, `minibt generate` and the Python
API ask of an engine. The HF engine (one base, PEFT adapters, minibt's own decode loop) and the vLLM
engine (LoRA requests on one vLLM base) each implement it; stages depend on this, not on either.

Adapters are named ("base" means none). Prompts are rendered chat text (`render`). Budgets follow
`generation_budget`: a prompt keeps every token unless it alone leaves fewer than MIN_NEW_TOKENS.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

BASE = "base"  # the adapter name that means "no adapter"


@runtime_checkable
class Inference(Protocol):
    name: str  # "hf" or "vllm": written into each inference stage's counts
    truncated: int  # texts and prompts cut to fit the context, over the engine's life

    @property
    def adapters(self) -> list[str]: ...

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def clip(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """(`text` cut to at most `max_tokens` tokens, whether it was cut); a cut is counted in `truncated`."""

    def clip_text(self, text: str, max_tokens: int) -> str:
        """`clip`'s text alone."""

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
