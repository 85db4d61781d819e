"""What one eager float32 step does, counted on meta tensors (no arithmetic, the same on every machine):
its FLOPs with ``torch.utils.flop_counter`` and an upper bound of its memory from the bytes its ops allocate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from perfkit.registry import Entry
from perfkit.variants import training_loss


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
        # An op returning a list (``split``) has one schema return for all its tensors; zip pairs it with the
        # first and stops.
        for ret, result in zip(returns, results, strict=False):
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

