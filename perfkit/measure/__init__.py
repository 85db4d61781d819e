"""Measuring one cell: timing, the correctness gate, FLOPs and memory.

The face other modules use; the work is in ``cell`` (a block's cell and its phases), ``kernel`` (a fused
kernel's cell), ``timing``, ``correctness``, ``memory``, ``counts`` and ``memory_model``.
"""

from perfkit.measure.cell import MEMORY_MODELS, measure_cell
from perfkit.measure.correctness import GATE_SEEDS, GroupCache, GroupState, eager_gate
from perfkit.measure.counts import StepCounts, step_counts, step_flops
from perfkit.measure.kernel import KernelBench, KernelCase, measure_kernel
from perfkit.measure.timing import (
    QUICK_POLICY,
    BenchmarkRounds,
    PairRunner,
    RoundRunner,
    SyncedStep,
    TimingPolicy,
    adaptive_pairs,
    adaptive_rounds,
    clock_rounds,
    pair_block,
    paired_rounds,
    stop_reason,
    warm_up,
)

__all__ = [
    "GATE_SEEDS", "MEMORY_MODELS", "QUICK_POLICY", "BenchmarkRounds", "GroupCache", "GroupState", "KernelBench",
    "KernelCase", "PairRunner", "RoundRunner", "StepCounts", "SyncedStep", "TimingPolicy", "adaptive_pairs",
    "adaptive_rounds", "clock_rounds", "eager_gate", "measure_cell", "measure_kernel", "pair_block", "paired_rounds",
    "step_counts", "step_flops", "stop_reason", "warm_up",
]
