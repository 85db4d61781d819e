"""The record of one benchmark cell: a plain dataclass that serializes to JSON as is.

Data flows one way: registry -> variant -> measure -> record -> report. The report and the comparison
read only records (from pytest-benchmark's ``extra_info`` or the JSON-lines file), never the code that
made them, so every field a reader needs is here, with its unit in its name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "perfkit.record/1"
STATUSES = ("ok", "failed", "oom", "error", "skipped", "impossible")
"""ok: measured and correct; failed: wrong result (correctness gate, before or after timing); oom: out of
memory; error: any other exception (a compile error, say); skipped: cannot run on this device, with the
reason; impossible: correct, but timed far under the step's physical floor (it did not do the work it is
counted for), its figures kept and never ranked."""


@dataclass
class Record:
    """One cell of the matrix: block x variant x mode x dtype x batch on one device."""

    block: str
    variant: str
    mode: str
    dtype: str
    batch: int
    status: str
    kind: str = "block"
    """block, network or kernel."""
    input_shape: list[int] = field(default_factory=list)
    reason: str | None = None
    device: dict[str, Any] = field(default_factory=dict)
    """The device's identity: name, memory, SM count, driver, CUDA, torch and triton versions or CPU model."""
    params: int | None = None
    # timing: the synchronized time of one step, over `rounds` rounds after warm-up
    step_time_median_s: float | None = None
    step_time_p20_s: float | None = None
    step_time_p80_s: float | None = None
    step_time_mean_s: float | None = None
    step_time_cv: float | None = None
    rounds: int | None = None
    noisy: bool | None = None
    times_s: list[float] = field(default_factory=list)
    step_time_ci_rel: float | None = None
    """Half-width of the distribution-free 95% confidence interval of the median, over the median."""
    noise_bound_rel: float | None = None
    """The bound on step_time_ci_rel the rounds aimed for; a cell that ended above it is ``noisy``."""
    step_time_repeat_rel: float | None = None
    """Half-width over the median of the interval a fresh repeat's median should fall in (~95%):
    step_time_ci_rel is within-run only; this adds the drift across the run and a calibrated floor."""
    timing_stop: str | None = None
    """Why the timed rounds ended: target met, a cap, or stopped early because the target was out of reach."""
    speedup_vs_eager: float | None = None
    """Eager's step time over this variant's, from rounds interleaved in this cell: the median over pairs of
    the ratio within each pair (robust to load that changes between rounds; perfkit.stats.paired_ratio_ci)."""
    speedup_ci_low: float | None = None
    """2.5% bound of speedup_vs_eager, bootstrapped over whole pairs of rounds."""
    speedup_ci_high: float | None = None
    eager_times_s: list[float] | None = None
    """Eager's rounds, each run just before the variant's round of the same index."""
    contended: bool | None = None
    """Other processes took the cores (or GPU) this cell ran on: its figures are kept, never ranked."""
    machine_load: dict[str, Any] | None = None
    """What the machine was doing from warm-up to the last round (perfkit.env.machine): load average and runnable tasks
    before and after, other processes' busy cores, process CPU time and wall time, threads, affinity."""
    threads: int | None = None
    """torch's intra-op threads the cell ran with."""
    wall_split_s: dict[str, float] | None = None
    """Wall time of the cell per stage (reference, compile, gate, warm-up, memory, timed rounds, ...)."""
    timer: str | None = None
    """How a round was timed (the clock, and that it synchronizes the device)."""
    warmup_steps: int | None = None
    samples_per_s: float | None = None
    compile_time_s: float | None = None
    """The compiled variant's first call: dynamo's trace, AOTAutograd and inductor, and the call itself."""
    pair_block: int | None = None
    """Paired cells: the rounds each member ran in a row before the other's (``measure.pair_block``)."""
    compile_cache: str | None = None
    """``cold`` (inductor generated code for at least one graph) or ``warm`` (every graph came from inductor's
    on-disk cache, e.g. a second run on the machine): which of the two ``compile_time_s`` measured."""
    # compile diagnostics (perfkit.measure.compile_info): None in a cell that did not compile
    compile_graphs: int | None = None
    """Graphs dynamo handed to the backend in the first call: 1 for a model it captured whole."""
    graph_breaks: int | None = None
    """Graph breaks dynamo met in the first call; the code between the graphs ran in eager Python."""
    graph_break_reasons: list[str] | None = None
    """The first few distinct graph-break reasons, one line each (torch's first line and explanation)."""
    graph_broken: bool | None = None
    """The compiled model broke into more than one graph (``graph_breaks`` > 0): the report marks it."""
    recompiles: int | None = None
    """Frames dynamo compiled again from the first call to the cell's end (a guard failed: a new batch size, a
    changed flag), each in the step that met it: in warm-up or a timed round, not in ``compile_time_s``."""
    recompile_reasons: list[str] | None = None
    """The first few distinct guard failures that caused them (``0/0: tensor 'x' size mismatch ...``)."""
    compile_time_split_s: dict[str, float] | None = None
    """``compile_time_s`` by who spent it: ``dynamo`` (tracing the bytecode, guards), ``aot_autograd`` (forward
    and backward graphs, less inductor), ``inductor`` (lowering and code generation), ``rest`` (running the
    graphs and everything else in the first call), from torch's ``CompilationMetrics``."""
    compile_notes: list[str] | None = None
    """What this torch could not say (a counter it lacks) and why the fields it would fill are None."""
    warmup_time_s: float | None = None
    fused_modules: int | None = None
    """``triton`` cells: the fused modules the model runs (perfkit's own blocks swapped by class, and each
    ``relu(bn(y) + s)`` or ``relu(bn(cat(...)))`` fused by pattern); a model with none is skipped instead."""
    fused_kinds: dict[str, int] | None = None
    """``triton`` cells: fused module class -> how many (``{"FusedResidualEpilogue": 8}``)."""
    # work
    flops_per_step: int | None = None
    tflops_per_s: float | None = None
    bytes_per_step: int | None = None
    """Kernel cells: the fewest bytes the step must move (each input read once, each output written once)."""
    achieved_gb_per_s: float | None = None
    # memory
    peak_memory_bytes: int | None = None
    peak_memory_rise_bytes: int | None = None
    memory_method: str | None = None
    predicted_peak_bytes: int | None = None
    """The memory model's peak for the step (``perfkit.measure.memory_model``): tensor storages only, no library
    workspaces; the same on every machine. Set against ``peak_memory_bytes`` it checks the model."""
    predicted_peak_rise_bytes: int | None = None
    """The predicted peak above what was live before the step; compare with ``peak_memory_rise_bytes``."""
    predicted_memory: dict[str, Any] | None = None
    """The prediction's bytes by category at the peak (``at_peak``), each category's own peak
    (``category_peaks``), its ``method`` and ``notes``, or the ``error`` that stopped it."""
    gate_batch: int | None = None
    """The batch the correctness gate ran at: the cell's batch, or the largest whose float64 reference was
    predicted to fit in free memory (the timed batch is never shrunk)."""
    # correctness gate against float64
    rel_error: float | None = None
    """Relative error of the output against the float64 reference on the timed input (the variant's first
    call); ``gate_checks`` has every input the variant was checked on."""
    tolerance: float | None = None
    grad_rel_error: float | None = None
    """Training cells: relative error of all parameter (and, for blocks, input) gradients, flattened."""
    grad_tolerance: float | None = None
    gate_checks: list[dict[str, Any]] | None = None
    """Each input the variant was checked on: ``input_seed``, ``when`` (``before timing``: the gate's inputs,
    the timed one first; ``after timing``: a fresh one), ``rel_error``, ``grad_rel_error`` and their tolerances."""
    # the physical floor (perfkit/env/ceilings.py)
    ceilings: dict[str, Any] | None = None
    """The device's ceilings the floor came from, measured once per run: peak TFLOP/s (``fp32_tflops`` or
    ``bf16_tflops``), ``copy_gb_per_s``, ``cache_bytes``, and how they were measured; None: not measured."""
    step_time_floor_s: float | None = None
    """The least time the step could take on ``ceilings``: FLOPs at the peak, or the bytes beyond the caches at
    the copy bandwidth, whichever is longer (``perfkit.env.ceilings.step_floor``)."""
    step_time_floor_bound: str | None = None
    """Which ceiling sets the floor: ``compute`` or ``memory``."""
    # GPU-grade measurement (perfkit/env/gpu.py) and scale-out (perfkit/matrix/shard.py)
    device_times_s: list[float] | None = None
    """CUDA: one device-clock round per host round (``times_s``), the step's kernels without launch gaps."""
    device_time_median_s: float | None = None
    device_timer: str | None = None
    device_rounds_uncovered: int | None = None
    """Device rounds whose spin kernel ended before the host had enqueued the step (their time has gaps)."""
    launch_bound: bool | None = None
    """Host median > 1.2 x device median: the GPU idles waiting for launches (CUDA graphs pay)."""
    throttled: bool | None = None
    """SM clock under 75% of the application clock during timing, also on the re-timing; None: unknown."""
    clocks: dict[str, Any] | None = None
    """NVML samples of SM clock, power, temperature and throttle reasons, or why none were taken."""
    isolation: str | None = None
    """``none`` (one pytest process) or ``process`` (a fresh process per block, ``--perfkit-isolate``)."""
    shard: str | None = None
    """``K/N`` when the run was one shard of the matrix (``--perfkit-shard``)."""
    eager_rel_error: float | None = None
    """Eager float32's output error against float64 in this group: the calibrated gate's yardstick."""
    eager_grad_rel_error: float | None = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Rebuild a record; unknown keys are an error so a schema drift is caught, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)


def append_jsonl(path: str | Path, record: Record) -> None:
    """Append one record as a line and flush, so an interrupted run keeps every finished cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[Record]:
    """Every record of a JSON-lines file."""
    with Path(path).open() as f:
        return [Record.from_dict(json.loads(line)) for line in f if line.strip()]
