"""Every statistic perfkit states, once: intervals of the median, paired ratios, repeat intervals.

Timing, reports, comparisons and history all read their figures from here, so two modules can never state
two different intervals for the same rounds.
"""

from __future__ import annotations

import math
import statistics

import torch

Z95 = 1.959964
"""The two-sided 95% normal quantile."""


def median_ci_rel(times: list[float], z: float = 1.96) -> float:
    """Half-width of the distribution-free ~95% CI of the median over the median (inf under 6 rounds)."""
    n = len(times)
    if n < 6:
        return math.inf
    data = sorted(times)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    median = statistics.median(data)
    return (data[hi] - data[lo]) / 2 / median if median > 0 else math.inf


def quantile(times: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1]."""
    data = sorted(times)
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def paired_ratio_ci(baseline: list[float], times: list[float], resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
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
    ratios = torch.tensor(baseline, dtype=torch.float64) / torch.tensor(times, dtype=torch.float64)
    ratio = statistics.median(ratios.tolist())
    index = torch.randint(len(times), (resamples, len(times)), generator=torch.Generator().manual_seed(seed))
    boot = ratios[index].quantile(0.5, dim=1)
    low, high = boot.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return ratio, min(low, ratio), max(high, ratio)


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
