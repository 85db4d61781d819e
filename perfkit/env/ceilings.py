"""The device's ceilings, measured in the same run as the cells they bound, and each cell's physical floor.

A kernel's GB/s means something only against what this GPU, today, at these clocks, can copy; a datasheet
figure is a ceiling no kernel reaches. ``copy_gb_per_s`` is a device-to-device copy of
:data:`COPY_BYTES` (far beyond any L2: the H200's is 60 MB), counted as bytes read plus bytes written;
``bf16_tflops`` a square bf16 matmul of :data:`MATMUL_N` (2 N^3 FLOPs). Each is the median of
:data:`ROUNDS` rounds timed with CUDA events after a warm-up. Written as ``ceilings.json``, the file
``perfkit report`` reads from a device's folder. On a CPU, :func:`measure_cpu_ceilings` takes the same two
figures (a float32 matmul at the run's threads, a copy) in under a second, once per run.

A cell's **floor** (:func:`step_floor`) is the time its step would take at these ceilings: its FLOPs at the
measured peak, or the bytes it must move beyond what the caches can hold over from the step before at the
copy bandwidth, whichever is longer. Measured ceilings are not proven ones (a kernel can beat the matmul
that measured them), so only a median under the floor by more than :data:`IMPOSSIBLE_FRACTION` is recorded
``impossible``: the step did not do the work it is counted for.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COPY_BYTES = 2 * 2**30
MATMUL_N = 8192
ROUNDS = 20
WARMUP_ROUNDS = 3


def _cuda_rounds(fn: Callable[[], None], rounds: int) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure_ceilings(device: torch.device | str, copy_bytes: int = COPY_BYTES, matmul_n: int = MATMUL_N,
                     rounds: int = ROUNDS,
                     time_rounds: Callable[[Callable[[], None], int], list[float]] | None = None) -> dict[str, float]:
    """``{"copy_gb_per_s", "bf16_tflops"}`` of ``device`` (``time_rounds`` defaults to CUDA events)."""
    device = torch.device(device)
    time_rounds = time_rounds or _cuda_rounds
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)

    def copy() -> None:
        target.copy_(source)

    def matmul() -> None:
        torch.mm(a, b)

    results = {}
    for key, fn, work in (("copy_gb_per_s", copy, 2 * source.numel() * source.element_size() / 1e9),
                          ("bf16_tflops", matmul, 2 * matmul_n**3 / 1e12)):
        time_rounds(fn, WARMUP_ROUNDS)
        results[key] = work / statistics.median(time_rounds(fn, rounds))
    return results


def write_ceilings(ceilings: dict[str, float], folder: str | Path) -> Path:
    """Write ``ceilings.json`` into ``folder`` (created); returns its path."""
    path = Path(folder) / "ceilings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ceilings, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ CPU

CPU_MATMUL_N = 2048
"""The CPU's peak from a square float32 matmul of this size: 17 GFLOP, 0.1 s on 2 cores of a recent Xeon; smaller
ones read lower there (1024: 0.7x, 512: 0.45x), and a peak read low raises every floor."""
CPU_COPY_BYTES = 256 * 2**20
"""The CPU's copy bandwidth from a copy of this many bytes: past most L2s; where it stays in a large L3 the
figure is the cache's, higher than memory's, which again only lowers the floor."""
CPU_ROUNDS = 3
"""Timed rounds of each, after one warm-up; the fastest is the ceiling (a ceiling is the best the machine did)."""


def _best_s(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_cpu_ceilings(threads: int | None = None, copy_bytes: int = CPU_COPY_BYTES, matmul_n: int = CPU_MATMUL_N,
                         rounds: int = CPU_ROUNDS) -> dict[str, Any]:
    """``{"fp32_tflops", "copy_gb_per_s", "cache_bytes", "threads", "measure_s", "method"}`` of this CPU at
    ``threads`` intra-op threads (None: torch's current count), from the fastest of ``rounds`` rounds each."""
    start = time.perf_counter()
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
        fp32_tflops = 2 * matmul_n**3 / _best_s(lambda: torch.mm(a, b), rounds) / 1e12
        source = torch.ones(copy_bytes // 4)
        target = torch.empty_like(source)
        copy_gb_per_s = 2 * copy_bytes / _best_s(lambda: target.copy_(source), rounds) / 1e9
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {"fp32_tflops": fp32_tflops, "copy_gb_per_s": copy_gb_per_s, "cache_bytes": cache_bytes("cpu"),
            "threads": threads, "measure_s": time.perf_counter() - start,
            "method": f"fastest of {rounds} rounds: float32 matmul {matmul_n}^2, copy of {copy_bytes // 2**20} MiB"}


def run_ceilings(device: torch.device | str, threads: int | None = None) -> dict[str, Any]:
    """The ceilings a run's cells are bounded by, measured once per run: on a GPU :func:`measure_ceilings`
    (copy and bf16 matmul) and its L2, on a CPU :func:`measure_cpu_ceilings` at the cells' ``threads``."""
    device = torch.device(device)
    if device.type != "cuda":
        return measure_cpu_ceilings(threads)
    start = time.perf_counter()
    ceilings: dict[str, Any] = dict(measure_ceilings(device))
    # The copy's 4 GiB stay in the caching allocator's pool otherwise, and the cells' memory plans read
    # that as used.
    torch.cuda.empty_cache()
    ceilings.update(cache_bytes=cache_bytes(device), measure_s=time.perf_counter() - start,
                    method=f"median of {ROUNDS} rounds (CUDA events): bf16 matmul {MATMUL_N}^2, copy of "
                           f"{COPY_BYTES // 2**30} GiB")
    return ceilings


def cache_bytes(device: torch.device | str) -> int | None:
    """The most bytes the device's caches can carry from one step to the next: every CPU cache (each shared
    one once) from sysfs, or a GPU's L2 (its L1s and shared memory do not outlive a kernel); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    seen: dict[tuple[str, str, str], int] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            kind, level = (index / "type").read_text().strip(), (index / "level").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        seen[(level, kind, shared)] = int(size.rstrip("KMG")) * units.get(size[-1], 1)
    return sum(seen.values()) or None


# ------------------------------------------------------------------------------------------ the floor

ELEMENT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of a cell's compute dtype: the fewest its tensors can be stored in, for the lower bound."""

IMPOSSIBLE_FRACTION = 10.0
"""A median under its floor by more than this factor is ``impossible``. Not 1: the ceilings are measured, not
proven. On a shared 2-core Xeon a oneDNN 3x3 convolution ran at 1.1x torch's 2048^2 matmul (176 against 159
GFLOP/s), and the matmul timed while other processes held the cores read up to 4.5x low; a copy moves up to
a third more bytes than it is counted for (write-allocate); a 3x3 convolution by Winograd's F(4x4, 3x3) does
4x fewer multiplies than it is counted for. A step skipped or answered from a cache runs a hundred times or
more under its floor (tests/test_ungameable.py)."""


def bytes_lower_bound(params: int | None, input_shape: Sequence[int] | None, dtype: str, mode: str) -> int | None:
    """The fewest bytes a block's step can move: its weights and its input read once each (training: weights
    read in forward and backward and their gradients written, input read twice), in its compute dtype;
    None without the parameter count or the input shape.

    It ignores activations and outputs, so it overstates the arithmetic intensity: a block placed right of
    the ridge by it may still be memory-bound, never the reverse.
    """
    if params is None or not input_shape:
        return None
    size = ELEMENT_BYTES.get(dtype, 4)
    training = mode == "training"
    return size * (params * (3 if training else 1) + math.prod(input_shape) * (2 if training else 1))


def peak_tflops(ceilings: dict[str, Any], dtype: str) -> float | None:
    """The measured peak TFLOP/s for ``dtype`` among ``ceilings``, None where none was measured."""
    key = {"bfloat16": "bf16_tflops", "float16": "fp16_tflops", "float32": "fp32_tflops"}.get(dtype)
    return ceilings.get(key) if key else None


@dataclass(frozen=True)
class Floor:
    """The least time a step could take on the device's ceilings, and which ceiling sets it."""

    step_time_s: float
    bound: str
    """``compute`` (FLOPs at the peak) or ``memory`` (bytes beyond the caches at the copy bandwidth)."""


def step_floor(flops: int | None, bytes_moved: int | None, ceilings: dict[str, Any] | None,
               dtype: str) -> Floor | None:
    """``max(flops / peak, (bytes_moved - cache_bytes) / copy bandwidth)`` on ``ceilings``, each term where its
    inputs are known; None where neither is (no ceilings, or a dtype without a measured peak and no bytes).

    The caches' capacity is taken off the bytes: a step repeated on the same weights and input may find that
    much still cached from the step before, so only the rest must come from memory.
    """
    if not ceilings:
        return None
    terms: list[tuple[float, str]] = []
    peak = peak_tflops(ceilings, dtype)
    if flops and peak:
        terms.append((flops / (peak * 1e12), "compute"))
    copy, cached = ceilings.get("copy_gb_per_s"), ceilings.get("cache_bytes")
    if bytes_moved and copy and cached is not None:
        terms.append((max(0, bytes_moved - cached) / (copy * 1e9), "memory"))
    if not terms:
        return None
    seconds, bound = max(terms)
    return Floor(seconds, bound) if seconds > 0 else None


def floor_fraction(floor_s: float | None, median_s: float | None) -> float | None:
    """The floor over the median: the share of the device's ceilings the step reached (1.0: on the floor)."""
    if not floor_s or not median_s or median_s <= 0:
        return None
    return floor_s / median_s


def impossible_reason(floor: Floor, median_s: float) -> str | None:
    """Why a step whose median is ``median_s`` is ``impossible`` against ``floor``, or None if it is not."""
    fraction = floor_fraction(floor.step_time_s, median_s)
    if fraction is None or fraction <= IMPOSSIBLE_FRACTION:
        return None
    return (f"median {median_s * 1e6:.3g} us is {fraction:.3g}x under the step's physical floor "
            f"{floor.step_time_s * 1e6:.3g} us ({floor.bound}-bound, from this run's ceilings); more than "
            f"{IMPOSSIBLE_FRACTION:g}x under it, the step cannot have done its work: never ranked")
