"""The HF inference engine (`interface.Inference`): transformers + peft, minibt's own decode loop.

It runs over a loaded model and tokenizer and a `roles` object that makes an adapter active
(`adapters.Adapters`, or `adapters.BaseOnly` for a model with none, such as a judge loaded on its own).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from minibt import stack_guards as guards
from minibt.engine import sampling
from minibt.engine.batching import (
    MIN_SHARED_PREFIX,
    after_head,
    common_prefix,
    each_batch,
    join_caches,
    left_pad,
    pad_groups,
    plain_cache,
    with_head,
)
from minibt.engine.load import compute_dtype
from minibt.engine.text import TextRules, renormalised

log = logging.getLogger("minibt.engine")

# On a CPU a batch runs as forwards over rows of similar length (`pad_groups`): padding is computed like any
# token there, while a smaller forward costs little. A GPU runs each batch whole, as before (not measured).
CPU_MAX_PAD_SHARE = 0.1


class HFInference:
    """Generation, next-token scoring and log-likelihoods over one model; `roles.use(name)` picks the adapter.

    `prefix_cache`: compute a head shared by every prompt (a system prompt, the rubric) once per call;
    off only to check that it changes nothing (tests, bench/device_check.py). `max_pad_share`: how much of
    a forward may be padding before its rows split by length (`pad_groups`; default: the device's rule)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, model_cfg: Any, backend: str, roles: Any, seed: int,
                 prefix_cache: bool = True, max_pad_share: float | None = None):
        self.model, self.tokenizer, self.model_cfg, self.backend, self.roles = model, tokenizer, model_cfg, backend, roles
        self.seed = seed  # sampling's seed when a call gives none
        self.dtype = compute_dtype(model_cfg.dtype)
        self.text = TextRules(tokenizer, model_cfg.max_length)
        self._prefix_cache = prefix_cache
        self.max_pad_share = max_pad_share if max_pad_share is not None else (
            CPU_MAX_PAD_SHARE if self.device.type == "cpu" else 1.0)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # only the last position's logits where the forward allows it (transformers >= 4.50)
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def variant(self, prefix_cache: bool = True, max_pad_share: float | None = None) -> HFInference:
        """The same model and roles with the prefix cache on or off, or another padding rule (its own
        `truncated` count)."""
        return HFInference(self.model, self.tokenizer, self.model_cfg, self.backend, self.roles, self.seed, prefix_cache,
                           max_pad_share if max_pad_share is not None else self.max_pad_share)

    @property
    def adapters(self) -> list[str]:
        return self.roles.adapters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- adapters ----------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        self.roles.load(name, path)

    def delete_adapter(self, name: str) -> None:
        self.roles.delete(name)

    def left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(seqs, self.tokenizer.pad_token_id, self.device)

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, seed: int | None = None, progress: Any = None) -> list[str]:
        """Complete rendered prompts with `adapter` ("base" for none): batched, left-padded, stop at EOS.

        Each prompt gets min(max_new_tokens, the context left after it) new tokens (`generation_budget`).
        Batch b samples from the stream `sampling.batch_seed(seed, b)` (seed: the call's, else the engine's)."""
        encoded, budgets = self.text.fit(prompts, max_new_tokens)
        outputs: list[str] = [""] * len(encoded)
        sample = temperature > 0
        seed = self.seed if seed is None else seed
        prefix: list[tuple[int, Any]] = []  # the prompts' shared head (a system prompt), computed once

        def step(b: int, idx: list[int]) -> None:
            ids, mask = self.left_pad([encoded[i][prefix[0][0]:] for i in idx])
            rows_budget = [budgets[i] for i in idx]
            if self.backend == "transformers":
                g = sampling.generator(sampling.batch_seed(seed, b), ids.device) if sample else None
                for i, tokens in zip(idx, self._decode(adapter, ids, mask, rows_budget, temperature, top_p, g, prefix[0])):
                    outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                return
            # unsloth: its own fast generation, which draws from torch's global generator; each row cut to its budget
            with sampling.seeded(sampling.batch_seed(seed, b)) if sample else contextlib.nullcontext():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max(rows_budget), do_sample=sample,
                    temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                )
            for row, i in enumerate(idx):
                new_tokens = out[row, ids.shape[1] : ids.shape[1] + budgets[i]]
                outputs[i] = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

        with self.roles.use(adapter):
            prefix.append(self.shared_head(encoded))
            each_batch(encoded, batch_size, step, progress)
        return outputs

    def _decode(self, adapter: str, ids: torch.Tensor, mask: torch.Tensor, budgets: Sequence[int], temperature: float,
                top_p: float, g: torch.Generator | None, head: tuple[int, Any] = (0, None)) -> list[list[int]]:
        """Sample (or greedily pick) up to budgets[row] tokens per row with a KV cache (`_prefill`), dropping
        rows from the batch as they reach EOS or their budget. `generate` keeps computing finished rows until
        the longest is done, which wastes most of a batch when lengths vary (2x throughput measured on the toy
        world); greedy outputs equal `generate`'s (tests/engine/test_infer.py)."""
        eos = self.tokenizer.eos_token_id
        next_logits, cache, mask, position, alive = self._prefill(ids, mask, head)
        limit = torch.tensor(list(budgets), device=ids.device)
        tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for t in range(max(budgets)):
            guards.check_finite(next_logits, adapter, "decoding", self.dtype)
            next_ids = sampling.pick(next_logits.float(), temperature, top_p, g)
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
            next_logits = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position,
                                     past_key_values=cache, use_cache=True).logits[:, -1, :]
        return tokens

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, head: tuple[int, Any]
                 ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run left-padded rows (after the `shared_head`) into one KV cache: a forward per group of similar
        length, the caches joined (`join_caches`). Returns the last logits, the cache, its attention mask,
        the last positions, and which input row each batch row is."""
        from transformers import DynamicCache

        lengths = mask.sum(-1).tolist()
        groups = self.groups(lengths) if plain_cache(head[1]) else [list(range(ids.shape[0]))]
        logits, caches, widths, positions = [], [], [], []
        for group in groups:
            rows = torch.tensor(group, device=ids.device)
            width = max(lengths[i] for i in group)
            group_mask, group_positions, cache = after_head(mask[rows, -width:], head)
            cache = cache if cache is not None else DynamicCache()
            logits.append(self.model(input_ids=ids[rows, -width:], attention_mask=group_mask, position_ids=group_positions,
                                     past_key_values=cache, use_cache=True, **self._last_only).logits[:, -1, :])
            caches.append(cache)
            widths.append(width)
            positions.append(group_positions[:, -1:])
        alive = torch.tensor([i for group in groups for i in group], device=ids.device)
        return (torch.cat(logits), join_caches(caches, widths, head[0]), with_head(mask[alive], head[0]),
                torch.cat(positions), alive)

    def groups(self, lengths: Sequence[int], rows: Sequence[int] | None = None) -> list[list[int]]:
        """`rows` (default: 0, 1, ...), whose token counts are `lengths`, as forwards of similar length (`pad_groups`)."""
        rows = range(len(lengths)) if rows is None else rows
        return [[rows[j] for j in group] for group in pad_groups(lengths, self.max_pad_share)]

    def stream(self, adapter: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
               on_text: Callable[[str], None]) -> str:
        """Generate one reply, handing each new piece of text to `on_text` as it is decoded (a chat: its
        sampling is not seeded)."""
        import threading

        from transformers import TextIteratorStreamer

        encoded, budgets = self.text.fit([prompt], max_new_tokens)
        ids, mask = self.left_pad(encoded)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=budgets[0], do_sample=sample,
                      temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, streamer=streamer)
        pieces = []
        with self.roles.use(adapter):
            worker = threading.Thread(target=self.model.generate, kwargs=kwargs)
            worker.start()
            for piece in streamer:
                on_text(piece)
                pieces.append(piece)
            worker.join()
        return "".join(pieces).strip()

    # --- scoring -------------------------------------------------------------------------

    @torch.no_grad()
    def next_token_probs(self, adapter: str, prompts: Sequence[str], prefix: str, choices: Sequence[str],
                         batch_size: int = 16, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """P(choice | prompt + prefix) for each prompt, from one forward pass per batch: no decoding.

        Returns (probabilities renormalised over the choices, [n, k]; the raw mass the choices got, [n]).
        """
        ids, encoded = self.text.choice_prompts(prompts, prefix, choices)
        probs = np.zeros((len(encoded), len(ids)), dtype=np.float64)
        choice_index = torch.tensor(ids, device=self.device)
        head: list[tuple[int, Any]] = []  # the rubric, the same text before every pair (`shared_head`)

        def step(_: int, batch: list[int]) -> None:
            for idx in self.groups([len(encoded[i]) - head[0][0] for i in batch], batch):
                input_ids, mask = self.left_pad([encoded[i][head[0][0]:] for i in idx])
                mask, position_ids, cache = after_head(mask, head[0])
                extra = {"past_key_values": cache} if cache is not None else {}
                # only the last position's logits: the LM head over every prompt position is wasted work
                # (with a 128k vocabulary, [batch, 1024, 128256] fp32 logits alone are 8 GB at batch 16);
                # use_cache=False: no cache of these rows is reused (a head cache given is still read)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                    **extra, **self._last_only).logits[:, -1, :]
                guards.check_finite(logits, adapter, "scoring", self.dtype)
                probs[idx] = torch.softmax(logits.float(), dim=-1)[:, choice_index].cpu().numpy()

        with self.roles.use(adapter):
            head.append(self.shared_head(encoded))
            each_batch(encoded, batch_size, step, progress)
        return renormalised(probs)

    @torch.no_grad()
    def completion_logprobs(self, adapter: str, prompts: Sequence[str], completions: Sequence[str],
                            batch_size: int = 16, progress: Any = None) -> np.ndarray:
        """Mean log-probability per token of each completion given its prompt (EOS included)."""
        seqs, comp = self.text.completion_sequences(prompts, completions)
        out = np.zeros(len(seqs))

        def step(_: int, batch: list[int]) -> None:
            for idx in self.groups([len(seqs[i]) for i in batch], batch):
                input_ids, mask = self.left_pad([seqs[i] for i in idx])
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                # use_cache=False: nothing reuses a cache here (the config's default would build one)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False).logits
                guards.check_finite(logits, adapter, "completion log-likelihoods", self.dtype)
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                for row, i in enumerate(idx):
                    out[i] = token_logp[row, -len(comp[i]) :].mean().item()

        with self.roles.use(adapter):
            each_batch(seqs, batch_size, step, progress)
        return out

    def shared_head(self, encoded: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """(n, a batch-1 KV cache of them): the n tokens every prompt starts with (a system prompt, the
        rubric), computed once so that each batch runs only the tokens after them; (0, None) when fewer
        than MIN_SHARED_PREFIX, with the prefix cache off, or on unsloth (its fast forward manages
        caches its own way). Call it with the adapter active."""
        shared = common_prefix(encoded) if self._prefix_cache and self.backend == "transformers" else 0
        if shared < MIN_SHARED_PREFIX:
            return 0, None
        ids = torch.tensor([list(encoded[0][:shared])], device=self.device)
        return shared, self.model(input_ids=ids, use_cache=True, **self._last_only).past_key_values
