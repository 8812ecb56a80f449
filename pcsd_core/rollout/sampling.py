"""Choosing the next token from a batch of logits: greedy, or sampling with temperature and top-p.

Sampling draws one uniform number per row and looks it up in the cumulative distribution
(inverse-CDF). That is exact for a categorical distribution and, over a 49k vocabulary, several times
cheaper on CPU than `torch.multinomial`, which draws one exponential per vocabulary entry. A
`torch.Generator` makes a call reproducible without touching the global RNG.
"""

from __future__ import annotations

import torch


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature == 0, else a sample of softmax(logits / T)
    restricted to the top-p nucleus."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    # float64: a float32 running sum over ~10^5 entries would shift each token's share by up to ~1e-7, a bias
    # of order 1e-3 in total. Unnormalised after top-p: the draw is scaled by the row total.
    cumulative = probs.double().cumsum(dim=-1)
    draw = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    draw = draw * cumulative[:, -1:]
    # The first index whose cumulative mass exceeds the draw; zero-probability tokens are never chosen.
    return torch.searchsorted(cumulative, draw, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p nucleus: the most likely tokens whose mass reaches `top_p`.

    Same rule as transformers' TopPLogitsWarper (tested against it): in ascending order, drop tokens while
    the cumulative mass is <= 1 - top_p; the most likely token always stays.
    """
    sorted_probs, order = probs.sort(dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) <= 1.0 - top_p
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)
