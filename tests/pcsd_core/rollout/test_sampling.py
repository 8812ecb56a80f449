"""Next-token choice: the sampler draws from softmax(logits / T) within the top-p nucleus, reproducibly."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from pcsd_core.rollout.sampling import next_tokens, nucleus


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next_tokens(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8)])
def test_sample_frequencies_match_the_distribution(temperature, top_p):
    """200k draws of a 6-token distribution: every frequency within 5 standard errors of its probability
    (float64 reference), and tokens outside the nucleus never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    draws = 200_000
    tokens = next_tokens(logits.expand(draws, -1), temperature=temperature, top_p=top_p,
                         generator=torch.Generator().manual_seed(1))
    frequencies = torch.bincount(tokens, minlength=6).double() / draws

    expected = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:  # by hand: keep the most likely tokens until their mass reaches top_p
        order = expected.argsort(descending=True)
        mass_before = expected[order].cumsum(0) - expected[order]
        expected[order[mass_before >= top_p]] = 0.0
        expected /= expected.sum()
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() <= 5 * standard_error + 1e-12).all(), (frequencies, expected)
    assert frequencies[expected == 0].sum() == 0


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_nucleus_keeps_what_transformers_keeps(top_p):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(2)) * 3
    kept_by_transformers = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
    kept = nucleus(torch.softmax(logits, dim=-1), top_p) > 0
    assert torch.equal(kept, kept_by_transformers)


def test_seeded_generator_reproduces_and_leaves_the_global_rng_alone():
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    first = next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    again = next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    other = next_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
