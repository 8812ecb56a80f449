"""Collapse diagnostics of one training step: signs that on-policy self-distillation is degenerating.

Training on the student's own samples can collapse: responses start to loop or shrink, the student's entropy
falls toward 0, and the loss piles up on a few tokens (say, the final number the privileged context leaks). Beside
the mean response length and the two entropies, the trainer logs per step:

    from pcsd_core.eval.collapse import rollout_repetition_rate, top_token_loss_share
    rollout_repetition_rate(texts, response_ids)     # share of the sampled responses that loop, in [0, 1]
    top_token_loss_share(per_token_losses)           # share of the loss on the top 10% of tokens, in [0.1, 1]

- **Repetition**: a response loops by `pcsd_core.eval.metrics.is_degenerate`, the detector behind the held-out
  `repetition_rate`, so the training curve and the final evaluation count the same thing.
- **Loss concentration**: the step's per-token losses (every response token; a token the loss skips, weight 0,
  counts as a token with loss 0: it is part of the response the student wrote) ranked by size; the top
  `ceil(fraction * n)` of the n tokens (at least 1) carry this share of their sum. Uniform loss gives about
  `fraction`, loss on a single token gives 1. Sizes are magnitudes: the divergences are >= 0, but the `sampled`
  estimator's per-token log-ratio can be negative, and a signed sum could be 0 or cancel out. No tokens, or a
  loss of exactly 0 everywhere, gives NaN: no loss, no share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pcsd_core.eval.metrics import is_degenerate

TOP_TOKEN_FRACTION = 0.1  # the share of tokens whose loss `top_token_loss_share` reports (the metric name's 10%)


def rollout_repetition_rate(texts: Sequence[str], response_ids: Sequence[Sequence[int]]) -> float:
    """The share of responses (decoded text and token ids, one pair per response) that `is_degenerate` flags."""
    if len(texts) != len(response_ids) or not texts:
        raise ValueError(f"rollout_repetition_rate needs one text per response and at least one response (got "
                         f"{len(texts)} texts and {len(response_ids)} token lists).")
    return float(np.mean([is_degenerate(text, ids) for text, ids in zip(texts, response_ids)]))


def top_token_count(num_tokens: int, fraction: float = TOP_TOKEN_FRACTION) -> int:
    """`ceil(fraction * num_tokens)`, at least 1; rounded first so that 0.1 * 30 (3.0000000000000004) gives 3."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction ({fraction}) must be in (0, 1], e.g. 0.1 for the top 10% of tokens.")
    return max(1, math.ceil(round(fraction * num_tokens, 9)))


def top_token_loss_share(per_token_losses: Sequence[float], *, fraction: float = TOP_TOKEN_FRACTION) -> float:
    """The share of the summed per-token loss magnitude carried by the `top_token_count` largest tokens (NaN
    when there are no tokens or every loss is 0)."""
    magnitudes = np.abs(np.asarray(per_token_losses, dtype=np.float64))
    if magnitudes.ndim != 1:
        raise ValueError(f"per_token_losses must be one flat list of per-token losses (got shape {magnitudes.shape}).")
    count = top_token_count(len(magnitudes), fraction)
    total = magnitudes.sum()
    if len(magnitudes) == 0 or total == 0:
        return math.nan
    top = np.partition(magnitudes, len(magnitudes) - count)[len(magnitudes) - count:]  # the `count` largest
    return float(top.sum() / total)
