"""Picking the next token (minibt/engine/sampling.py): explicit generators, the per-batch seed rule, nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from minibt.engine import sampling


def test_sampling_is_seeded_and_respects_top_p():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]] * 200)
    picked = sampling.pick(logits, temperature=1.0, top_p=0.5, generator=sampling.generator(0))
    assert set(picked.tolist()) == {0}  # token 0 alone holds > 50 % of the mass
    wide = sampling.pick(logits, temperature=1.0, top_p=1.0, generator=sampling.generator(0))
    assert set(wide.tolist()) <= {0, 1} and 1 in wide.tolist()
    assert torch.equal(sampling.pick(logits, temperature=1.0, top_p=1.0, generator=sampling.generator(0)), wide)
    assert not torch.equal(sampling.pick(logits, temperature=1.0, top_p=1.0, generator=sampling.generator(1)), wide)
    assert torch.equal(sampling.pick(logits, 0.0, 1.0, None), torch.zeros(200, dtype=torch.long))  # greedy: no stream
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        sampling.pick(logits, 1.0, 1.0, None)


def test_a_seeded_generator_draws_what_the_seeded_global_generator_drew():
    """The engine sampled from torch.manual_seed(batch_seed) + the global generator before; the same seed in
    its own generator draws the same tokens, and the global generator is not touched."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)) * 3
    seed = sampling.batch_seed(7, 2)
    torch.manual_seed(seed)
    before = [sampling.pick(logits, 0.7, 0.9, torch.default_generator) for _ in range(3)]
    state = torch.random.get_rng_state()
    g = sampling.generator(seed)
    assert all(torch.equal(b, sampling.pick(logits, 0.7, 0.9, g)) for b in before)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_batch_seeds_keep_their_numbers_and_seeded_blocks_leave_the_global_generator_alone():
    assert sampling.batch_seed(0, 0) == 0 and sampling.batch_seed(3, 5) == 3 * 100_003 + 5
    state = torch.random.get_rng_state()
    with sampling.seeded(11):
        inside = torch.rand(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    with sampling.seeded(11):
        assert torch.equal(torch.rand(4), inside)


def test_nucleus_sampling_draws_exactly_what_a_full_sort_does(monkeypatch):
    """Peaked rows take their nucleus from the top-k candidates, a flat row (its nucleus reaching past
    them) makes the batch sort the whole vocabulary: either way, under one seed, the very tokens that
    sorting the whole vocabulary and calling torch.multinomial draw."""

    def full_sort(logits, temperature, top_p, g):
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p] = 0
        return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=g)).squeeze(-1)

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 8)
    peaked = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) * 4
    for logits in (peaked, torch.cat([peaked, torch.zeros(1, 40)])):
        for top_p in (0.5, 0.9, 1.0):
            ours = sampling.pick(logits, 0.7, top_p, sampling.generator(1))
            assert torch.equal(ours, full_sort(logits, 0.7, top_p, sampling.generator(1)))
