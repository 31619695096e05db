"""Prompts as batches of token ids: the generation budget, length-sorted batches that halve on
out-of-memory, left padding, groups of rows that waste little of it, and the head every prompt shares
(computed once, its KV cache reused)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from minibt import stack_guards as guards
from minibt.errors import MinibtError

log = logging.getLogger("minibt.engine")

MIN_NEW_TOKENS = 16  # what a prompt too long for the context still leaves for generation
MIN_SHARED_PREFIX = 16  # tokens: shorter shared prefixes are not worth a cache


def generation_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) for one prompt in a context of `context` tokens: the whole
    prompt and min(max_new_tokens, the room after it); only a prompt that leaves less than
    MIN_NEW_TOKENS (or max_new_tokens, if smaller) is clipped, from the left, to leave that much.
    The rule of every engine: a prompt is never cut to make room for generation that does not fit."""
    floor = max(1, min(max_new_tokens, MIN_NEW_TOKENS, context // 2))
    if prompt_tokens + floor <= context:
        return prompt_tokens, min(max_new_tokens, context - prompt_tokens)
    return context - floor, floor


def each_batch(encoded: list[list[int]], batch_size: int, step: Callable[[int, list[int]], None], progress: Any) -> None:
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


def left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `seqs` padded on the left to the longest."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def pad_groups(lengths: Sequence[int], max_pad_share: float) -> list[list[int]]:
    """Row indices, longest first, in runs whose left padding is at most `max_pad_share` of the run's
    positions: one forward each. Padding is computed like any token, so on a CPU a batch of mixed lengths
    wastes most of its work (59 % of augmentation's positions were padding on the real model, one batch
    of 16 texts); 1.0 keeps the batch whole."""
    groups: list[list[int]] = []
    real = 0  # tokens in the last group
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        positions = lengths[groups[-1][0]] * (len(groups[-1]) + 1) if groups else 0
        if groups and positions - (real + lengths[i]) <= max_pad_share * positions:
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def join_caches(caches: Sequence[Any], widths: Sequence[int], shared: int) -> Any:
    """One KV cache (the first one, extended) for rows prefilled in groups: cache g holds rows
    left-padded to widths[g] after a head of `shared` positions; each is padded with zeros (masked
    out) between the head and its rows to the widest, then all are stacked on the batch dimension."""
    from transformers.cache_utils import DynamicLayer

    joined, width = caches[0], max(widths)
    if len(caches) == 1 and widths[0] == width:
        return joined
    for n, layer in enumerate(joined.layers):
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cannot join KV caches of layer type {type(layer).__name__}")
        keys, values = [], []
        for cache, w in zip(caches, widths):
            k, v = cache.layers[n].keys, cache.layers[n].values
            if w < width:
                k, v = (torch.cat([t[:, :, :shared], t.new_zeros(*t.shape[:2], width - w, t.shape[3]), t[:, :, shared:]], dim=2)
                        for t in (k, v))
            keys.append(k)
            values.append(v)
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    return joined


def plain_cache(cache: Any) -> bool:
    """Whether every layer of `cache` is a plain growing one (`join_caches` can pad it): not a sliding window."""
    from transformers.cache_utils import DynamicLayer

    return cache is None or all(type(layer) is DynamicLayer for layer in cache.layers)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
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


def after_head(mask: torch.Tensor, head: tuple[int, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(attention mask, position ids, KV cache or None) for left-padded rows that follow a shared head
    (`HFInference.shared_head`): the pads sit between the head and each row's rest, masked out, and the
    positions stay exact. Without a head: the mask as it is, its positions, no cache."""
    shared, head_cache = head
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + shared
    if not shared:
        return mask, positions, None
    return with_head(mask, shared), positions, repeat_cache(head_cache, mask.shape[0])


def with_head(mask: torch.Tensor, shared: int) -> torch.Tensor:
    """The attention mask of rows that follow a head of `shared` positions."""
    return torch.cat([mask.new_ones(mask.shape[0], shared), mask], dim=1) if shared else mask


def repeat_cache(cache: Any, n: int) -> Any:
    """A fresh copy of a batch-1 KV cache, repeated to batch `n` (a forward pass appends to its cache)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out
