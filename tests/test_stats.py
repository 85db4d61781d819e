"""Every statistic of ``perfkit.stats``, each tested here once: the median's interval and half-width, quantiles,
the bootstraps of ratios, the rank test, repeat intervals, geometric means, and the fits behind a history."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perfkit.stats import (
    bootstrap_ratio_ci,
    find_drift,
    find_steps,
    geomean_interval,
    log_se,
    mann_whitney_p,
    median_ci_rel,
    median_interval,
    median_se,
    paired_ratio_ci,
    quantile,
    repeat_interval_rel,
    run_scatter,
    theil_sen,
)


def _binomial_tail(n: int, k: int) -> float:
    """P(Bin(n, 1/2) < k)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [6, 7, 10, 11, 20, 41, 100, 400])
def test_median_interval_takes_the_narrowest_symmetric_ranks_that_reach_95(n):
    times = [float(i) for i in range(1, n + 1)]  # x(i) == i: the interval names its ranks
    low, median, high = median_interval(list(reversed(times)))
    j = int(low)
    assert high == n + 1 - j and median == pytest.approx((n + 1) / 2)
    assert 1 - 2 * _binomial_tail(n, j) >= 0.95 > 1 - 2 * _binomial_tail(n, j + 1)


def test_median_interval_at_ten_rounds_and_below_six():
    assert median_interval(range(1, 11)) == (2, 5.5, 9)  # x(2)..x(9): 97.9%
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 3.0, 5.0)  # no pair reaches 95%: the extremes
    with pytest.raises(ValueError, match="at least one round"):
        median_interval([])


def test_median_ci_rel_is_the_intervals_half_width():
    assert median_ci_rel(list(range(1, 11))) == pytest.approx((9 - 2) / 2 / 5.5)
    assert math.isinf(median_ci_rel([1.0] * 5))  # under 6 rounds no interval reaches 95%
    assert median_ci_rel([1.0] * 10 + [2.0]) == 0
    assert math.isinf(median_ci_rel([0.0] * 10))


def test_quantile_interpolates_linearly():
    assert quantile([5.0, 1.0, 2.0, 3.0, 4.0], 0.2) == pytest.approx(1.8)
    assert quantile([3.0], 0.8) == 3.0


def test_paired_ratio_ci_is_deterministic_and_brackets_the_ratio():
    eager = [2.0, 2.2, 1.9, 2.1, 2.05, 1.95, 2.0, 2.3]
    assert paired_ratio_ci(eager, [t / 2 for t in eager]) == (2.0, 2.0, 2.0)  # pairs move together
    noisy = [t / 2 * (1 + 0.05 * (-1) ** i) for i, t in enumerate(eager)]
    ratio, low, high = paired_ratio_ci(eager, noisy)
    assert low < ratio < high and (ratio, low, high) == paired_ratio_ci(eager, noisy)
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_ratio_ci(eager, noisy[:3])


def test_bootstrap_ratio_ci_is_deterministic_and_brackets_the_ratio():
    base = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98]
    new = [2 * t for t in base]
    low, high = bootstrap_ratio_ci(base, new)
    assert (low, high) == bootstrap_ratio_ci(base, new)
    assert low < 2.0 < high


def test_mann_whitney_matches_the_textbook_value():
    # n1 = n2 = 3, complete separation: U = 0, z = (4.5 - 0.5) / sqrt(5.25), p = 0.0809 (scipy's asymptotic).
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.080856, abs=1e-5)
    assert mann_whitney_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)


def test_repeat_interval_widens_with_drift_and_has_a_floor():
    rng = np.random.default_rng(0)
    steady = (1e-3 * (1 + 0.01 * rng.uniform(-1, 1, 30))).tolist()
    drifting = [t * (1 + 0.01 * i) for i, t in enumerate(steady)]
    assert repeat_interval_rel(steady) < repeat_interval_rel(drifting)
    assert repeat_interval_rel([1e-3] * 30) == pytest.approx(0.07)  # no scatter: the CPU's floor alone
    assert repeat_interval_rel([1e-3] * 30, device_type="cuda") == pytest.approx(0.03)
    assert repeat_interval_rel([0.01] * 5) is None


def test_geomean_interval_of_ratios():
    values, lows, highs = [2.0, 1.25, 1.0], [1.9, 1.2, 0.95], [2.1, 1.3, 1.05]
    geomean, low, high = geomean_interval(values, lows, highs)
    assert geomean == pytest.approx(2.5 ** (1 / 3))
    errors = [log_se(lo, hi) for lo, hi in zip(lows, highs, strict=True)]
    assert math.log(high / geomean) == pytest.approx(1.959964 * math.sqrt(sum(e * e for e in errors)) / 3)
    assert low * high == pytest.approx(geomean**2)  # symmetric in log space
    assert log_se(1 / math.e, math.e) == pytest.approx(1 / 1.959964)


def test_run_scatter_ignores_one_step():
    noise = np.random.default_rng(0).normal(0, 0.01, 400)
    stepped = noise + np.where(np.arange(400) >= 200, 0.5, 0.0)
    assert run_scatter(noise) == pytest.approx(0.01, rel=0.15)
    assert run_scatter(stepped) == pytest.approx(run_scatter(noise), rel=0.05)
    assert run_scatter([1.0, 2.0]) == 0.0


def test_median_se_grows_where_the_points_jump_between_modes():
    u = np.full(20, 0.001)
    steady = np.zeros(20)
    bimodal = np.tile([0.0, 0.2], 10)
    assert median_se(steady, u) == pytest.approx(math.sqrt(math.pi / 2) * 0.001 / math.sqrt(20))
    assert median_se(bimodal, u) > 10 * median_se(steady, u)


def test_theil_sen_recovers_a_line_through_an_outlier():
    x = np.arange(10.0)
    y = 3 * x + 1
    y[4] = 100.0
    assert theil_sen(x, y) == pytest.approx((3.0, 1.0))
    assert theil_sen([0.0], [2.0]) == (0.0, 2.0)


@pytest.mark.parametrize("k", [3, 10, 16])
def test_find_steps_finds_a_step_where_it_is(k):
    jitter = 0.002 * np.sin(np.arange(20) * 2.4)  # run-to-run scatter well inside the points' uncertainty
    u = np.full(20, 0.01)
    assert find_steps(jitter, u, min_z=4.0) == []
    [(index, z)] = find_steps(jitter + np.where(np.arange(20) >= k, 0.1, 0.0), u, min_z=4.0)
    assert index == k and z > 4.0
    latest = jitter.copy()
    latest[-1] += 0.1  # the newest point alone may be a piece: the one a gate judges
    assert [i for i, _ in find_steps(latest, u, min_z=4.0)] == [19]


def test_find_drift_reads_a_slope_not_a_step():
    y = np.log(1.01) * np.arange(12) + np.random.default_rng(2).normal(0, 0.001, 12)
    u = np.full(12, 0.001)
    per_point, z = find_drift(y, u, min_z=3.0)
    assert per_point == pytest.approx(0.01, abs=0.002) and z > 3.0
    assert find_drift(np.zeros(12), u, min_z=3.0) is None
    assert find_drift(y[:5], u[:5], min_z=3.0) is None  # thirds of under 6 points are too short
