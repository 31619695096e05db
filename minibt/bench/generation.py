"""The bench's generation comparison: the HF engine's batched `generate` vs one prompt at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minibt.bench.stats import interleaved_pairs, spread

if TYPE_CHECKING:
    from minibt.engine import Engine


def count_tokens(engine: Any, texts: Sequence[str]) -> int:
    """Tokens in the returned texts: the same count for both sides of a generation comparison."""
    return sum(len(ids) for ids in engine.tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0


def generate_one_at_a_time(engine: Engine, adapter: str, prompts: Sequence[str], max_new_tokens: int,
                           temperature: float, top_p: float, seed: int = 0) -> list[str]:
    """The plain way: model.generate on one prompt at a time (same model, adapter, inputs and sampling;
    prompt i samples from the stream of batch i, transformers' generate drawing from the global generator)."""
    from minibt.engine.sampling import batch_seed, seeded

    sample = temperature > 0
    outputs = []
    with engine.use(adapter), torch.no_grad():
        for i, ids in enumerate(engine.text.encode(prompts, room=max_new_tokens)):
            input_ids = torch.tensor([ids], device=engine.device)
            with seeded(batch_seed(seed, i)) if sample else contextlib.nullcontext():
                out = engine.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                    do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                    top_k=None, pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.tokenizer.eos_token_id,
                )
            outputs.append(engine.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def compare_generation(engine: Engine, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                       top_p: float, batch_size: int, seed: int = 0, pairs: int = 5, fast_runs: int = 5) -> dict[str, Any]:
    """Batched `HFInference.generate` vs the one-at-a-time loop on the same prompts: tokens/s each side, as
    interleaved pairs (`interleaved_pairs`; both sides seeded, so each run returns the same texts)."""
    out, single, batched_s, single_s = interleaved_pairs(
        lambda: engine.infer.generate(adapter, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, seed=seed),
        lambda: generate_one_at_a_time(engine, adapter, prompts, max_new_tokens, temperature, top_p, seed),
        pairs, fast_runs)
    b_tokens, s_tokens = count_tokens(engine, out), count_tokens(engine, single)
    ratios = [(b_tokens / b) / (s_tokens / s) for b, s in zip(batched_s, single_s)] if s_tokens else []
    return {
        "prompts": len(prompts),
        "outputs": {"batched": len(out), "one_at_a_time": len(single)},
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "tokens": {"batched": b_tokens, "one_at_a_time": s_tokens},
        "seconds": {"batched": [round(s, 3) for s in batched_s], "one_at_a_time": [round(s, 3) for s in single_s]},
        "tokens_per_second": {"batched": round(b_tokens / float(np.median(batched_s)), 1),
                              "one_at_a_time": round(s_tokens / float(np.median(single_s)), 1)},
        "speedup": round(float(np.median(ratios)), 2) if ratios else None,
        "spread": spread(ratios) if ratios else None,
        "speedup_measure": "generated tokens/s, each returned text re-tokenized by the same tokenizer on both sides; "
                           f"median over {pairs} interleaved pairs (batched side: mean of {fast_runs} runs per pair)",
        "_outputs": out,
    }
