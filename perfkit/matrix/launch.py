"""``perfkit launch``: the matrix's shards as cluster jobs through submitit, merged into one report.

Each of the N jobs runs ``python -m pytest <benchmarks> --perfkit-shard K/N`` (a fresh interpreter: a job
is a clean process whatever the executor) and writes ``shard-K-of-N.json`` and ``.jsonl`` in the output
folder. ``slurm`` submits one SLURM job per shard, asking for what :class:`SlurmOptions` holds (one GPU
when the matrix runs on CUDA, none for a CPU matrix or a partition without GPUs: :func:`default_gpus`);
each job runs pytest in the directory ``perfkit launch`` ran in, so the checkout must be on a filesystem
the nodes share. ``local`` runs the same jobs as processes on this machine (submitit's local executor: for
tests, and for a CPU), each given its own GPU where there are GPUs, never more shards than GPUs. When
every job has ended, the shards that produced results are merged by ``perfkit report`` (which refuses a
cell two shards measured on different devices of one name); a failed shard is reported with its log and
the others are kept. A job ``sbatch`` refuses is one line quoting the scheduler and naming the option to
change (:func:`sbatch_refusal`), and the jobs already submitted are cancelled; so are all of them on
Ctrl-C. Exit status 0 when every shard ran, 1 when one failed, 2 on bad input or a refused job.

submitit is an optional dependency: ``pip install -e '.[cluster]'``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

EXECUTORS = ("slurm", "local")

SBATCH_FLAGS = {
    "--partition": "--partition",
    "--gpus": "--gpus-per-node",
    "--cpus-per-task": "--cpus-per-task",
    "--mem": "--mem",
    "--account": "--account",
    "--qos": "--qos",
    "--constraint": "--constraint",
    "--timeout-min": "--time",
    "--sbatch": "--KEY=VALUE",
}
"""Each ``perfkit launch`` option for SLURM and the ``sbatch`` flag it becomes (every job is one task on one node,
so ``--gpus-per-node`` is the job's GPUs)."""

# The option a refusal of sbatch is about, by the words of Slurm's messages; the first match wins, so the
# memory message, which goes on to "node configuration is not available", is named before the CPUs.
_REFUSALS = (
    (r"unrecognized option|invalid option", "--sbatch"),
    (r"account/partition", "--account or --partition"),
    (r"accounting/qos policy", "--qos, --account or --timeout-min"),
    (r"account", "--account"),
    (r"partition", "--partition"),
    (r"gres|generic resource|gpu", "--gpus"),
    (r"qos", "--qos"),
    (r"feature|constraint", "--constraint"),
    (r"memory|--mem", "--mem"),
    (r"time", "--timeout-min"),
    (r"cpu|processor|node configuration", "--cpus-per-task"),
)


@dataclass
class ShardRun:
    """What one shard's job left: its results files and pytest's exit status."""

    shard: str
    returncode: int
    json_path: str
    jsonl_path: str


@dataclass(frozen=True)
class SlurmOptions:
    """What each SLURM job asks the scheduler for; None leaves the cluster's default (:data:`SBATCH_FLAGS`)."""

    partition: str | None = None
    gpus: int | None = None
    """GPUs per job; None: :func:`default_gpus` decides."""
    cpus_per_task: int | None = None
    mem: str | None = None
    """Memory per node as sbatch reads it (``16G``, ``4000M``)."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, str | bool] = field(default_factory=dict)
    """Any other sbatch option, ``KEY`` -> value (True: a flag without a value), from :func:`parse_sbatch`."""

    def given(self) -> list[str]:
        """The options set here, as ``perfkit launch`` spells them."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) not in (None, {})]

    def parameters(self, gpus: int, timeout_min: int) -> dict[str, object]:
        """submitit's AutoExecutor parameters for one job (None: no flag)."""
        return {"timeout_min": timeout_min, "tasks_per_node": 1, "name": "perfkit", "gpus_per_node": gpus or None,
                "cpus_per_task": self.cpus_per_task, "slurm_partition": self.partition, "slurm_mem": self.mem,
                "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint,
                "slurm_additional_parameters": dict(self.sbatch) or None}


def parse_sbatch(items: list[str] | None) -> dict[str, str | bool]:
    """``--sbatch KEY=VALUE`` (or ``KEY`` for a flag), repeated: sbatch options that have no option of their own."""
    own = {flag.removeprefix("--"): option for option, flag in SBATCH_FLAGS.items() if option != "--sbatch"}
    options: dict[str, str | bool] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not key or (sep and not value):
            raise ValueError(f"--sbatch {item!r}: give KEY=VALUE or KEY, e.g. --sbatch reservation=maint")
        if key in own:
            raise ValueError(f"--sbatch {item!r}: use {own[key]} for sbatch --{key}")
        options[key] = value if sep else True
    return options


def matrix_device(pytest_args: list[str], environ: Mapping[str, str] = os.environ) -> str | None:
    """The ``--perfkit-device`` the shards will get, from their pytest options or ``PERFKIT_DEVICE`` (None: unset)."""
    for i, arg in enumerate(pytest_args):
        if arg.startswith("--perfkit-device="):
            return arg.partition("=")[2]
        if arg == "--perfkit-device" and i + 1 < len(pytest_args):
            return pytest_args[i + 1]
    return environ.get("PERFKIT_DEVICE") or None


def partition_has_gpus(partition: str | None) -> bool | None:
    """Whether a node of ``partition`` (None: the default one) offers a GPU, from sinfo's GRES column.

    None when sinfo cannot run. No such partition has no GPU: asked for none, sbatch then refuses the
    partition itself, not a GPU the cluster may not have (it checks GRES first).
    """
    command = ["sinfo", "--noheader", "--format=%P %G", *([f"--partition={partition}"] if partition else [])]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(maxsplit=1) for line in listing.splitlines() if line.strip()]
    # Without --partition sinfo lists every partition and marks the default one with '*'.
    rows = [row for row in rows if partition or row[0].endswith("*")]
    return any("gpu" in row[-1].lower() for row in rows)


def default_gpus(pytest_args: list[str], partition: str | None,
                 environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """GPUs per SLURM job when ``--gpus`` is not given, and why.

    The matrix runs on CUDA unless its device says otherwise; the machine ``perfkit launch`` runs on says
    nothing about that (a login node seldom has the compute nodes' GPUs), the partition's nodes do.
    """
    device = matrix_device(pytest_args, environ)
    if device is not None and not device.startswith("cuda"):
        return 0, f"the matrix runs on --perfkit-device={device}"
    if device is None and partition_has_gpus(partition) is False:
        where = f"partition {partition}" if partition else "the default partition"
        return 0, f"{where}'s nodes offer no GPU (sinfo) and no --perfkit-device is given"
    return 1, "the matrix runs on CUDA"


def sbatch_refusal(message: str) -> str:
    """One line from sbatch's refusal: the scheduler's words and the ``perfkit launch`` option to change."""
    lines = [re.sub(r"^sbatch: (error: )?", "", line.strip()) for line in message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Try \"sbatch --help\"")]
    quoted = "; ".join(lines) or "no message"
    option = next((option for pattern, option in _REFUSALS if re.search(pattern, quoted, re.IGNORECASE)),
                  ", ".join(SBATCH_FLAGS))
    return f"sbatch refused the job: {quoted} (change {option})"


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


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError("perfkit launch needs submitit: pip install -e '.[cluster]' (or pip install submitit)") \
            from None
    return submitit


def _executor(kind: str, folder: Path, timeout_min: int, slurm: SlurmOptions, pytest_args: list[str]):
    submitit = _submitit()
    if kind == "local":
        return submitit.LocalExecutor(folder=folder)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError:  # submitit's "Could not detect srun"
        raise ValueError("--executor slurm: no srun here; run perfkit launch on a SLURM cluster's login node "
                         "(or use --executor local)") from None
    gpus, why = (slurm.gpus, "--gpus") if slurm.gpus is not None else default_gpus(pytest_args, slurm.partition)
    print(f"perfkit launch: {gpus} GPU(s) per job: {why}", flush=True)
    executor.update_parameters(**slurm.parameters(gpus, timeout_min))
    return executor


def _submit(executor, kind: str, k: int, n: int, gpus: list[int] | None, timeout_min: int, args: tuple):
    """Submit shard ``k``; a refusal from sbatch becomes a ValueError of one line."""
    if kind == "local":
        # One GPU per shard on this machine; none (CUDA_VISIBLE_DEVICES="") on a CPU.
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=1 if gpus else 0,
                                   visible_gpus=[gpus[k - 1]] if gpus else ())
    # submitit prints sbatch's error output before raising it: kept out of the terminal, it is quoted once.
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return executor.submit(run_shard, k, n, *args)
        except _submitit().core.utils.FailedJobError as error:
            raise ValueError(sbatch_refusal(str(error))) from None
        except FileNotFoundError as error:
            raise ValueError(f"--executor slurm: {error.filename} is not installed here; run perfkit launch on "
                             "a SLURM cluster's login node") from None


def _cancel(jobs: list) -> str:
    """Cancel every job (scancel for SLURM, a signal for a local process); what was cancelled, in words."""
    for job in jobs:
        with contextlib.suppress(Exception):  # a job that already ended cannot be cancelled, and need not be
            job.cancel(check=False)
    return f"cancelled {len(jobs)} job(s): {', '.join(str(job.job_id) for job in jobs)}" if jobs else "no job submitted"


def _wait(jobs: list, n: int) -> tuple[list[ShardRun], list[str]]:
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
    return runs, failures


def _merge(runs: list[ShardRun], reports_dir: str | Path | None) -> None:
    # The JSON-lines file holds every cell of a shard (the benchmark JSON only the timed ones, and none
    # under --benchmark-disable); a shard whose cells were all elsewhere has none.
    paths = [r.jsonl_path for r in runs if Path(r.jsonl_path).exists()]
    if paths and reports_dir is not None:
        from perfkit.matrix.shard import check_shard_results
        from perfkit.results.load import load_results
        from perfkit.results.report import build_reports

        for warning in check_shard_results([load_results(p) for p in paths]):
            print(f"perfkit launch: {warning}", file=sys.stderr)
        build_reports(paths, reports_dir)


def _check(n: int, executor_kind: str, gpus: list[int] | None, slurm: SlurmOptions) -> None:
    if n < 1:
        raise ValueError(f"--shards {n}: give a positive number of shards")
    if executor_kind not in EXECUTORS:
        raise ValueError(f"--executor {executor_kind!r}: valid executors: {', '.join(EXECUTORS)}")
    if executor_kind == "local" and gpus and n > len(gpus):
        raise ValueError(f"--shards {n} with the local executor on {len(gpus)} GPU(s): each shard needs a GPU of "
                         f"its own; use at most {len(gpus)} shards (or slurm)")
    # --partition alone was always accepted (and ignored) with the local executor.
    slurm_only = [option for option in slurm.given() if option != "--partition"]
    if executor_kind == "local" and slurm_only:
        raise ValueError(f"{', '.join(slurm_only)}: SLURM options; --executor local runs the shards on this machine")


def launch(n: int, executor_kind: str, out_dir: str | Path, reports_dir: str | Path | None, *,
           benchmarks: str = "benchmarks", pytest_args: list[str] | None = None, timeout_min: int = 60,
           gpus: list[int] | None = None, slurm: SlurmOptions | None = None) -> tuple[list[ShardRun], list[str]]:
    """Submit ``n`` shards, wait for them, merge the results; returns (runs that produced results, failures).

    ``gpus``: for the local executor, the GPUs to give the shards one each (None: none, the CPU).
    ``slurm``: what each SLURM job asks for. A refused submission cancels the jobs already submitted and
    raises ValueError; Ctrl-C cancels every job submitted, says so, and raises KeyboardInterrupt again.
    """
    slurm = slurm or SlurmOptions()
    pytest_args = list(pytest_args or [])
    _check(n, executor_kind, gpus, slurm)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    executor = _executor(executor_kind, out / "submitit", timeout_min, slurm, pytest_args)
    jobs: list = []
    try:
        for k in range(1, n + 1):
            args = (benchmarks, pytest_args, str(out), str(Path.cwd()))
            jobs.append(_submit(executor, executor_kind, k, n, gpus, timeout_min, args))
            print(f"perfkit launch: shard {k}/{n} is job {jobs[-1].job_id}", flush=True)
        runs, failures = _wait(jobs, n)
    except ValueError as error:
        raise ValueError(f"{error}; {_cancel(jobs)}" if jobs else str(error)) from None
    except KeyboardInterrupt:
        print(f"perfkit launch: interrupted; {_cancel(jobs)}", file=sys.stderr, flush=True)
        raise
    _merge(runs, reports_dir)
    return runs, failures
