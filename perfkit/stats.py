"""Every statistic perfkit states, once: intervals of the median, ratios of step times with their intervals,
repeat intervals, a rank test, geometric means, and the robust fits that find steps and drifts in a history.

Timing, reports, comparisons and history all read their figures from here, so two modules can never state
two different intervals for the same rounds.

**The interval of the median** (:func:`median_interval`) is distribution-free: the median of whatever
distribution the rounds come from lies between the order statistics x(j) and x(n+1-j) (1-based, sorted
rounds) with probability 1 - 2·P(Bin(n, ½) < j). perfkit takes the largest j that still gives 95%, from the
binomial itself. The normal approximation's rounding (n/2 ∓ 1.96·√n/2, floored or ceiled) moved one end by
a rank, and two copies of it rounded differently: at 10 rounds one stated x(1)..x(9), the other
x(2)..x(10); the exact ranks are x(2)..x(9), which hold the median 97.9% of the time. Symmetric ranks keep
the interval centred on the median's rank, so a slow outlier widens it no more than a fast one does. Under
6 rounds no pair of order statistics reaches 95% (x(1)..x(5) hold 93.8%). The relative half-width
(:func:`median_ci_rel`) is this interval's, never a second formula's.

**The bootstraps** (:func:`bootstrap_medians`) resample with numpy's generator from a fixed seed: the same
rounds always give the same interval, so a verdict never changes between two readings of one file.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np

Z95 = 1.959964
"""The two-sided 95% normal quantile."""
CONFIDENCE = 0.95
"""The coverage of every interval perfkit states."""
BOOTSTRAP_RESAMPLES = 2000
SEED = 0
"""The bootstraps' seed: the same rounds always give the same interval."""
MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)
"""The standard error of a median over that of a mean, for normal scatter."""


@functools.cache
def _median_rank(n: int, confidence: float) -> int:
    """The largest 1-based rank j for which x(j)..x(n+1-j) holds the median with ``confidence``; 0 if none."""
    log_total = n * math.log(2)
    tail, rank = 0.0, 0
    for k in range((n + 1) // 2):
        # P(Bin(n, 1/2) = k) in log space: 2**-n underflows beyond about a thousand rounds.
        tail += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - log_total)
        if 2 * tail > 1 - confidence:
            break
        rank = k + 1
    return rank


def median_interval(times: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(low, median, high)``: the median of ``times`` between the order statistics that hold it with
    ``confidence`` (the module's docstring says which); the extremes where no pair does, whose coverage,
    1 - 2^(1-n), is then less than asked."""
    data = sorted(times)
    if not data:
        raise ValueError("the median's interval needs at least one round; got none")
    rank = _median_rank(len(data), confidence)
    low, high = (data[rank - 1], data[-rank]) if rank else (data[0], data[-1])
    return low, statistics.median(data), high


def median_ci_rel(times: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the median's interval (:func:`median_interval`) over the median: inf where no pair of
    order statistics reaches ``confidence`` (under 6 rounds at 95%) or the median is not positive."""
    if not _median_rank(len(times), confidence):
        return math.inf
    low, median, high = median_interval(times, confidence)
    return (high - low) / 2 / median if median > 0 else math.inf


def quantile(times: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1]."""
    data = sorted(times)
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def bootstrap_medians(values: Sequence[float], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The medians of ``resamples`` bootstrap resamples of ``values`` (each as many draws with replacement)."""
    x = np.asarray(values, dtype=float)
    return np.median(x[rng.integers(0, x.size, (resamples, x.size))], axis=1)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_ratio_ci(baseline: Sequence[float], times: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = SEED) -> tuple[float, float, float]:
    """(median over pairs of ``baseline[i] / times[i]``, its 2.5% and 97.5% bootstrap bounds over pairs).

    The ratio is taken within each pair, then the median across pairs: a pair's two rounds ran back to
    back under the same load, so their ratio is what pairing protects. The ratio of the two medians (the
    dynamo harness's) is not: on a 2-core CPU with busy loops beside it, rounds are either ~0.2 ms or
    ~400 ms (an OpenMP barrier waiting out scheduler slices), the two medians can land in different modes,
    and eager against itself read 449x; the median of pair ratios read 1.01-1.04 in the same runs.
    Deterministic (fixed ``seed``).
    """
    if len(baseline) != len(times) or not times:
        raise ValueError(f"paired rounds must have equal, non-zero lengths; got {len(baseline)} and {len(times)}")
    ratios = np.asarray(baseline, dtype=float) / np.asarray(times, dtype=float)
    ratio = float(np.median(ratios))
    low, high = _percentiles(bootstrap_medians(ratios, resamples, np.random.default_rng(seed)), CONFIDENCE)
    return ratio, min(low, ratio), max(high, ratio)


DETECTION_POWER = 0.8
"""The chance a change of the minimal detectable effect's size is told from noise (the usual 80%)."""


def minimal_detectable_effect(low: float, high: float, power: float = DETECTION_POWER) -> float:
    """The smallest relative change of a ratio whose 95% interval is ``[low, high]`` that rounds as noisy as
    these would tell from no change with probability ``power``: ``exp((z_0.975 + z_power) × se) − 1``, the
    standard error in log space being the interval's (:func:`log_se`). With 80% power that is 1.43 times
    the interval's half-width: a change just at the half-width is caught only half the time."""
    if not 0 < low <= high:
        raise ValueError(f"an interval of a positive ratio needs 0 < low <= high; got [{low}, {high}]")
    return math.expm1((Z95 + statistics.NormalDist().inv_cdf(power)) * log_se(low, high))


def bootstrap_ratio_ci(base_s: Sequence[float], new_s: Sequence[float], confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of median(new)/median(base), each run's rounds resampled on its own.

    For two runs timed apart, whose rounds have no pairs; deterministic (fixed ``seed``).
    """
    rng = np.random.default_rng(seed)
    base_medians = bootstrap_medians(base_s, resamples, rng)
    new_medians = bootstrap_medians(new_s, resamples, rng)
    return _percentiles(new_medians / base_medians, confidence)


def mann_whitney_p(base_s: Sequence[float], new_s: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test, normal approximation with the tie correction."""
    base, new = np.asarray(base_s, dtype=float), np.asarray(new_s, dtype=float)
    n1, n2 = base.size, new.size
    values = np.concatenate([base, new])
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(1, values.size + 1)
    # Tied values share the mean of their ranks.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - (counts**3 - counts).sum() / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(variance)  # 0.5: continuity correction
    return float(math.erfc(max(z, 0.0) / math.sqrt(2)))


REPEAT_FLOOR_REL = {"cpu": 0.07, "cuda": 0.03}
"""Part of a fresh repeat's deviation that one run cannot see (memory placement, the allocator's state,
the machine's load), added to the interval a record states for a repeat, by device type.

CPU, calibrated on the 2-core CPU. A repeat in a fresh process (three ``make bench`` runs back to back,
quiet, 42 cells, 252 ordered pairs): the interval held the other runs' medians 82% of the time with a
floor of 0.03, 91% with 0.05, 95% with 0.07, 99% with 0.10. A repeat in the same process
(tests/test_timing.py's repeat test, 4 cells x 5 repeats, 1 thread, load average 8-9): 63 of 80 with no
floor, 74 with 0.03, 78 with 0.05; the within-run CI alone, 43 of 80.

CUDA: not calibrated (no GPU was lent while this was written); 0.03 is a prior from the CPU's in-process
repeats, to be replaced by the same cross-process measurement on a GPU."""


def repeat_interval_rel(times: list[float], segments: int = 3, device_type: str = "cpu") -> float | None:
    """Half-width, over the median, of the interval that should hold a fresh repeat's median (~95%).

    The within-run CI of the median (:func:`median_ci_rel`) assumes rounds are independent and speaks of
    this run's median only. A repeat's median differs from this one by both runs' sampling error (√2 × the
    CI), by slow drift that the rounds' order shows (the spread of the medians of ``segments`` consecutive
    stretches of rounds), and by what no single run shows (:data:`REPEAT_FLOOR_REL` for ``device_type``).
    """
    ci = median_ci_rel(times)
    if not math.isfinite(ci):
        return None
    median = statistics.median(times)
    size = len(times) // segments
    drift = 0.0
    if size >= 3:
        medians = [statistics.median(times[i * size:(i + 1) * size]) for i in range(segments)]
        drift = (max(medians) - min(medians)) / median / 2
    return math.sqrt(2) * ci + drift + REPEAT_FLOOR_REL.get(device_type, REPEAT_FLOOR_REL["cpu"])


def log_se(low: float, high: float) -> float:
    """The standard error in log space that a 95% interval ``[low, high]`` of a positive quantity implies."""
    return (math.log(high) - math.log(low)) / (2 * Z95)


def geomean_interval(values: Sequence[float], lows: Sequence[float],
                     highs: Sequence[float]) -> tuple[float, float, float]:
    """``(geomean, low, high)``: the geometric mean of positive ratios, with a 95% interval from theirs.

    Each log-ratio carries the standard error its own interval implies (:func:`log_se`); the mean of n of
    them has the root of their summed squares over n. The interval is thus the measurement noise of these
    ratios, not a claim about ratios not measured.
    """
    if not values:
        raise ValueError("a geometric mean needs at least one ratio; got none")
    logs = [math.log(v) for v in values]
    errors = [log_se(low, high) for low, high in zip(lows, highs, strict=True)]
    mean = sum(logs) / len(logs)
    half = Z95 * math.sqrt(sum(e * e for e in errors)) / len(errors)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


# A history is a series of run medians in log space, ``y``, each with an uncertainty ``u`` (a standard
# error in log space). Steps and drifts are found in it by the fits below; their thresholds are the caller's.

def run_scatter(y: Sequence[float]) -> float:
    """The run-to-run standard deviation of a series, from its successive differences.

    The centred median absolute deviation of the differences, which one step (a single large difference) or
    a steady drift (a shift of every difference) does not inflate; 1.4826 makes a MAD a normal standard
    deviation, and a difference of two runs has √2 of one run's.
    """
    d = np.diff(np.asarray(y, dtype=float))
    if d.size < 2:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2))


def median_se(y: Sequence[float], u: Sequence[float], resamples: int = 200, seed: int = SEED) -> float:
    """The standard error of the median of ``y``: from its points' uncertainties ``u``, or from resampling
    its points where that is larger (a cell whose rounds are bimodal has run medians that jump between the
    modes). 200 resamples: this runs for every candidate split of every cell."""
    y_arr, u_arr = np.asarray(y, dtype=float), np.asarray(u, dtype=float)
    from_points = MEDIAN_EFFICIENCY * math.sqrt(float(np.mean(u_arr**2)) / u_arr.size)
    if y_arr.size < 3:
        return from_points
    resampled = bootstrap_medians(y_arr, resamples, np.random.default_rng(seed))
    return max(from_points, float(np.std(resampled)))


def _levels_z(y: np.ndarray, u: np.ndarray, first: slice, second: slice) -> float:
    """How many standard errors the medians of two stretches of ``y`` differ by."""
    se = math.hypot(median_se(y[first], u[first]), median_se(y[second], u[second]))
    return abs(float(np.median(y[second]) - np.median(y[first]))) / se if se > 0 else math.inf


def theil_sen(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the Theil-Sen line (the median of pairwise slopes; robust to outliers)."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.size < 2:
        return 0.0, float(np.median(y_arr)) if y_arr.size else 0.0
    i, j = np.triu_indices(x_arr.size, 1)
    slope = float(np.median((y_arr[j] - y_arr[i]) / (x_arr[j] - x_arr[i])))
    return slope, float(np.median(y_arr - slope * x_arr))


def _best_split(y: np.ndarray, u: np.ndarray, lo: int, hi: int, at_end: bool,
                min_z: float) -> tuple[int, float] | None:
    """The best split of ``y[lo:hi]`` into two constant pieces, and its z, when it passes both tests."""
    best: tuple[int, float] | None = None
    last_k = hi - (1 if at_end else 2)
    for k in range(lo + 2, last_k + 1):
        z = _levels_z(y, u, slice(lo, k), slice(k, hi))
        if best is None or z > best[1]:
            best = (k, z)
    if best is None or best[1] <= min_z:
        return None
    k = best[0]
    x = np.arange(lo, hi, dtype=float)
    step_cost = float(np.abs(y[lo:k] - np.median(y[lo:k])).sum() + np.abs(y[k:hi] - np.median(y[k:hi])).sum())
    slope, intercept = theil_sen(x, y[lo:hi])
    line_cost = float(np.abs(y[lo:hi] - (slope * x + intercept)).sum())
    return best if step_cost < line_cost else None


def find_steps(y: Sequence[float], u: Sequence[float], min_z: float) -> list[tuple[int, float]]:
    """Change points of the series ``y`` with uncertainties ``u``: ``[(first index after, z), ...]``.

    Binary segmentation into constant pieces (the piecewise-constant model asv fits, found greedily): the
    split whose two medians differ most in standard errors (:func:`median_se`) is kept when that exceeds
    ``min_z`` and two constant pieces fit the stretch better (least absolute deviations) than one
    Theil-Sen line; then each piece is searched again. A piece has at least two points, except the last,
    which may be the newest point alone: the one a gate must judge.
    """
    y_arr, u_arr = np.asarray(y, dtype=float), np.asarray(u, dtype=float)
    found: list[tuple[int, float]] = []
    pending = [(0, y_arr.size)]
    while pending:
        lo, hi = pending.pop()
        split = _best_split(y_arr, u_arr, lo, hi, hi == y_arr.size, min_z)
        if split:
            found.append(split)
            pending += [(lo, split[0]), (split[0], hi)]
    return sorted(found)


def find_drift(y: Sequence[float], u: Sequence[float], min_z: float) -> tuple[float, float] | None:
    """A steady change along ``y`` (a piece with no step): ``(relative change per point, z)`` when its last
    third's median differs from its first third's by more than ``min_z`` standard errors; the change is
    the Theil-Sen slope's. None under 6 points, whose thirds are too short to tell."""
    y_arr, u_arr = np.asarray(y, dtype=float), np.asarray(u, dtype=float)
    n = y_arr.size
    if n < 6:
        return None
    third = n // 3
    z = _levels_z(y_arr, u_arr, slice(0, third), slice(n - third, n))
    if z <= min_z:
        return None
    slope, _ = theil_sen(np.arange(n, dtype=float), y_arr)
    return math.expm1(slope), z
