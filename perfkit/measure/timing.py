"""Timing one step: the policy, the round runners, warm-up, adaptive and paired rounds, and the record's
timing fields.

A round is one step that ends in a device synchronization. Rounds are added in growing chunks until the
distribution-free 95% confidence interval of the median is within a target (±2% by default), a round/time
cap is reached, or (past half the time) the target is out of reach; ``timing_stop`` says which. This is
nvbench's stopping rule on the median rather than the mean (a GPU's step times are skewed by rare slow
rounds). Paired rounds interleave a variant's blocks of rounds with eager's, so a change of the machine's
load hits both members of a pair. ``torch.utils.benchmark``'s ``adaptive_autorange`` is not used because
it times blocks of many steps and keeps no per-step times.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from perfkit.env.machine import LoadMonitor, minor_faults
from perfkit.stats import median_ci_rel, paired_ratio_ci, quantile, repeat_interval_rel

RoundRunner = Callable[..., list[float]]
"""``run(step, n, before=None)`` runs ``n`` timed rounds of one synchronizing step and returns their times in
seconds; ``before``, when given, runs untimed before each round (the paired rounds time eager's step in it)."""


@dataclass(frozen=True)
class TimingPolicy:
    """When warm-up ends and when the timed rounds stop."""

    min_rounds: int = 10
    max_rounds: int = 2000
    max_time_s: float = 10.0
    """Cap on the timed rounds' total time."""
    target_ci_rel: float = 0.02
    """Stop when the 95% CI of the median is within ± this fraction of it; above it at the end = noisy."""
    warmup_batch_s: float = 0.05
    """A warm-up batch repeats the step for at least this long, so short steps are not judged one by one."""
    warmup_steady_rel: float = 0.05
    """Warm-up ends when two consecutive batches' times per step agree within this fraction."""
    warmup_max_s: float = 10.0
    min_time_s: float = 0.0
    """Keep timing until the rounds add up to at least this long, even with the target met (nvbench's
    ``--min-time``, whose default 0.5 s the quick profile takes): a dozen sub-millisecond rounds meet ±2%
    within one run yet say little about the next."""


QUICK_POLICY = TimingPolicy(min_rounds=6, max_rounds=400, max_time_s=2.0, warmup_batch_s=0.02, warmup_max_s=1.0,
                            min_time_s=0.5)
"""Sized for the quick profile on a small CPU: a looser time budget, the same stopping rule. The caps and
``min_time_s`` cover a variant's and eager's paired rounds together."""


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class SyncedStep:
    """One step's work followed by the device's synchronization; calling it runs both.

    The two halves stay apart so a device clock (``perfkit.env.gpu.DeviceClockRounds``) can record its end
    event after the work is queued and before the host waits.
    """

    work: Callable[[], None]
    sync: Callable[[], None]

    def __call__(self) -> None:
        self.work()
        self.sync()


def clock_rounds(step: Callable[[], None], n: int, before: Callable[[], None] | None = None) -> list[float]:
    """Time ``n`` calls of ``step`` (which synchronizes) with ``time.perf_counter``; ``before`` runs untimed."""
    times = []
    for _ in range(n):
        if before is not None:
            before()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


class BenchmarkRounds:
    """A :data:`RoundRunner` whose rounds are the ones a pytest-benchmark fixture stores in its ``stats``.

    The first call runs ``benchmark.pedantic(step, rounds=n, iterations=1, warmup_rounds=0)`` (perfkit warms
    up before; ``setup`` runs untimed before each round). pedantic runs once per test, so the adaptive rule's
    further rounds are timed with the same clock and appended to the same stats (``Stats.update``): the
    stored ``stats.data`` is exactly the list this runner returns. Under ``--benchmark-disable`` the rounds
    are timed and nothing is stored.
    """

    def __init__(self, benchmark: Any, setup: Callable[[], None] | None = None) -> None:
        self.benchmark = benchmark
        self.setup = setup

    def _setup(self, before: Callable[[], None] | None) -> Callable[[], None] | None:
        if before is None or self.setup is None:
            return before or self.setup
        setup = self.setup

        def both() -> None:
            setup()
            before()

        return both

    def __call__(self, step: Callable[[], None], n: int, before: Callable[[], None] | None = None) -> list[float]:
        setup = self._setup(before)
        if self.benchmark.disabled:
            return clock_rounds(step, n, setup)
        if self.benchmark.stats is None:
            self.benchmark.pedantic(step, setup=setup, rounds=n, iterations=1, warmup_rounds=0)
            return list(self.benchmark.stats.stats.data)
        times = clock_rounds(step, n, setup)
        for duration in times:
            self.benchmark.stats.stats.update(duration)
        return times


def warm_up(step: Callable[[], None], policy: TimingPolicy) -> tuple[int, float]:
    """Run ``step`` until steady (see :class:`TimingPolicy`); returns (steps run, seconds spent)."""
    start = time.perf_counter()
    steps = 0
    previous = None
    while True:
        batch_start = time.perf_counter()
        n = 0
        while True:
            step()
            n += 1
            if time.perf_counter() - batch_start >= policy.warmup_batch_s:
                break
        steps += n
        per_step = (time.perf_counter() - batch_start) / n
        if previous is not None and abs(per_step - previous) <= policy.warmup_steady_rel * min(per_step, previous):
            break
        if time.perf_counter() - start >= policy.warmup_max_s:
            break
        previous = per_step
    return steps, time.perf_counter() - start


UNREACHABLE_FACTOR = 4.0
"""Stop early, once half the time budget is spent, when the rounds the target needs (the CI narrows as
1/sqrt(n)) exceed the caps this many times over: the other half would buy a flag, not a figure. Not
sooner: a dozen rounds on a busy machine overstate the spread."""


def _next_chunk(ci: float, rounds: int, spent_s: float, policy: TimingPolicy) -> int:
    """Rounds to add next, or 0 to stop (target met, a cap reached, or the target out of reach)."""
    if rounds >= policy.max_rounds or spent_s >= policy.max_time_s:
        return 0
    per_round = spent_s / rounds
    room = min(policy.max_rounds - rounds, int((policy.max_time_s - spent_s) / per_round))
    if ci <= policy.target_ci_rel:
        if spent_s >= policy.min_time_s:
            return 0
        return max(0, min(room, math.ceil((policy.min_time_s - spent_s) / per_round)))
    if rounds >= 2 * policy.min_rounds and spent_s >= policy.max_time_s / 2 and math.isfinite(ci):
        needed = rounds * (ci / policy.target_ci_rel) ** 2
        if needed > UNREACHABLE_FACTOR * min(policy.max_rounds, policy.max_time_s / per_round):
            return 0
    # Grow by half of what was run: the CI narrows as 1/sqrt(n), so doubling n costs what it buys.
    return max(0, min(room, max(policy.min_rounds, rounds // 2)))


def stop_reason(ci: float, rounds: int, spent_s: float, policy: TimingPolicy) -> str:
    """Why the timed rounds ended: the target met, a cap, or stopped early with the rounds it would need."""
    if ci <= policy.target_ci_rel:
        return f"median's 95% CI within ±{policy.target_ci_rel:.0%}"
    if rounds >= policy.max_rounds:
        return f"round cap ({policy.max_rounds}) reached at ±{ci:.1%}"
    if spent_s >= policy.max_time_s:
        return f"time cap ({policy.max_time_s:g} s) reached at ±{ci:.1%}"
    if not math.isfinite(ci):
        return f"too few rounds for a CI ({rounds}) within the caps"
    needed = rounds * (ci / policy.target_ci_rel) ** 2
    return (f"stopped early at ±{ci:.1%} after {rounds} rounds: ±{policy.target_ci_rel:.0%} would take "
            f"~{needed:.0f}, beyond the caps")


def adaptive_rounds(step: Callable[[], None], policy: TimingPolicy, run: RoundRunner = clock_rounds) -> list[float]:
    """Time rounds of ``step`` in growing chunks until the median's CI is within target, a cap is hit, or the
    target is clearly out of reach (:data:`UNREACHABLE_FACTOR`)."""
    times: list[float] = []
    chunk = policy.min_rounds
    while chunk > 0:
        times += run(step, chunk)
        chunk = _next_chunk(median_ci_rel(times), len(times), sum(times), policy)
    return times


PAIR_BLOCK_S = 0.01
PAIR_BLOCK_MAX = 10
"""Paired rounds alternate in blocks of about :data:`PAIR_BLOCK_S` (at most this many rounds each): one
round after the other member's evicts this one's caches. Measured on the 2-core CPU, inception's
channels_last inference at batch 8 (0.72 ms alone, 2.55x over eager timed alone): alternating single
rounds read 0.84 ms and 2.22x, blocks of 3 2.30x, of 5 2.40x, of 10 0.735 ms and 2.51x. Cells of a few
milliseconds and more moved by less than their noise, so their blocks stay a round or two."""


def pair_block(step_s: float) -> int:
    """Rounds per block for a step of ``step_s`` seconds (:data:`PAIR_BLOCK_S`)."""
    if not step_s > 0:
        return 1
    return max(1, min(PAIR_BLOCK_MAX, round(PAIR_BLOCK_S / step_s)))


def paired_rounds(step: Callable[[], None], baseline_step: Callable[[], None], policy: TimingPolicy,
                  run: RoundRunner = clock_rounds, block: int = 1) -> tuple[list[float], list[float]]:
    """Interleaved rounds: ``block`` timed rounds of ``baseline_step``, then ``block`` of ``step``, and again.

    Returns (step's times, baseline's times); round ``i`` of each ran in the same block pair, a few
    milliseconds apart, so a change of the machine's load hits both members of a pair. Chunks grow as in
    :func:`adaptive_rounds` until both medians' CIs are within target, or the rounds of both together reach
    a cap.
    """

    def run_pairs(n: int) -> tuple[list[float], list[float]]:
        times: list[float] = []
        baseline: list[float] = []
        for _ in range(max(1, math.ceil(n / block))):
            baseline += clock_rounds(baseline_step, block)
            times += run(step, block)
        return times, baseline

    return adaptive_pairs(run_pairs, policy)


PairRunner = Callable[[int], tuple[list[float], list[float]]]
"""``run_pairs(n)`` runs ``n`` pairs (a baseline round, then the step's) and returns (step's times, baseline's)."""


def adaptive_pairs(run_pairs: PairRunner, policy: TimingPolicy) -> tuple[list[float], list[float]]:
    """Pairs in growing chunks, as :func:`adaptive_rounds`, until both medians' CIs are within target or the
    rounds of both together reach a cap; returns (step's times, baseline's times), pair ``i`` back to back."""
    times: list[float] = []
    baseline: list[float] = []
    chunk = policy.min_rounds
    while chunk > 0:
        step_times, baseline_times = run_pairs(chunk)
        times += step_times
        baseline += baseline_times
        ci = max(median_ci_rel(times), median_ci_rel(baseline))
        chunk = _next_chunk(ci, len(times), sum(times) + sum(baseline), policy)
    return times, baseline


class MachineWatch:
    """The machine's load from warm-up to the last round (``perfkit.env.machine.LoadMonitor``), and the page
    faults of the timed rounds.

    It starts before warm-up: /proc/stat ticks at 100 Hz, and a cell that meets its target in a dozen short
    rounds would otherwise be judged on one or two ticks.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.monitor = LoadMonitor(device)
        self.monitor.start()
        self._faults_before = self._faults = 0

    def rounds_start(self) -> None:
        """Mark the first timed round: page faults count from here."""
        self._faults_before = minor_faults()

    def rounds_end(self) -> None:
        """Mark the end of the timed rounds."""
        self._faults = minor_faults() - self._faults_before

    def fields(self, threads: int, rounds: int) -> dict[str, Any]:
        """The record's ``contended`` and ``machine_load`` (with ``minor_faults_per_round``) over ``rounds``."""
        load = self.monitor.stop(threads)
        load["minor_faults_per_round"] = self._faults / rounds
        return {"contended": load.pop("contended"), "machine_load": load}


def timing_fields(times: list[float], eager_times: list[float], policy: TimingPolicy, *, batch: int,
                  device_type: str) -> dict[str, Any]:
    """The record's fields of a cell's timed rounds (``eager_times`` are eager's paired rounds, or empty):
    the median and its spread, the repeat interval, why timing stopped, and the paired speedup."""
    median = statistics.median(times)
    mean = statistics.fmean(times)
    ci = median_ci_rel(times)
    spent_s = sum(times) + sum(eager_times)
    fields: dict[str, Any] = dict(
        times_s=times, rounds=len(times), step_time_median_s=median, step_time_mean_s=mean,
        step_time_p20_s=quantile(times, 0.2), step_time_p80_s=quantile(times, 0.8),
        step_time_cv=statistics.stdev(times) / mean if len(times) > 1 and mean > 0 else None,
        step_time_ci_rel=ci if math.isfinite(ci) else None, noise_bound_rel=policy.target_ci_rel,
        step_time_repeat_rel=repeat_interval_rel(times, device_type=device_type),
        timing_stop=stop_reason(max(ci, median_ci_rel(eager_times) if eager_times else 0.0), len(times), spent_s,
                                policy),
        noisy=not ci <= policy.target_ci_rel, samples_per_s=batch / median if median > 0 else None,
    )
    if eager_times:
        ratio, low, high = paired_ratio_ci(eager_times, times)
        fields.update(eager_times_s=eager_times, speedup_vs_eager=ratio, speedup_ci_low=low, speedup_ci_high=high)
    return fields
