"""The device's ceilings, measured in the same run as the cells they bound: copy bandwidth and bf16 matmul.

A kernel's GB/s means something only against what this GPU, today, at these clocks, can copy; a datasheet
figure is a ceiling no kernel reaches. ``copy_gb_per_s`` is a device-to-device copy of
:data:`COPY_BYTES` (far beyond any L2: the H200's is 60 MB), counted as bytes read plus bytes written;
``bf16_tflops`` a square bf16 matmul of :data:`MATMUL_N` (2 N^3 FLOPs). Each is the median of
:data:`ROUNDS` rounds timed with CUDA events after a warm-up. Written as ``ceilings.json``, the file
``perfkit report`` reads from a device's folder.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

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
