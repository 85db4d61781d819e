"""FLOP counts with torch's own counter (``torch.utils.flop_counter``), on the meta device.

Counting on meta tensors costs no arithmetic, so a ResNet-152 at 224×224 counts in well under a second.
The counter counts a multiply-add as two FLOPs, as the roofline does.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from perfkit.registry import get_entry


def count_flops(name: str, batch: int = 1, *, bench: bool = True, training: bool = False, **overrides) -> int:
    """FLOPs of one forward (and, if ``training``, backward) pass of ``name`` on a ``batch`` of its shape."""
    entry = get_entry(name)
    with torch.device("meta"):
        module = entry.create(**overrides)
    module.train(training)
    x = torch.empty((batch, *(entry.bench_shape if bench else entry.test_shape)), device="meta",
                    requires_grad=training)
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        if training:
            out = out if isinstance(out, torch.Tensor) else out[0]
            out.sum().backward()
    return int(counter.get_total_flops())
