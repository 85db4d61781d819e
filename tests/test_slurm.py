"""``perfkit launch`` on SLURM: its options and errors on the CPU, then against a real one-node cluster.

The cluster is started on this machine from Debian's packages (``apt-get install slurm-wlm munge``, which
``.ci/run`` does): munged, slurmctld and slurmd, as root, with their state, sockets, pid and log files in a
temporary folder and ports that were free, so nothing of the machine's own SLURM (if any) is touched. The
daemons are stopped by process id at the end. Where they are not installed, or do not come up, those tests
skip with the reason.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from perfkit.cli import main
from perfkit.matrix import launch as launch_module
from perfkit.matrix.launch import SlurmOptions, default_gpus, parse_sbatch, sbatch_refusal
from perfkit.record import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
MATRIX = "benchmarks/test_matrix.py"
TINY = ("--perfkit-blocks=basic,wrc", "--perfkit-modes=inference", "--perfkit-kernels=none",
        "--perfkit-variants=eager,channels_last", "--perfkit-device=cpu")
"""Four CPU cells, two in each of two shards."""
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "srun")

# What Slurm 22.05's sbatch printed when it refused a job on the test cluster (and, for the account and
# the QOS, which that cluster does not enforce, Slurm's own messages).
REFUSALS = {
    "--partition": "sbatch: error: invalid partition specified: nope\n"
                   "sbatch: error: Batch job submission failed: Invalid partition name specified",
    "--gpus": "sbatch: error: Invalid generic resource (gres) specification",
    "--mem": "sbatch: error: Memory specification can not be satisfied\n"
             "sbatch: error: Batch job submission failed: Requested node configuration is not available",
    "--constraint": "sbatch: error: Batch job submission failed: Invalid feature specification",
    "--sbatch": "sbatch: unrecognized option '--bogus'\nTry \"sbatch --help\" for more information",
    "--timeout-min": "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or "
                     "exceeds some limit)",
    "--account or --partition": "sbatch: error: Batch job submission failed: Invalid account or account/partition "
                                "combination specified",
    "--qos": "sbatch: error: Batch job submission failed: Invalid qos specification",
    "--qos, --account or --timeout-min": "sbatch: error: Batch job submission failed: Job violates accounting/QOS "
                                         "policy (job submit limit, user's size and/or time limits)",
}


def _environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PERFKIT_", "SLURM_"))}
    return {**environ, **extra}


def _cells(path: Path) -> list[tuple]:
    return sorted((r.block, r.variant, r.mode, r.batch, r.status) for r in read_jsonl(path))


# ------------------------------------------------------------------------------------- options and errors

@pytest.mark.parametrize("option", sorted(REFUSALS))
def test_sbatch_refusal_is_one_line_quoting_sbatch_and_naming_the_option(option: str) -> None:
    line = sbatch_refusal(REFUSALS[option])
    assert "\n" not in line and line.startswith("sbatch refused the job: ")
    assert line.endswith(f"(change {option})"), line
    assert "sbatch: error" not in line and "Try " not in line


def test_parse_sbatch_passes_other_options_and_refuses_those_with_their_own() -> None:
    assert parse_sbatch(["reservation=maint", "--exclusive", "mail_type=END"]) == {
        "reservation": "maint", "exclusive": True, "mail-type": "END"}
    assert parse_sbatch(None) == {}
    with pytest.raises(ValueError, match="use --partition"):
        parse_sbatch(["partition=gpu"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sbatch(["reservation="])


def test_slurm_options_become_submitit_parameters() -> None:
    options = SlurmOptions(partition="gpu", cpus_per_task=8, mem="32G", account="perf", qos="high",
                           constraint="a100", sbatch={"reservation": "maint"})
    assert options.parameters(1, 30) == {
        "timeout_min": 30, "tasks_per_node": 1, "name": "perfkit", "gpus_per_node": 1, "cpus_per_task": 8,
        "slurm_partition": "gpu", "slurm_mem": "32G", "slurm_account": "perf", "slurm_qos": "high",
        "slurm_constraint": "a100", "slurm_additional_parameters": {"reservation": "maint"}}
    # No GPU is no --gpus-per-node flag at all: a cluster without GPUs refuses even a request for 0 of them.
    assert SlurmOptions().parameters(0, 60)["gpus_per_node"] is None
    assert options.given() == ["--partition", "--cpus-per-task", "--mem", "--account", "--qos", "--constraint",
                               "--sbatch"]


def test_gpus_default_follows_the_matrix_device_not_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_module, "partition_has_gpus", lambda partition: None)
    assert default_gpus(["--perfkit-device=cpu"], None, {})[0] == 0
    assert default_gpus(["--perfkit-device", "cpu"], None, {})[0] == 0
    assert default_gpus([], None, {"PERFKIT_DEVICE": "cpu"})[0] == 0
    assert default_gpus(["--perfkit-device=cuda:0"], None, {})[0] == 1
    assert default_gpus([], None, {})[0] == 1  # sinfo cannot tell: the compute nodes are taken to have GPUs
    monkeypatch.setattr(launch_module, "partition_has_gpus", lambda partition: False)
    gpus, why = default_gpus([], "debug", {})
    assert gpus == 0 and "partition debug" in why
    assert default_gpus(["--perfkit-device=cuda"], "debug", {})[0] == 1


def test_local_executor_refuses_slurm_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--shards", "1", "--executor", "local", "--account", "perf", "--sbatch", "x=1"]) == 2
    assert "--account, --sbatch: SLURM options" in capsys.readouterr().err


class _FakeJob:
    def __init__(self, job_id: int, cancelled: list[int]) -> None:
        self.job_id, self._cancelled = job_id, cancelled

    def result(self):
        raise KeyboardInterrupt

    def cancel(self, check: bool = True) -> None:
        self._cancelled.append(self.job_id)


class _FakeExecutor:
    """Accepts ``accepted`` jobs, then refuses as submitit does: sbatch's words printed, then raised."""

    def __init__(self, accepted: int, cancelled: list[int]) -> None:
        self.accepted, self.cancelled, self.submitted = accepted, cancelled, 0

    def update_parameters(self, **_: object) -> None:
        pass

    def submit(self, *_: object) -> _FakeJob:
        if self.submitted == self.accepted:
            import submitit

            print(REFUSALS["--gpus"], file=sys.stderr)
            raise submitit.core.utils.FailedJobError(REFUSALS["--gpus"])
        self.submitted += 1
        return _FakeJob(100 + self.submitted, self.cancelled)


def test_ctrl_c_cancels_every_job_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cancelled: list[int] = []
    monkeypatch.setattr(launch_module, "_executor", lambda *_: _FakeExecutor(2, cancelled))
    assert main(["launch", "--shards", "2", "--executor", "local", "-o", str(tmp_path)]) == 130
    assert cancelled == [101, 102]
    assert "perfkit launch: interrupted; cancelled 2 job(s): 101, 102" in capsys.readouterr().err


def test_a_refused_shard_is_one_line_exit_2_and_cancels_those_submitted(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[cluster]')")
    cancelled: list[int] = []
    monkeypatch.setattr(launch_module, "_executor", lambda *_: _FakeExecutor(1, cancelled))
    assert main(["launch", "--shards", "2", "--executor", "local", "-o", str(tmp_path)]) == 2
    assert cancelled == [101]
    assert capsys.readouterr().err.splitlines() == [
        "perfkit launch: sbatch refused the job: Invalid generic resource (gres) specification (change --gpus); "
        "cancelled 1 job(s): 101"]


# ------------------------------------------------------------------------------ a running one-node cluster

@dataclass
class Cluster:
    """A one-node SLURM cluster on this machine: its partition and the environment its clients need."""

    partition: str
    environ: dict[str, str]
    folder: Path

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, squeue, ...) against this cluster."""
        return subprocess.run(command, env=self.environ, capture_output=True, text=True, timeout=timeout)

    def jobs(self) -> list[str]:
        """The ids of the jobs the scheduler still holds, whatever their state."""
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(folder: Path, munge_socket: Path, partition: str) -> str:
    host = socket.gethostname().split(".")[0]
    # slurmd -C describes this machine as slurmd sees it; a node declared larger than that would be drained.
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    resources = " ".join(node.splitlines()[0].split()[1:])
    return "\n".join([
        "ClusterName=perfkit-test", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        # No cgroups (a container seldom lets slurmd have them) and no accounting daemon.
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        f"NodeName={host} NodeAddr=127.0.0.1 {resources}",
        f"PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def _wait_for(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return False


def _stop(daemons: list[subprocess.Popen]) -> None:
    for daemon in reversed(daemons):  # slurmd, slurmctld, then munged that both authenticate through
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=15)


def _start(folder: Path, partition: str) -> tuple[list[subprocess.Popen], Cluster]:
    munge_key, munge_socket = folder / "munge.key", folder / "munge.socket"
    munge_key.write_bytes(os.urandom(1024))
    munge_key.chmod(0o400)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, munge_socket, partition))
    cluster = Cluster(partition, _environ(SLURM_CONF=str(conf)), folder)
    commands = [
        ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={munge_key}",
         f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    daemons = []
    for command in commands:
        with open(folder / f"{command[0]}.out", "w") as log:
            daemons.append(subprocess.Popen(command, env=cluster.environ, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        if command[0] == "munged" and not _wait_for(munge_socket.exists, 10):
            break
    return daemons, cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged needs root")
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[cluster]')")
    folder = tmp_path_factory.mktemp("slurm")
    daemons, cluster = _start(folder, "debug")

    def idle() -> bool:
        return cluster.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle"

    try:
        _wait_for(lambda: any(d.poll() is not None for d in daemons) or idle(), 30)
        if not idle():
            exited = [f"{d.args[0]} exited {d.returncode}" for d in daemons if d.poll() is not None]
            why = ", ".join(exited) or "its node is not idle"
            pytest.skip(f"the one-node SLURM cluster did not come up within 30 s ({why}); logs in {folder}")
        yield cluster
    finally:
        if all(d.poll() is None for d in daemons):
            if cluster.jobs():
                cluster.run("scancel", *cluster.jobs())
            # A job's slurmstepd outlives its last output: stopped before it reports to slurmd, it stays.
            _wait_for(lambda: not cluster.jobs() and idle(), 30)
        _stop(daemons)


def _launch(cluster: Cluster, logs: Path, *args: str) -> subprocess.Popen:
    """``perfkit launch --executor slurm`` on the cluster, as a user runs it; its output goes to ``logs``/launch.*."""
    command = [sys.executable, "-m", "perfkit.cli", "launch", "--executor", "slurm", "--partition", cluster.partition,
               *args]
    with open(logs / "launch.out", "w") as out, open(logs / "launch.err", "w") as err:
        return subprocess.Popen(command, cwd=ROOT, env=cluster.environ, stdout=out, stderr=err)


def _finish(process: subprocess.Popen, logs: Path, timeout_s: float) -> tuple[str, str]:
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
    return (logs / "launch.out").read_text(), (logs / "launch.err").read_text()


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "r.jsonl"
    result = subprocess.run([sys.executable, "-m", "pytest", MATRIX, "-q", "-p",
                             "no:cacheprovider", *TINY, f"--perfkit-jsonl={out}", "--benchmark-disable"],
                            cwd=ROOT, env=_environ(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
def test_two_cpu_shards_run_as_slurm_jobs_and_merge_to_the_serial_cells(cluster: Cluster, serial_run: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster.environ["SLURM_CONF"])
    assert default_gpus([], cluster.partition, {})[0] == 0  # sinfo: this partition's node has no GPU
    process = _launch(cluster, tmp_path, "--shards", "2", "--benchmarks", MATRIX, "-o", str(tmp_path / "out"),
                      "--reports", str(tmp_path / "reports"), "--", *TINY, "--benchmark-disable")
    stdout, stderr = _finish(process, tmp_path, 300)
    assert process.returncode == 0, stdout + stderr
    assert "0 GPU(s) per job" in stdout and "merged 2 of 2 shards" in stdout, stdout
    job_ids = [line.rsplit(" ", 1)[1] for line in stdout.splitlines() if " is job " in line]
    assert len(job_ids) == 2 and all(job_id.isdigit() for job_id in job_ids), stdout
    # Each shard's log is submitit's file of its SLURM job, written on the node.
    assert all(list((tmp_path / "out" / "submitit").glob(f"{job_id}_0_log.out")) for job_id in job_ids)
    shards = [_cells(tmp_path / "out" / f"shard-{k}-of-2.jsonl") for k in (1, 2)]
    assert all(shards) and sorted(shards[0] + shards[1]) == _cells(serial_run)
    with open(next((tmp_path / "reports").glob("*/summary.csv"))) as summary:
        merged = sorted((r["block"], r["variant"], r["mode"], int(r["batch"]), r["status"])
                        for r in csv.DictReader(summary))
    assert merged == _cells(serial_run)


@pytest.mark.slow
@pytest.mark.parametrize(("option", "says"), [(("--partition", "nope"), "Invalid partition name specified"),
                                              (("--gpus", "1"), "Invalid generic resource (gres) specification")])
def test_a_refused_job_is_one_line_and_exit_2(cluster: Cluster, tmp_path: Path, option: tuple[str, str],
                                              says: str) -> None:
    # A job of the previous test may still be completing: only a job this launch submitted would be wrong.
    before = set(cluster.jobs())
    process = _launch(cluster, tmp_path, "--shards", "2", "-o", str(tmp_path / "out"), *option, "--", *TINY)
    stdout, stderr = _finish(process, tmp_path, 120)
    assert process.returncode == 2, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("perfkit launch: sbatch refused the job: "), stderr
    assert says in stderr and f"(change {option[0]})" in stderr
    assert not set(cluster.jobs()) - before, "a refused launch left a job of its own in the queue"


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    process = _launch(cluster, tmp_path, "--shards", "2", "--benchmarks", MATRIX, "-o", str(tmp_path / "out"),
                      "--", *TINY)
    # Interrupted once both submissions have returned (not between sbatch and the job's bookkeeping).
    submitted = _wait_for(lambda: "shard 2/2 is job" in (tmp_path / "launch.out").read_text(), 60)
    process.send_signal(signal.SIGINT)
    stdout, stderr = _finish(process, tmp_path, 60)
    assert submitted, stdout + stderr
    assert process.returncode == 130, stdout + stderr
    assert "perfkit launch: interrupted; cancelled 2 job(s)" in stderr and "Traceback" not in stderr, stderr
    assert _wait_for(lambda: not cluster.jobs(), 30), cluster.jobs()
