"""The benchmark matrix as a pytest plugin: its options, parametrization and bookkeeping.

Registered through the ``pytest11`` entry point, so it is active wherever perfkit is installed:
``pytest benchmarks/ --benchmark-json out.json`` in this checkout, or a user's own folder of benchmarks.

Selection (each option has an environment variable; the option wins):

==========================  ===================  ==========================================================
option                      environment          meaning
==========================  ===================  ==========================================================
``--perfkit-profile``       ``PERFKIT_PROFILE``  ``quick`` (CPU-sized; the default without a GPU),
                                                 ``full`` (benchmark shapes, every entry; default with one)
                                                 or ``gpu-smoke`` (one call on one GPU, with its plan)
``--perfkit-blocks``        ``PERFKIT_BLOCKS``   comma list of names or globs (``basic,resnet*``)
``--perfkit-variants``      ``PERFKIT_VARIANTS`` comma list of variants (``eager,channels_last+bf16``)
``--perfkit-modes``         ``PERFKIT_MODES``    ``inference``, ``training`` or both
``--perfkit-batches``       ``PERFKIT_BATCHES``  comma list of batch sizes (replaces the profile's)
``--perfkit-device``        ``PERFKIT_DEVICE``   ``cuda`` when a GPU is present, else ``cpu``
``--perfkit-jsonl``         ``PERFKIT_JSONL``    JSON-lines file every cell's record is appended to
                                                 (default ``out/results.jsonl``)
``--perfkit-kernels``       ``PERFKIT_KERNELS``  kernel cells: comma list of kernels, or ``none``
                                                 (default: all; their variants are eager, compile, triton)
``--perfkit-shard``         ``PERFKIT_SHARD``    ``K/N``: only shard K of N, balanced by estimated cost
                                                 (``perfkit/shard.py``; the same split on every machine)
``--perfkit-isolate``       ``PERFKIT_ISOLATE``  each block's cells in a fresh process (``perfkit/workers.py``)
``--perfkit-import``        ``PERFKIT_IMPORT``   comma list of modules whose ``@perfkit.register`` calls add
                                                 blocks (a user's own models); installed packages may also
                                                 expose them through the ``perfkit.blocks`` entry points
``--perfkit-threads``       ``PERFKIT_THREADS``  torch's intra-op threads per cell (default: torch's
                                                 default, at most the cores that other processes did not
                                                 keep busy over 0.5 s at the start of the run)
``--perfkit-memory-model``  (below)              ``auto`` (the memory model predicts a cell on a GPU, and
                                                 elsewhere only where memory is tight) or ``exact`` (every
                                                 cell, so the report compares prediction and measurement);
                                                 env ``PERFKIT_MEMORY_MODEL``
``--perfkit-malloc``        ``PERFKIT_MALLOC``   ``pinned`` (glibc's mmap and trim thresholds fixed before
                                                 the first cell, so no cell's allocator depends on what
                                                 ran before it; ``perfkit.env.machine.pin_malloc``) or
                                                 ``default`` (glibc's moving thresholds)
==========================  ===================  ==========================================================

A profile with a time limit (``gpu-smoke``) and a shard print the plan (every cell's estimated cost, the
total; ``perfkit/plan.py``) after collection, ``--collect-only`` included, and a progress line per cell.
Under pytest-xdist on a GPU, ``-n auto`` runs one worker per visible GPU, each seeing only its own.

A bad name is a usage error listing the valid ones; ``-k`` filters the readable test ids
(``basic-channels_last+bf16-training-b32``) as usual.

Where each cell goes. pytest-benchmark's ``params`` are the cell's parametrization (block, variant, mode,
dtype, batch), its ``group`` is ``{block}-{mode}`` so its table puts the variants of a block side by side,
and its ``extra_info`` is the cell's whole :class:`perfkit.record.Record`. The stored timing is the
synchronized step time: rounds run through ``benchmark.pedantic`` (one iteration, no pytest-benchmark
warm-up: perfkit warms up until steady before), each round a step that ends in a device synchronization;
when the adaptive rule asks for more rounds than the first call ran, they are timed with the same clock
and appended to the same ``stats`` (pytest-benchmark's ``Stats.update``), so ``stats.data`` holds exactly
the record's ``times_s``. Raw rounds are kept in saved runs too (``benchmark_save_data`` is forced on).
A variant's rounds are interleaved with eager's (pytest-benchmark's ``setup`` runs, untimed by it, one
timed eager step before each round): ``stats.data`` stays the variant's rounds, eager's paired rounds are
the record's ``eager_times_s``, and ``speedup_vs_eager`` their ratio. The cells of an (entry, mode, batch)
group share one float64 reference and one warm eager model (``measure.GroupCache``). At the end of the run
the terminal summary gives the contended cells, the largest ranked speedup and where the wall time went.

Cells that are not timed. pytest-benchmark writes only benchmarks that ran, so:

- every record, whatever its status, is appended to the JSON-lines file as the cell finishes: that file
  is the complete record of a run, and an interrupted run keeps what it measured;
- in the benchmark JSON, records of ``skipped`` cells go under the top-level key ``perfkit_skipped_cells``
  and those of ``failed``/``oom``/``error`` cells under ``perfkit_failed_cells``;
- in pytest's output a skipped cell is a skip with its reason, and a failed, OOM or errored cell an
  ``xfail`` whose reason starts with its status. Not a test failure: the matrix is a measurement, a cell
  that fails its correctness gate is a finding about that variant on this device (CPU bf16 training, say),
  and the run must go on and exit cleanly so its report gets written.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import perfkit
from perfkit.env.device import default_device, device_identity
from perfkit.env.machine import available_cores, default_threads, pin_malloc
from perfkit.matrix.plan import (
    CEILINGS_S,
    OTHER_TEST_S,
    CellCost,
    estimate_cell,
    estimate_kernel_cell,
    format_plan,
    session_s,
)
from perfkit.matrix.shard import assign_shards, parse_shard
from perfkit.matrix.workers import WORKER_GPU_KEY, BlockProcess, visible_gpus, worker_gpu
from perfkit.measure import MEMORY_MODELS, QUICK_POLICY, BenchmarkRounds, GroupCache, TimingPolicy, measure_cell
from perfkit.record import Record, append_jsonl
from perfkit.registry import ENTRY_POINT_GROUP, IMPORT_ENV, import_modules, plugin_errors
from perfkit.variants import MODES, parse_variant


@dataclass(frozen=True)
class Profile:
    """A default matrix: which entries, variants, modes and batches, at which shapes."""

    blocks: tuple[str, ...]
    """Names or globs; those not registered (yet) are left out."""
    variants: tuple[str, ...]
    modes: tuple[str, ...]
    block_batches: tuple[int, ...]
    network_batches: tuple[int, ...]
    bench_shape: bool
    policy: TimingPolicy
    extra_cells: tuple[tuple[str, str], ...] = field(default=())
    """(entry, variant) pairs added on top: a variant too slow to run on every entry (a first compile)."""
    kernel_variants: tuple[str, ...] = ("eager", "compile", "triton")
    kernel_dtypes: tuple[str, ...] = ("float32",)
    kernel_layouts: tuple[str, ...] = ("nchw",)
    inference_only: tuple[tuple[str, str], ...] = field(default=())
    """(entry, variant) pairs left out of training: a network's first training compile costs a minute or more."""
    ceilings: bool = False
    """Measure the device's copy bandwidth and bf16 matmul in the run (benchmarks/test_ceilings.py)."""
    time_limit_s: float | None = None
    """The wall time the profile is sized for: its plan is printed and checked against it."""


PROFILES = {
    # About a minute on 2 CPU cores: small shapes, a few entries, the variants a CPU runs; one first
    # compile (~25 s each mode) on the smallest block only.
    "quick": Profile(
        blocks=("basic", "bottleneck", "wrc", "dense_plain", "inception", "d2l_resnet18"),
        variants=("eager", "channels_last", "bf16"),
        modes=MODES,
        block_batches=(8,),
        network_batches=(8,),
        bench_shape=False,
        policy=QUICK_POLICY,
        # The fused kernel inside a block: on the CPU only gate-checked, under TRITON_INTERPRET=1 (make bench
        # sets it where there is no GPU). Not dense_plain's (the interpreter takes 87 s over its two modes),
        # nor the compiled compositions (0.2-0.7 s of compile each): tests/test_fused_ops.py gates those,
        # the GPU profiles time them.
        extra_cells=(("basic", "compile"), ("wrc", "triton")),
        # A first compile of each kernel expression would cost ~25 s apiece here; the GPU profile has them.
        kernel_variants=("eager", "triton"),
    ),
    # For a GPU: benchmark shapes, every entry, every variant alone and the combinations that matter.
    "full": Profile(
        blocks=("*",),
        variants=("eager", "channels_last", "bf16", "fp16", "channels_last+bf16", "channels_last+fp16", "compile",
                  "channels_last+bf16+compile", "max-autotune", "cudagraphs", "channels_last+bf16+cudagraphs",
                  "triton", "channels_last+bf16+triton"),
        modes=MODES,
        block_batches=(32, 128, 256),
        network_batches=(32, 128),
        bench_shape=True,
        policy=TimingPolicy(),
        kernel_dtypes=("float32", "bfloat16"),
        kernel_layouts=("nchw", "channels_last"),
        ceilings=True,
    ),
    # One call on one H100/H200 (`make bench-gpu`), sized by perfkit/plan.py's cost model to stay under 7
    # minutes with its first compiles: eager, channels_last, channels_last+bf16 and triton on the blocks and
    # networks with fused kernels at batch 64; compile on each, in training too for the blocks only (a
    # network's training compile is a minute or more); triton+compile on the two blocks whose kernels are
    # the point (wrc, dense); the kernel cells in float32; the ceilings. Every compile in both modes (issue
    # #14's whole list) estimates at 13.5 minutes.
    "gpu-smoke": Profile(
        blocks=("basic", "bottleneck", "wrc", "dense", "resnet50", "densenet121"),
        variants=("eager", "channels_last", "channels_last+bf16", "triton"),
        modes=MODES,
        block_batches=(64,),
        network_batches=(64,),
        bench_shape=True,
        policy=TimingPolicy(min_rounds=10, max_rounds=300, max_time_s=1.0, warmup_max_s=2.0),
        extra_cells=(("basic", "compile"), ("bottleneck", "compile"), ("wrc", "compile"), ("dense", "compile"),
                     ("resnet50", "compile"), ("densenet121", "compile"), ("wrc", "triton+compile"),
                     ("dense", "triton+compile")),
        inference_only=(("resnet50", "compile"), ("densenet121", "compile")),
        kernel_variants=("eager", "triton"),
        ceilings=True,
        time_limit_s=7 * 60,
    ),
}

KERNELS = ("wrc_epilogue", "dense_bn_relu")
"""Kernel-level cells (benchmarks/test_kernels.py): each fused kernel alone against the same expression in
eager PyTorch and under torch.compile."""
KERNEL_VARIANTS = ("eager", "compile", "triton")

OPTIONS = {
    "profile": "PERFKIT_PROFILE",
    "blocks": "PERFKIT_BLOCKS",
    "variants": "PERFKIT_VARIANTS",
    "modes": "PERFKIT_MODES",
    "batches": "PERFKIT_BATCHES",
    "device": "PERFKIT_DEVICE",
    "jsonl": "PERFKIT_JSONL",
    "kernels": "PERFKIT_KERNELS",
    "shard": "PERFKIT_SHARD",
    "import": "PERFKIT_IMPORT",
    "threads": "PERFKIT_THREADS",
    "memory_model": "PERFKIT_MEMORY_MODEL",
    "malloc": "PERFKIT_MALLOC",
}
ISOLATE_ENV = "PERFKIT_ISOLATE"
ARGNAMES = ("block", "variant", "mode", "dtype", "batch")
KERNEL_ARGNAMES = ("kernel", "variant", "mode", "dtype", "layout")

_STATE = pytest.StashKey["MatrixConfig"]()
MALLOC_CHOICES = ("pinned", "default")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perfkit", "perfkit benchmark matrix")
    helps = {
        "profile": f"matrix profile: {', '.join(PROFILES)} (default: full with a GPU, quick without)",
        "blocks": "comma-separated block/network names or globs (default: the profile's)",
        "variants": "comma-separated variants, atoms joined with '+' (default: the profile's)",
        "modes": f"comma-separated modes from {', '.join(MODES)} (default: both)",
        "batches": "comma-separated batch sizes (default: the profile's)",
        "device": "torch device to measure on (default: cuda if available, else cpu)",
        "jsonl": "JSON-lines file each cell's record is appended to (default: out/results.jsonl)",
        "kernels": f"comma-separated kernels from {', '.join(KERNELS)}, or none (default: all)",
        "shard": "K/N: run only shard K of N (1-based), cells balanced by estimated cost",
        "import": "comma-separated modules to import first; their @perfkit.register calls add blocks",
        "threads": f"torch intra-op threads per cell, 1..{available_cores()} (default: torch's default, at most "
                   "the cores not kept busy by other processes at the start of the run)",
        "memory_model": f"when the memory model predicts a cell: {', '.join(MEMORY_MODELS)} (default: auto, "
                        "every cell on a GPU, elsewhere only where memory is tight)",
        "malloc": f"glibc malloc for the cells: {', '.join(MALLOC_CHOICES)} (default: pinned thresholds, the "
                  "same whatever ran before a cell)",
    }
    for name, env in OPTIONS.items():
        group.addoption(f"--perfkit-{name.replace('_', '-')}", dest=f"perfkit_{name}", default=None,
                        help=f"{helps[name]}; env {env}")
    group.addoption("--perfkit-isolate", dest="perfkit_isolate", action="store_true", default=None,
                    help=f"measure each block's cells in a fresh process; env {ISOLATE_ENV}=1")


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(f"perfkit_{name}")
    if value is None:
        value = os.environ.get(OPTIONS[name]) or None
    return value


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


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
        ``--perfkit-malloc default``."""
        if self.malloc == "pinned":
            pin_malloc()
        if self.threads is None:
            self.threads = default_threads()
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
            kind = perfkit.get_entry(block).kind
            batches = self.batches or (self.profile.block_batches if kind == "block" else self.profile.network_batches)
            variants = list(self.variants or self.profile.variants)
            if self.variants is None:
                variants += [v for b, v in self.profile.extra_cells if b == block and v not in variants]
            for variant in variants:
                dtype = parse_variant(variant).compute_dtype
                for mode in self.modes:
                    if mode == "training" and self.variants is None and (block, variant) in self.profile.inference_only:
                        continue
                    for batch in batches:
                        cells.append((block, variant, mode, dtype, batch))
        return cells

    def kernel_cells(self) -> list[tuple[str, str, str, str, str]]:
        """(kernel, variant, mode, dtype, layout) of every kernel cell."""
        variants = [v for v in (self.variants or self.profile.kernel_variants) if v in KERNEL_VARIANTS]
        return [(k, v, m, d, layout) for k in self.kernels for v in variants for m in self.modes
                for d in self.profile.kernel_dtypes for layout in self.profile.kernel_layouts]


def _import_blocks(config: pytest.Config) -> None:
    """Import ``--perfkit-import``'s modules; exported, so subprocesses (workers, isolated cells) see them too."""
    modules = _option(config, "import")
    if not modules:
        return
    try:
        import_modules(modules)
    except ImportError as error:
        raise pytest.UsageError(f"--perfkit-import: {error}") from None
    os.environ[IMPORT_ENV] = modules


def _resolve(config: pytest.Config) -> MatrixConfig:
    _import_blocks(config)
    valid_names = perfkit.list_blocks()
    device_name = _option(config, "device")
    try:
        device = torch.device(device_name) if device_name else default_device()
    except RuntimeError as error:
        raise pytest.UsageError(f"--perfkit-device {device_name!r}: {error}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--perfkit-device cuda: no CUDA GPU is available here; use cpu")

    profile_name = _option(config, "profile") or ("full" if device.type == "cuda" else "quick")
    if profile_name not in PROFILES:
        raise pytest.UsageError(f"unknown --perfkit-profile {profile_name!r}; valid profiles: {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]

    blocks_value = _option(config, "blocks")
    if blocks_value:
        blocks = []
        for pattern in _split(blocks_value):
            matches = fnmatch.filter(valid_names, pattern)
            if not matches:
                raise pytest.UsageError(f"--perfkit-blocks: {pattern!r} matches no registered block or network; "
                                        f"valid names: {', '.join(valid_names)}")
            blocks += [m for m in matches if m not in blocks]
    else:
        blocks = [n for n in valid_names if any(fnmatch.fnmatchcase(n, p) for p in profile.blocks)]

    variants_value = _option(config, "variants")
    variants = None
    if variants_value:
        variants = []
        for name in _split(variants_value):
            try:
                canonical = parse_variant(name).name
            except ValueError as error:
                raise pytest.UsageError(f"--perfkit-variants: {error}") from None
            if canonical not in variants:
                variants.append(canonical)

    modes = list(profile.modes)
    modes_value = _option(config, "modes")
    if modes_value:
        modes = _split(modes_value)
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise pytest.UsageError(f"--perfkit-modes: unknown mode(s) {bad}; valid modes: {', '.join(MODES)}")

    batches = None
    batches_value = _option(config, "batches")
    if batches_value:
        try:
            batches = [int(b) for b in _split(batches_value)]
        except ValueError:
            batches = []
        if not batches or any(b < 1 for b in batches):
            raise pytest.UsageError(f"--perfkit-batches {batches_value!r}: give positive integers, e.g. 32,128")

    kernels = list(KERNELS)
    kernels_value = _option(config, "kernels")
    if kernels_value:
        kernels = [] if kernels_value.strip() == "none" else _split(kernels_value)
        bad = [k for k in kernels if k not in KERNELS]
        if bad:
            raise pytest.UsageError(f"--perfkit-kernels: unknown kernel(s) {bad}; valid kernels: "
                                    f"{', '.join(KERNELS)} (or none)")

    shard = None
    shard_value = _option(config, "shard")
    if shard_value:
        try:
            shard = parse_shard(shard_value)
        except ValueError as error:
            raise pytest.UsageError(f"--perfkit-shard: {error}") from None
    isolate = bool(config.getoption("perfkit_isolate") or os.environ.get(ISOLATE_ENV) == "1")

    if device.type == "cuda" and not hasattr(config, "workerinput"):
        numprocesses = getattr(config.option, "numprocesses", None)  # pytest-xdist's -n, resolved by now
        gpus = visible_gpus()
        if isinstance(numprocesses, int) and numprocesses > len(gpus):
            raise pytest.UsageError(f"-n {numprocesses}: only {len(gpus)} GPU(s) visible ({', '.join(gpus)}); each "
                                    f"xdist worker owns one GPU, so run at most -n {len(gpus)} (or -n auto)")

    threads = None
    threads_value = _option(config, "threads")
    if threads_value:
        cores = available_cores()
        try:
            threads = int(threads_value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise pytest.UsageError(f"--perfkit-threads {threads_value!r}: give a positive integer; this process "
                                    f"may run on {cores} core(s), so 1..{cores} avoids oversubscription")

    malloc = _option(config, "malloc") or "pinned"
    if malloc not in MALLOC_CHOICES:
        raise pytest.UsageError(f"--perfkit-malloc {malloc!r}: valid choices are {', '.join(MALLOC_CHOICES)}")
    memory_model = _option(config, "memory_model") or "auto"
    if memory_model not in MEMORY_MODELS:
        raise pytest.UsageError(f"--perfkit-memory-model {memory_model!r}: valid choices are "
                                f"{', '.join(MEMORY_MODELS)}")

    jsonl = Path(_option(config, "jsonl") or "out/results.jsonl")
    return MatrixConfig(profile_name, profile, device, blocks, variants, modes, batches, jsonl, kernels, shard,
                        isolate, xdist_worker=hasattr(config, "workerinput"), threads=threads,
                        memory_model=memory_model, malloc=malloc)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before pytest-benchmark's own pytest_configure reads it: keep every round in saved runs as well as in
    # --benchmark-json (which always has them), since `perfkit compare` works on the rounds.
    if hasattr(config.option, "benchmark_save_data"):
        config.option.benchmark_save_data = True
    # An xdist worker given a GPU by the controller sees only that one; set before CUDA starts here.
    gpu = getattr(config, "workerinput", {}).get(WORKER_GPU_KEY)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    config.stash[_STATE] = _resolve(config)
    if config.stash[_STATE].shows_plan:
        config.pluginmanager.register(ProgressLines(config), "perfkit-progress")


# --- issue 14: one GPU per xdist worker, the plan, shards and progress lines (perfkit/workers.py, plan.py,
# shard.py); everything from here to file_record.


def _wants_cuda(config: pytest.Config) -> bool:
    device = _option(config, "device")
    return device.startswith("cuda") if device else torch.cuda.is_available()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` on a GPU: one worker per visible GPU (elsewhere xdist's own count)."""
    if not _wants_cuda(config):
        return None
    return len(visible_gpus()) or None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Give xdist worker gwK the K-th visible GPU, when the matrix runs on CUDA."""
    if node.config.stash[_STATE].device.type == "cuda":
        node.workerinput[WORKER_GPU_KEY] = worker_gpu(node.gateway.id, visible_gpus())


def _item_cost(matrix: MatrixConfig, item: pytest.Item) -> CellCost:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    name = item.name
    if "block" in params:
        policy = matrix.profile.policy
        return estimate_cell(name, params["block"], params["variant"], params["mode"], params["batch"],
                             bench_shape=matrix.profile.bench_shape, min_rounds=policy.min_rounds,
                             max_time_s=policy.max_time_s, warmup_batch_s=policy.warmup_batch_s)
    if "kernel" in params:
        return estimate_kernel_cell(name, params["variant"], params["mode"])
    return CellCost(name, 0.0, CEILINGS_S if name == "test_ceilings" else OTHER_TEST_S, 0.0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # First, before -k and -m deselect: a shard is a function of the whole collection, the same everywhere.
    matrix: MatrixConfig = config.stash[_STATE]
    if not matrix.shows_plan:
        return
    matrix.costs = {item.nodeid: _item_cost(matrix, item) for item in items}
    if matrix.shard is None:
        return
    k, n = matrix.shard
    assignment = assign_shards({nodeid: cost.total_s for nodeid, cost in matrix.costs.items()}, n)
    keep = [item for item in items if assignment[item.nodeid] == k]
    config.hook.pytest_deselected(items=[item for item in items if assignment[item.nodeid] != k])
    items[:] = keep


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    matrix: MatrixConfig = config.stash[_STATE]
    if not matrix.shows_plan or not items:
        return []
    costs = [matrix.costs[item.nodeid] for item in items if item.nodeid in matrix.costs]
    triton = any("triton" in c.cell for c in costs)
    header = [f"perfkit shard {matrix.shard[0]}/{matrix.shard[1]}"] if matrix.shard else []
    matrix.progress = {"done": 0, "total": len(items), "start": time.perf_counter(),
                       "estimate_s": sum(c.total_s for c in costs) + session_s(costs, triton)}
    return header + format_plan(costs, session_s(costs, triton), limit_s=matrix.profile.time_limit_s)


class ProgressLines:
    """Registered when the plan is shown: a line per finished cell with its outcome, estimate and the run's time."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        matrix: MatrixConfig = self.config.stash[_STATE]
        progress = matrix.progress
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if not progress or reporter is None:
            return
        progress["done"] += 1
        cost = matrix.costs.get(report.nodeid)
        elapsed = time.perf_counter() - progress["start"]
        outcome = "xfail" if hasattr(report, "wasxfail") else report.outcome
        reporter.write_line(
            f"[{progress['done']}/{progress['total']}] {report.nodeid.split('::')[-1]}: {outcome} in "
            f"{report.duration:.1f} s (estimate {cost.total_s if cost else 0:.1f} s); run {elapsed:.0f} s of an "
            f"estimated {progress['estimate_s']:.0f} s")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name each ``perfkit.blocks`` entry point that failed to load, with its error; the rest of the run goes on."""
    return [f"perfkit: {ENTRY_POINT_GROUP} entry point {name} failed to load: {error}"
            for name, error in plugin_errors().items()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    matrix = metafunc.config.stash[_STATE]
    if set(ARGNAMES) <= set(metafunc.fixturenames):
        cells = matrix.cells()
        metafunc.parametrize(ARGNAMES, cells, ids=[f"{b}-{v}-{m}-b{n}" for b, v, m, _, n in cells])
    elif set(KERNEL_ARGNAMES) <= set(metafunc.fixturenames):
        cells = matrix.kernel_cells()
        metafunc.parametrize(KERNEL_ARGNAMES, cells, ids=["-".join(cell) for cell in cells])


# --- end of issue 14's hooks


def file_record(matrix: MatrixConfig, benchmark, record: Record) -> Record:
    """Store ``record`` in extra_info and the JSON-lines file; skip or xfail the test if it was not timed."""
    record.isolation = matrix.isolation(record.kind)
    record.shard = f"{matrix.shard[0]}/{matrix.shard[1]}" if matrix.shard else None
    benchmark.extra_info.update(record.to_dict())
    append_jsonl(matrix.jsonl, record)
    matrix.records.append(record)
    if record.status == "skipped":
        matrix.skipped.append(record.to_dict())
        pytest.skip(record.reason)
    if record.status != "ok":
        matrix.failed.append(record.to_dict())
        pytest.xfail(f"{record.status}: {record.reason}")
    return record


@pytest.fixture
def perfkit_measure(request: pytest.FixtureRequest, benchmark):
    """``measure(block, variant, mode, batch) -> Record``: one cell, stored in pytest-benchmark and the JSONL."""
    matrix: MatrixConfig = request.config.stash[_STATE]

    def measure(block: str, variant: str, mode: str, batch: int) -> Record:
        benchmark.group = f"{block}-{mode}"
        matrix.before_cell()
        if matrix.isolate:
            if matrix.block_process is None:
                matrix.block_process = BlockProcess(matrix.device, matrix.profile.bench_shape, matrix.profile.policy,
                                                    threads=matrix.threads, memory_model=matrix.memory_model,
                                                    pin_malloc=matrix.malloc == "pinned")
            record = matrix.block_process.measure(block, variant, mode, batch)
            store_rounds(benchmark, record.times_s)
        else:
            record = measure_cell(block, variant, mode, batch, matrix.device, bench_shape=matrix.profile.bench_shape,
                                  policy=matrix.profile.policy, run_rounds=BenchmarkRounds(benchmark),
                                  groups=matrix.groups, threads=matrix.threads, memory_model=matrix.memory_model)
        return file_record(matrix, benchmark, record)

    return measure


def store_rounds(benchmark, times_s: list[float]) -> None:
    """Put rounds timed in another process into pytest-benchmark's stats, so ``stats.data`` is ``times_s``."""
    if benchmark.disabled or not times_s:
        return
    # pedantic is the public way to create the stats; its no-op rounds are then replaced by the real ones.
    benchmark.pedantic(lambda: None, rounds=len(times_s), iterations=1, warmup_rounds=0)
    benchmark.stats.stats.data[:] = times_s


@pytest.fixture
def perfkit_matrix(request: pytest.FixtureRequest) -> MatrixConfig:
    """The session's resolved selection (device, profile, JSON-lines path)."""
    return request.config.stash[_STATE]


@pytest.fixture
def perfkit_file_record(request: pytest.FixtureRequest):
    """``file(benchmark, record)``: :func:`file_record` for a test that measured its own cell."""
    matrix: MatrixConfig = request.config.stash[_STATE]
    return lambda benchmark, record: file_record(matrix, benchmark, record)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["perfkit_device"] = device_identity(config.stash[_STATE].device)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    matrix = config.stash[_STATE]
    output_json["perfkit_profile"] = matrix.profile_name
    # The PERFKIT_* variables select as the options do, so they are part of the command that reruns the run.
    selection = [f"{name}={os.environ[name]}" for name in sorted(OPTIONS.values()) if os.environ.get(name)]
    output_json["perfkit_command"] = shlex.join([*selection, "pytest", *config.invocation_params.args])
    output_json["perfkit_skipped_cells"] = matrix.skipped
    output_json["perfkit_failed_cells"] = matrix.failed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Close the isolated block's worker process (``--perfkit-isolate``), and write ``--benchmark-json`` when no
    cell was timed: pytest-benchmark then writes nothing ("no benchmarks have been run"), yet the skipped,
    failed and OOM cells are the run's results. Runs after pytest-benchmark's own hook (a wrapper that saves
    before yielding)."""
    matrix = session.config.stash.get(_STATE, None)
    if matrix is not None and matrix.block_process is not None:
        matrix.block_process.close()
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is None or not bench.json or bench.benchmarks or matrix is None or not (matrix.skipped or matrix.failed):
        return
    hook = session.config.hook
    commit_info = hook.pytest_benchmark_generate_commit_info(config=session.config)
    hook.pytest_benchmark_update_commit_info(config=session.config, commit_info=commit_info)
    output_json = hook.pytest_benchmark_generate_json(config=session.config, benchmarks=[], include_data=True,
                                                      machine_info=bench.get_machine_info(), commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=session.config, benchmarks=[], output_json=output_json)
    bench.save_json(output_json)
def run_summary(records: list[Record]) -> list[str]:
    """Lines for the end of a run: contended cells, the largest ranked speedup, where the wall time went."""
    timed = [r for r in records if r.status == "ok"]
    if not timed:
        return []
    contended = [r for r in timed if r.contended]
    lines = [f"perfkit: {len(timed)} cells timed, {len(contended)} contended (other processes took the cores "
             "they ran on: kept, never ranked)"]
    for r in contended:
        load = r.machine_load or {}
        lines.append(f"  contended: {r.block}-{r.variant}-{r.mode}-b{r.batch}: {load.get('contended_reason')}")
    every = [r for r in timed if r.speedup_vs_eager is not None]
    if every:
        top = max(every, key=lambda r: r.speedup_vs_eager)
        lines.append(f"perfkit: largest speedup of any cell, contended or not: {top.speedup_vs_eager:.2f}x "
                     f"[{top.speedup_ci_low:.2f}, {top.speedup_ci_high:.2f}] ({top.block} {top.variant} {top.mode} "
                     f"b{top.batch})")
    paired = [r for r in every if not r.contended]
    if paired:
        best = max(paired, key=lambda r: r.speedup_vs_eager)
        lines.append(f"perfkit: largest ranked speedup {best.speedup_vs_eager:.2f}x "
                     f"[{best.speedup_ci_low:.2f}, {best.speedup_ci_high:.2f}] ({best.block} {best.variant} "
                     f"{best.mode} b{best.batch}, interleaved with eager)")
    split: dict[str, float] = {}
    for r in records:
        for stage, seconds in (r.wall_split_s or {}).items():
            split[stage] = split.get(stage, 0.0) + seconds
    total = sum(split.values())
    if total > 0:
        parts = ", ".join(f"{stage} {seconds / total:.0%}" for stage, seconds in
                          sorted(split.items(), key=lambda item: -item[1]))
        timed_share = split.get("timed rounds", 0.0) / total
        lines.append(f"perfkit: wall time of the cells {total:.1f} s, {timed_share:.0%} of it timed rounds: {parts}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    matrix = config.stash.get(_STATE, None)
    if matrix is None:
        return
    for line in run_summary(matrix.records):
        terminalreporter.write_line(line)
