"""Measure one cell of the matrix (block x variant x mode x batch on a device) into a :class:`Record`.

A cell is a :class:`Cell` value taken through its phases (:data:`PHASES`), in this order, and why:

1. **Skip check**: a variant the device cannot run (fp16 on the CPU) is skipped with the reason, never
   replaced by another; decided on the meta device, before anything is allocated.
2. **Memory plan**: where :data:`MEMORY_MODELS` says so, the memory model predicts the step and the float64
   reference (``perfkit.measure.memory_model``): a step that cannot fit is recorded ``oom`` without
   running, and the gate runs at the largest batch whose reference fits.
3. **Build** the model and input under a fixed seed, and the group's float64 reference and eager cell
   (``perfkit.measure.correctness``; once per group, shared by its variants).
4. **First call** of the variant on the gate's batch; for a compiled variant it is the compile
   (``compile_time_s``, ``compile_cache``, and what dynamo made of the model: graphs, graph breaks, recompiles
   until the cell ends, the compile time split; ``perfkit.measure.compile_info``).
5. **Gate**: the first call's output (and gradients, in training) against the float64 reference, and the
   same on the gate's other inputs (``gate_seeds``); a cell over tolerance on any is ``failed`` and is not
   timed, so it can never read as a speedup.
6. **Interpreter skip**: a Triton variant under ``TRITON_INTERPRET=1`` is gated but not timed.
7. **Warm-up until steady**: batches of steps until two consecutive batches agree on the time per step
   within a few percent (or a time cap); a paired cell warms the group's eager too, once per group.
8. **Memory** on one separate step (``perfkit.measure.memory``): on a GPU the allocator's peak after a
   reset; on the CPU the profiler's allocator events.
9. **Timing**, adaptive and paired (``perfkit.measure.timing``): a variant's rounds are interleaved in blocks
   with the group's warm eager (``speedup_vs_eager`` with a paired-bootstrap interval).
10. **GPU re-time**: on a GPU, the rounds are timed again once if the clock fell during them, and the
    device clock's fields are recorded (``perfkit.env.gpu``).
11. **Post-timing check** on a fresh input: a variant whose output went stale or comes from a cache fails.
12. **Load**: the machine's load from warm-up to the last round (``contended``, ``machine_load``).
13. **Statistics**: the median, its intervals and why timing stopped, and the FLOPs of one step
    (``perfkit.measure.counts``, on the meta device).
14. **Floor**: the step's least possible time on the run's ceilings (``perfkit.env.ceilings``); a median far
    under it is ``impossible``, never ranked; else the ``ok`` record.

Every failure of a cell becomes its record: ``oom`` (the allocator emptied), ``error`` (a compile error,
say, with the message and the stage it happened in); the caller's loop goes on.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import perfkit.measure.memory_model as _memory_model
from perfkit.env.ceilings import bytes_lower_bound, impossible_reason, step_floor
from perfkit.env.device import device_identity
from perfkit.env.gpu import DeviceClockRounds
from perfkit.measure.compile_info import CompileWatch
from perfkit.measure.correctness import (
    GATE_SEEDS,
    GateCheck,
    GroupCache,
    GroupState,
    check_fields,
    check_on,
    gate_rule,
    group_state,
    recheck,
    set_tolerances,
    tolerance_dtype,
    verdict,
)
from perfkit.measure.counts import step_counts
from perfkit.measure.memory import live_bytes, step_memory
from perfkit.measure.memory_model import REFERENCE_HEADROOM, MemoryPlan, format_bytes, plan_cell_memory
from perfkit.measure.stages import Stages, error_message, failure, interpreted_reason, intra_op_threads
from perfkit.measure.timing import (
    MachineWatch,
    RoundRunner,
    SyncedStep,
    TimingPolicy,
    adaptive_rounds,
    clock_rounds,
    pair_block,
    paired_rounds,
    synchronizer,
    timing_fields,
    warm_up,
)
from perfkit.record import Record
from perfkit.registry import Entry, get_entry
from perfkit.variants import MODES, Prepared, Variant, parse_variant, triton_interpreted

TIMER = "time.perf_counter around one step that ends in a device synchronization"

MEMORY_MODELS = ("auto", "exact")
"""``exact``: the memory model predicts every cell. ``auto``: on a GPU, likewise; elsewhere only where
:func:`step_counts`'s bound does not clearly fit (:data:`BOUND_MARGIN`)."""

BOUND_MARGIN = 4
"""The variant's step (autocast's copies of weights and activations bounded by the float32 step) and the
float64 reference (every floating tensor twice its float32 size) each stay within twice the eager float32
step's allocation bound; where four times it fits in the reference's share of free memory, neither can run
out, and the exact prediction (0.1-0.9 s a cell on a 2-core CPU) would decide nothing."""


@dataclass
class Cell:
    """One cell while it is measured: its parameters, the record's fields so far, and what each phase learned
    for the phases after it."""

    entry: Entry
    variant: Variant
    mode: str
    batch: int
    device: torch.device
    bench_shape: bool
    seed: int
    policy: TimingPolicy
    run_rounds: RoundRunner
    flops: bool
    paired: bool
    """Time the variant's rounds interleaved with the group's eager."""
    groups: GroupCache
    memory_model: str
    tol_dtype: str
    fields: dict[str, Any]
    """The record's fields so far: each phase adds its own, and a failure is recorded with them as they stand."""
    stages: Stages = field(default_factory=Stages)
    gate_batch: int = 0
    sync: Callable[[], None] = field(default=lambda: None)
    model: nn.Module | None = None
    inputs: torch.Tensor | None = None
    group: GroupState | None = None
    prepared: Prepared | None = None
    first_call_s: float = 0.0
    gate_seeds: int = GATE_SEEDS
    """Inputs the gate checks before timing (``perfkit.measure.correctness``)."""
    ceilings: dict[str, Any] | None = None
    """The device's ceilings, measured once per run: the cell's physical floor (None: no floor)."""
    checks: list[GateCheck] = field(default_factory=list)
    """The variant's errors on each input against the float64 reference, the timed input's first."""
    timed_step: SyncedStep | None = None
    baseline: Prepared | None = None
    """The group's eager, timed beside a paired variant; None when unpaired."""
    eager_step: SyncedStep | None = None
    step_s: float = 0.0
    eager_step_s: float = 0.0
    """Time per step of the variant and of eager after warm-up: they size the pairs' blocks."""
    watch: MachineWatch | None = None
    compile_watch: CompileWatch | None = None
    """A compiled cell's view of dynamo and inductor from its first call on (``perfkit.measure.compile_info``)."""
    times: list[float] = field(default_factory=list)
    eager_times: list[float] = field(default_factory=list)

    @property
    def timed_is_eager(self) -> bool:
        """The cell times the group's eager itself (eager, unpaired)."""
        return self.variant.name == "eager" and not self.paired

    def record(self, status: str, reason: str | None = None) -> Record:
        """The cell's record with its fields so far (a compiled cell's recompiles counted up to now)."""
        if self.compile_watch is not None:
            self.fields.update(self.compile_watch.cell_fields())
        return Record(status=status, reason=reason, **self.fields)


def _skip_check(cell: Cell) -> Record | None:
    """Skip a variant the device cannot run, saying why; on the meta device, before anything is allocated."""
    cell.stages.enter("build")
    with torch.device("meta"):
        cell.fields["params"] = sum(p.numel() for p in cell.entry.create().parameters())
        reason = cell.variant.skip_reason(cell.device, cell.entry.create(), cell.mode)
    return cell.record("skipped", reason) if reason else None


def _memory_plan(cell: Cell) -> Record | None:
    """Predict the cell's memory: a step that cannot fit, or whose reference cannot at batch 1, is not run."""
    cell.stages.enter("memory prediction")
    plan = _plan(cell)
    cell.gate_batch = cell.fields["gate_batch"] = plan.gate_batch if plan is not None else cell.batch
    if plan is not None and not plan.variant_fits:
        return cell.record("oom", (
            f"predicted: the step needs at least {format_bytes(plan.variant.peak_bytes)} of tensors and "
            f"{cell.device} has {format_bytes(plan.free_bytes)} free; not run"))
    if cell.gate_batch < 1:
        return cell.record("oom", (
            f"predicted: the float64 reference does not fit at batch 1 ({format_bytes(plan.reference_peak_bytes)}"
            f" at batch 1 against {format_bytes(plan.free_bytes)} free), so the cell cannot be gated; not run"))
    return None


def _plan(cell: Cell) -> MemoryPlan | None:
    """The cell's memory plan, its prediction filed in the record's fields; None (with the reason filed) where
    the memory model is not needed (``memory_model`` ``auto`` off a GPU, with memory to spare) or cannot run
    this cell: the cell then runs as it would without a plan."""
    entry, fields = cell.entry, cell.fields
    if cell.memory_model == "auto" and cell.device.type != "cuda":
        try:
            bound = step_counts(entry, cell.batch, cell.bench_shape, cell.mode, entry.kind == "block").bound_bytes
        except Exception:  # the meta pass failed; the memory model below says why (or the cell will)
            bound = None
        free = _memory_model.free_memory_bytes(cell.device)
        if bound is not None and (free is None or BOUND_MARGIN * bound <= REFERENCE_HEADROOM * free):
            fields["predicted_memory"] = {
                "method": "bound", "bound_bytes": bound, "free_bytes": free,
                "notes": [f"not predicted: {BOUND_MARGIN} x the eager step's allocation bound "
                          f"({format_bytes(bound)}) fits in free memory; --perfkit-memory-model exact predicts it"]}
            return None
    try:
        plan = plan_cell_memory(entry.name, cell.variant, cell.mode, cell.batch, bench_shape=cell.bench_shape,
                                device=cell.device, seed=cell.seed)
    except Exception as error:  # a fake-tensor gap must not cost the cell its measurement
        fields["predicted_memory"] = {"error": error_message(error, 300)}
        return None
    p = plan.variant
    fields.update(predicted_peak_bytes=p.peak_bytes, predicted_peak_rise_bytes=p.peak_rise_bytes,
                  predicted_memory={"at_peak": p.at_peak, "category_peaks": p.category_peaks, "method": p.method,
                                    "notes": p.notes, "free_bytes": plan.free_bytes})
    return plan


def _build(cell: Cell) -> None:
    """The model and input under the cell's seed, and the group's reference and eager (its first cell's job)."""
    cell.stages.enter("build")
    torch.manual_seed(cell.seed)
    with torch.device(cell.device):
        cell.model = cell.entry.create()
    cell.inputs = cell.entry.example_input(cell.batch, bench=cell.bench_shape, device=cell.device,
                                           generator=torch.Generator().manual_seed(cell.seed + 1))
    cell.sync = synchronizer(cell.device)
    group_key = (cell.mode, cell.batch)
    group = cell.groups.get((cell.entry.name, str(cell.device), cell.bench_shape, cell.seed, cell.gate_seeds),
                            group_key)
    if group is None:
        group = group_state(cell.entry, cell.mode, cell.batch, cell.device, cell.bench_shape, cell.seed,
                            cell.tol_dtype, cell.stages, cell.gate_batch, cell.sync, cell.gate_seeds)
        cell.groups.put(group_key, group)
    cell.group = group
    # The group's reference decides the gate's batch (its first cell planned it).
    cell.fields.update(eager_rel_error=group.eager_error, eager_grad_rel_error=group.eager_grad_error,
                       gate_batch=group.gate_batch)


def _first_call(cell: Cell) -> None:
    """The variant's first call on the gate's batch, and its errors; for a compiled variant, the compile."""
    group = cell.group
    if cell.timed_is_eager:
        # The eager cell is the group's eager, gated already against its own bound.
        cell.prepared, cell.first_call_s = group.eager, group.eager_first_call_s
        cell.checks = list(group.eager_checks)
        cell.model = cell.inputs = None
        return
    cell.stages.enter("variant")
    compiled = cell.variant.compiled
    if compiled:
        # A fresh trace per cell: kept, dynamo's cache would compile a second batch size with a dynamic
        # batch dimension (automatic dynamic shapes: other kernels than a static compile's) and count
        # every cell against its recompile limit. Inductor's on-disk cache outlives the reset, so what a
        # reset costs is dynamo's trace, not code generation (``compile_cache`` says which it was).
        torch._dynamo.reset()
    cell.prepared = cell.variant.apply(cell.model, cell.inputs, cell.mode,
                                       input_requires_grad=cell.entry.kind == "block", seed=cell.seed)
    cell.fields.update(cell.prepared.record_fields)
    cell.model = cell.inputs = None
    cell.stages.enter("compile" if compiled else "first call", "first call (compile)" if compiled else "first call")
    cell.compile_watch = CompileWatch() if compiled else None
    first, cell.first_call_s = check_on(cell.prepared, cell.mode, group.references[0], cell.sync)
    if compiled:
        cell.fields.update(cell.compile_watch.first_call_fields(cell.first_call_s))
    cell.stages.enter("correctness gate")
    # The gate's other inputs: a variant answering with its first output, or from a cache, fails on them.
    cell.checks = [first] + [check_on(cell.prepared, cell.mode, r, cell.sync)[0] for r in group.references[1:]]


def _gate(cell: Cell) -> Record | None:
    """Hold the variant's errors on each of the gate's inputs to the cell's tolerance: a cell over it on any is
    ``failed`` and never timed."""
    group = cell.group
    if not cell.timed_is_eager:  # the eager cell's checks are the group's, held to eager's own bound
        set_tolerances(cell.checks, group, cell.tol_dtype, cell.mode, eager_itself=False)
    cell.fields.update(check_fields(cell.checks))
    if cell.timed_is_eager and group.eager is None:
        return cell.record("failed", group.eager_failure)
    reason = verdict(cell.checks, gate_rule(cell.tol_dtype, group.eager is not None, cell.timed_is_eager))
    if reason is None:
        return None
    cell.fields["wall_split_s"] = cell.stages.close()
    return cell.record("failed", reason)


def _interpreter_skip(cell: Cell) -> Record | None:
    """A Triton variant in the interpreter is gated, not timed: the interpreter's times say nothing."""
    if not (cell.variant.triton and triton_interpreted(cell.device)):
        return None
    cell.fields["wall_split_s"] = cell.stages.close()
    return cell.record("skipped", interpreted_reason(cell.fields["rel_error"]))


def _warm_up(cell: Cell) -> None:
    """Warm the variant until steady, and beside it the group's eager when the cell is paired."""
    prepared, group = cell.prepared, cell.group
    cell.timed_step = SyncedStep(prepared.step, cell.sync)
    if cell.paired and group.eager is not None and group.eager is not prepared:
        cell.baseline = group.eager
        cell.eager_step = SyncedStep(group.eager.step, cell.sync)
    cell.stages.enter("warm-up")
    cell.watch = MachineWatch(cell.device)
    steps, seconds = warm_up(cell.timed_step, cell.policy)
    cell.step_s = seconds / max(steps, 1)
    if cell.eager_step is not None:
        cell.eager_step_s = _warm_eager(cell)
    if cell.eager_step is not None or prepared is group.eager:
        group.eager_warm = True
    # An eager variant's first call (cuDNN's algorithm search, allocator growth) is warm-up too.
    cell.fields.update(warmup_steps=steps,
                       warmup_time_s=seconds + (0.0 if cell.variant.compiled else cell.first_call_s))


def _warm_eager(cell: Cell) -> float:
    """Warm the group's eager, once per group; its time per step."""
    # After an earlier cell warmed it, one step refills the allocator's cache: each block of eager rounds
    # starts after the variant's block anyway (pair_block), and its median, not a longer warm-up, is what
    # discounts that first round.
    if cell.group.eager_warm:
        start = time.perf_counter()
        cell.eager_step()
        return time.perf_counter() - start
    steps, seconds = warm_up(cell.eager_step, cell.policy)
    return seconds / max(steps, 1)


def _memory(cell: Cell) -> None:
    """The peak memory of one separate step."""
    cell.stages.enter("memory")
    # On a GPU the allocator counts the group's eager state too; it is not this cell's.
    resident = live_bytes(cell.baseline) if cell.baseline is not None and cell.device.type == "cuda" else 0
    peak, rise, method = step_memory(cell.prepared, cell.timed_step, cell.device)
    cell.fields.update(peak_memory_bytes=peak - resident, peak_memory_rise_bytes=rise, memory_method=method)


def _timing(cell: Cell) -> None:
    """The timed rounds (and eager's, when paired), until the median is known well enough or a cap is hit."""
    cell.stages.enter("timing")
    cell.watch.rounds_start()
    cell.times, cell.eager_times = _time_rounds(cell)
    cell.watch.rounds_end()


def _time_rounds(cell: Cell) -> tuple[list[float], list[float]]:
    """(the cell's round times, eager's): paired in blocks sized to the steps, or the cell's alone."""
    if cell.eager_step is None:
        return adaptive_rounds(cell.timed_step, cell.policy, cell.run_rounds), []
    cell.fields["pair_block"] = pair_block(min(cell.step_s, cell.eager_step_s))
    return paired_rounds(cell.timed_step, cell.eager_step, cell.policy, cell.run_rounds, cell.fields["pair_block"])


def _gpu_retime(cell: Cell) -> None:
    """On a GPU, time again once if the clock fell during the rounds; record the device clock's fields."""
    clock = cell.run_rounds
    if not isinstance(clock, DeviceClockRounds):
        return
    retimed: list[tuple[list[float], list[float]]] = []

    def time_again() -> list[float]:
        retimed.append(_time_rounds(cell))
        return retimed[-1][0]

    cell.times = clock.retime_if_throttled(time_again, cell.times)
    if retimed:
        cell.eager_times = retimed[-1][1]
    cell.fields.update(clock.record_fields())


def _recheck(cell: Cell) -> Record | None:
    """The variant once more after its timed steps, on an input it has never seen: one whose output went stale
    or comes from a cache is ``failed``, never ranked."""
    cell.stages.enter("post-timing check")
    check = recheck(cell.prepared, cell.group, cell.mode, cell.sync)
    set_tolerances([check], cell.group, cell.tol_dtype, cell.mode, eager_itself=cell.timed_is_eager)
    cell.checks.append(check)
    cell.fields.update(check_fields(cell.checks))
    reason = verdict([check], gate_rule(cell.tol_dtype, cell.group.eager is not None, cell.timed_is_eager))
    if reason is None:
        return None
    cell.fields["wall_split_s"] = cell.stages.close(timed_s=sum(cell.times) + sum(cell.eager_times))
    return cell.record("failed", reason)


def _load(cell: Cell) -> None:
    """The machine's load over warm-up and rounds, and whether other work crowded the cell."""
    cell.fields.update(cell.watch.fields(cell.fields["threads"], len(cell.times) + len(cell.eager_times)))


def _statistics(cell: Cell) -> None:
    """The rounds' statistics, and the FLOPs of one step (counted once per group)."""
    cell.fields.update(timing_fields(cell.times, cell.eager_times, cell.policy, batch=cell.batch,
                                     device_type=cell.device.type))
    if cell.flops:
        cell.stages.enter("flop count")
        group = cell.group
        if group.flops is None:
            group.flops = step_counts(cell.entry, cell.batch, cell.bench_shape, cell.mode,
                                      cell.entry.kind == "block").flops
        cell.fields["flops_per_step"] = group.flops
        median = cell.fields["step_time_median_s"]
        if median > 0:
            cell.fields["tflops_per_s"] = group.flops / median / 1e12
    cell.fields["wall_split_s"] = cell.stages.close(timed_s=sum(cell.times) + sum(cell.eager_times))


def _floor(cell: Cell) -> Record | None:
    """The step's physical floor on the run's ceilings (``perfkit.env.ceilings``); a median far under it is
    ``impossible``: the step did not do the work it is counted for, and is never ranked."""
    fields = cell.fields
    bytes_moved = bytes_lower_bound(fields.get("params"), fields.get("input_shape"), fields["dtype"], cell.mode)
    floor = step_floor(fields.get("flops_per_step"), bytes_moved, cell.ceilings, fields["dtype"])
    if floor is None:
        return None
    fields.update(step_time_floor_s=floor.step_time_s, step_time_floor_bound=floor.bound)
    reason = impossible_reason(floor, fields["step_time_median_s"])
    return cell.record("impossible", reason) if reason else None


PHASES: tuple[Callable[[Cell], Record | None], ...] = (
    _skip_check, _memory_plan, _build, _first_call, _gate, _interpreter_skip, _warm_up, _memory, _timing,
    _gpu_retime, _recheck, _load, _statistics, _floor,
)
"""A cell's phases in order (the module's docstring says why); one that returns a record ends the cell."""


def _run_cell(cell: Cell) -> Record:
    """The cell through :data:`PHASES` until one records it; past the last, it is ``ok``."""
    for phase in PHASES:
        record = phase(cell)
        if record is not None:
            return record
    return cell.record("ok")


def measure_cell(name: str, variant: str | Variant, mode: str, batch: int, device: torch.device | str, *,
                 bench_shape: bool, seed: int = 0, policy: TimingPolicy | None = None,
                 run_rounds: RoundRunner = clock_rounds, flops: bool = True, paired: bool | None = None,
                 groups: GroupCache | None = None, threads: int | None = None, memory_model: str = "auto",
                 gate_seeds: int = GATE_SEEDS, ceilings: dict[str, Any] | None = None) -> Record:
    """Gate, warm up, measure memory, time and count one cell; every failure becomes the record's status.

    ``run_rounds`` runs the timed rounds (the benchmark passes one that records them in pytest-benchmark).
    ``paired`` interleaves the variant's rounds with eager's (default: every variant but eager itself);
    ``groups`` shares the float64 reference and the warm eager cell between the cells of a group (default:
    nothing shared); ``threads`` sets torch's intra-op threads for the cell (default: as they are);
    ``memory_model`` says when the memory model predicts the cell (:data:`MEMORY_MODELS`); ``gate_seeds`` how
    many inputs the gate checks before timing; ``ceilings`` the device's, measured once per run
    (``perfkit.env.ceilings.run_ceilings``), bound the step's time (default: no floor, never ``impossible``).
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
    if gate_seeds < 1:
        raise ValueError(f"gate_seeds must be at least 1 (the timed input), got {gate_seeds}")
    device = torch.device(device)
    if device.type == "cuda" and not isinstance(run_rounds, DeviceClockRounds):
        run_rounds = DeviceClockRounds(run_rounds, device)  # the device's clock beside the host's
    shape = entry.bench_shape if bench_shape else entry.test_shape
    with intra_op_threads(threads) as cell_threads:
        cell = Cell(entry, variant, mode, batch, device, bench_shape, seed, policy or TimingPolicy(), run_rounds,
                    flops, paired if paired is not None else variant.name != "eager", groups or GroupCache(),
                    memory_model, tolerance_dtype(variant, device), fields=dict(
                        block=name, variant=variant.name, mode=mode, dtype=variant.compute_dtype, batch=batch,
                        kind=entry.kind, input_shape=[batch, *shape], device=device_identity(device), timer=TIMER,
                        threads=cell_threads, ceilings=ceilings), gate_seeds=gate_seeds, ceilings=ceilings)
        try:
            return _run_cell(cell)
        except Exception as error:  # every failure of a cell is recorded, the matrix goes on
            status, reason = failure(error, cell.stages.label)
    fields = cell.fields
    # Out of the except block the traceback (and the tensors its frames hold) is gone; with the cell's own
    # tensors dropped too, the memory can be freed.
    del cell
    if groups is not None and status == "oom":
        groups.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Record(status=status, reason=reason, **fields)
