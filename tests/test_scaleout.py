"""Scale-out bookkeeping on the CPU: the plan, shards, isolation, xdist workers, submitit jobs, shard merging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from perfkit.cli import main
from perfkit.matrix.shard import assign_shards, check_shard_results, parse_shard
from perfkit.matrix.workers import BlockProcess, worker_gpu
from perfkit.measure import QUICK_POLICY
from perfkit.record import Record, append_jsonl, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--perfkit-blocks=basic,wrc", "--perfkit-variants=eager,channels_last", "--perfkit-modes=inference",
        "--perfkit-kernels=none", "--perfkit-profile=quick")


def _pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)


def _collected(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("benchmarks/")]


def _cells(path: Path) -> list[tuple]:
    return sorted((r.block, r.variant, r.mode, r.batch, r.status) for r in read_jsonl(path))


# ------------------------------------------------------------------------------------------------ shards

def test_parse_shard_accepts_k_of_n_and_names_the_form() -> None:
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/2", "3/2", "2", "a/b", ""):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_assign_shards_is_a_balanced_stable_partition() -> None:
    costs = {f"cell{i}": float((i * 37) % 11 + 1) for i in range(40)}
    assignment = assign_shards(costs, 4)
    assert set(assignment) == set(costs) and set(assignment.values()) == {1, 2, 3, 4}
    assert assign_shards(dict(reversed(list(costs.items()))), 4) == assignment  # order of input is irrelevant
    totals = [sum(c for cell, c in costs.items() if assignment[cell] == k) for k in range(1, 5)]
    assert max(totals) - min(totals) <= max(costs.values())


@pytest.mark.slow
def test_shards_partition_the_collected_cells_the_same_in_every_process() -> None:
    everything = _collected(_pytest("--collect-only", "-q", "--perfkit-profile=quick"))
    shards = [_collected(_pytest("--collect-only", "-q", "--perfkit-profile=quick", f"--perfkit-shard={k}/3"))
              for k in (1, 2, 3)]
    # Each shard computed its split in its own process (string hashing differs between processes): the
    # union being everything with no cell twice is the split agreeing across processes.
    assert sorted(sum(shards, [])) == sorted(everything)
    assert all(shards)


def test_bad_shard_is_a_usage_error() -> None:
    result = _pytest("--collect-only", "-q", "--perfkit-shard=4/3")
    assert result.returncode == 4 and "K/N" in result.stderr


@pytest.mark.slow
def test_gpu_smoke_prints_its_plan_within_seven_minutes_without_running() -> None:
    result = _pytest("--collect-only", "-q", env={"PERFKIT_PROFILE": "gpu-smoke"})
    assert result.returncode == 0, result.stderr
    plan = [line for line in result.stdout.splitlines() if "perfkit plan" in line or line.startswith("  test_")]
    cells = [line for line in plan if line.startswith("  test_")]
    assert len(cells) == len(_collected(result))
    minutes = float(re.search(r"estimate (\d+\.\d) min", result.stdout)[1])
    assert minutes < 7 and "within the profile's limit of 7 min" in result.stdout, plan[-2:]


# ------------------------------------------------------------------------------- processes and workers

@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial")
    result = _pytest(*TINY, f"--perfkit-jsonl={out / 'r.jsonl'}", "--benchmark-disable")
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "r.jsonl"


@pytest.mark.slow
def test_two_xdist_workers_yield_the_serial_cells(serial_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e '.[dev]')")
    result = _pytest(*TINY, "-n", "2", f"--perfkit-jsonl={tmp_path / 'r.jsonl'}", "--benchmark-disable")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _cells(tmp_path / "r.jsonl") == _cells(serial_run)
    assert {r.isolation for r in read_jsonl(tmp_path / "r.jsonl")} == {"worker"}
    assert {r.isolation for r in read_jsonl(serial_run)} == {"none"}


def test_worker_gpu_gives_each_worker_its_own_gpu() -> None:
    assert [worker_gpu(f"gw{i}", ["3", "5"]) for i in (0, 1)] == ["3", "5"]
    with pytest.raises(ValueError, match="at most 2 workers"):
        worker_gpu("gw2", ["3", "5"])


@pytest.mark.slow
def test_isolate_runs_each_block_in_a_fresh_process() -> None:
    cells = BlockProcess("cpu", bench_shape=False, policy=QUICK_POLICY)
    try:
        first = cells.measure("basic", "eager", "inference", 2)
        basic_pid = cells.pid
        second = cells.measure("basic", "channels_last", "inference", 2)
        assert cells.pid == basic_pid
        third = cells.measure("wrc", "eager", "inference", 2)
        assert cells.pid not in (None, basic_pid, os.getpid())
    finally:
        cells.close()
    assert [r.status for r in (first, second, third)] == ["ok"] * 3, [r.reason for r in (first, second, third)]


@pytest.mark.slow
def test_isolated_run_yields_the_serial_cells_and_stores_their_rounds(serial_run: Path, tmp_path: Path) -> None:
    result = _pytest(*TINY, "--perfkit-isolate", f"--perfkit-jsonl={tmp_path / 'r.jsonl'}",
                     f"--benchmark-json={tmp_path / 'b.json'}", "--perfkit-shard=1/1")
    assert result.returncode == 0, result.stdout + result.stderr
    # A shard prints its plan, then a progress line per test: the 4 cells, the ceilings' and the kernels' skips.
    assert "perfkit plan: 6 cells" in result.stdout
    assert len(re.findall(r"\[\d/6\] \S+: (?:passed|skipped) in", result.stdout)) == 6, result.stdout
    assert _cells(tmp_path / "r.jsonl") == _cells(serial_run)
    benches = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert len(benches) == 4
    for bench in benches:
        assert bench["extra_info"]["isolation"] == "process"
        assert bench["stats"]["data"] == bench["extra_info"]["times_s"]


@pytest.mark.slow
def test_two_shards_through_submitit_yield_the_serial_cells(serial_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[cluster]')")
    from perfkit.matrix.launch import launch

    for key in [k for k in os.environ if k.startswith("PERFKIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)
    runs, failures = launch(2, "local", tmp_path / "out", tmp_path / "reports", timeout_min=10,
                            benchmarks="benchmarks/test_matrix.py", pytest_args=[*TINY, "--benchmark-disable"])
    assert failures == [] and sorted(r.shard for r in runs) == ["1/2", "2/2"]
    records = [r for run in runs for r in read_jsonl(run.jsonl_path)]
    assert sorted((r.block, r.variant, r.mode, r.batch, r.status) for r in records) == _cells(serial_run)
    assert {r.shard for r in records} == {"1/2", "2/2"}
    assert list((tmp_path / "reports").glob("*/README.md"))


def test_launch_refuses_bad_input_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--shards", "0", "--executor", "local"]) == 2
    assert "positive number of shards" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- shard merging

def _record(shard: str, **device) -> Record:
    return Record(block="basic", variant="eager", mode="inference", dtype="float32", batch=64, status="ok",
                  device={"type": "cuda", "name": "NVIDIA H100 80GB HBM3", **device}, shard=shard,
                  times_s=[1e-3, 1.1e-3], step_time_median_s=1.05e-3)


def test_report_refuses_one_cell_from_two_devices_of_one_name(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append_jsonl(a, _record("1/2", driver="570.1"))
    append_jsonl(b, _record("2/2", driver="580.2"))
    assert main(["report", str(a), str(b), "-o", str(tmp_path / "reports")]) == 2
    error = capsys.readouterr().err
    assert "two different devices named 'NVIDIA H100 80GB HBM3'" in error and "driver" in error
    assert not (tmp_path / "reports").exists()


def test_shard_merge_keeps_a_rerun_on_the_same_device_and_names_missing_shards(tmp_path: Path) -> None:
    from perfkit.results.load import load_results

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append_jsonl(a, _record("1/3", driver="570.1"))
    append_jsonl(b, _record("1/3", driver="570.1"))
    warnings = check_shard_results([load_results(a), load_results(b)])
    assert warnings == ["shards of 3: 2, 3 missing; the report covers the others"]
