"""Collapse diagnostics: the top-token loss share against a sort-and-sum reference, and the rollout repetition rate
as the held-out evaluation's own `repetition_rate` on the same responses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pcsd_core.eval import collapse, metrics
from pcsd_core.eval.collapse import TOP_TOKEN_FRACTION, rollout_repetition_rate, top_token_count, top_token_loss_share
from pcsd_core.metric_names import TRAIN_LOSS_SHARE_TOP10PCT_TOKENS


def _naive_top_share(values: np.ndarray) -> float:
    """Sort the magnitudes, largest first; the first ceil(n / 10) (integer arithmetic, at least 1) over all."""
    ordered = sorted((abs(float(v)) for v in values), reverse=True)
    count = max(1, -(-len(ordered) // 10))
    return sum(ordered[:count]) / sum(ordered)


def test_top_token_count_is_the_ceiling_of_a_tenth_and_at_least_one():
    for n in range(0, 301):
        assert top_token_count(n) == max(1, -(-n // 10)), n  # 0.1 * 30 is 3.0000000000000004, still 3
    assert top_token_count(7, 0.5) == 4 and top_token_count(7, 1.0) == 7
    assert f"top{round(100 * TOP_TOKEN_FRACTION)}pct" in TRAIN_LOSS_SHARE_TOP10PCT_TOKENS  # the name says the fraction
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction \(.*\) must be in \(0, 1\]"):
            top_token_count(10, fraction)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 30, 31, 99, 1000])
def test_top_token_loss_share_matches_sort_and_sum(n):
    generator = np.random.default_rng(n)
    losses = generator.exponential(size=n)
    losses[generator.random(n) < 0.2] = 0.0  # tokens the loss skips (weight 0) carry loss 0 and still count
    if not losses.any():
        losses[0] = 1.0
    assert top_token_loss_share(losses.tolist()) == pytest.approx(_naive_top_share(losses), rel=1e-12)


def test_top_token_loss_share_edge_cases():
    assert top_token_loss_share([0.7]) == 1.0  # one token carries it all
    assert top_token_loss_share([0.0] * 19 + [3.0]) == 1.0
    assert top_token_loss_share([2.0] * 40) == pytest.approx(4 / 40)  # uniform: the top 10% carry 10%
    assert top_token_loss_share([1.0] * 5) == pytest.approx(1 / 5)  # ceil(0.5) = 1 token of 5
    # The sampled estimator's log-ratios can be negative: ranked and summed as magnitudes.
    signed = np.array([-3.0, 1.0, 0.5, -0.5, 2.0, 0.0, 1.0, -1.0, 0.25, 0.75, 4.0])
    assert top_token_loss_share(signed) == pytest.approx(_naive_top_share(signed))
    assert top_token_loss_share(signed) == pytest.approx((4.0 + 3.0) / np.abs(signed).sum())  # ceil(1.1) = 2
    # No loss at all: no share to report.
    assert math.isnan(top_token_loss_share([0.0, 0.0, 0.0]))
    assert math.isnan(top_token_loss_share([]))
    with pytest.raises(ValueError, match="one flat list"):
        top_token_loss_share([[1.0, 2.0], [3.0, 4.0]])


def test_rollout_repetition_rate_is_the_heldout_repetition_rate():
    """One detector: the training-time rate is what `summarize_scores` reports as `repetition_rate`."""
    assert collapse.is_degenerate is metrics.is_degenerate
    loop = list(range(7, 11)) * 16  # a 4-token block copied 16 times: 64 tokens of loop
    responses = [
        ("Tom has 3 apples.\n#### 3", [11, 12, 13, 14, 15]),
        ("#### 16\n#### 16\n#### 16", [1, 2, 1, 2, 1, 2]),  # a line three times
        ("so the answer is 5 " * 16, loop),  # a token loop without newlines
        ("2 + 2 = 4\n2 + 2 = 4\n#### 4", [3, 4, 5]),  # a line twice is not a loop
    ]
    texts, ids = [text for text, _ in responses], [token_ids for _, token_ids in responses]
    scores = metrics.score_responses(texts, ids, ["3", "16", "5", "4"], max_new_tokens=1000)
    heldout = metrics.summarize_scores(scores, num_resamples=10)["repetition_rate"]
    assert rollout_repetition_rate(texts, ids) == heldout == 0.5
    with pytest.raises(ValueError, match="one text per response"):
        rollout_repetition_rate(texts, ids[:2])
    with pytest.raises(ValueError, match="at least one response"):
        rollout_repetition_rate([], [])
