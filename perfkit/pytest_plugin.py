"""The benchmark matrix as a pytest plugin: its hooks and fixtures.

Registered through the ``pytest11`` entry point, so it is active wherever perfkit is installed:
``pytest benchmarks/ --benchmark-json out.json`` in this checkout, or a user's own folder of benchmarks.
The options (``perfkit.matrix.options``), the profiles and where each cell's record goes in the JSON are
described in ``docs/matrix.md``.
"""

from __future__ import annotations

import os
import shlex
import time

import pytest
import torch

from perfkit import user_variants
from perfkit.env.device import device_identity
from perfkit.matrix.config import MatrixConfig, resolve_matrix
from perfkit.matrix.options import OPTIONS, OptionError, option_values, selection_env
from perfkit.matrix.plan import (
    CEILINGS_S,
    OTHER_TEST_S,
    CellCost,
    estimate_cell,
    estimate_kernel_cell,
    format_plan,
    session_s,
)
from perfkit.matrix.shard import assign_shards
from perfkit.matrix.summary import run_summary
from perfkit.matrix.workers import WORKER_GPU_KEY, BlockProcess, visible_gpus, worker_gpu
from perfkit.measure import BenchmarkRounds, measure_cell
from perfkit.record import Record, append_jsonl
from perfkit.registry import ENTRY_POINT_GROUP, plugin_errors

ARGNAMES = ("block", "variant", "mode", "dtype", "batch")
"""The parameters of a ``test_matrix``-like test, which the plugin parametrizes with the matrix's cells."""
KERNEL_ARGNAMES = ("kernel", "variant", "mode", "dtype", "layout")
"""The parameters of a ``test_kernel``-like test, parametrized with the kernel cells."""

_STATE = pytest.StashKey[MatrixConfig]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register every option of :data:`perfkit.matrix.options.OPTIONS`, unset by default (the variable decides)."""
    group = parser.getgroup("perfkit", "perfkit benchmark matrix")
    for option in OPTIONS:
        if option.switch:
            group.addoption(option.flag, dest=option.dest, action="store_true", default=None,
                            help=f"{option.help}; env {option.env}=1")
        else:
            group.addoption(option.flag, dest=option.dest, default=None, help=f"{option.help}; env {option.env}")


def _resolve(config: pytest.Config) -> MatrixConfig:
    """The session's matrix; a bad value is a usage error (pytest's exit status 4)."""
    try:
        return resolve_matrix(option_values(config.getoption), xdist_worker=hasattr(config, "workerinput"),
                              numprocesses=getattr(config.option, "numprocesses", None))  # xdist's -n, resolved
    except OptionError as error:
        raise pytest.UsageError(str(error)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Resolve the matrix, before pytest-benchmark configures itself."""
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


def _wants_cuda(config: pytest.Config) -> bool:
    device = option_values(config.getoption)["device"]
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
    """Estimate each collected cell's cost and, under ``--perfkit-shard K/N``, keep only shard K's cells."""
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
    """The plan (every cell's estimated cost and the total), for a profile with a time limit or a shard."""
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
        """Write the progress line of a cell that finished (or failed to set up)."""
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
    """Name each ``perfkit.blocks`` or ``perfkit.variants`` entry point that failed to load, with its error; the
    rest of the run goes on."""
    failed = [(ENTRY_POINT_GROUP, plugin_errors()), (user_variants.ENTRY_POINT_GROUP,
                                                      user_variants.variant_plugin_errors())]
    return [f"perfkit: {group} entry point {name} failed to load: {error}"
            for group, errors in failed for name, error in errors.items()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize a test taking :data:`ARGNAMES` with the matrix's cells, one taking :data:`KERNEL_ARGNAMES`
    with its kernel cells; the ids are readable for ``-k`` (``basic-channels_last+bf16-training-b32``)."""
    matrix = metafunc.config.stash[_STATE]
    if set(ARGNAMES) <= set(metafunc.fixturenames):
        cells = matrix.cells()
        metafunc.parametrize(ARGNAMES, cells, ids=[f"{b}-{v}-{m}-b{n}" for b, v, m, _, n in cells])
    elif set(KERNEL_ARGNAMES) <= set(metafunc.fixturenames):
        cells = matrix.kernel_cells()
        metafunc.parametrize(KERNEL_ARGNAMES, cells, ids=["-".join(cell) for cell in cells])


def file_record(matrix: MatrixConfig, benchmark, record: Record) -> Record:
    """Store ``record`` in extra_info and the JSON-lines file; skip or xfail the test if it was not timed.

    A failed, OOM or errored cell is an xfail, not a test failure: the matrix is a measurement, a cell that
    fails its correctness gate is a finding about that variant on this device, and the run must go on and
    exit cleanly so its report gets written.
    """
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
                                                    pin_malloc=matrix.malloc == "pinned", gate_seeds=matrix.gate_seeds,
                                                    ceilings=matrix.ceilings)
            record = matrix.block_process.measure(block, variant, mode, batch)
            store_rounds(benchmark, record.times_s)
        else:
            record = measure_cell(block, variant, mode, batch, matrix.device, bench_shape=matrix.profile.bench_shape,
                                  policy=matrix.profile.policy, run_rounds=BenchmarkRounds(benchmark),
                                  groups=matrix.groups, threads=matrix.threads, memory_model=matrix.memory_model,
                                  gate_seeds=matrix.gate_seeds, ceilings=matrix.ceilings)
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
    """Name the measured device (not only the host) in pytest-benchmark's machine info."""
    machine_info["perfkit_device"] = device_identity(config.stash[_STATE].device)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Add the profile, the command that reruns the run, and the records of the cells that were not timed."""
    matrix = config.stash[_STATE]
    output_json["perfkit_profile"] = matrix.profile_name
    # The PERFKIT_* variables select as the options do, so they are part of the command that reruns the run.
    output_json["perfkit_command"] = shlex.join([*selection_env(os.environ), "pytest", *config.invocation_params.args])
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


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """End the run with :func:`perfkit.matrix.summary.run_summary`'s lines."""
    matrix = config.stash.get(_STATE, None)
    if matrix is None:
        return
    for line in run_summary(matrix.records):
        terminalreporter.write_line(line)
