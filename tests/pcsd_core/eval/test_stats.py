"""pcsd_core.eval.stats against statsmodels and scipy on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as statsmodels_mcnemar
from statsmodels.stats.proportion import proportion_confint

from pcsd_core.eval.stats import (
    Interval,
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_difference,
    wilson_interval,
)


@pytest.mark.parametrize(("successes", "total"), [(0, 200), (1, 200), (23, 200), (100, 200), (199, 200), (200, 200), (3, 16), (0, 1), (700, 1319)])
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_interval_matches_statsmodels(successes, total, confidence):
    ours = wilson_interval(successes, total, confidence)
    low, high = proportion_confint(successes, total, alpha=1 - confidence, method="wilson")
    assert ours.estimate == pytest.approx(successes / total)
    assert (ours.low, ours.high) == pytest.approx((low, high), abs=1e-12)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match=r"0 <= successes \(5\) <= total \(4\)"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match=r"confidence \(95\) must be in \(0, 1\)"):
        wilson_interval(1, 4, confidence=95)


def _paired_outcomes(only_a: int, only_b: int, both: int, neither: int, seed: int = 0) -> tuple[list[bool], list[bool]]:
    pairs = [(True, False)] * only_a + [(False, True)] * only_b + [(True, True)] * both + [(False, False)] * neither
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


@pytest.mark.parametrize(
    ("only_a", "only_b", "both", "neither"),
    [(14, 5, 10, 171), (5, 14, 10, 171), (0, 0, 20, 180), (3, 0, 0, 197), (40, 38, 60, 62), (1, 1, 0, 198), (150, 110, 500, 559)],
)
def test_mcnemar_matches_statsmodels_and_scipy(only_a, only_b, both, neither):
    a, b = _paired_outcomes(only_a, only_b, both, neither)
    ours = mcnemar_exact(a, b)
    assert (ours.only_a, ours.only_b) == (only_a, only_b)
    table = [[both, only_a], [only_b, neither]]
    assert ours.p_value == pytest.approx(statsmodels_mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-15)
    if only_a + only_b:
        scipy_p = scipy_stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert ours.p_value == pytest.approx(scipy_p, rel=1e-9, abs=1e-15)


def test_paired_inputs_must_line_up():
    with pytest.raises(ValueError, match=r"equally long, non-empty .* \(got 3 and 2\)"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap_difference([], [])


def test_paired_bootstrap_difference_matches_scipy():
    a, b = _paired_outcomes(only_a=30, only_b=12, both=25, neither=133, seed=1)
    ours = paired_bootstrap_difference(a, b, num_resamples=20000, seed=0)
    reference = scipy_stats.bootstrap(
        (np.array(a, float), np.array(b, float)), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True,
        vectorized=True, n_resamples=20000, method="percentile", random_state=np.random.default_rng(123),
    ).confidence_interval
    assert ours.estimate == pytest.approx((30 - 12) / 200)
    # Different random streams: the bootstrap distribution sits on a grid of 1/200; allow two grid steps.
    assert (ours.low, ours.high) == pytest.approx((reference.low, reference.high), abs=0.01)
    assert ours.excludes(0.0)  # 18 of 42 discordant questions more for A: a clear difference


def test_bootstrap_mean_interval_matches_scipy():
    values = np.random.default_rng(2).gamma(2.0, 40.0, size=200)  # response-length-like, skewed
    ours = bootstrap_mean_interval(values, num_resamples=20000, seed=0)
    reference = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", random_state=np.random.default_rng(7)
    ).confidence_interval
    width = reference.high - reference.low
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.low == pytest.approx(reference.low, abs=0.03 * width)
    assert ours.high == pytest.approx(reference.high, abs=0.03 * width)


def test_bootstrap_is_seeded():
    values = list(range(50))
    assert bootstrap_mean_interval(values, seed=3) == bootstrap_mean_interval(values, seed=3)
    assert bootstrap_mean_interval(values, seed=3) != bootstrap_mean_interval(values, seed=4)
    assert bootstrap_mean_interval([5.0] * 10, num_resamples=100) == Interval(5.0, 5.0, 5.0)


def test_student_t_quantile_matches_scipy_and_the_seed_interval_matches_scipy_t_interval():
    import numpy as np
    import pytest
    from scipy import stats as scipy_stats

    from pcsd_core.eval.stats import mean_over_seeds_interval, student_t_quantile

    for df in (1, 2, 3, 7, 30, 200):
        for probability in (0.025, 0.1, 0.5, 0.9, 0.975, 0.999):
            assert student_t_quantile(probability, df) == pytest.approx(scipy_stats.t.ppf(probability, df), abs=1e-8)
    values = [0.12, 0.31, 0.18, 0.2]
    interval = mean_over_seeds_interval(values)
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((np.mean(values), low, high))
    single = mean_over_seeds_interval([0.3])
    assert single.estimate == 0.3 and np.isnan(single.low) and np.isnan(single.high)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)
