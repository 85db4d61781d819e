"""Peak memory of one step on the CPU, where torch's allocator keeps no peak statistics.

The profiler's memory events (``profile_memory=True``) report every allocation and free of torch's
CPU allocator, temporaries and autograd's saved tensors included, in order. Their running sum is the
bytes live above what was live before the step; its maximum is the step's peak rise. For a given
module, shape and variant the figure is deterministic, so CI can gate it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

METHOD = "torch.profiler CPU allocator events (profile_memory=True)"


@dataclass(frozen=True)
class StepMemory:
    """What one call did to the CPU allocator."""

    peak_rise_bytes: int
    """Highest total of bytes live at once during the call, above what was live before it."""
    retained_bytes: int
    """Bytes allocated by the call and still live after it (gradients created by the step, say)."""


def cpu_step_memory(step: Callable[[], object]) -> StepMemory:
    """Run ``step`` once under the profiler and return its allocator peak rise and retained bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return StepMemory(peak_rise_bytes=peak, retained_bytes=live)
