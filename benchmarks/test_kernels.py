"""Kernel cells: each fused Triton kernel alone, against the same expression in eager PyTorch and compiled.

* ``wrc_epilogue``: ``relu(alpha * batch_norm(y) + beta * s)`` (``perfkit.kernels.wrc.wrc_epilogue``) at a
  ResNet stage-1 shape, y, s = [32, 256, 56, 56] on a GPU.
* ``dense_bn_relu``: the BN-ReLU of a dense layer's channel prefix (``perfkit.kernels.dense.bn_relu``) at
  the last layer of DenseNet-121's third block, [32, 992, 14, 14] on a GPU.

Inference is the forward with the running statistics; training is forward with batch statistics (and the
running update) plus the backward from a fixed output gradient. Each cell is gated against float64 eager
PyTorch (output and every gradient) before it is timed, and records ``bytes_per_step`` (each input read
once, each output written once: the kernels' own ``bytes_moved`` figures) and ``achieved_gb_per_s``.

Timing. On a GPU, rounds are timed as ``triton.testing.do_bench`` does: an L2-sized buffer is zeroed before
each round (so a memory-bound kernel is not timed out of cache, and the zeroing keeps the GPU busy while the
round's events and launches queue behind it), and CUDA events bracket the round; those device times are the
record's ``times_s``. pytest-benchmark's ``stats`` hold a second, host-clock series of the same rounds (flush
untimed, the round ending in a synchronization), which includes the launch latency; the record is the figure
to read for GB/s. On the CPU both are the same perf_counter rounds (there is no cache to flush by hand; the
CPU shapes are tiny and only check that the cells run).

Side by side. A variant other than eager (``compile``, ``triton``) is timed interleaved with the eager
expression on its own copy of the inputs, pair by pair (on a GPU one round each, each after its own L2
flush; on the CPU in blocks, ``measure.pair_block``):
``speedup_vs_eager`` is the median of the pairs' ratios, as in the matrix's cells. Every cell runs at the
matrix's thread count and records the machine's load over its rounds (``contended``, ``machine_load``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from perfkit.env.device import device_identity
from perfkit.env.machine import LoadMonitor, minor_faults
from perfkit.measure import (
    BenchmarkRounds,
    PairRunner,
    Stages,
    TimingPolicy,
    adaptive_pairs,
    adaptive_rounds,
    error_message,
    is_oom,
    median_ci_rel,
    pair_block,
    paired_ratio_ci,
    paired_rounds,
    quantile,
    repeat_interval_rel,
    stop_reason,
    synchronizer,
    warm_up,
)
from perfkit.record import Record
from perfkit.testing import REL_TOLERANCE, relative_error
from perfkit.variants import parse_variant, triton_interpreted

SHAPES = {
    "wrc_epilogue": {"cpu": (2, 16, 8, 8), "cuda": (32, 256, 56, 56)},
    "dense_bn_relu": {"cpu": (2, 40, 4, 4), "cuda": (32, 992, 14, 14)},
}
MOMENTUM, EPS = 0.1, 1e-5
L2_FLUSH_BYTES = 256 * 2**20
"""Larger than any current GPU's L2 (H100: 50 MB; H200: 60 MB), as triton.testing.do_bench's flush buffer."""


def _wrc_expression(y, s, weight, bias, running_mean, running_var, alpha, beta, training):
    return torch.relu(alpha * F.batch_norm(y, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
                      + beta * s)


def _bn_relu_expression(x, weight, bias, running_mean, running_var, training):
    return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS))


def _wrc_triton(y, s, weight, bias, running_mean, running_var, alpha, beta, training):
    from perfkit.kernels.wrc import wrc_epilogue

    return wrc_epilogue(y, s, weight, bias, running_mean, running_var, alpha, beta, training=training,
                        momentum=MOMENTUM, eps=EPS)


def _bn_relu_triton(x, weight, bias, running_mean, running_var, training):
    from perfkit.kernels.dense import bn_relu

    return bn_relu(x, weight, bias, running_mean, running_var, training=training, momentum=MOMENTUM, eps=EPS)


def _bytes_per_step(kernel: str, x: torch.Tensor, training: bool) -> int:
    if kernel == "wrc_epilogue":
        from perfkit.kernels.wrc import bytes_moved

        return bytes_moved(x, training) + (bytes_moved(x, training, backward=True) if training else 0)
    from perfkit.kernels.dense import bn_relu_bytes_moved

    forward = bn_relu_bytes_moved(tuple(x.shape), x.dtype, training=training)
    if not training:
        return forward
    # Backward: read x and the output gradient, write the input gradient; per channel read weight, bias,
    # mean and var and write the weight and bias gradients (float32).
    return forward + 3 * x.numel() * x.element_size() + 6 * 4 * x.shape[1]


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


def make_case(kernel: str, dtype: torch.dtype, layout: str, training: bool, device: torch.device) -> KernelCase:
    """Random inputs (never zeros) of the kernel's shape on ``device``; parameters float32 as in a network."""
    shape = SHAPES[kernel][device.type if device.type in ("cpu", "cuda") else "cpu"]
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]

    def tensor(*size, scale=1.0, offset=0.0, dt=torch.float32, grad=False):
        t = (torch.randn(size, generator=generator) * scale + offset).to(device, dt)
        if len(size) == 4:
            t = t.contiguous(memory_format=memory_format)
        return t.requires_grad_(grad)

    x = tensor(*shape, dt=dtype, grad=training)
    weight, bias = tensor(c, scale=0.1, offset=1.0, grad=training), tensor(c, scale=0.1, grad=training)
    running_mean = tensor(c, scale=0.1)
    running_var = (torch.rand(c, generator=generator) + 0.5).to(device)
    if kernel == "wrc_epilogue":
        s = tensor(*shape, dt=dtype, grad=training)
        alpha, beta = tensor(scale=0.0, offset=0.8, grad=training), tensor(scale=0.0, offset=1.2, grad=training)
        args = [x, s, weight, bias, running_mean, running_var, alpha, beta, training]
    else:
        args = [x, weight, bias, running_mean, running_var, training]
    return KernelCase(args, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])


def _implementation(kernel: str, variant: str) -> Callable:
    eager = _wrc_expression if kernel == "wrc_epilogue" else _bn_relu_expression
    if variant == "eager":
        return eager
    if variant == "compile":
        return torch.compile(eager)
    return _wrc_triton if kernel == "wrc_epilogue" else _bn_relu_triton


def _run(fn: Callable, case: KernelCase, grad_out: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for t in case.grads:
        t.grad = None
    if grad_out is None:
        with torch.no_grad():
            return fn(*case.args), []
    out = fn(*case.args)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in case.grads]


def _flush_buffer(device: torch.device) -> torch.Tensor | None:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None


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


def measure_kernel(kernel: str, variant: str, mode: str, dtype: str, layout: str, device: torch.device,
                   policy: TimingPolicy, benchmark, threads: int | None = None) -> Record:
    """Gate and time one kernel cell; a failure becomes the record's status.

    A variant other than eager is timed interleaved with the eager expression on its own copy of the inputs,
    pair by pair (``speedup_vs_eager`` is the median of the pairs' ratios), as the matrix's cells are.
    ``threads`` sets torch's intra-op threads for the cell; the machine's load over the timed rounds is
    recorded, and a cell that other processes crowded is flagged ``contended``.
    """
    torch_dtype = getattr(torch, dtype)
    training = mode == "training"
    shape = SHAPES[kernel]["cuda" if device.type == "cuda" else "cpu"]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    base = dict(block=kernel, variant=variant, mode=mode, dtype=dtype, batch=shape[0], kind="kernel",
                input_shape=list(shape), device=device_identity(device), tolerance=REL_TOLERANCE[dtype],
                threads=torch.get_num_threads())
    reason = parse_variant(variant).skip_reason(device)
    if reason:
        torch.set_num_threads(previous_threads)
        return Record(status="skipped", reason=reason, **base)
    result: dict = {}
    progress: dict = {}
    stages = Stages(progress)
    try:
        stages.enter("build", "setup")
        case = make_case(kernel, torch_dtype, layout, training, device)
        grad_out = (torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, torch_dtype)
                    if training else None)
        result["bytes_per_step"] = _bytes_per_step(kernel, case.args[0], training)

        stages.enter("float64 reference")
        ref_out, ref_grads = _run(_wrc_expression if kernel == "wrc_epilogue" else _bn_relu_expression,
                                  case.clone(torch.float64), None if grad_out is None else grad_out.double())

        stages.enter("compile" if variant == "compile" else "first call",
                     "first call (compile)" if variant == "compile" else "first call")
        fn = _implementation(kernel, variant)
        sync = synchronizer(device)
        start = time.perf_counter()
        out, grads = _run(fn, case.clone(), grad_out)
        sync()
        if variant == "compile":
            result["compile_time_s"] = time.perf_counter() - start

        stages.enter("correctness gate")
        errors = [relative_error(out, ref_out)] + [relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)]
        result["rel_error"] = max(errors)
        if result["rel_error"] > base["tolerance"]:
            return Record(status="failed", **base, **result, wall_split_s=stages.close(), reason=(
                f"relative error {result['rel_error']:.3e} > {base['tolerance']:.1e} ({dtype}) against float64"))
        if variant == "triton" and triton_interpreted(device):
            return Record(status="skipped", **base, **result, wall_split_s=stages.close(), reason=(
                f"correctness checked (relative error {result['rel_error']:.2e}); not timed: TRITON_INTERPRET=1 "
                "runs the kernels in the interpreter"))

        def step() -> None:
            _run(fn, case, grad_out)

        def synced_step() -> None:
            step()
            sync()

        eager_fn = _implementation(kernel, "eager") if variant != "eager" else None
        eager_case = case.clone() if eager_fn is not None else None

        def eager_step() -> None:
            _run(eager_fn, eager_case, grad_out)

        def synced_eager_step() -> None:
            eager_step()
            sync()

        stages.enter("warm-up")
        monitor = LoadMonitor(device)
        monitor.start()
        steps, seconds = warm_up(synced_step, policy)
        if eager_fn is not None:
            warm_up(synced_eager_step, policy)
        result.update(warmup_steps=steps, warmup_time_s=seconds)

        stages.enter("timing")
        faults = minor_faults()
        eager_times: list[float] = []
        cache = _flush_buffer(device)
        if cache is not None:
            if eager_fn is not None:
                times, eager_times = adaptive_pairs(event_pairs(step, eager_step, cache), policy)
            else:
                times = adaptive_rounds(step, policy, event_rounds(step, cache))
            result["timer"] = "CUDA events around each round, 256 MiB zeroed before it (L2 flush)"

            def flush() -> None:
                cache.zero_()
                sync()

            # pytest-benchmark's host-clock series of the same kernel (see the module docstring).
            BenchmarkRounds(benchmark, setup=flush)(synced_step, min(len(times), 100))
        else:
            if eager_fn is not None:
                result["pair_block"] = pair_block(seconds / max(steps, 1))
                times, eager_times = paired_rounds(synced_step, synced_eager_step, policy, BenchmarkRounds(benchmark),
                                                   result["pair_block"])
            else:
                times = adaptive_rounds(synced_step, policy, BenchmarkRounds(benchmark))
            result["timer"] = "time.perf_counter around one call (CPU; no cache flush)"
        load = monitor.stop(base["threads"])
        load["minor_faults_per_round"] = (minor_faults() - faults) / (len(times) + len(eager_times))
        median = statistics.median(times)
        ci = median_ci_rel(times)
        result.update(
            times_s=times, rounds=len(times), step_time_median_s=median, step_time_mean_s=statistics.fmean(times),
            step_time_p20_s=quantile(times, 0.2), step_time_p80_s=quantile(times, 0.8),
            step_time_cv=statistics.stdev(times) / statistics.fmean(times) if len(times) > 1 else None,
            step_time_ci_rel=ci if ci != float("inf") else None, noise_bound_rel=policy.target_ci_rel,
            step_time_repeat_rel=repeat_interval_rel(times, device_type=device.type),
            timing_stop=stop_reason(max(ci, median_ci_rel(eager_times) if eager_times else 0.0), len(times),
                                    sum(times) + sum(eager_times), policy),
            noisy=not ci <= policy.target_ci_rel, samples_per_s=shape[0] / median,
            achieved_gb_per_s=result["bytes_per_step"] / median / 1e9,
            contended=load.pop("contended"), machine_load=load,
        )
        if eager_times:
            ratio, low, high = paired_ratio_ci(eager_times, times)
            result.update(eager_times_s=eager_times, speedup_vs_eager=ratio, speedup_ci_low=low, speedup_ci_high=high)
        split = stages.close()
        split["timing"] -= sum(times) + sum(eager_times)
        split["timed rounds"] = sum(times) + sum(eager_times)
        return Record(status="ok", **base, **result, wall_split_s=split)
    except Exception as error:  # every failure of a cell is recorded, the run goes on
        status, message = ("oom" if is_oom(error) else "error"), f"{progress.get('stage')}: {error_message(error)}"
    finally:
        torch.set_num_threads(previous_threads)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Record(status=status, reason=message, **base, **result)


def test_kernel(benchmark, perfkit_matrix, perfkit_file_record, kernel: str, variant: str, mode: str, dtype: str,
                layout: str) -> None:
    """One kernel cell; its record is pytest-benchmark's extra_info and a line of the JSON-lines file."""
    benchmark.group = f"{kernel}-{mode}-{dtype}-{layout}"
    record = measure_kernel(kernel, variant, mode, dtype, layout, perfkit_matrix.device, perfkit_matrix.profile.policy,
                            benchmark, threads=perfkit_matrix.before_cell())
    perfkit_file_record(benchmark, record)
