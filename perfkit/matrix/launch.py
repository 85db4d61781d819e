"""``perfkit launch``: the matrix's shards as cluster jobs through submitit, merged into one report.

Each of the N jobs runs ``python -m pytest <benchmarks> --perfkit-shard K/N`` (a fresh interpreter: a job
is a clean process whatever the executor) and writes ``shard-K-of-N.json`` and ``.jsonl`` in the output
folder. ``slurm`` submits one SLURM job per shard, one GPU each; each job runs pytest in the directory
``perfkit launch`` ran in, so the checkout must be on a filesystem the nodes share. ``local`` runs the same
jobs as processes on this machine (submitit's local executor: for tests, and for a CPU), each given its
own GPU where there are GPUs, never more shards than GPUs. When every job has ended, the shards that
produced results are merged by ``perfkit report`` (which refuses a cell two shards measured on different
devices of one name); a failed shard is reported with its log and the others are kept. Exit status 0
when every shard ran, 1 when one failed, 2 on bad input.

submitit is an optional dependency: ``pip install -e '.[cluster]'``.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EXECUTORS = ("slurm", "local")


@dataclass
class ShardRun:
    """What one shard's job left: its results files and pytest's exit status."""

    shard: str
    returncode: int
    json_path: str
    jsonl_path: str


def shard_paths(out_dir: Path, k: int, n: int) -> tuple[Path, Path]:
    """The benchmark JSON and JSON-lines files of shard ``k`` of ``n``."""
    stem = out_dir / f"shard-{k}-of-{n}"
    return stem.with_suffix(".json"), stem.with_suffix(".jsonl")


def run_shard(k: int, n: int, benchmarks: str, pytest_args: list[str], out_dir: str, cwd: str) -> ShardRun:
    """The job: run shard ``k`` of ``n`` in a fresh pytest process (this function runs on the job's node)."""
    json_path, jsonl_path = shard_paths(Path(out_dir), k, n)
    jsonl_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", benchmarks, "-q", "-p", "no:cacheprovider",
               f"--perfkit-shard={k}/{n}", f"--benchmark-json={json_path}", f"--perfkit-jsonl={jsonl_path}",
               *pytest_args]
    print("perfkit launch:", " ".join(command), flush=True)
    returncode = subprocess.call(command, cwd=cwd)
    return ShardRun(f"{k}/{n}", returncode, str(json_path), str(jsonl_path))


def _executor(kind: str, folder: Path, timeout_min: int, partition: str | None):
    try:
        import submitit
    except ImportError:
        raise ValueError("perfkit launch needs submitit: pip install -e '.[cluster]' (or pip install submitit)") \
            from None
    if kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"timeout_min": timeout_min, "gpus_per_node": 1, "tasks_per_node": 1, "name": "perfkit"}
        if partition:
            params["slurm_partition"] = partition
        executor.update_parameters(**params)
        return executor
    return submitit.LocalExecutor(folder=folder)


def launch(n: int, executor_kind: str, out_dir: str | Path, reports_dir: str | Path | None, *,
           benchmarks: str = "benchmarks", pytest_args: list[str] | None = None, timeout_min: int = 60,
           partition: str | None = None, gpus: list[int] | None = None) -> tuple[list[ShardRun], list[str]]:
    """Submit ``n`` shards, wait for them, merge the results; returns (runs that produced results, failures).

    ``gpus``: for the local executor, the GPUs to give the shards one each (None: none, the CPU).
    """
    if n < 1:
        raise ValueError(f"--shards {n}: give a positive number of shards")
    if executor_kind not in EXECUTORS:
        raise ValueError(f"--executor {executor_kind!r}: valid executors: {', '.join(EXECUTORS)}")
    if executor_kind == "local" and gpus and n > len(gpus):
        raise ValueError(f"--shards {n} with the local executor on {len(gpus)} GPU(s): each shard needs a GPU of "
                         f"its own; use at most {len(gpus)} shards (or slurm)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    executor = _executor(executor_kind, out / "submitit", timeout_min, partition)
    jobs = []
    for k in range(1, n + 1):
        if executor_kind == "local":
            # One GPU per shard on this machine; none (CUDA_VISIBLE_DEVICES="") on a CPU.
            executor.update_parameters(timeout_min=timeout_min, gpus_per_node=1 if gpus else 0,
                                       visible_gpus=[gpus[k - 1]] if gpus else ())
        jobs.append(executor.submit(run_shard, k, n, benchmarks, list(pytest_args or []), str(out), str(Path.cwd())))
    runs, failures = [], []
    for k, job in enumerate(jobs, 1):
        try:
            run = job.result()
        except Exception as error:  # a failed job is reported, the other shards are kept
            failures.append(f"shard {k}/{n} (job {job.job_id}) failed: {str(error).strip().splitlines()[0]}; "
                            f"log: {job.paths.stderr}")
            continue
        # pytest's 0: all passed; 1: a test failed (a cell's record is still filed); 5: nothing in this shard.
        if run.returncode not in (0, 1, 5):
            failures.append(f"shard {run.shard} (job {job.job_id}): pytest exited {run.returncode}; what it wrote "
                            f"is kept; log: {job.paths.stdout}")
        runs.append(run)
    # The JSON-lines file holds every cell of a shard (the benchmark JSON only the timed ones, and none
    # under --benchmark-disable); a shard whose cells were all elsewhere has none.
    paths = [r.jsonl_path for r in runs if Path(r.jsonl_path).exists()]
    if paths and reports_dir is not None:
        from perfkit.matrix.shard import check_shard_results
        from perfkit.results.report import build_reports, load_results

        for warning in check_shard_results([load_results(p) for p in paths]):
            print(f"perfkit launch: {warning}", file=sys.stderr)
        build_reports(paths, reports_dir)
    return runs, failures
