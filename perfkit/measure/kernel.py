"""Measure one kernel cell: a fused kernel alone, against the same expression in eager PyTorch and compiled.

A benchmark declares a kernel as a :class:`KernelBench` (its inputs, its eager expression, its fused
implementation, the bytes a step must move); :func:`measure_kernel` gates and times it as the matrix's
cells are, with the same timing tail (``perfkit.measure.timing``).

Inference is the forward with the running statistics; training is forward with batch statistics (and the
running update) plus the backward from a fixed output gradient. Each cell is gated against float64 eager
PyTorch (output and every gradient) before it is timed, and records ``bytes_per_step`` (each input read
once, each output written once) and ``achieved_gb_per_s``.

Timing. On a GPU, rounds are timed as ``triton.testing.do_bench`` does: an L2-sized buffer is zeroed before
each round (so a memory-bound kernel is not timed out of cache, and the zeroing keeps the GPU busy while the
round's events and launches queue behind it), and CUDA events bracket the round; those device times are the
record's ``times_s``. pytest-benchmark's ``stats`` hold a second, host-clock series of the same rounds (flush
untimed, the round ending in a synchronization), which includes the launch latency; the record is the figure
to read for GB/s. On the CPU both are the same perf_counter rounds (there is no cache to flush by hand; the
CPU shapes are tiny and only check that the cells run).

Side by side. A variant other than eager (``compile``, ``triton``) is timed interleaved with the eager
expression on its own copy of the inputs, pair by pair (on a GPU one round each, each after its own L2
flush; on the CPU in blocks, :func:`perfkit.measure.timing.pair_block`): ``speedup_vs_eager`` is the median
of the pairs' ratios, as in the matrix's cells. Every cell runs at the matrix's thread count and records
the machine's load over its rounds (``contended``, ``machine_load``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from perfkit.env.device import device_identity
from perfkit.measure.compile_info import CompileWatch
from perfkit.measure.stages import Stages, failure, interpreted_reason, intra_op_threads
from perfkit.measure.timing import (
    BenchmarkRounds,
    MachineWatch,
    PairRunner,
    TimingPolicy,
    adaptive_pairs,
    adaptive_rounds,
    pair_block,
    paired_rounds,
    synchronizer,
    timing_fields,
    warm_up,
)
from perfkit.record import Record
from perfkit.testing import REL_TOLERANCE, relative_error
from perfkit.variants import parse_variant, triton_interpreted

L2_FLUSH_BYTES = 256 * 2**20
"""Larger than any current GPU's L2 (H100: 50 MB; H200: 60 MB), as triton.testing.do_bench's flush buffer."""


@dataclass
class KernelCase:
    """The tensors of one kernel cell; ``grads`` are the inputs whose gradients a training step computes."""

    args: list
    grads: list[torch.Tensor]

    def clone(self, dtype: torch.dtype | None = None) -> KernelCase:
        """Fresh leaves with the same values (running statistics too), optionally cast to ``dtype``."""
        args = []
        for a in self.args:
            if isinstance(a, torch.Tensor):
                b = a.detach().clone() if dtype is None else a.detach().to(dtype)
                args.append(b.requires_grad_(a.requires_grad))
            else:
                args.append(a)
        return KernelCase(args, [b for b in args if isinstance(b, torch.Tensor) and b.requires_grad])


@dataclass(frozen=True)
class KernelBench:
    """What a kernel benchmark declares: the kernel's shapes and inputs, its providers and its bytes."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    """The input's shape on the CPU (``cpu``, small: the cells only check that they run) and on a GPU."""
    make_case: Callable[[torch.dtype, str, bool, torch.device], KernelCase]
    """``make_case(dtype, layout, training, device)``: random inputs of :meth:`shape` on ``device``."""
    eager: Callable[..., torch.Tensor]
    """The expression in plain PyTorch: the ``eager`` variant, compiled for ``compile``, the float64 reference."""
    triton: Callable[..., torch.Tensor]
    """The fused kernel: the ``triton`` variant."""
    bytes_per_step: Callable[[torch.Tensor, bool], int]
    """``bytes_per_step(x, training)``: each input read once and each output written once, in a step."""

    def shape(self, device: torch.device) -> tuple[int, ...]:
        """The input's shape on ``device``."""
        return self.shapes["cuda" if device.type == "cuda" else "cpu"]


def _implementation(bench: KernelBench, variant: str) -> Callable[..., torch.Tensor]:
    if variant == "eager":
        return bench.eager
    if variant == "compile":
        return torch.compile(bench.eager)  # a fresh compile per cell, whose first call is its compile time
    return bench.triton


def _run(fn: Callable, case: KernelCase, grad_out: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for t in case.grads:
        t.grad = None
    if grad_out is None:
        with torch.no_grad():
            return fn(*case.args), []
    out = fn(*case.args)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in case.grads]


def event_rounds(step: Callable[[], None], cache: torch.Tensor) -> Callable[[Callable[[], None], int], list[float]]:
    """A round runner timing ``step`` on the GPU with CUDA events, the L2 flushed before each round."""

    def run(_, n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends, strict=True):
            cache.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)]

    return run


def event_pairs(step: Callable[[], None], baseline: Callable[[], None], cache: torch.Tensor) -> PairRunner:
    """A pair runner for the GPU: each pair times ``baseline`` then ``step`` with CUDA events, the L2 flushed
    before each of the two (as :func:`event_rounds`)."""

    def run(n: int) -> tuple[list[float], list[float]]:
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(n)]
        for base_start, base_end, start, end in events:
            cache.zero_()
            base_start.record()
            baseline()
            base_end.record()
            cache.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return ([e[2].elapsed_time(e[3]) / 1e3 for e in events], [e[0].elapsed_time(e[1]) / 1e3 for e in events])

    return run


@dataclass
class _KernelCell:
    """One kernel cell while it is measured: its parameters, the record's fields, what each phase learned."""

    bench: KernelBench
    variant: str
    dtype: str
    layout: str
    training: bool
    device: torch.device
    policy: TimingPolicy
    benchmark: Any
    fields: dict[str, Any]
    stages: Stages = field(default_factory=Stages)
    case: KernelCase | None = None
    grad_out: torch.Tensor | None = None
    fn: Callable[..., torch.Tensor] | None = None
    eager_case: KernelCase | None = None
    """The eager expression's own copy of the inputs, for the pairs; None when the cell is eager itself."""
    sync: Callable[[], None] = field(default=lambda: None)
    step_s: float = 0.0
    watch: MachineWatch | None = None

    def step(self) -> None:
        """One call of the variant (unsynchronized: the event runners bracket it on the device)."""
        _run(self.fn, self.case, self.grad_out)

    def eager_step(self) -> None:
        """One call of the eager expression beside a paired variant."""
        _run(self.bench.eager, self.eager_case, self.grad_out)

    def synced(self, step: Callable[[], None]) -> Callable[[], None]:
        """``step`` followed by the device's synchronization."""

        def run() -> None:
            step()
            self.sync()

        return run

    def record(self, status: str, reason: str | None = None, **fields: Any) -> Record:
        """The cell's record with its fields so far."""
        return Record(status=status, reason=reason, **self.fields, **fields)


def _first_call(cell: _KernelCell) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """The inputs, the float64 reference and the variant's first call (its compile, for ``compile``): the
    first call's output and gradients, then the reference's."""
    bench, stages = cell.bench, cell.stages
    stages.enter("build", "setup")
    torch_dtype = getattr(torch, cell.dtype)
    cell.case = bench.make_case(torch_dtype, cell.layout, cell.training, cell.device)
    cell.grad_out = (torch.randn(bench.shape(cell.device), generator=torch.Generator().manual_seed(1))
                     .to(cell.device, torch_dtype) if cell.training else None)
    cell.fields["bytes_per_step"] = bench.bytes_per_step(cell.case.args[0], cell.training)

    stages.enter("float64 reference")
    ref_out, ref_grads = _run(bench.eager, cell.case.clone(torch.float64),
                              None if cell.grad_out is None else cell.grad_out.double())

    compiled = cell.variant == "compile"
    stages.enter("compile" if compiled else "first call", "first call (compile)" if compiled else "first call")
    cell.fn = _implementation(bench, cell.variant)
    cell.sync = synchronizer(cell.device)
    watch = CompileWatch() if compiled else None
    start = time.perf_counter()
    out, grads = _run(cell.fn, cell.case.clone(), cell.grad_out)
    cell.sync()
    if watch is not None:
        cell.fields.update(watch.first_call_fields(time.perf_counter() - start))
    return out, grads, ref_out, ref_grads


def _gate(cell: _KernelCell) -> Record | None:
    """The first call against the float64 reference: over tolerance is ``failed``, and an interpreted Triton
    kernel is gated but not timed."""
    out, grads, ref_out, ref_grads = _first_call(cell)
    cell.stages.enter("correctness gate")
    errors = [relative_error(out, ref_out)] + [relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    error = cell.fields["rel_error"] = max(errors)
    if error > cell.fields["tolerance"]:
        return cell.record("failed", (f"relative error {error:.3e} > {cell.fields['tolerance']:.1e} ({cell.dtype}) "
                                      "against float64"), wall_split_s=cell.stages.close())
    if cell.variant == "triton" and triton_interpreted(cell.device):
        return cell.record("skipped", interpreted_reason(error), wall_split_s=cell.stages.close())
    return None


def _warm_up(cell: _KernelCell) -> None:
    """Warm the variant until steady, and the eager expression beside a paired variant."""
    if cell.variant != "eager":
        cell.eager_case = cell.case.clone()
    cell.stages.enter("warm-up")
    cell.watch = MachineWatch(cell.device)
    steps, seconds = warm_up(cell.synced(cell.step), cell.policy)
    if cell.eager_case is not None:
        warm_up(cell.synced(cell.eager_step), cell.policy)
    cell.step_s = seconds / max(steps, 1)
    cell.fields.update(warmup_steps=steps, warmup_time_s=seconds)


def _time_on_gpu(cell: _KernelCell, cache: torch.Tensor) -> tuple[list[float], list[float]]:
    """Device-timed rounds, each after an L2 flush; then pytest-benchmark's host-clock series of the step."""
    if cell.eager_case is not None:
        times, eager_times = adaptive_pairs(event_pairs(cell.step, cell.eager_step, cache), cell.policy)
    else:
        times, eager_times = adaptive_rounds(cell.step, cell.policy, event_rounds(cell.step, cache)), []
    cell.fields["timer"] = "CUDA events around each round, 256 MiB zeroed before it (L2 flush)"

    def flush() -> None:
        cache.zero_()
        cell.sync()

    BenchmarkRounds(cell.benchmark, setup=flush)(cell.synced(cell.step), min(len(times), 100))
    return times, eager_times


def _time_on_cpu(cell: _KernelCell) -> tuple[list[float], list[float]]:
    """perf_counter rounds stored in pytest-benchmark's stats, paired with eager's in blocks when paired."""
    step, rounds = cell.synced(cell.step), BenchmarkRounds(cell.benchmark)
    cell.fields["timer"] = "time.perf_counter around one call (CPU; no cache flush)"
    if cell.eager_case is None:
        return adaptive_rounds(step, cell.policy, rounds), []
    cell.fields["pair_block"] = pair_block(cell.step_s)
    return paired_rounds(step, cell.synced(cell.eager_step), cell.policy, rounds, cell.fields["pair_block"])


def _timing(cell: _KernelCell) -> None:
    """The timed rounds, the machine's load over them, and their statistics."""
    cell.stages.enter("timing")
    cell.watch.rounds_start()
    if cell.device.type == "cuda":
        times, eager_times = _time_on_gpu(cell, torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32,
                                                            device=cell.device))
    else:
        times, eager_times = _time_on_cpu(cell)
    cell.watch.rounds_end()
    cell.fields.update(cell.watch.fields(cell.fields["threads"], len(times) + len(eager_times)))
    cell.fields.update(timing_fields(times, eager_times, cell.policy, batch=cell.bench.shape(cell.device)[0],
                                     device_type=cell.device.type))
    cell.fields["achieved_gb_per_s"] = cell.fields["bytes_per_step"] / cell.fields["step_time_median_s"] / 1e9
    cell.fields["wall_split_s"] = cell.stages.close(timed_s=sum(times) + sum(eager_times))


def measure_kernel(bench: KernelBench, variant: str, mode: str, dtype: str, layout: str, device: torch.device,
                   policy: TimingPolicy, benchmark: Any, threads: int | None = None) -> Record:
    """Gate and time one kernel cell; a failure becomes the record's status.

    A variant other than eager is timed interleaved with the eager expression on its own copy of the inputs,
    pair by pair (``speedup_vs_eager`` is the median of the pairs' ratios), as the matrix's cells are.
    ``benchmark`` is pytest-benchmark's fixture, whose stats get the rounds. ``threads`` sets torch's
    intra-op threads for the cell; the machine's load over the timed rounds is recorded, and a cell that
    other processes crowded is flagged ``contended``.
    """
    shape = bench.shape(device)
    with intra_op_threads(threads) as cell_threads:
        fields = dict(block=bench.name, variant=variant, mode=mode, dtype=dtype, batch=shape[0], kind="kernel",
                      input_shape=list(shape), device=device_identity(device), tolerance=REL_TOLERANCE[dtype],
                      threads=cell_threads)
        reason = parse_variant(variant).skip_reason(device)
        if reason:
            return Record(status="skipped", reason=reason, **fields)
        cell = _KernelCell(bench, variant, dtype, layout, mode == "training", device, policy, benchmark, fields)
        try:
            record = _gate(cell)
            if record is not None:
                return record
            _warm_up(cell)
            _timing(cell)
            return cell.record("ok")
        except Exception as error:  # every failure of a cell is recorded, the run goes on
            status, reason = failure(error, cell.stages.label)
    del cell  # its tensors, before the allocator's cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Record(status=status, reason=reason, **fields)
