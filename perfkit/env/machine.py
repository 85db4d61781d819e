"""What the machine was doing while a cell was timed, and whether it was alone (pyperf's metadata, per cell).

A timing is only as good as the machine was quiet. On a CPU with more runnable threads than cores, every
OpenMP barrier waits out a scheduler slice (~4 ms), so a 0.5 ms step reads 100 ms with a tight interval:
the rounds agree with each other, not with the truth. Agreement between rounds cannot detect that; the
kernel's own accounting can. Around the timed rounds this module reads:

- ``/proc/loadavg`` (1-minute load, runnable tasks) and ``/proc/stat``'s ``procs_running``, before and after;
- ``/proc/stat``'s per-CPU busy time on the CPUs this process may run on (its affinity), from which this
  process's own CPU time is subtracted: what is left is the CPU time *other* processes took from the
  cores the cell was using — the direct measure of contention;
- the time this process's threads spent runnable but waiting for a core (``/proc/self/task/*/schedstat``),
  the process's CPU time against wall time (``time.process_time``), threads used against cores available;
- on a GPU, the other processes on the device (NVML, when ``nvidia-ml-py`` is installed).

A cell is ``contended`` when other processes kept busy, on average, more cores than the ones this process
left free (``cores - threads``) plus :data:`CONTENDED_SPARE_CORES` (and the counters' tick over the region:
one per CPU, 2 cores x 10 ms over 0.1 s is 0.2 of a core), when this process's threads spent more than
:data:`MAX_WAIT_SHARE` of their time runnable but waiting for a core (``/proc/self/task/*/schedstat``;
without it, when the process got less than :data:`MIN_CPU_SHARE` of the cores its threads needed), or when another
process computed on the same GPU. Such a cell's figures are kept (the record says how busy the machine was)
but never ranked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

CONTENDED_SPARE_CORES = 0.25
"""Others may use up to this many cores beyond the ones left free before a cell counts as contended: a
shell, a logger, the kernel's own threads keep a few percent of a core busy on any quiet machine."""

MAX_WAIT_SHARE = 0.1
"""A cell whose threads spent more than this fraction of ``threads x wall`` runnable but waiting for a core
(the scheduler's run-queue delay) was crowded out. Measured on the 2-core CPU over quick-profile cells:
0.000-0.008 per thread alone (1 or 2 threads), 0.28-0.52 per thread beside two busy loops. A step that
sleeps, or waits for a GPU, is not runnable, so it does not count (its CPU share would)."""

MIN_CPU_SHARE = 0.85
"""Where the kernel has no run-queue statistics: on the CPU, a cell whose process got less CPU time than
this fraction of ``threads x wall`` was kept waiting for a core. Measured on the 2-core CPU with 1 thread:
0.95-1.01 alone, 0.50-0.75 beside two busy loops (three runnable threads on two cores get two thirds of a
core each). A step that sleeps reads as contended by this rule, which is why it is the fallback."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


MALLOC_MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest mmap threshold on 64-bit Linux, the one a long-running process's dynamic threshold climbs to."""
MALLOC_TRIM_THRESHOLD = 2**30

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_policy: str | None = None


def pin_malloc() -> str:
    """Fix glibc malloc's mmap and trim thresholds for the rest of the process; returns the policy in words.

    By default glibc moves both with what the process has freed so far: a tensor above the current mmap
    threshold is mapped and unmapped, and free memory above the trim threshold at the top of the heap is
    returned to the kernel, so each step faults its pages in again. How far the thresholds have climbed
    depends on everything the process ran before. Measured on the 2-core CPU, the ``bottleneck`` block's
    inference at batch 8 took 1.6 ms in a fresh process (269k page faults) and 0.40 ms once anything larger
    had been freed before it (a float64 forward, a training step: 44k), in the same process and code.
    Pinned, every cell sees the allocator a long-running process settles into, whatever ran before it.
    Where the C library is not glibc, nothing changes and the policy says so.
    """
    global _malloc_policy
    if _malloc_policy is not None:
        return _malloc_policy
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    glibc = libc is not None and hasattr(libc, "gnu_get_libc_version")
    mallopt = libc.mallopt if glibc else None
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                               and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)):
        _malloc_policy = "the C library's default (not glibc, or mallopt refused)"
    else:
        _malloc_policy = (f"glibc, pinned by perfkit: mmap threshold {MALLOC_MMAP_THRESHOLD // 2**20} MiB, trim "
                          f"threshold {MALLOC_TRIM_THRESHOLD // 2**20} MiB")
    return _malloc_policy


def malloc_policy() -> str:
    """How this process's malloc was set up: :func:`pin_malloc`'s words, or glibc's moving default."""
    return _malloc_policy or "the C library's default (glibc: thresholds that move with what was freed)"


def minor_faults() -> int:
    """Minor page faults of this process so far (a page the kernel had to map in, e.g. after malloc)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def available_cores() -> int:
    """CPUs this process may run on (its affinity), or the CPU count where affinity is not exposed."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpu_busy_s(cpus: set[int]) -> float | None:
    """Busy seconds (all but idle and iowait) summed over ``cpus`` since boot, from /proc/stat."""
    text = _read("/proc/stat")
    if text is None:
        return None
    busy = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in rest.split()]
        # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
        busy += sum(fields[:8]) - fields[3] - fields[4]
    return busy / _CLOCK_TICKS


def _procs_running() -> int | None:
    text = _read("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return None


def _loadavg() -> tuple[float, int] | None:
    """(1-minute load average, runnable tasks) from /proc/loadavg."""
    text = _read("/proc/loadavg")
    if text is None:
        return None
    parts = text.split()
    return float(parts[0]), int(parts[3].split("/")[0])


def _runqueue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a core (the scheduler's run-queue
    delay, ``/proc/self/task/*/schedstat``'s second field), or None where the kernel does not expose it."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        text = _read(f"/proc/self/task/{task}/schedstat")
        if text is None:
            continue  # a thread that ended between the listing and the read
        fields = text.split()
        if len(fields) < 2:
            return None
        total += int(fields[1])
    return total / 1e9 if tasks else None


def _own_cpu_s() -> float:
    # CLOCK_PROCESS_CPUTIME_ID (all threads, nanoseconds); os.times() ticks at 100 Hz, too coarse here.
    return time.process_time()


def gpu_other_processes(device: torch.device) -> list[dict[str, Any]] | None:
    """Other processes computing on ``device`` (pid, used memory), or None where NVML is not available."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return None
    me = os.getpid()
    listed = [{"pid": p.pid, "used_memory_bytes": p.usedGpuMemory} for p in procs]
    others = [p for p in listed if p["pid"] != me]
    if len(others) == len(listed) and others:
        # In a container NVML reports the host's pids, so this process is not found by its own: it is one
        # of them (it holds a context by now), and the others are the rest.
        others = others[1:]
    return others


@dataclass
class Snapshot:
    """The counters read at the start of a timed region."""

    wall_s: float
    own_cpu_s: float
    minor_faults: int
    wait_s: float | None
    busy_s: float | None
    loadavg: tuple[float, int] | None
    procs_running: int | None


class LoadMonitor:
    """Reads the machine's counters around a timed region: ``start()``, the rounds, ``stop()``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self._start: Snapshot | None = None

    def _snapshot(self) -> Snapshot:
        return Snapshot(time.perf_counter(), _own_cpu_s(), minor_faults(), _runqueue_wait_s(), _cpu_busy_s(self.cpus),
                        _loadavg(), _procs_running())

    def start(self) -> None:
        """Read the counters before the timed region."""
        self._start = self._snapshot()

    def stop(self, threads: int, round_cpu_per_wall: list[float] | None = None) -> dict[str, Any]:
        """The machine's load over the region since :meth:`start`, and whether it was ``contended``.

        ``threads`` is the intra-op thread count the cell ran with; ``round_cpu_per_wall`` the process CPU
        time over wall time of each timed round (its median is recorded).
        """
        if self._start is None:
            raise RuntimeError("LoadMonitor.stop() before start()")
        end = self._snapshot()
        begin = self._start
        wall = end.wall_s - begin.wall_s
        own = end.own_cpu_s - begin.own_cpu_s
        cores = len(self.cpus)
        load: dict[str, Any] = {
            "cores_available": cores,
            "affinity": sorted(self.cpus),
            "threads": threads,
            "wall_s": wall,
            "process_cpu_s": own,
            "runqueue_wait_s": (end.wait_s - begin.wait_s) if end.wait_s is not None and begin.wait_s is not None
            else None,
            "minor_page_faults": end.minor_faults - begin.minor_faults,
            "malloc": malloc_policy(),
            "loadavg_1m_before": begin.loadavg[0] if begin.loadavg else None,
            "loadavg_1m_after": end.loadavg[0] if end.loadavg else None,
            "runnable_before": begin.procs_running,
            "runnable_after": end.procs_running,
        }
        if round_cpu_per_wall:
            ordered = sorted(round_cpu_per_wall)
            load["round_cpu_per_wall_median"] = ordered[len(ordered) // 2]
        others = None
        if begin.busy_s is not None and end.busy_s is not None and wall > 0:
            # Jiffies tick at 100 Hz: over a region shorter than ~0.5 s this is coarse, which is why the
            # region spans all of a cell's warm-up and timed rounds and the margin grows as it shortens.
            others = max(0.0, (end.busy_s - begin.busy_s - own) / wall)
            load["others_busy_cores"] = others
        free = max(0, cores - threads)
        reasons = []
        # Each CPU's busy counter may be off by a tick at either end: over a short region (a kernel cell's
        # rounds last ~50 ms) that alone reads as a fraction of a core that nobody used.
        tick_cores = cores / _CLOCK_TICKS / wall if wall > 0 else 0.0
        if others is not None and others > free + CONTENDED_SPARE_CORES + tick_cores:
            reasons.append(f"other processes kept {others:.2f} of the {cores} cores busy while {threads} "
                           f"thread(s) ran here")
        waited = load["runqueue_wait_s"]
        if waited is not None:
            # Runnable but not running: a step that sleeps or waits on a GPU is not waiting for a core.
            if threads > 0 and wall > 0 and waited > MAX_WAIT_SHARE * max(threads, 1) * wall:
                reasons.append(f"its threads waited {waited / wall:.2f} s per second for a core (run queue)")
        elif self.device.type == "cpu" and threads > 0 and wall > 0 and own < MIN_CPU_SHARE * threads * wall:
            # Without schedstat, the CPU share: on a GPU the host may sleep in a synchronization, so not there.
            reasons.append(f"the process got {own / wall:.2f} cores of CPU time for {threads} thread(s)")
        gpu_others = gpu_other_processes(self.device)
        if gpu_others is not None:
            load["gpu_other_processes"] = gpu_others
            if gpu_others:
                reasons.append(f"{len(gpu_others)} other process(es) on the GPU")
        load["contended_reason"] = "; ".join(reasons) or None
        load["contended"] = bool(reasons)
        return load


def default_threads(sample_s: float = 0.5) -> int:
    """Intra-op threads the machine can give without oversubscription, judged over ``sample_s`` seconds.

    torch's default (one per physical core), at most the cores this process may use, less the cores other
    processes kept busy while this sampled (rounded), and at least one. Why it matters: on a 2-core CPU
    with the other core's worth of work elsewhere, 2 threads ran 4.5-93x slower than 1 (every OpenMP
    barrier waits out a scheduler slice), while quiet, 2 ran 1.5x faster. The count used is recorded.
    """
    monitor = LoadMonitor("cpu")
    monitor.start()
    time.sleep(sample_s)
    others = monitor.stop(threads=0).get("others_busy_cores") or 0.0
    free = available_cores() - round(others)
    return max(1, min(torch.get_num_threads(), available_cores(), free))
