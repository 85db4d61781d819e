"""A benchmark session's matrix: the options resolved into a :class:`MatrixConfig`, its cells, its records.

:func:`resolve_matrix` reads the options' text (``perfkit.matrix.options.option_values``) in a fixed order:
the user's modules first, so their blocks can be selected; then the device, which picks the default
profile; then the profile, whose defaults the other options fall back on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import perfkit
from perfkit.env.ceilings import run_ceilings
from perfkit.env.machine import default_threads, pin_malloc
from perfkit.matrix.options import (
    OptionError,
    parse_batches,
    parse_blocks,
    parse_device,
    parse_gate_seeds,
    parse_import,
    parse_isolate,
    parse_jsonl,
    parse_kernels,
    parse_malloc,
    parse_memory_model,
    parse_modes,
    parse_profile,
    parse_shard,
    parse_threads,
    parse_variants,
)
from perfkit.matrix.plan import CellCost
from perfkit.matrix.profiles import KERNEL_VARIANTS, PROFILES, Profile
from perfkit.matrix.workers import BlockProcess, visible_gpus
from perfkit.measure import GATE_SEEDS, GroupCache
from perfkit.record import Record
from perfkit.registry import IMPORT_ENV, import_modules
from perfkit.variants import parse_variant


@dataclass
class MatrixConfig:
    """The resolved selection of one benchmark session, and the records of its cells that were not timed."""

    profile_name: str
    profile: Profile
    device: torch.device
    blocks: list[str]
    variants: list[str] | None
    """None: the profile's variants (with its extra cells)."""
    modes: list[str]
    batches: list[int] | None
    jsonl: Path
    kernels: list[str]
    shard: tuple[int, int] | None = None
    isolate: bool = False
    xdist_worker: bool = False
    threads: int | None = None
    """None: :func:`perfkit.env.machine.default_threads`, judged when the first cell is about to run."""
    memory_model: str = "auto"
    malloc: str = "pinned"
    gate_seeds: int = GATE_SEEDS
    """Inputs the correctness gate checks each cell on before timing (``--perfkit-gate-seeds``)."""
    ceilings: dict[str, Any] | None = None
    """The device's ceilings, measured before the first cell (:func:`perfkit.env.ceilings.run_ceilings`): every
    cell's physical floor, and its record's ``ceilings``."""
    records: list[Record] = field(default_factory=list)
    """Every record of the session, for the terminal summary."""
    groups: GroupCache = field(default_factory=GroupCache)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    costs: dict[str, CellCost] = field(default_factory=dict)
    """Estimated cost of each collected test, by node id (filled when a plan is shown or a shard taken)."""
    block_process: BlockProcess | None = None
    progress: dict = field(default_factory=dict)
    """Cells done, cells planned, start time and estimated total, for the progress lines."""

    @property
    def shows_plan(self) -> bool:
        """Whether the plan and the progress lines are printed: a profile with a time limit, or a shard."""
        return self.profile.time_limit_s is not None or self.shard is not None

    def before_cell(self) -> int:
        """Set the process up for the cells, once, and return the intra-op threads every cell runs with:
        ``--perfkit-threads``, else judged before the first cell (:func:`perfkit.env.machine.default_threads`).
        glibc's malloc thresholds are pinned (:func:`perfkit.env.machine.pin_malloc`) unless
        ``--perfkit-malloc default``; the device's ceilings are measured (:attr:`ceilings`)."""
        if self.malloc == "pinned":
            pin_malloc()
        if self.threads is None:
            self.threads = default_threads()
        if self.ceilings is None:
            # Once per run (per process under xdist), at the cells' threads: what bounds every cell's time.
            self.ceilings = run_ceilings(self.device, self.threads)
        return self.threads

    def isolation(self, kind: str) -> str:
        """How a cell of ``kind`` was isolated: ``process``, ``worker`` (an xdist worker) or ``none``."""
        if self.isolate and kind != "kernel":
            return "process"
        return "worker" if self.xdist_worker else "none"

    def cells(self) -> list[tuple[str, str, str, str, int]]:
        """(block, variant, mode, dtype, batch) of every cell, in a stable order."""
        cells = []
        for block in self.blocks:
            for variant in self._variants(block):
                dtype = parse_variant(variant).compute_dtype
                for mode in self.modes:
                    if mode == "training" and self.variants is None and (block, variant) in self.profile.inference_only:
                        continue
                    cells += [(block, variant, mode, dtype, batch) for batch in self._batches(block)]
        return cells

    def _variants(self, block: str) -> list[str]:
        """The selected variants, else the profile's with its extra cells on ``block``."""
        variants = list(self.variants or self.profile.variants)
        if self.variants is None:
            variants += [v for b, v in self.profile.extra_cells if b == block and v not in variants]
        return variants

    def _batches(self, block: str) -> tuple[int, ...] | list[int]:
        """The selected batches, else the profile's for a block or for a network."""
        if self.batches:
            return self.batches
        kind = perfkit.get_entry(block).kind
        return self.profile.block_batches if kind == "block" else self.profile.network_batches

    def kernel_cells(self) -> list[tuple[str, str, str, str, str]]:
        """(kernel, variant, mode, dtype, layout) of every kernel cell."""
        variants = [v for v in (self.variants or self.profile.kernel_variants) if v in KERNEL_VARIANTS]
        return [(k, v, m, d, layout) for k in self.kernels for v in variants for m in self.modes
                for d in self.profile.kernel_dtypes for layout in self.profile.kernel_layouts]


def import_blocks(modules: list[str]) -> None:
    """Import ``--perfkit-import``'s modules; exported, so subprocesses (workers, isolated cells) see them too."""
    if not modules:
        return
    try:
        import_modules(modules)
    except ImportError as error:
        raise OptionError(f"--perfkit-import: {error}") from None
    os.environ[IMPORT_ENV] = ",".join(modules)


def check_gpu_workers(numprocesses: object, device: torch.device) -> None:
    """On CUDA, refuse more pytest-xdist workers (``-n``) than visible GPUs: each worker owns one."""
    if device.type != "cuda":
        return
    gpus = visible_gpus()
    if isinstance(numprocesses, int) and numprocesses > len(gpus):
        raise OptionError(f"-n {numprocesses}: only {len(gpus)} GPU(s) visible ({', '.join(gpus)}); each xdist worker "
                          f"owns one GPU, so run at most -n {len(gpus)} (or -n auto)")


def resolve_matrix(values: Mapping[str, str | None], *, xdist_worker: bool = False,
                   numprocesses: object = None) -> MatrixConfig:
    """The session's matrix from each option's text (None: unset); OptionError names a bad value.

    ``xdist_worker``: this process is a pytest-xdist worker (the controller checked ``-n`` already);
    ``numprocesses``: xdist's resolved ``-n`` in the controller, checked against the visible GPUs.
    """
    import_blocks(parse_import(values.get("import")))
    registered = perfkit.list_blocks()
    device = parse_device(values.get("device"))
    profile_name = parse_profile(values.get("profile"), device)
    profile = PROFILES[profile_name]
    blocks = parse_blocks(values.get("blocks"), registered, profile.blocks)
    variants = parse_variants(values.get("variants"))
    modes = parse_modes(values.get("modes"), profile.modes)
    batches = parse_batches(values.get("batches"))
    kernels = parse_kernels(values.get("kernels"))
    shard = parse_shard(values.get("shard"))
    isolate = parse_isolate(values.get("isolate"))
    if not xdist_worker:
        check_gpu_workers(numprocesses, device)
    threads = parse_threads(values.get("threads"))
    malloc = parse_malloc(values.get("malloc"))
    memory_model = parse_memory_model(values.get("memory_model"))
    gate_seeds = parse_gate_seeds(values.get("gate_seeds"))
    jsonl = parse_jsonl(values.get("jsonl"))
    return MatrixConfig(profile_name, profile, device, blocks, variants, modes, batches, jsonl, kernels, shard, isolate,
                        xdist_worker=xdist_worker, threads=threads, memory_model=memory_model, malloc=malloc,
                        gate_seeds=gate_seeds)
