"""The device clock, launch_bound and throttling bookkeeping (perfkit/env/gpu.py), on the CPU.

A simulated GPU stands in for CUDA: a virtual host clock, and a stream on which kernels run back to back
from when they are launched (or when the previous one ends), as a real stream does. With it the tests can
state exactly what each clock must read, with no real time involved.
"""

from __future__ import annotations

import sys
import time

import pytest

from perfkit.env import gpu
from perfkit.env.ceilings import measure_ceilings, write_ceilings
from perfkit.env.gpu import ClockMonitor, DeviceClockRounds
from perfkit.measure import BenchmarkRounds, SyncedStep, TimingPolicy, adaptive_rounds, clock_rounds, measure_cell

CYCLES_PER_S = 1e9


class SimulatedGPU:
    """A virtual host clock and one CUDA stream."""

    def __init__(self) -> None:
        self.host_s = 0.0
        self.busy_until_s = 0.0

    def clock(self) -> float:
        return self.host_s

    def host(self, seconds: float) -> None:
        self.host_s += seconds

    def launch(self, seconds: float) -> None:
        self.busy_until_s = max(self.host_s, self.busy_until_s) + seconds

    def spin(self, cycles: int) -> None:
        self.launch(cycles / CYCLES_PER_S)

    def sync(self) -> None:
        self.host_s = max(self.host_s, self.busy_until_s)

    def event(self):
        simulated = self

        class Event:
            def record(self) -> None:
                simulated.launch(0.0)
                self.at_s = simulated.busy_until_s

            def elapsed_time(self, end) -> float:
                return (end.at_s - self.at_s) * 1e3

        return Event()

    def step(self, host_s: float, device_s: float, kernels: int = 8, sync_inside: bool = False) -> SyncedStep:
        """A step launching ``kernels`` kernels, ``host_s`` of Python in all, ``device_s`` of GPU work in all."""

        def work() -> None:
            for i in range(kernels):
                self.host(host_s / kernels)
                self.launch(device_s / kernels)
                if sync_inside and i == kernels // 2:
                    self.sync()  # a .item() in the middle of the step

        return SyncedStep(work, self.sync)

    def rounds(self, step, n: int) -> list[float]:
        """A host-clock round runner on the virtual clock (what clock_rounds is on a real one)."""
        times = []
        for _ in range(n):
            start = self.clock()
            step()
            times.append(self.clock() - start)
        return times


class FakeNVML:
    """The pynvml functions perfkit calls; SM clocks are read from ``clocks_mhz`` in turn (last one repeats)."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8

    def __init__(self, clocks_mhz: list[int], application_mhz: int = 1980, reasons: int = 0) -> None:
        self.clocks_mhz = list(clocks_mhz)
        self.application_mhz = application_mhz
        self.reasons = reasons

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetApplicationsClock(self, handle, clock) -> int:
        return self.application_mhz

    def nvmlDeviceGetClockInfo(self, handle, clock) -> int:
        return self.clocks_mhz.pop(0) if len(self.clocks_mhz) > 1 else self.clocks_mhz[0]

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return 650_000

    def nvmlDeviceGetTemperature(self, handle, sensor) -> int:
        return 61

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle) -> int:
        return self.reasons


def runner(sim: SimulatedGPU, nvml: FakeNVML | None = None, spin=None, pauses: list | None = None):
    return DeviceClockRounds(sim.rounds, None, event=sim.event, spin=spin or sim.spin, clock=sim.clock,
                             cycles_per_s=CYCLES_PER_S, monitor=ClockMonitor(0, nvml=nvml or FakeNVML([1980])),
                             pause=(pauses.append if pauses is not None else lambda s: None))


def test_launch_bound_cell_reads_its_kernels_on_the_device_clock() -> None:
    sim = SimulatedGPU()
    rounds = runner(sim)
    host = rounds(sim.step(host_s=4e-3, device_s=1e-3), 10)
    assert len(host) == len(rounds.device_times_s) == 10
    # Host: all the Python, then the last kernel; device: the kernels back to back behind the spin.
    assert host == pytest.approx([4e-3 + 1e-3 / 8] * 10)
    assert rounds.device_times_s == pytest.approx([1e-3] * 10)
    fields = rounds.record_fields()
    assert fields["launch_bound"] is True and fields["device_rounds_uncovered"] == 0
    assert fields["device_time_median_s"] == pytest.approx(1e-3)


def test_gpu_bound_cell_is_not_launch_bound() -> None:
    sim = SimulatedGPU()
    rounds = runner(sim)
    host = rounds(sim.step(host_s=0.4e-3, device_s=4e-3), 6)
    assert host == pytest.approx([0.4e-3 / 8 + 4e-3] * 6)
    assert rounds.device_times_s == pytest.approx([4e-3] * 6)
    assert rounds.record_fields()["launch_bound"] is False


def test_without_the_spin_events_span_the_launch_gaps_and_rounds_read_uncovered() -> None:
    # Why the spin kernel: plain events around a launch-bound step measure the host's pace, not the GPU's.
    sim = SimulatedGPU()
    rounds = runner(sim, spin=lambda cycles: None)
    rounds(sim.step(host_s=4e-3, device_s=1e-3), 5)
    assert rounds.device_times_s == pytest.approx([4e-3 + 1e-3 / 8] * 5)  # = the host time
    fields = rounds.record_fields()
    assert fields["device_rounds_uncovered"] == 5 and fields["launch_bound"] is False


def test_a_step_that_synchronizes_inside_is_counted_uncovered() -> None:
    sim = SimulatedGPU()
    rounds = runner(sim)
    rounds(sim.step(host_s=1e-3, device_s=1e-3, sync_inside=True), 4)
    assert rounds.record_fields()["device_rounds_uncovered"] == 4


def test_host_series_is_what_pytest_benchmark_stores(benchmark) -> None:
    sim = SimulatedGPU()
    rounds = DeviceClockRounds(BenchmarkRounds(benchmark), None, event=sim.event, spin=sim.spin, clock=sim.clock,
                               cycles_per_s=CYCLES_PER_S, monitor=ClockMonitor(0, nvml=FakeNVML([1980])))
    policy = TimingPolicy(min_rounds=6, max_rounds=30, max_time_s=0.5)
    times = adaptive_rounds(sim.step(host_s=1e-3, device_s=1e-3), policy, rounds)
    assert benchmark.stats.stats.data == times == rounds.host_times_s
    assert len(rounds.device_times_s) == len(times)


def test_a_plain_step_is_refused() -> None:
    sim = SimulatedGPU()
    with pytest.raises(TypeError, match="SyncedStep"):
        runner(sim)(lambda: None, 1)


def test_throttled_cell_is_retimed_once_and_keeps_the_second_timing() -> None:
    sim = SimulatedGPU()
    # start sample, then 3 timing samples at 1000 MHz (< 0.75 x 1980), then full clock.
    pauses: list[float] = []
    rounds = runner(sim, nvml=FakeNVML([1980, 1000, 1000, 1000, 1980], reasons=0x4), pauses=pauses)
    step = sim.step(host_s=1e-4, device_s=1e-3)
    first = rounds(step, 3)
    assert rounds.monitor.throttled() is True
    kept = rounds.retime_if_throttled(lambda: rounds(step, 4), first)
    assert pauses == [gpu.THROTTLE_PAUSE_S] and len(kept) == 4 == len(rounds.device_times_s)
    fields = rounds.record_fields()
    assert fields["throttled"] is False and fields["clocks"]["retimed_after_throttle"] is True
    assert fields["clocks"]["sm_clock_min_mhz"] == 1980
    assert fields["clocks"]["throttle_reasons"] == ["SwPowerCap"]


def test_throttled_on_the_retiming_too_keeps_the_flag() -> None:
    sim = SimulatedGPU()
    rounds = runner(sim, nvml=FakeNVML([1980, 900]))
    step = sim.step(host_s=1e-4, device_s=1e-3)
    kept = rounds.retime_if_throttled(lambda: rounds(step, 3), rounds(step, 3))
    fields = rounds.record_fields()
    assert len(kept) == 3 and fields["throttled"] is True and fields["clocks"]["sm_clock_min_mhz"] == 900


def test_missing_nvml_is_a_reason_and_throttled_is_unknown(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    monitor = ClockMonitor(0)
    assert not monitor.available and "nvidia-ml-py" in monitor.reason
    sim = SimulatedGPU()
    rounds = DeviceClockRounds(sim.rounds, None, event=sim.event, spin=sim.spin, clock=sim.clock,
                               cycles_per_s=CYCLES_PER_S, monitor=monitor)
    rounds(sim.step(host_s=1e-4, device_s=1e-3), 2)
    fields = rounds.record_fields()
    assert fields["throttled"] is None
    assert fields["clocks"]["source"] is None and "nvidia-ml-py" in fields["clocks"]["reason"]


class WallClockEvent:
    """An event on the host clock: on the CPU the 'device' is the host, so both clocks see the same work."""

    def record(self) -> None:
        self.at_s = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.at_s - self.at_s) * 1e3


def test_measure_cell_fills_the_device_fields() -> None:
    rounds = DeviceClockRounds(clock_rounds, None, event=WallClockEvent,
                               spin=lambda cycles: None, cycles_per_s=CYCLES_PER_S,
                               monitor=ClockMonitor(0, nvml=FakeNVML([1980])))
    policy = TimingPolicy(min_rounds=6, max_rounds=12, max_time_s=0.3, warmup_batch_s=0.01, warmup_max_s=0.1)
    record = measure_cell("basic", "eager", "inference", 2, "cpu", bench_shape=False, policy=policy,
                          run_rounds=rounds, flops=False)
    assert record.status == "ok", record.reason
    assert len(record.device_times_s) == record.rounds == len(record.times_s)
    assert record.throttled is False and record.clocks["source"] == "nvml"
    assert record.launch_bound in (True, False) and record.device_timer == gpu.DEVICE_TIMER


def _wall_rounds(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def test_ceilings_are_work_over_median_time_and_the_report_reads_them(tmp_path) -> None:
    from perfkit.results.load import read_ceilings

    # On the CPU with a host clock: the bookkeeping only (the benchmark measures them on a GPU).
    ceilings = measure_ceilings("cpu", copy_bytes=2**22, matmul_n=64, rounds=3, time_rounds=_wall_rounds)
    assert set(ceilings) == {"copy_gb_per_s", "bf16_tflops"} and all(v > 0 for v in ceilings.values())
    write_ceilings(ceilings, tmp_path / "cpu-x")
    assert read_ceilings(tmp_path / "cpu-x", None) == pytest.approx(ceilings)
