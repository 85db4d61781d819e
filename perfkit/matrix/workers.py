"""Cells in other processes: a fresh process per block (``--perfkit-isolate``), one GPU per xdist worker.

**Isolation.** In one process, a cell inherits the caching allocator's pools, cuDNN's algorithm choices and
Inductor's state from the cells before it (the long-standing complaint about timm's benchmark script).
With ``--perfkit-isolate`` each block's cells run in a fresh process, spawned (never forked: CUDA cannot
survive a fork) when the block starts and ended when it is done; pytest itself stays the one process that
files the records. pytest-xdist's ``--dist loadgroup`` was the other choice: it keeps a group on one worker
but a worker lives for the whole session and runs group after group, so the state still carries over; and
it would take the one-worker-per-GPU slot that scale-out needs. A worker that dies (a segfault, a CUDA
error that poisons the context) becomes that cell's ``error`` record and the next cell gets a new process.

**Several GPUs on one host.** Under pytest-xdist with a CUDA device, ``-n auto`` starts one worker per
visible GPU and worker ``gwK`` sees only the K-th (``CUDA_VISIBLE_DEVICES``, set before CUDA starts in
that worker), so no two cells ever share a GPU; more workers than GPUs is a usage error.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from typing import Any

import torch

from perfkit.env.device import device_identity
from perfkit.env.machine import pin_malloc
from perfkit.measure import GroupCache, TimingPolicy, measure_cell
from perfkit.record import Record
from perfkit.variants import parse_variant

WORKER_GPU_KEY = "perfkit_cuda_visible_devices"
"""The key of xdist's ``workerinput`` that carries a worker's GPU."""


def _serve_cells(conn: Any, device: str, bench_shape: bool, policy: TimingPolicy, options: dict[str, Any]) -> None:
    """The isolated process: measure each cell sent until told to stop (None). The block's groups share their
    float64 reference and warm eager model within the process, as they do in the matrix's own."""
    groups = GroupCache()
    if options.pop("pin_malloc", False):
        pin_malloc()
    while True:
        cell = conn.recv()
        if cell is None:
            return
        block, variant, mode, batch = cell
        conn.send(measure_cell(block, variant, mode, batch, device, bench_shape=bench_shape, policy=policy,
                               groups=groups, **options).to_dict())


class BlockProcess:
    """Measures cells in a process of their own, a new one each time the block changes."""

    def __init__(self, device: torch.device, bench_shape: bool, policy: TimingPolicy, **options: Any) -> None:
        """``options`` go to every :func:`perfkit.measure.measure_cell` call (``threads``, ``memory_model``),
        but ``pin_malloc``, which pins the process's malloc first (:func:`perfkit.env.machine.pin_malloc`)."""
        self.device = device
        self.bench_shape = bench_shape
        self.policy = policy
        self.options = options
        self.block: str | None = None
        self._process: Any = None
        self._conn: Any = None

    @property
    def pid(self) -> int | None:
        """The process measuring the current block (None before the first cell)."""
        return None if self._process is None else self._process.pid

    def _start(self, block: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_cells, name=f"perfkit-{block}", daemon=True,
                                        args=(child, str(self.device), self.bench_shape, self.policy, self.options))
        self._process.start()
        child.close()
        self.block = block

    def measure(self, block: str, variant: str, mode: str, batch: int) -> Record:
        """Measure one cell in the block's process; a dead process becomes the cell's ``error`` record."""
        if block != self.block or self._process is None:
            self.close()
            self._start(block)
        try:
            self._conn.send((block, variant, mode, batch))
            return Record.from_dict(self._conn.recv())
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._process.join(timeout=10)
            code = self._process.exitcode
            self._process = None
            self.block = None
            return Record(block=block, variant=variant, mode=mode, dtype=parse_variant(variant).compute_dtype,
                          batch=batch, status="error", device=device_identity(self.device),
                          reason=f"the isolated process of block {block} died (exit code {code}) measuring this cell")

    def close(self) -> None:
        """End the current block's process."""
        if self._process is None:
            return
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._conn.close()
        self._process = None
        self.block = None


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries, else 0..count-1."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [d.strip() for d in value.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_gpu(worker_id: str, gpus: list[str]) -> str:
    """The GPU of xdist worker ``gwK``: the K-th of ``gpus``; ValueError when there are fewer GPUs."""
    match = re.fullmatch(r"gw(\d+)", worker_id)
    if not match:
        raise ValueError(f"not an xdist worker id: {worker_id!r} (expected gw0, gw1, ...)")
    index = int(match[1])
    if index >= len(gpus):
        raise ValueError(f"xdist worker {worker_id} has no GPU of its own: {len(gpus)} visible ({', '.join(gpus)}); "
                         f"run at most {len(gpus)} workers (-n auto picks that)")
    return gpus[index]
