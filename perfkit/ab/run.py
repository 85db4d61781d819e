"""The interleaved A/B of two sides, cell by cell: build and gate on both, warm both, then alternate blocks
of rounds until the HEAD/BASE ratio's interval decides or the cell's budget is spent.

Per cell the two workers are built with the same seed, their first outputs compared, each warmed up,
then timed in alternating blocks of :func:`perfkit.measure.pair_block` rounds (the order flips every
block pair, so neither side always runs right after the other's caches). Pair ``i`` is BASE's round ``i``
and HEAD's round ``i``; the ratio is :func:`perfkit.stats.paired_ratio_ci`'s median of HEAD/BASE within
pairs. A cell stops once its interval lies wholly inside ±threshold (unchanged) or wholly beyond it
(slower, faster) and its rounds add up to the policy's ``min_time_s``, or when the policy's caps are
reached. The machine's load over the cell is judged as a matrix cell's is
(:class:`perfkit.env.machine.LoadMonitor`), counting both workers' CPU time and run-queue wait as this
run's own: a contended cell is listed with its figures but not judged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perfkit.ab.worker import Worker
from perfkit.ab.worktree import Side
from perfkit.env.machine import LoadMonitor, Snapshot
from perfkit.measure.timing import TimingPolicy, pair_block, warm_up
from perfkit.stats import minimal_detectable_effect, paired_ratio_ci
from perfkit.testing import gate_tolerance, relative_error
from perfkit.variants import parse_variant

AB_POLICY = TimingPolicy(min_rounds=10, max_rounds=4000, max_time_s=20.0, min_time_s=2.0, warmup_batch_s=0.05,
                         warmup_max_s=1.0)
"""A cell's rounds: both sides' timed rounds together run at least ``min_time_s`` and at most ``max_time_s``
(``--budget-s``). The floor keeps a cell whose first dozen rounds happen to agree from stopping on them."""

VERDICTS = ("slower", "faster", "unchanged", "inconclusive", "contended")
"""A timed cell's verdict: its interval wholly beyond +threshold, beyond -threshold, inside ±threshold,
across a threshold (the budget ran out first), or not judged because the machine was busy."""


@dataclass(frozen=True)
class AbSettings:
    """What an A/B measures and how: the cells' axes, the device, the threads, the threshold, the rounds."""

    blocks: list[str]
    variants: list[str]
    modes: list[str]
    batches: list[int]
    bench_shape: bool
    device: str
    threads: int
    threshold: float
    policy: TimingPolicy = AB_POLICY
    seed: int = 0


@dataclass(frozen=True)
class CellSpec:
    """One cell of the A/B: block × variant × mode × batch."""

    block: str
    variant: str
    mode: str
    batch: int

    @property
    def name(self) -> str:
        """``block/variant/mode/dtype/bN``, as ``perfkit history --cells`` globs it."""
        return f"{self.block}/{self.variant}/{self.mode}/{parse_variant(self.variant).compute_dtype}/b{self.batch}"


def cell_specs(settings: AbSettings) -> list[CellSpec]:
    """Every cell of ``settings``, block by block."""
    return [CellSpec(b, v, m, n) for b in settings.blocks for v in settings.variants for m in settings.modes
            for n in settings.batches]


@dataclass
class CellResult:
    """What the A/B of one cell found; ``status`` is ``measured`` or why it was not (listed, never fatal)."""

    spec: CellSpec
    status: str
    reason: str | None = None
    verdict: str | None = None
    ratio: float | None = None
    """HEAD's step time over BASE's (median over pairs): above 1 is slower."""
    ratio_low: float | None = None
    ratio_high: float | None = None
    detectable_rel: float | None = None
    """The minimal detectable effect (:func:`perfkit.stats.minimal_detectable_effect`)."""
    pairs: int = 0
    base_median_s: float | None = None
    head_median_s: float | None = None
    outputs: str | None = None
    """The HEAD-against-BASE output check: ``same``, ``within tolerance ...`` or ``CHANGED ...``."""
    contended_reason: str | None = None
    machine_load: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    timed_s: float = 0.0
    stop: str | None = None


def _task_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) of all of ``pid``'s threads, from /proc/PID/task/*/schedstat."""
    cpu = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except OSError:
            continue  # a thread that ended between the listing and the read
        cpu += int(fields[0])
        wait += int(fields[1])
    return cpu / 1e9, wait / 1e9


class SidesMonitor(LoadMonitor):
    """A :class:`LoadMonitor` whose "own" process is this one and both workers: their CPU time is the run's,
    not another process's, and their run-queue wait is the run's being crowded out."""

    def __init__(self, device: str, pids: list[int]) -> None:
        super().__init__(device)
        self.pids = pids

    def _snapshot(self) -> Snapshot:
        snapshot = super()._snapshot()
        workers = [_task_stats(pid) for pid in self.pids]
        wait = None if snapshot.wait_s is None else snapshot.wait_s + sum(w for _, w in workers)
        return dataclasses.replace(snapshot, own_cpu_s=snapshot.own_cpu_s + sum(c for c, _ in workers), wait_s=wait)


def verdict(low: float, high: float, threshold: float) -> str:
    """The verdict of a HEAD/BASE interval against ±``threshold`` (symmetric in log: 1/(1+t) .. 1+t)."""
    if low > 1 + threshold:
        return "slower"
    if high < 1 / (1 + threshold):
        return "faster"
    if low >= 1 / (1 + threshold) and high <= 1 + threshold:
        return "unchanged"
    return "inconclusive"


def _output_check(base_path: Path, head_path: Path, variant: str) -> str:
    """HEAD's first outputs (output, then gradients) against BASE's, at the variant's tolerance."""
    base, head = torch.load(base_path), torch.load(head_path)
    if len(base) != len(head):
        return f"CHANGED: {len(head) - 1} gradients against {len(base) - 1}"
    dtype = parse_variant(variant).compute_dtype
    worst = 0.0
    for i, (b, h) in enumerate(zip(base, head, strict=True)):
        what = "output" if i == 0 else f"gradient {i}"
        if b.shape != h.shape:
            return f"CHANGED: {what} shape {tuple(h.shape)} against {tuple(b.shape)}"
        error = relative_error(h, b)
        tolerance = gate_tolerance(dtype, None, gradients=i > 0)
        if error > tolerance:
            return f"CHANGED: {what} relative error {error:.2e} > {tolerance:.0e}"
        worst = max(worst, error)
    return "same" if worst == 0 else f"within tolerance (relative error {worst:.1e})"


def _build(spec: CellSpec, sides: dict[str, Worker], settings: AbSettings, scratch: Path) -> CellResult | None:
    """Build and gate the cell on both sides; a result when it cannot be timed (missing, skipped, failed)."""
    replies = {}
    for label, worker in sides.items():
        replies[label] = worker.request("build", block=spec.block, variant=spec.variant, mode=spec.mode,
                                        batch=spec.batch, bench_shape=settings.bench_shape, seed=settings.seed,
                                        outputs_path=str(scratch / f"{label}.pt"))
    for key, status in (("missing", "only in {other}"), ("failed", "failed in {label}"), ("skipped", "skipped")):
        for label, reply in replies.items():
            if key in reply:
                other = next(lb for lb in sides if lb != label)
                return CellResult(spec, status.format(label=label, other=other), reason=reply[key])
    return None


def _alternate(base: Worker, head: Worker, block: int, policy: TimingPolicy,
               threshold: float) -> tuple[list[float], list[float], str]:
    """Alternating blocks of rounds until decided or out of budget: (BASE's times, HEAD's times, why it stopped)."""
    base_times: list[float] = []
    head_times: list[float] = []
    chunk = policy.min_rounds
    flip = False
    while True:
        for _ in range(max(1, math.ceil(chunk / block))):
            for worker in ((head, base) if flip else (base, head)):
                (base_times if worker is base else head_times).extend(worker.rounds(block))
            flip = not flip
        spent = sum(base_times) + sum(head_times)
        _, low, high = paired_ratio_ci(head_times, base_times)
        decided = verdict(low, high, threshold) != "inconclusive"
        if decided and spent >= policy.min_time_s and len(base_times) >= policy.min_rounds:
            return base_times, head_times, f"decided at ±{threshold:.0%} after {len(base_times)} pairs"
        if len(base_times) >= policy.max_rounds or spent >= policy.max_time_s:
            return base_times, head_times, f"budget spent ({len(base_times)} pairs, {spent:.1f} s timed)"
        per_pair = spent / len(base_times)
        room = min(policy.max_rounds - len(base_times), int((policy.max_time_s - spent) / per_pair) + 1)
        # Grow by half of what was run: the interval narrows as 1/sqrt(n), so doubling costs what it buys.
        chunk = max(block, min(room, max(policy.min_rounds, len(base_times) // 2)))


def run_cell(spec: CellSpec, base: Worker, head: Worker, settings: AbSettings) -> CellResult:
    """The A/B of one cell (see the module's docstring)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="perfkit-ab-") as scratch:
        refused = _build(spec, {"BASE": base, "HEAD": head}, settings, Path(scratch))
        if refused:
            refused.wall_s = time.perf_counter() - start
            return refused
        outputs = _output_check(Path(scratch) / "BASE.pt", Path(scratch) / "HEAD.pt", spec.variant)
    monitor = SidesMonitor(settings.device, [base.pid, head.pid])
    monitor.start()
    for worker in (base, head):
        warm_up(lambda worker=worker: worker.rounds(1), settings.policy)
    probe = statistics.median(base.rounds(3) + head.rounds(3))
    base_times, head_times, stop = _alternate(base, head, pair_block(probe), settings.policy, settings.threshold)
    load = monitor.stop(settings.threads)
    ratio, low, high = paired_ratio_ci(head_times, base_times)
    contended = load.pop("contended")
    return CellResult(
        spec, "measured", verdict="contended" if contended else verdict(low, high, settings.threshold),
        ratio=ratio, ratio_low=low, ratio_high=high, detectable_rel=minimal_detectable_effect(low, high),
        pairs=len(base_times), base_median_s=statistics.median(base_times),
        head_median_s=statistics.median(head_times), outputs=outputs,
        contended_reason=load.get("contended_reason"), machine_load=load, wall_s=time.perf_counter() - start,
        timed_s=sum(base_times) + sum(head_times), stop=stop)


class Workers:
    """Both sides' workers, started together and always closed (``with Workers(...) as (base, head)``)."""

    def __init__(self, base: Side, head: Side, settings: AbSettings) -> None:
        self.sides = (base, head)
        self.settings = settings
        self.workers: list[Worker] = []

    def __enter__(self) -> tuple[Worker, Worker]:
        try:
            for side in self.sides:
                self.workers.append(Worker(side.label, side.root, self.settings.threads, self.settings.device))
            # Both import at once; a side that cannot be measured is refused here, before any cell.
            self.hellos = [worker.hello for worker in self.workers]
        except BaseException:
            self.__exit__()
            raise
        return self.workers[0], self.workers[1]

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.close()


def run_cells(base: Worker, head: Worker, settings: AbSettings, specs: list[CellSpec],
              progress: Any = None) -> list[CellResult]:
    """The A/B of each of ``specs`` on the two workers, in order; ``progress(result)`` after each."""
    results = []
    for spec in specs:
        result = run_cell(spec, base, head, settings)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def exit_status(results: list[CellResult]) -> int:
    """1 when a cell's whole interval lies beyond the threshold on the slow side (and was judged), else 0."""
    return 1 if any(r.verdict == "slower" for r in results) else 0
