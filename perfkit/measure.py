"""Measure one cell of the matrix (block x variant x mode x batch on a device) into a :class:`Record`.

The order of work in a cell, and why:

1. **Skip** a variant the device cannot run (fp16 on the CPU), with the reason; never substitute another.
2. **Correctness gate.** The model is built under a fixed seed and deep-copied to float64 on the same
   device; the float64 copy runs the same batch (inference: the output; training: the output and every
   gradient after one forward and backward). The variant's relative error ``‖a − ref‖/‖ref‖`` is checked
   against ``perfkit.testing.REL_TOLERANCE`` for its compute dtype (``tf32`` for float32 on a GPU that
   allows it), the gradients' against ``GRAD_REL_TOLERANCE``. A cell over tolerance is ``failed`` and is
   not timed, so it can never read as a speedup.
   The gate's call is the variant's first call, so for a compiled variant it is the compile time.
3. **Warm-up until steady**: batches of steps until two consecutive batches agree on the time per step
   within a few percent (or a time cap).
4. **Memory** on one separate step: on a GPU the allocator's peak after a reset; on the CPU, where the
   allocator keeps no peak, the profiler's allocator events (``perfkit.memory``).
5. **Timing, adaptive**: rounds of one step each, each ending in a device synchronization, added in
   growing chunks until the distribution-free 95% confidence interval of the median is within a target
   (±2% by default) or a round/time cap is reached; a cell still above the target is flagged ``noisy``.
   This is nvbench's stopping rule on the median rather than the mean (a GPU's step times are skewed by
   rare slow rounds). ``torch.utils.benchmark``'s ``adaptive_autorange`` is not used because it times
   blocks of many steps and keeps no per-step times; the comparison of runs needs every round.
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
from torch.utils.flop_counter import FlopCounterMode

from perfkit.device import device_identity
from perfkit.gpu import DeviceClockRounds
from perfkit.memory import METHOD as CPU_MEMORY_METHOD
from perfkit.memory import cpu_step_memory
from perfkit.memory_model import MemoryPlan, format_bytes, plan_cell_memory
from perfkit.record import Record
from perfkit.registry import Entry, get_entry
from perfkit.testing import GRAD_REL_TOLERANCE, REL_TOLERANCE, relative_error
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

RoundRunner = Callable[[Callable[[], None], int], list[float]]
"""``run(step, n)`` runs ``n`` timed rounds of one synchronizing step and returns their times in seconds."""


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


QUICK_POLICY = TimingPolicy(min_rounds=6, max_rounds=200, max_time_s=1.0, warmup_batch_s=0.02, warmup_max_s=1.0)
"""Sized for the quick profile on a small CPU: a looser time budget, the same stopping rule."""


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class SyncedStep:
    """One step's work followed by the device's synchronization; calling it runs both.

    The two halves stay apart so a device clock (``perfkit.gpu.DeviceClockRounds``) can record its end
    event after the work is queued and before the host waits.
    """

    work: Callable[[], None]
    sync: Callable[[], None]

    def __call__(self) -> None:
        self.work()
        self.sync()


def clock_rounds(step: Callable[[], None], n: int) -> list[float]:
    """Time ``n`` calls of ``step`` (which synchronizes) with ``time.perf_counter``."""
    times = []
    for _ in range(n):
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

    def _clock(self, step: Callable[[], None], n: int) -> list[float]:
        times = []
        for _ in range(n):
            if self.setup is not None:
                self.setup()
            times += clock_rounds(step, 1)
        return times

    def __call__(self, step: Callable[[], None], n: int) -> list[float]:
        if self.benchmark.disabled:
            return self._clock(step, n)
        if self.benchmark.stats is None:
            self.benchmark.pedantic(step, setup=self.setup, rounds=n, iterations=1, warmup_rounds=0)
            return list(self.benchmark.stats.stats.data)
        times = self._clock(step, n)
        for duration in times:
            self.benchmark.stats.stats.update(duration)
        return times


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


def adaptive_rounds(step: Callable[[], None], policy: TimingPolicy, run: RoundRunner = clock_rounds) -> list[float]:
    """Time rounds of ``step`` in growing chunks until the median's CI is within target or a cap is hit."""
    times: list[float] = []
    chunk = policy.min_rounds
    while True:
        times += run(step, chunk)
        if median_ci_rel(times) <= policy.target_ci_rel or len(times) >= policy.max_rounds:
            return times
        spent = sum(times)
        if spent >= policy.max_time_s:
            return times
        per_round = spent / len(times)
        room = min(policy.max_rounds - len(times), int((policy.max_time_s - spent) / per_round))
        # Grow by half of what was run: the CI narrows as 1/sqrt(n), so doubling n costs what it buys.
        chunk = max(1, min(room, max(policy.min_rounds, len(times) // 2)))
        if room < 1:
            return times


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


def step_flops(entry: Entry, batch: int, bench_shape: bool, mode: str, input_requires_grad: bool) -> int:
    """FLOPs of one eager step (forward; in training also the loss and backward), counted on meta tensors.

    The count matches the timed step: the input's gradient is computed only for blocks (as inside a
    network), and the loss is the step's own. The counter counts a multiply-add as two FLOPs.
    """
    training = mode == "training"
    with torch.device("meta"):
        module = entry.create()
    module.train(training)
    shape = entry.bench_shape if bench_shape else entry.test_shape
    x = torch.empty((batch, *shape), device="meta", requires_grad=training and input_requires_grad)
    with FlopCounterMode(display=False) as counter:
        if training:
            out = module(x)
            target = (torch.zeros(out.shape[0], dtype=torch.int64, device="meta") if out.dim() == 2
                      else torch.empty(out.shape, device="meta"))
            training_loss(out.float(), target).backward()
        else:
            with torch.no_grad():
                module(x)
    return int(counter.get_total_flops())


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


def measure_cell(name: str, variant: str | Variant, mode: str, batch: int, device: torch.device | str, *,
                 bench_shape: bool, seed: int = 0, policy: TimingPolicy | None = None,
                 run_rounds: RoundRunner = clock_rounds, flops: bool = True) -> Record:
    """Gate, warm up, measure memory, time and count one cell; every failure becomes the record's status.

    ``run_rounds`` runs the timed rounds (the benchmark passes one that records them in pytest-benchmark).
    Raises only for a bad argument (unknown block, variant or mode), never for a cell that fails.
    """
    entry = get_entry(name)
    variant = parse_variant(variant)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    device = torch.device(device)
    if device.type == "cuda" and not isinstance(run_rounds, DeviceClockRounds):
        run_rounds = DeviceClockRounds(run_rounds, device)  # issue 14: the device clock beside the host's
    shape = entry.bench_shape if bench_shape else entry.test_shape
    tol_dtype = tolerance_dtype(variant, device)
    base: dict[str, Any] = dict(
        block=name, variant=variant.name, mode=mode, dtype=variant.compute_dtype, batch=batch, kind=entry.kind,
        input_shape=[batch, *shape], device=device_identity(device), tolerance=REL_TOLERANCE[tol_dtype],
        grad_tolerance=GRAD_REL_TOLERANCE[tol_dtype] if mode == "training" else None,
        timer=TIMER,
    )
    progress: dict[str, Any] = {"stage": "build", "result": {}}
    try:
        return _run_cell(entry, variant, mode, batch, device, bench_shape, seed, policy or TimingPolicy(),
                         run_rounds, flops, tol_dtype, base, progress)
    except Exception as error:  # every failure of a cell is recorded, the matrix goes on
        status = "oom" if is_oom(error) else "error"
        reason = f"{progress['stage']}: {error_message(error)}"
    # Out of the except block, the traceback (and the tensors its frames hold) is gone: free the memory.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Record(status=status, reason=reason, **base, **progress["result"])


def _plan(entry: Entry, variant: Variant, mode: str, batch: int, device: torch.device, bench_shape: bool,
          seed: int, result: dict[str, Any]) -> MemoryPlan | None:
    """The cell's memory plan, its prediction filed in ``result``; None (with the reason filed) where the
    memory model cannot run this cell: the cell then runs as it would without a plan."""
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


def _run_cell(entry: Entry, variant: Variant, mode: str, batch: int, device: torch.device, bench_shape: bool,
              seed: int, policy: TimingPolicy, run_rounds: RoundRunner, flops: bool, tol_dtype: str,
              base: dict[str, Any], progress: dict[str, Any]) -> Record:
    result = progress["result"]
    # The skip check and the memory plan come before anything is allocated on the device.
    with torch.device("meta"):
        base["params"] = sum(p.numel() for p in entry.create().parameters())
        reason = variant.skip_reason(device, entry.create())
    if reason:
        return Record(status="skipped", reason=reason, **base)
    progress["stage"] = "memory prediction"
    plan = _plan(entry, variant, mode, batch, device, bench_shape, seed, result)
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

    torch.manual_seed(seed)
    with torch.device(device):
        model = entry.create()
    x = entry.example_input(batch, bench=bench_shape, device=device,
                            generator=torch.Generator().manual_seed(seed + 1))
    # A block's input comes from earlier layers and needs its gradient; a network's input is data.
    input_requires_grad = entry.kind == "block"

    progress["stage"] = "float64 reference"
    ref_out, ref_grads = _reference(model, x[:gate_batch], mode, input_requires_grad, seed)
    ref_out = ref_out.to("cpu")
    ref_grad = _flat(ref_grads) if ref_grads else None
    del ref_grads

    progress["stage"] = "variant"
    if variant.compile_mode is not None:
        # A fresh compile per cell: dynamo's caches are keyed on code, and a cell must not reuse (or
        # exhaust the recompile limit with) another cell's graphs.
        torch._dynamo.reset()
    prepared = variant.apply(model, x, mode, input_requires_grad=input_requires_grad, seed=seed)
    sync = synchronizer(device)

    progress["stage"] = "first call (compile)" if variant.compile_mode is not None else "first call"
    full_inputs = prepared.inputs
    if gate_batch < batch:  # the gate runs on the first gate_batch samples, as the reference did
        prepared.inputs = full_inputs[:gate_batch].detach().requires_grad_(full_inputs.requires_grad)
    start = time.perf_counter()
    if mode == "training":
        out, grads = prepared.forward_backward()
    else:
        out, grads = prepared.forward(), []
    sync()
    first_call_s = time.perf_counter() - start
    if variant.compile_mode is not None:
        result["compile_time_s"] = first_call_s
    if gate_batch < batch:
        prepared.inputs, prepared._loss_target = full_inputs, None

    progress["stage"] = "correctness gate"
    out_error = relative_error(out.float(), ref_out)
    result["rel_error"] = out_error
    if ref_grad is not None:
        result["grad_rel_error"] = relative_error(_flat(grads), ref_grad)
    del out, grads, ref_out, ref_grad
    failures = [f"{what} relative error {err:.3e} > {tol:.1e}"
                for what, err, tol in (("output", out_error, base["tolerance"]),
                                       ("gradients", result.get("grad_rel_error"), base["grad_tolerance"]))
                if err is not None and err > tol]
    if failures:
        reason = f"{'; '.join(failures)} ({tol_dtype}) against the float64 reference"
        return Record(status="failed", reason=reason, **base, **result)
    prepared.zero_grad()
    if variant.triton and triton_interpreted(device):
        return Record(status="skipped", **base, **result, reason=(
            f"correctness checked (relative error {result['rel_error']:.2e}); not timed: TRITON_INTERPRET=1 "
            "runs the kernels in the interpreter"))

    timed_step = SyncedStep(prepared.step, sync)

    progress["stage"] = "warm-up"
    warmup_steps, warmup_s = warm_up(timed_step, policy)
    # An eager variant's first call (cuDNN's algorithm search, allocator growth) is warm-up too.
    result.update(warmup_steps=warmup_steps,
                  warmup_time_s=warmup_s + (0.0 if variant.compile_mode is not None else first_call_s))

    progress["stage"] = "memory"
    peak, rise, method = step_memory(prepared, timed_step, device)
    result.update(peak_memory_bytes=peak, peak_memory_rise_bytes=rise, memory_method=method)

    progress["stage"] = "timing"
    times = adaptive_rounds(timed_step, policy, run_rounds)
    if isinstance(run_rounds, DeviceClockRounds):  # issue 14: clocks, throttling, device times
        times = run_rounds.retime_if_throttled(lambda: adaptive_rounds(timed_step, policy, run_rounds), times)
        result.update(run_rounds.record_fields())
    median = statistics.median(times)
    mean = statistics.fmean(times)
    ci = median_ci_rel(times)
    result.update(
        times_s=times, rounds=len(times), step_time_median_s=median, step_time_mean_s=mean,
        step_time_p20_s=quantile(times, 0.2), step_time_p80_s=quantile(times, 0.8),
        step_time_cv=statistics.stdev(times) / mean if len(times) > 1 and mean > 0 else None,
        step_time_ci_rel=ci if math.isfinite(ci) else None, noise_bound_rel=policy.target_ci_rel,
        noisy=not ci <= policy.target_ci_rel, samples_per_s=batch / median if median > 0 else None,
    )

    if flops:
        progress["stage"] = "flop count"
        result["flops_per_step"] = step_flops(entry, batch, bench_shape, mode, input_requires_grad)
        if median > 0:
            result["tflops_per_s"] = result["flops_per_step"] / median / 1e12
    return Record(status="ok", **base, **result)
