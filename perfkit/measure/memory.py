"""Peak memory of one measured step: on a GPU the allocator's peak after a reset; on the CPU, where torch's
allocator keeps no peak statistics, the profiler's allocator events.

The profiler's memory events (``profile_memory=True``) report every allocation and free of torch's
CPU allocator, temporaries and autograd's saved tensors included, in order. Their running sum is the
bytes live above what was live before the step; its maximum is the step's peak rise. For a given
module, shape and variant the figure is deterministic, so CI can gate it exactly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from perfkit.variants import Prepared

METHOD = "torch.profiler CPU allocator events (profile_memory=True)"
CUDA_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"


@dataclass(frozen=True)
class StepMemory:
    """What one call did to the CPU allocator."""

    peak_rise_bytes: int
    """Highest total of bytes live at once during the call, above what was live before it."""
    retained_bytes: int
    """Bytes allocated by the call and still live after it (gradients created by the step, say)."""


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block: kineto writes "USDT: ... profiler_start" and
    "profiler_stop" lines from C++ straight to it, where no Python setting reaches. Use it around the
    profiler's start and stop only, so the step's own errors and warnings still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_step_memory(step: Callable[[], object]) -> StepMemory:
    """Run ``step`` once under the profiler and return its allocator peak rise and retained bytes."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_stderr_silenced():
        prof.__enter__()
    try:
        step()
    finally:
        with native_stderr_silenced():
            prof.__exit__(None, None, None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return StepMemory(peak_rise_bytes=peak, retained_bytes=live)


def live_bytes(prepared: Prepared) -> int:
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
        return peak, peak - before, CUDA_METHOD
    before = live_bytes(prepared)
    rise = cpu_step_memory(step).peak_rise_bytes
    return before + rise, rise, METHOD
