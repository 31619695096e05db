"""Picking the next token, and the random streams sampling draws from.

Every draw comes from an explicit torch.Generator. `batch_seed` is the one rule that turns a call's
seed into each batch's stream, so a shard samples the same texts whatever ran before it in the
process. Code that can only draw from torch's global generator (peft's LoRA init, transformers'
`generate`) runs inside `seeded`, which forks the global generator and restores it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Nucleus sampling looks among the k likeliest tokens first: a full sort of the vocabulary every step
# was 14 % of augmentation time on the toy world (64 rows x 1,600 tokens), and more with a 128k one.
NUCLEUS_CANDIDATES = 64


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch number `batch` of a call seeded `seed` (a shard's seed, or the run's)."""
    return seed * 100_003 + batch


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded `seed`: the stream torch.manual_seed(seed) gives the default one."""
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on torch's global generator seeded `seed`, and leave it as it was afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling (the smallest set of tokens
    whose probability reaches top_p), drawn from `generator`.

    torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) over the row; drawing q the same way
    over the whole vocabulary makes every sample exactly the one a full sort then multinomial gives."""
    if temperature <= 0:
        return logits.argmax(-1)
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator")
    probs = torch.softmax(logits / temperature, dim=-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # sorted, likeliest first
    if not bool((top.sum(-1) > top_p).all()):  # some row's nucleus reaches past the candidates
        top, order = probs.sort(dim=-1, descending=True)
    top[(top.cumsum(-1) - top) > top_p] = 0  # the top token always stays
    return order.gather(-1, (top / q[:, : top.shape[-1]]).argmax(-1, keepdim=True)).squeeze(-1)
