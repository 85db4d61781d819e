"""Measure one cell of the matrix (block x variant x mode x batch on a device) into a :class:`Record`.

The order of work in a cell, and why:

1. **Skip** a variant the device cannot run (fp16 on the CPU), with the reason; never substitute another.
2. **Correctness gate.** The model is built under a fixed seed; once per (entry, mode, batch) group a
   float64 copy runs the same batch under the same seed (inference: the output; training: the output and
   every gradient after one forward and backward), and so does eager float32 (:class:`GroupState`, shared
   by the group's variants through a :class:`GroupCache`). Relative errors ``‖a − ref‖/‖ref‖``: eager is
   held to its own sanity bound, a float32 variant to a multiple of eager's error plus a floor (the dynamo
   harness's rule), reduced precision to its table or eager's error scaled to its unit roundoff
   (``perfkit.testing.gate_tolerance``). A cell over tolerance is ``failed`` and is not timed, so it can
   never read as a speedup. The gate's call is the variant's first call, so for a compiled variant it is
   the compile time.
3. **Warm-up until steady**: batches of steps until two consecutive batches agree on the time per step
   within a few percent (or a time cap).
4. **Memory** on one separate step: on a GPU the allocator's peak after a reset; on the CPU, where the
   allocator keeps no peak, the profiler's allocator events (``perfkit.measure.memory``).
5. **Timing, adaptive and paired**: rounds of one step each, each ending in a device synchronization,
   added in growing chunks until the distribution-free 95% confidence interval of the median is within a
   target (±2% by default), a round/time cap is reached, or (past half the time) the target is out of
   reach; a cell still above the target is flagged ``noisy`` and ``timing_stop`` says why it stopped.
   This is nvbench's stopping rule on the median rather than the mean (a GPU's step times are skewed by
   rare slow rounds). A variant's rounds are interleaved with the group's warm eager, one eager round
   before each (``speedup_vs_eager`` with a paired-bootstrap interval), and the machine's load over them
   is read (``perfkit.env.machine``: ``contended``, ``machine_load``). ``torch.utils.benchmark``'s
   ``adaptive_autorange`` is not used because it times blocks of many steps and keeps no per-step times.
6. **FLOPs** of one step with ``torch.utils.flop_counter`` on the meta device (no arithmetic).

Every failure of a cell becomes its record: ``oom`` (the allocator emptied), ``error`` (a compile error,
say, with the message and the stage it happened in); the caller's loop goes on.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from perfkit.env.device import device_identity
from perfkit.env.gpu import DeviceClockRounds
from perfkit.env.machine import LoadMonitor, minor_faults
from perfkit.measure import memory_model as _memory_model
from perfkit.measure.memory import METHOD as CPU_MEMORY_METHOD
from perfkit.measure.memory import cpu_step_memory
from perfkit.measure.memory_model import REFERENCE_HEADROOM, MemoryPlan, format_bytes, plan_cell_memory
from perfkit.record import Record
from perfkit.registry import Entry, get_entry
from perfkit.stats import REPEAT_FLOOR_REL, median_ci_rel, paired_ratio_ci, quantile, repeat_interval_rel  # noqa: F401
from perfkit.testing import (
    ACCURACY_FLOOR,
    ACCURACY_MULTIPLIER,
    EAGER_SANITY_TOLERANCE,
    GRAD_REL_TOLERANCE,
    REL_TOLERANCE,
    gate_tolerance,
    relative_error,
)
from perfkit.variants import (
    MODES,
    Prepared,
    Variant,
    gradients,
    loss_target,
    parse_variant,
    training_loss,
    triton_interpreted,
)

CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
TIMER = "time.perf_counter around one step that ends in a device synchronization"

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


def tolerance_dtype(variant: Variant, device: torch.device | str) -> str:
    """The tolerance table's key for ``variant`` on ``device``: its compute dtype, or tf32 where allowed."""
    dtype = variant.compute_dtype
    if dtype == "float32" and torch.device(device).type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        return "tf32"
    return dtype


def _reference(model: nn.Module, x: torch.Tensor, mode: str, input_requires_grad: bool,
               seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 copy's output (and gradients, in training) on the same batch."""
    reference = copy.deepcopy(model).to(torch.float64)
    training = mode == "training"
    reference.train(training)
    x64 = x.detach().to(torch.float64).requires_grad_(training and input_requires_grad)
    if not training:
        with torch.no_grad():
            return reference(x64), []
    out = reference(x64)
    training_loss(out, loss_target(out, seed)).backward()
    return out.detach(), [g.detach() for g in gradients(list(reference.parameters()), x64)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])


def _live_bytes(prepared: Prepared) -> int:
    """Bytes of the unique storages live before a step: parameters, buffers, grads, optimizer state, inputs."""
    tensors = list(prepared.parameters) + list(prepared.module.buffers())
    tensors += [p.grad for p in prepared.parameters if p.grad is not None]
    if prepared.optimizer is not None:
        for state in prepared.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors.append(prepared.inputs)
    if prepared._loss_target is not None:
        tensors.append(prepared._loss_target)
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def step_memory(prepared: Prepared, step: Callable[[], None], device: torch.device) -> tuple[int, int, str]:
    """(absolute peak bytes, rise above what was live before, method) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - before, CUDA_MEMORY_METHOD
    before = _live_bytes(prepared)
    rise = cpu_step_memory(step).peak_rise_bytes
    return before + rise, rise, CPU_MEMORY_METHOD


@dataclass(frozen=True)
class StepCounts:
    """What one eager float32 step does, counted on meta tensors (the same on every machine)."""

    flops: int
    """Multiply-adds count as two."""
    allocated_bytes: int
    """Every tensor the step's ops created (views and in-place results excluded), freed or not."""
    state_bytes: int
    """Parameters three times (themselves, their gradients, SGD's momentum), buffers and the input."""

    @property
    def bound_bytes(self) -> int:
        """An upper bound of the step's peak: nothing live at any moment was not allocated or held."""
        return self.allocated_bytes + self.state_bytes


class _AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every fresh tensor an op returns; a view's or an in-place op's result aliases an
    input (its schema says so) and allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, result in zip(returns, results):
            if ret.alias_info is None and isinstance(result, torch.Tensor):
                self.bytes += result.numel() * result.element_size()
        return out


def _count_step(entry: Entry, batch: int, bench_shape: bool, mode: str, input_requires_grad: bool) -> StepCounts:
    training = mode == "training"
    with torch.device("meta"):
        module = entry.create()
    module.train(training)
    shape = entry.bench_shape if bench_shape else entry.test_shape
    x = torch.empty((batch, *shape), device="meta", requires_grad=training and input_requires_grad)
    allocations = _AllocationCounter()
    with FlopCounterMode(display=False) as counter, allocations:
        if training:
            out = module(x)
            target = (torch.zeros(out.shape[0], dtype=torch.int64, device="meta") if out.dim() == 2
                      else torch.empty(out.shape, device="meta"))
            training_loss(out.float(), target).backward()
        else:
            with torch.no_grad():
                module(x)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    state = 3 * nbytes(module.parameters()) + nbytes(module.buffers()) + nbytes([x])
    return StepCounts(int(counter.get_total_flops()), allocations.bytes, state)


def step_counts(entry: Entry, batch: int, bench_shape: bool, mode: str, input_requires_grad: bool) -> StepCounts:
    """FLOPs and an upper bound of the memory of one eager step (forward; in training also the loss and
    backward), from one pass on meta tensors, once per group's parameters.

    The count matches the timed step: the input's gradient is computed only for blocks (as inside a
    network), and the loss is the step's own. The counter counts a multiply-add as two FLOPs.
    """
    key = (entry.name, entry.factory, repr(entry.kwargs), entry.bench_shape, entry.test_shape, batch, bench_shape,
           mode, input_requires_grad)
    if key not in _STEP_COUNTS:
        if len(_STEP_COUNTS) >= 512:
            _STEP_COUNTS.clear()
        _STEP_COUNTS[key] = _count_step(entry, batch, bench_shape, mode, input_requires_grad)
    return _STEP_COUNTS[key]


_STEP_COUNTS: dict[tuple, StepCounts] = {}
"""Counts by everything they depend on: the variants of a group, and its memory plan, count once."""


def step_flops(entry: Entry, batch: int, bench_shape: bool, mode: str, input_requires_grad: bool) -> int:
    """FLOPs of one eager step (:func:`step_counts`)."""
    return step_counts(entry, batch, bench_shape, mode, input_requires_grad).flops


def is_oom(error: BaseException) -> bool:
    """True for an out-of-memory error: torch's, the CPU allocator's, or one a compile wrapper chained."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError; compile wrappers may chain the original OOM.
    text = str(error)
    cause = error.__cause__ or error.__context__
    return ("DefaultCPUAllocator: can't allocate memory" in text or "out of memory" in text.lower()
            or (cause is not None and cause is not error and is_oom(cause)))


def error_message(error: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``error``, cut at ``limit`` characters."""
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


@dataclass
class GroupState:
    """What the variants of one (entry, mode, batch) group share: computed once, by the group's first cell.

    The float64 reference (same seed, input and model for every variant), eager float32's error against
    it (the calibrated gate's yardstick), the eager cell itself, prepared and kept warm to be timed beside
    each variant, and the FLOP count (of the eager step, the same for every variant).
    """

    ref_out: torch.Tensor
    ref_grad: torch.Tensor | None
    eager_error: float
    eager_grad_error: float | None
    eager: Prepared | None
    """None when eager failed its own gate (``eager_failure`` says why): its variants are timed unpaired."""
    eager_failure: str | None
    eager_first_call_s: float
    eager_warm: bool = False
    flops: int | None = None
    gate_batch: int | None = None
    """The batch the reference (and so every variant's gate) ran at: the cell's, or the largest that fits."""


class GroupCache:
    """The :class:`GroupState` of each group of the entry being measured; a new entry drops the previous ones.

    The matrix runs an entry's cells together (its variants, modes and batches), so holding only the
    current entry's groups bounds the memory kept: one eager model, input and optimizer state per mode and
    batch of one entry.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None
        self._groups: dict[tuple, GroupState] = {}

    def get(self, entry_key: tuple, group_key: tuple) -> GroupState | None:
        """The group's state, or None; a different ``entry_key`` than the last one empties the cache."""
        if entry_key != self._entry:
            self._groups.clear()
            self._entry = entry_key
        return self._groups.get(group_key)

    def put(self, group_key: tuple, state: GroupState) -> None:
        """Keep ``state`` for the rest of this entry's cells."""
        self._groups[group_key] = state

    def clear(self) -> None:
        """Drop every kept group (its eager model and tensors)."""
        self._groups.clear()
        self._entry = None


class Stages:
    """Wall time per stage of a cell (``wall_split_s``), and the stage a failure is reported in."""

    def __init__(self, progress: dict[str, Any]) -> None:
        self.progress = progress
        self.split: dict[str, float] = {}
        self._name: str | None = None
        self._start = time.perf_counter()

    def enter(self, name: str, label: str | None = None) -> None:
        """Close the current stage and start ``name`` (``label`` is what a failure in it reports)."""
        now = time.perf_counter()
        if self._name is not None:
            self.split[self._name] = self.split.get(self._name, 0.0) + now - self._start
        self._name, self._start = name, now
        self.progress["stage"] = label or name

    def close(self) -> dict[str, float]:
        """Close the current stage; the split so far."""
        self.enter("done")
        return self.split


def measure_cell(name: str, variant: str | Variant, mode: str, batch: int, device: torch.device | str, *,
                 bench_shape: bool, seed: int = 0, policy: TimingPolicy | None = None,
                 run_rounds: RoundRunner = clock_rounds, flops: bool = True, paired: bool | None = None,
                 groups: GroupCache | None = None, threads: int | None = None, memory_model: str = "auto") -> Record:
    """Gate, warm up, measure memory, time and count one cell; every failure becomes the record's status.

    ``run_rounds`` runs the timed rounds (the benchmark passes one that records them in pytest-benchmark).
    ``paired`` interleaves the variant's rounds with eager's (default: every variant but eager itself);
    ``groups`` shares the float64 reference and the warm eager cell between the cells of a group (default:
    nothing shared); ``threads`` sets torch's intra-op threads for the cell (default: as they are);
    ``memory_model`` says when the memory model predicts the cell (:data:`MEMORY_MODELS`).
    Raises only for a bad argument (unknown block, variant or mode), never for a cell that fails.
    """
    entry = get_entry(name)
    variant = parse_variant(variant)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    if memory_model not in MEMORY_MODELS:
        raise ValueError(f"unknown memory_model {memory_model!r}; valid: {', '.join(MEMORY_MODELS)}")
    device = torch.device(device)
    if device.type == "cuda" and not isinstance(run_rounds, DeviceClockRounds):
        run_rounds = DeviceClockRounds(run_rounds, device)  # issue 14: the device clock beside the host's
    shape = entry.bench_shape if bench_shape else entry.test_shape
    tol_dtype = tolerance_dtype(variant, device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    base: dict[str, Any] = dict(
        block=name, variant=variant.name, mode=mode, dtype=variant.compute_dtype, batch=batch, kind=entry.kind,
        input_shape=[batch, *shape], device=device_identity(device), timer=TIMER, threads=torch.get_num_threads(),
    )
    progress: dict[str, Any] = {"stage": "build", "result": {}}
    try:
        return _run_cell(entry, variant, mode, batch, device, bench_shape, seed, policy or TimingPolicy(),
                         run_rounds, flops, tol_dtype, base, progress,
                         paired if paired is not None else variant.name != "eager", groups or GroupCache(),
                         memory_model)
    except Exception as error:  # every failure of a cell is recorded, the matrix goes on
        status = "oom" if is_oom(error) else "error"
        reason = f"{progress['stage']}: {error_message(error)}"
    finally:
        torch.set_num_threads(previous_threads)
    # Out of the except block, the traceback (and the tensors its frames hold) is gone: free the memory.
    if groups is not None and status == "oom":
        groups.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Record(status=status, reason=reason, **base, **progress["result"])


MEMORY_MODELS = ("auto", "exact")
"""``exact``: the memory model predicts every cell. ``auto``: on a GPU, likewise; elsewhere only where
:func:`step_counts`'s bound does not clearly fit (:data:`BOUND_MARGIN`)."""

BOUND_MARGIN = 4
"""The variant's step (autocast's copies of weights and activations bounded by the float32 step) and the
float64 reference (every floating tensor twice its float32 size) each stay within twice the eager float32
step's allocation bound; where four times it fits in the reference's share of free memory, neither can run
out, and the exact prediction (0.1-0.9 s a cell on a 2-core CPU) would decide nothing."""


def _plan(entry: Entry, variant: Variant, mode: str, batch: int, device: torch.device, bench_shape: bool,
          seed: int, result: dict[str, Any], memory_model: str = "auto") -> MemoryPlan | None:
    """The cell's memory plan, its prediction filed in ``result``; None (with the reason filed) where the
    memory model is not needed (``memory_model`` ``auto`` off a GPU, with memory to spare) or cannot run this
    cell: the cell then runs as it would without a plan."""
    if memory_model == "auto" and device.type != "cuda":
        try:
            bound = step_counts(entry, batch, bench_shape, mode, entry.kind == "block").bound_bytes
        except Exception:  # the meta pass failed; the memory model below says why (or the cell will)
            bound = None
        free = _memory_model.free_memory_bytes(device)
        if bound is not None and (free is None or BOUND_MARGIN * bound <= REFERENCE_HEADROOM * free):
            result["predicted_memory"] = {
                "method": "bound", "bound_bytes": bound, "free_bytes": free,
                "notes": [f"not predicted: {BOUND_MARGIN} x the eager step's allocation bound "
                          f"({format_bytes(bound)}) fits in free memory; --perfkit-memory-model exact predicts it"]}
            return None
    try:
        plan = plan_cell_memory(entry.name, variant, mode, batch, bench_shape=bench_shape, device=device, seed=seed)
    except Exception as error:  # a fake-tensor gap must not cost the cell its measurement
        result["predicted_memory"] = {"error": error_message(error, 300)}
        return None
    p = plan.variant
    result.update(predicted_peak_bytes=p.peak_bytes, predicted_peak_rise_bytes=p.peak_rise_bytes,
                  predicted_memory={"at_peak": p.at_peak, "category_peaks": p.category_peaks, "method": p.method,
                                    "notes": p.notes, "free_bytes": plan.free_bytes})
    return plan


def _first_call(prepared: Prepared, mode: str, seed: int, sync: Callable[[], None], gate_batch: int
                ) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """The variant's first call, on the first ``gate_batch`` samples (as the reference ran), for the gate."""
    full_inputs = prepared.inputs
    if gate_batch < full_inputs.shape[0]:
        prepared.inputs = full_inputs[:gate_batch].detach().requires_grad_(full_inputs.requires_grad)
    # The reference ran under the same seed: dropout draws the same mask in float32 and float64.
    torch.manual_seed(seed + 2)
    start = time.perf_counter()
    try:
        if mode == "training":
            out, grads = prepared.forward_backward()
        else:
            out, grads = prepared.forward(), []
        sync()
    finally:
        if prepared.inputs is not full_inputs:  # the timed steps run the whole batch
            prepared.inputs, prepared._loss_target = full_inputs, None
    return out, grads, time.perf_counter() - start


def _inductor_cache_misses() -> int:
    """Graphs inductor compiled so far in this process (FX graph cache misses; bypasses count as misses)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_bypass"]


def _group_state(entry: Entry, mode: str, batch: int, device: torch.device, bench_shape: bool, seed: int,
                 input_requires_grad: bool, tol_dtype: str, stages: Stages, gate_batch: int) -> GroupState:
    """Build the float64 reference (on the first ``gate_batch`` samples) and the eager cell of a group, and
    gate eager against its own bound."""
    stages.enter("float64 reference")
    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.create()
    x = entry.example_input(batch, bench=bench_shape, device=device, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed + 2)
    ref_out, ref_grads = _reference(model, x[:gate_batch], mode, input_requires_grad, seed)
    ref_out = ref_out.to("cpu")
    ref_grad = _flat(ref_grads) if ref_grads else None
    del ref_grads

    stages.enter("eager first call")
    eager = EAGER.apply(model, x, mode, input_requires_grad=input_requires_grad, seed=seed)
    sync = synchronizer(device)
    out, grads, first_call_s = _first_call(eager, mode, seed, sync, gate_batch)
    stages.enter("correctness gate")
    error = relative_error(out.float(), ref_out)
    grad_error = relative_error(_flat(grads), ref_grad) if ref_grad is not None else None
    del out, grads
    eager.zero_grad()
    bounds = EAGER_SANITY_TOLERANCE.get(tol_dtype)
    failure = None
    if bounds is not None:
        failures = [f"{what} relative error {err:.3e} > {tol:.1e}"
                    for what, err, tol in (("output", error, bounds[0]), ("gradients", grad_error, bounds[1]))
                    if err is not None and not err <= tol]
        if failures:
            failure = f"{'; '.join(failures)} ({tol_dtype}, eager's own bound) against the float64 reference"
    return GroupState(ref_out, ref_grad, error, grad_error, None if failure else eager, failure, first_call_s,
                      gate_batch=gate_batch)


EAGER = parse_variant("eager")


def eager_gate(name: str, mode: str, batch: int, device: torch.device | str = "cpu", *, bench_shape: bool,
               seed: int = 0) -> GroupState:
    """Eager float32 of one group against its float64 reference and its own bound (what a group's first cell
    does before any variant): ``eager_failure`` is None when eager passes."""
    entry = get_entry(name)
    device = torch.device(device)
    return _group_state(entry, mode, batch, device, bench_shape, seed, entry.kind == "block",
                        tolerance_dtype(EAGER, device), Stages({}), batch)


def _run_cell(entry: Entry, variant: Variant, mode: str, batch: int, device: torch.device, bench_shape: bool,
              seed: int, policy: TimingPolicy, run_rounds: RoundRunner, flops: bool, tol_dtype: str,
              base: dict[str, Any], progress: dict[str, Any], paired: bool, groups: GroupCache,
              memory_model: str) -> Record:
    result = progress["result"]
    stages = Stages(progress)
    stages.enter("build")
    # The skip check and the memory plan come before anything is allocated on the device.
    with torch.device("meta"):
        base["params"] = sum(p.numel() for p in entry.create().parameters())
        reason = variant.skip_reason(device, entry.create())
    if reason:
        return Record(status="skipped", reason=reason, **base)
    stages.enter("memory prediction")
    plan = _plan(entry, variant, mode, batch, device, bench_shape, seed, result, memory_model)
    gate_batch = plan.gate_batch if plan is not None else batch
    result["gate_batch"] = gate_batch
    if plan is not None and not plan.variant_fits:
        return Record(status="oom", reason=(
            f"predicted: the step needs at least {format_bytes(plan.variant.peak_bytes)} of tensors and "
            f"{device} has {format_bytes(plan.free_bytes)} free; not run"), **base, **result)
    if gate_batch < 1:
        return Record(status="oom", reason=(
            f"predicted: the float64 reference does not fit at batch 1 ({format_bytes(plan.reference_peak_bytes)}"
            f" at batch 1 against {format_bytes(plan.free_bytes)} free), so the cell cannot be gated; not run"),
            **base, **result)
    stages.enter("build")
    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.create()
    x = entry.example_input(batch, bench=bench_shape, device=device,
                            generator=torch.Generator().manual_seed(seed + 1))
    # A block's input comes from earlier layers and needs its gradient; a network's input is data.
    input_requires_grad = entry.kind == "block"
    sync = synchronizer(device)

    entry_key = (entry.name, str(device), bench_shape, seed)
    group_key = (mode, batch)
    group = groups.get(entry_key, group_key)
    if group is None:
        group = _group_state(entry, mode, batch, device, bench_shape, seed, input_requires_grad, tol_dtype, stages,
                             gate_batch)
        groups.put(group_key, group)
    # The group's reference decides the gate's batch (its first cell planned it).
    result.update(eager_rel_error=group.eager_error, eager_grad_rel_error=group.eager_grad_error,
                  gate_batch=group.gate_batch)

    timed_is_eager = variant.name == "eager" and not paired
    if timed_is_eager:
        # The eager cell is the group's eager, gated already against its own bound.
        if group.eager is None:
            return Record(status="failed", reason=group.eager_failure, **base, **result,
                          rel_error=group.eager_error, grad_rel_error=group.eager_grad_error,
                          tolerance=EAGER_SANITY_TOLERANCE[tol_dtype][0],
                          grad_tolerance=EAGER_SANITY_TOLERANCE[tol_dtype][1] if mode == "training" else None)
        prepared = group.eager
        first_call_s = group.eager_first_call_s
        out_error, grad_error = group.eager_error, group.eager_grad_error
        tolerance, grad_tolerance = EAGER_SANITY_TOLERANCE.get(tol_dtype, (REL_TOLERANCE[tol_dtype],
                                                                          GRAD_REL_TOLERANCE[tol_dtype]))
        del model, x
    else:
        stages.enter("variant")
        if variant.compile_mode is not None:
            # A fresh trace per cell: kept, dynamo's cache would compile a second batch size with a dynamic
            # batch dimension (automatic dynamic shapes: other kernels than a static compile's) and count
            # every cell against its recompile limit. Inductor's on-disk cache outlives the reset, so what a
            # reset costs is dynamo's trace, not code generation (``compile_cache`` says which it was).
            torch._dynamo.reset()
        prepared = variant.apply(model, x, mode, input_requires_grad=input_requires_grad, seed=seed)
        stages.enter("compile" if variant.compile_mode is not None else "first call",
                     "first call (compile)" if variant.compile_mode is not None else "first call")
        misses = _inductor_cache_misses()
        out, grads, first_call_s = _first_call(prepared, mode, seed, sync, group.gate_batch)
        if variant.compile_mode is not None:
            result["compile_time_s"] = first_call_s
            result["compile_cache"] = "cold" if _inductor_cache_misses() > misses else "warm"
        stages.enter("correctness gate")
        out_error = relative_error(out.float(), group.ref_out)
        grad_error = relative_error(_flat(grads), group.ref_grad) if group.ref_grad is not None else None
        del out, grads
        eager_ok = group.eager is not None
        tolerance = gate_tolerance(tol_dtype, group.eager_error if eager_ok else None)
        grad_tolerance = gate_tolerance(tol_dtype, group.eager_grad_error if eager_ok else None, gradients=True)
        prepared.zero_grad()
    if mode != "training":
        grad_tolerance = None
    result.update(rel_error=out_error, grad_rel_error=grad_error)
    base.update(tolerance=tolerance, grad_tolerance=grad_tolerance)
    failures = [f"{what} relative error {err:.3e} > {tol:.1e}"
                for what, err, tol in (("output", out_error, tolerance), ("gradients", grad_error, grad_tolerance))
                if err is not None and tol is not None and not err <= tol]
    if failures:
        if group.eager is None:
            rule = "fixed table, eager failed its own bound"
        elif tol_dtype in ACCURACY_FLOOR:
            rule = f"{ACCURACY_MULTIPLIER:g}x eager's error + floor"
        else:
            rule = f"fixed table or {ACCURACY_MULTIPLIER:g}x eager's error scaled to {tol_dtype}'s unit roundoff"
        reason = f"{'; '.join(failures)} ({tol_dtype}: {rule}) against the float64 reference"
        result["wall_split_s"] = stages.close()
        return Record(status="failed", reason=reason, **base, **result)
    if variant.triton and triton_interpreted(device):
        result["wall_split_s"] = stages.close()
        return Record(status="skipped", **base, **result, reason=(
            f"correctness checked (relative error {result['rel_error']:.2e}); not timed: TRITON_INTERPRET=1 "
            "runs the kernels in the interpreter"))

    timed_step = SyncedStep(prepared.step, sync)

    baseline = group.eager if paired and group.eager is not None and group.eager is not prepared else None

    def eager_step() -> None:
        baseline.step()
        sync()

    stages.enter("warm-up")
    # The load is read from here to the last round: /proc/stat ticks at 100 Hz, and a cell that meets its
    # target in a dozen short rounds would otherwise be judged on one or two ticks.
    monitor = LoadMonitor(device)
    monitor.start()
    warmup_steps, warmup_s = warm_up(timed_step, policy)
    if baseline is not None:
        # Warm once per group. After an earlier cell warmed it, one step refills the allocator's cache: each
        # block of eager rounds starts after the variant's block anyway (pair_block), and its median, not a
        # longer warm-up, is what discounts that first round.
        if group.eager_warm:
            start = time.perf_counter()
            eager_step()
            eager_step_s = time.perf_counter() - start
        else:
            steps, seconds = warm_up(eager_step, policy)
            eager_step_s = seconds / max(steps, 1)
        group.eager_warm = True
    if prepared is group.eager:
        group.eager_warm = True
    # An eager variant's first call (cuDNN's algorithm search, allocator growth) is warm-up too.
    result.update(warmup_steps=warmup_steps,
                  warmup_time_s=warmup_s + (0.0 if variant.compile_mode is not None else first_call_s))

    stages.enter("memory")
    # On a GPU the allocator counts the group's eager state too; it is not this cell's.
    resident = _live_bytes(baseline) if baseline is not None and device.type == "cuda" else 0
    peak, rise, method = step_memory(prepared, timed_step, device)
    result.update(peak_memory_bytes=peak - resident, peak_memory_rise_bytes=rise, memory_method=method)

    stages.enter("timing")
    def time_rounds() -> tuple[list[float], list[float]]:
        if baseline is not None:
            result["pair_block"] = pair_block(min(warmup_s / max(warmup_steps, 1), eager_step_s))
            return paired_rounds(timed_step, eager_step, policy, run_rounds, result["pair_block"])
        return adaptive_rounds(timed_step, policy, run_rounds), []

    faults = minor_faults()
    times, eager_times = time_rounds()
    faults = minor_faults() - faults
    if isinstance(run_rounds, DeviceClockRounds):  # issue 14: clocks, throttling, device times
        retimed: list[list[float]] = []
        times = run_rounds.retime_if_throttled(lambda: retimed.append(time_rounds()) or retimed[-1][0], times)
        if retimed:
            eager_times = retimed[-1][1]
        result.update(run_rounds.record_fields())
    load = monitor.stop(base["threads"])
    load["minor_faults_per_round"] = faults / (len(times) + len(eager_times))
    result["timing_stop"] = stop_reason(max(median_ci_rel(times), median_ci_rel(eager_times) if eager_times else 0.0),
                                        len(times), sum(times) + sum(eager_times), policy)
    median = statistics.median(times)
    mean = statistics.fmean(times)
    ci = median_ci_rel(times)
    result.update(
        times_s=times, rounds=len(times), step_time_median_s=median, step_time_mean_s=mean,
        step_time_p20_s=quantile(times, 0.2), step_time_p80_s=quantile(times, 0.8),
        step_time_cv=statistics.stdev(times) / mean if len(times) > 1 and mean > 0 else None,
        step_time_ci_rel=ci if math.isfinite(ci) else None, noise_bound_rel=policy.target_ci_rel,
        step_time_repeat_rel=repeat_interval_rel(times, device_type=device.type),
        noisy=not ci <= policy.target_ci_rel, samples_per_s=batch / median if median > 0 else None,
        contended=load.pop("contended"), machine_load=load,
    )
    if eager_times:
        ratio, low, high = paired_ratio_ci(eager_times, times)
        result.update(eager_times_s=eager_times, speedup_vs_eager=ratio, speedup_ci_low=low, speedup_ci_high=high)
    timed_s = sum(times) + sum(eager_times)

    if flops:
        stages.enter("flop count")
        if group.flops is None:
            group.flops = step_counts(entry, batch, bench_shape, mode, input_requires_grad).flops
        result["flops_per_step"] = group.flops
        if median > 0:
            result["tflops_per_s"] = result["flops_per_step"] / median / 1e12
    split = stages.close()
    split["timing"] -= timed_s
    split["timed rounds"] = timed_s
    result["wall_split_s"] = split
    return Record(status="ok", **base, **result)
