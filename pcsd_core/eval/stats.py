"""Honest statistics for small evaluations: intervals for one model, paired tests between two.

    from pcsd_core.eval.stats import wilson_interval, mcnemar_exact, paired_bootstrap_difference, bootstrap_mean_interval
    wilson_interval(23, 200)                          # Interval(estimate=0.115, low=0.078, high=0.167)
    mcnemar_exact(after_correct, before_correct)      # McNemar(only_a=14, only_b=5, p_value=0.064)
    paired_bootstrap_difference(after_correct, before_correct, seed=0)   # accuracy(a) - accuracy(b), 95% interval
    bootstrap_mean_interval(response_lengths, seed=0)                     # mean and 95% percentile interval

- **Wilson score interval** for a proportion (Wilson 1927): good coverage at small n and near 0 or 1, where
  the normal (Wald) interval collapses to [0, 0] for 0/200. Matches statsmodels'
  `proportion_confint(method="wilson")`.
- **Exact McNemar test** for two models scored on the same questions: only the discordant questions (right
  for one model, wrong for the other) carry information; under "equal accuracy" each discordant question is a
  fair coin, so the two-sided p-value is `min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))`, as statsmodels'
  `mcnemar(exact=True)` and scipy's `binomtest(min(b, c), b + c, 0.5)` compute it.
- **Paired bootstrap** of the accuracy difference: resample questions (the same indices for both models, which
  keeps their pairing) and take percentiles of the difference; a 95% interval that excludes 0 is the bootstrap's
  view of a real difference.
- **Percentile bootstrap** of a mean (response length, per-response KL).

Pure Python and numpy; every bootstrap is seeded, so a report is reproducible. Resamples are drawn in blocks
of `BLOCK_RESAMPLES` so memory stays bounded for the whole GSM8K test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BLOCK_RESAMPLES = 1000  # bootstrap resamples drawn at once: (1000, n) indices


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided interval at `confidence`."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two models on the same questions."""

    only_a: int  # questions model A got right and model B wrong
    only_b: int  # questions model B got right and model A wrong
    p_value: float  # two-sided, exact binomial on the only_a + only_b discordant questions


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence ({confidence}) must be in (0, 1), e.g. 0.95.")


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of `successes / total`; the estimate is the plain proportion."""
    _check_confidence(confidence)
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"wilson_interval needs 0 <= successes ({successes}) <= total ({total}) and total >= 1.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    proportion = successes / total
    denominator = 1 + z * z / total
    center = (proportion + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / total + z * z / (4 * total * total)) / denominator
    return Interval(proportion, max(0.0, center - half_width), min(1.0, center + half_width), confidence)


def _paired_booleans(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a_array, b_array = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a_array.ndim != 1 or a_array.shape != b_array.shape or len(a_array) == 0:
        raise ValueError(
            f"paired tests need two equally long, non-empty lists of per-question results (got {len(a)} and {len(b)}); "
            "score both models on the same questions, in the same order."
        )
    return a_array, b_array


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test: is model A's accuracy different from model B's on these questions?"""
    a, b = _paired_booleans(a_correct, b_correct)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    # P(X <= min) for X ~ Binomial(discordant, 1/2), in exact integer arithmetic (no underflow at n ~ 1000s).
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant)
    return McNemar(only_a=only_a, only_b=only_b, p_value=p_value)


def _bootstrap_statistics(values: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """Means of `num_resamples` resamples (with replacement) of the rows of `values` (n,) -> (num_resamples,)."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples ({num_resamples}) must be >= 1; 10000 is typical.")
    generator = np.random.default_rng(seed)
    means = []
    for start in range(0, num_resamples, BLOCK_RESAMPLES):
        block = min(BLOCK_RESAMPLES, num_resamples - start)
        indices = generator.integers(0, len(values), size=(block, len(values)))
        means.append(values[indices].mean(axis=1))
    return np.concatenate(means)


def _percentile_interval(estimate: float, statistics: np.ndarray, confidence: float) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(statistics, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), confidence)


def paired_bootstrap_difference(
    a_correct: Sequence[bool], b_correct: Sequence[bool], *, num_resamples: int = 10000, confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """accuracy(A) - accuracy(B) and its paired percentile-bootstrap interval (questions resampled jointly)."""
    _check_confidence(confidence)
    a, b = _paired_booleans(a_correct, b_correct)
    differences = a.astype(np.float64) - b.astype(np.float64)  # per question: -1, 0 or +1
    return _percentile_interval(differences.mean(), _bootstrap_statistics(differences, num_resamples, seed), confidence)


def bootstrap_mean_interval(
    values: Sequence[float], *, num_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of `values` and its percentile-bootstrap interval."""
    _check_confidence(confidence)
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"bootstrap_mean_interval needs a non-empty list of finite numbers (got {len(array)} values).")
    return _percentile_interval(array.mean(), _bootstrap_statistics(array, num_resamples, seed), confidence)


# ---- across seeds: a few independent reruns of one arm --------------------------------------------------


def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The `probability` quantile of Student's t with `degrees_of_freedom` (>= 1), as scipy's `t.ppf` gives it.

    Its CDF is 1/2 + the integral of the density from 0, by Simpson's rule after the substitution t = tan(u)
    (which makes the heavy-tailed density smooth and bounded on u in [0, pi/2)); the quantile by bisection.
    """
    if not 0 < probability < 1 or degrees_of_freedom < 1:
        raise ValueError(f"student_t_quantile needs 0 < probability < 1 and degrees_of_freedom >= 1 (got "
                         f"{probability}, {degrees_of_freedom}).")
    nu = float(degrees_of_freedom)
    log_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def cdf(x: float) -> float:
        upper = math.atan(abs(x))
        steps = 2000
        width = upper / steps
        total = 0.0
        for i in range(steps + 1):
            u = i * width
            weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
            t = math.tan(u)
            total += weight * math.exp(log_norm - (nu + 1) / 2 * math.log1p(t * t / nu)) / math.cos(u) ** 2
        half = total * width / 3
        return 0.5 + half if x >= 0 else 0.5 - half

    low, high = -1.0, 1.0
    while cdf(low) > probability:
        low *= 2
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def mean_over_seeds_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of one arm's results over independent seeds and its Student-t interval (n - 1 degrees of freedom).

    With 2 seeds the interval is wide (t = 12.7 at 95%): that is what two reruns can say. One value gives an
    interval of [nan, nan]: no spread is known.
    """
    _check_confidence(confidence)
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"mean_over_seeds_interval needs a non-empty list of finite numbers (got {len(array)}).")
    mean = float(array.mean())
    if len(array) == 1:
        return Interval(mean, math.nan, math.nan, confidence)
    half_width = student_t_quantile(0.5 + confidence / 2, len(array) - 1) * float(array.std(ddof=1)) / math.sqrt(len(array))
    return Interval(mean, mean - half_width, mean + half_width, confidence)
