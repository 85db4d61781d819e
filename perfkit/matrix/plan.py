"""What a run will cost before it starts: a per-cell estimate of seconds on a reference GPU, and the plan.

The model is deliberately simple, and every constant in it is a stated assumption, not a measurement
(the run's own records give ``compile_time_s``, ``warmup_time_s`` and the rounds to check it against):

* **step time** = max(device, host). Device: the step's FLOPs (``torch.utils.flop_counter``, counted once
  per entry and mode at batch 1 on the meta device, scaled by the batch) over :data:`MATMUL_EFFICIENCY` of
  the GPU's dense peak for the compute dtype (float32 convolutions run as TF32, cuDNN's default). Host:
  :data:`HOST_S_PER_OP` per leaf module, three times over in training (forward, backward, optimizer).
* **gate**: the float64 reference's FLOPs at :data:`FP64_FLOPS` (cuDNN's float64 convolutions use no
  tensor cores), plus the first call.
* **warm-up** three batches of at least the policy's ``warmup_batch_s``; **memory** one step; **timing**
  twice the policy's ``min_rounds`` (a GPU's step time is steady, so the adaptive rule stops early),
  each host round paired with a device round (``perfkit.env.gpu``), capped by ``max_time_s`` per clock.
* **compile allowance**: :data:`COMPILE_BASE_S` per compiled graph plus :data:`COMPILE_S_PER_OP` per leaf
  module, times :data:`COMPILE_TRAINING_FACTOR` in training (the joint graph and the backward), and once
  per session :data:`COMPILE_FIRST_S` (Inductor's worker pool, Triton's import). First compiles on a
  cold cache: the FX graph cache would make a second run faster, the estimate does not count on it.
* **per cell** :data:`CELL_OVERHEAD_S` (building the model, moving it, the record) plus the FLOP count
  the cell does itself (:data:`FLOP_COUNT_S_PER_OP` per leaf module); per session :data:`SESSION_S`.

Shards are balanced on this estimate for :data:`REFERENCE` whatever the local device, so every machine
computes the same split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from perfkit.registry import get_entry


@dataclass(frozen=True)
class Hardware:
    """A GPU's datasheet figures the cost model needs."""

    name: str
    bf16_tflops: float
    """Dense (no sparsity) bf16/fp16 tensor-core peak."""
    tf32_tflops: float


HARDWARE = {
    # The H200 has the H100's compute (and 4.8 against 3.35 TB/s of HBM, which this model does not use).
    "h100": Hardware("NVIDIA H100 SXM", bf16_tflops=989.0, tf32_tflops=494.5),
    "h200": Hardware("NVIDIA H200", bf16_tflops=989.0, tf32_tflops=494.5),
}
REFERENCE = "h100"

MATMUL_EFFICIENCY = 0.35
"""Fraction of the dense peak a CNN's convolutions reach at batch 64 (cuDNN, mixed shapes)."""
FP64_FLOPS = 5e12
HOST_S_PER_OP = 12e-6
"""Host time per eager op launch (PyTorch's dispatcher and a CUDA launch)."""
COMPILE_FIRST_S = 15.0
COMPILE_BASE_S = 4.0
COMPILE_S_PER_OP = 0.12
COMPILE_TRAINING_FACTOR = 2.5
TRITON_JIT_S = 3.0
"""First launch of the fused Triton kernels in a process (compile to cubin; cached afterwards)."""
CELL_OVERHEAD_S = 0.5
FLOP_COUNT_S_PER_OP = 0.01
SESSION_S = 20.0
"""pytest's start, imports, CUDA context, cuDNN and cuBLAS handles."""
KERNEL_CELL_S = 2.0
"""A kernel cell (one fused op): reference, gate, warm-up and rounds of a sub-millisecond step."""
CEILINGS_S = 5.0
OTHER_TEST_S = 2.0
"""A test the model knows nothing of (a user's own benchmark in the same session)."""


@dataclass(frozen=True)
class CellCost:
    """The estimated seconds of one cell, by stage."""

    cell: str
    compile_s: float
    run_s: float
    """Everything but the compile: gate, warm-up, memory, rounds, FLOP count, overhead."""
    step_s: float

    @property
    def total_s(self) -> float:
        """Compile plus run."""
        return self.compile_s + self.run_s


@functools.cache
def _entry_counts(name: str, bench_shape: bool) -> tuple[int, int]:
    """(inference FLOPs per sample, leaf modules) of an entry, on the meta device."""
    from perfkit.measure import step_flops

    entry = get_entry(name)
    with torch.device("meta"):
        module = entry.create()
    leaves = sum(1 for m in module.modules() if not list(m.children()))
    return step_flops(entry, 1, bench_shape, "inference", False), leaves


def estimate_cell(cell: str, block: str, variant: str, mode: str, batch: int, *, bench_shape: bool,
                  min_rounds: int, max_time_s: float, warmup_batch_s: float,
                  hardware: Hardware = HARDWARE[REFERENCE]) -> CellCost:
    """Estimated cost of one matrix cell on ``hardware`` (see the module docstring for the model)."""
    from perfkit.variants import parse_variant

    parsed = parse_variant(variant)
    flops_per_sample, leaves = _entry_counts(block, bench_shape)
    training = mode == "training"
    # Backward costs about twice the forward: a training step is three forwards' worth of arithmetic.
    flops = flops_per_sample * batch * (3 if training else 1)
    peak = hardware.bf16_tflops if parsed.amp_dtype is not None else hardware.tf32_tflops
    device_s = flops / (MATMUL_EFFICIENCY * peak * 1e12)
    host_s = HOST_S_PER_OP * leaves * (3 if training else 1)
    step_s = max(device_s, host_s)
    gate_s = flops / FP64_FLOPS + step_s
    warmup_s = 3 * max(warmup_batch_s, step_s)
    rounds = 2 * min_rounds
    timing_s = 2 * min(rounds * step_s, max_time_s)
    run_s = CELL_OVERHEAD_S + gate_s + warmup_s + step_s + timing_s + FLOP_COUNT_S_PER_OP * leaves
    compile_s = 0.0
    if parsed.compiled:
        compile_s = (COMPILE_BASE_S + COMPILE_S_PER_OP * leaves) * (COMPILE_TRAINING_FACTOR if training else 1)
    return CellCost(cell, compile_s, run_s, step_s)


def estimate_kernel_cell(cell: str, variant: str, mode: str) -> CellCost:
    """Estimated cost of one kernel cell: a fixed allowance, plus a small compile for ``compile``."""
    compile_s = COMPILE_BASE_S * (COMPILE_TRAINING_FACTOR if mode == "training" else 1) if variant == "compile" \
        else 0.0
    return CellCost(cell, compile_s, KERNEL_CELL_S, 0.0)


def session_s(costs: list[CellCost], triton: bool) -> float:
    """The once-per-session costs of a run of ``costs``: start-up, first compile, Triton's JIT."""
    compiled = any(c.compile_s > 0 for c in costs)
    return SESSION_S + (COMPILE_FIRST_S if compiled else 0.0) + (TRITON_JIT_S if triton else 0.0)


def format_plan(costs: list[CellCost], extra_s: float, hardware: Hardware = HARDWARE[REFERENCE],
                limit_s: float | None = None) -> list[str]:
    """The plan as lines: one per cell (estimated seconds), then the totals and the time limit, if any."""
    lines = [f"perfkit plan: {len(costs)} cells, estimated on {hardware.name} (cost model: perfkit/matrix/plan.py)"]
    width = max((len(c.cell) for c in costs), default=4)
    for c in costs:
        compile_text = f"  (compile {c.compile_s:5.1f} s)" if c.compile_s else ""
        lines.append(f"  {c.cell:<{width}}  {c.total_s:6.1f} s{compile_text}")
    compile_s = sum(c.compile_s for c in costs)
    total_s = sum(c.total_s for c in costs) + extra_s
    lines.append(f"perfkit plan: estimate {total_s / 60:.1f} min = {total_s:.0f} s (compiles {compile_s:.0f} s, "
                 f"session start-up {extra_s:.0f} s)")
    if limit_s is not None:
        verdict = "within" if total_s <= limit_s else "OVER"
        lines.append(f"perfkit plan: {verdict} the profile's limit of {limit_s / 60:.0f} min")
    return lines
