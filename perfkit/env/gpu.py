"""GPU-grade timing: a device clock beside the host clock, and the SM clock and throttling from NVML.

**Two clocks.** On a GPU, the host clock around a synchronized step measures the kernels *plus* Python,
the launches and the synchronization's wake-up; for a small block at batch 32 that overhead can be most of
the step. CUDA events around the same step do not remove it: the events span the gaps in which the GPU
waits for the host to launch the next kernel. So :class:`DeviceClockRounds` pairs each host round with a
*device round* timed as nvbench does with its blocking kernel: a spin kernel (``torch.cuda._sleep``) holds
the stream while the host enqueues the whole step behind it, then CUDA events on the step's stream measure
the step's kernels back to back, without launch gaps. The spin is sized from the host's enqueue time of
the round before (twice it, plus 20 µs), and each device round checks that the spin outlasted the enqueue
(events around the spin against the host clock): a round where it did not ("uncovered": the step
synchronizes inside, say) is counted in ``device_rounds_uncovered``, since its device time includes gaps.

The host series goes through the wrapped runner unchanged (pytest-benchmark's ``stats.data`` stays the
record's ``times_s``); the device series is ``device_times_s``. A cell whose host median exceeds its device
median by more than :data:`LAUNCH_BOUND_MARGIN` is ``launch_bound``: the GPU idles for a fifth of the step
or more, the regime where CUDA graphs (``cudagraphs``) and fusion pay.

**Clocks.** Where ``nvidia-ml-py`` imports, :class:`ClockMonitor` samples the SM clock, its application
clock, power, temperature and the throttle reasons at the start of the cell, during each device round
(while the GPU runs the step) and at the end. A cell whose SM clock fell below :data:`THROTTLE_FRACTION` of
the application clock during timing is re-timed once after :data:`THROTTLE_PAUSE_S` (nvbench discards such
trials; perfkit keeps the second timing and, if it throttled too, the ``throttled`` flag). Without NVML,
``clocks`` says why and ``throttled`` is None (unknown), never False.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

LAUNCH_BOUND_MARGIN = 0.2
"""``launch_bound`` when host median > (1 + this) x device median."""
THROTTLE_FRACTION = 0.75
"""nvbench's rule: a trial whose SM clock is under 75% of the default (application) clock is throttled."""
THROTTLE_PAUSE_S = 5.0
"""Pause before re-timing a throttled cell, for the clock to recover."""
SPIN_FACTOR = 2.0
SPIN_FLOOR_S = 20e-6
DEVICE_TIMER = ("CUDA events on the step's stream, the step enqueued behind a spin kernel (no launch gaps); "
                "one device round after each host round")


class Event(Protocol):
    """The part of ``torch.cuda.Event`` the device clock uses."""

    def record(self) -> None: ...

    def elapsed_time(self, end: Any) -> float: ...


def _cuda_event() -> Event:
    return torch.cuda.Event(enable_timing=True)


@functools.cache
def spin_cycles_per_s(device: str) -> float:
    """Clock ticks per second of ``torch.cuda._sleep`` on ``device``, calibrated once with CUDA events."""
    with torch.cuda.device(torch.device(device)):
        start, end = _cuda_event(), _cuda_event()
        cycles = 20_000_000
        torch.cuda._sleep(1000)  # the spin kernel's first launch loads its module; keep that out of the timing
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)


class ClockMonitor:
    """Samples the GPU's SM clock, power and throttle reasons through NVML (``pynvml``, from nvidia-ml-py).

    ``nvml`` is the module to use (tests inject a fake); by default ``pynvml`` if it imports. Every failure
    to read becomes ``reason``; the cell is measured either way.
    """

    def __init__(self, device_index: int | None, nvml: Any = None) -> None:
        self.reason: str | None = None
        self.samples: list[dict[str, Any]] = []
        self.application_sm_clock_mhz: int | None = None
        self._nvml = nvml
        self._handle = None
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py): clocks not sampled"
                return
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
            self._handle = _nvml_handle(self._nvml, device_index or 0)
            self.application_sm_clock_mhz = int(self._nvml.nvmlDeviceGetApplicationsClock(
                self._handle, self._nvml.NVML_CLOCK_SM))
        except Exception as error:  # an NVML error of any kind is a recorded reason, never a failed cell
            self.reason = f"NVML: {error}"
            self._handle = None

    @property
    def available(self) -> bool:
        """True when samples can be taken."""
        return self._handle is not None

    def _throttle_reasons(self) -> list[str]:
        nvml = self._nvml
        # Renamed "clocks event reasons" in newer NVML; the old name stays for older nvidia-ml-py.
        query = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                 or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        mask = int(query(self._handle))
        names = []
        for attr in dir(nvml):
            for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
                if attr.startswith(prefix) and attr[len(prefix):] not in ("All", "None", "Unknown"):
                    bit = getattr(nvml, attr)
                    name = attr[len(prefix):]
                    if isinstance(bit, int) and bit and mask & bit == bit and name not in names:
                        names.append(name)
        return sorted(names)

    def sample(self, when: str) -> dict[str, Any] | None:
        """Read the clocks now; ``when`` is ``start``, ``timing`` or ``end``. None when NVML is unavailable."""
        if not self.available:
            return None
        nvml = self._nvml
        try:
            sample = {
                "when": when,
                "sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM)),
                "power_w": nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000,
                "temperature_c": int(nvml.nvmlDeviceGetTemperature(self._handle, nvml.NVML_TEMPERATURE_GPU)),
                "throttle_reasons": self._throttle_reasons(),
            }
        except Exception as error:  # see __init__
            self.reason = f"NVML: {error}"
            self._handle = None
            return None
        self.samples.append(sample)
        return sample

    def throttled(self) -> bool | None:
        """Whether a sample during timing had the SM clock under THROTTLE_FRACTION of the application clock."""
        timing = [s for s in self.samples if s["when"] == "timing"]
        if not timing or not self.application_sm_clock_mhz:
            return None
        floor = THROTTLE_FRACTION * self.application_sm_clock_mhz
        return any(s["sm_clock_mhz"] < floor for s in timing)

    def summary(self) -> dict[str, Any]:
        """The record's ``clocks``: the source, the application clock, start/end samples, the timing range."""
        if not self.samples:
            return {"source": None, "reason": self.reason or "no sample taken"}
        timing = [s for s in self.samples if s["when"] == "timing"]
        start = next((s for s in self.samples if s["when"] == "start"), None)
        end = next((s for s in reversed(self.samples) if s["when"] == "end"), None)
        summary: dict[str, Any] = {
            "source": "nvml", "application_sm_clock_mhz": self.application_sm_clock_mhz,
            "start": start, "end": end, "timing_samples": len(timing),
        }
        if timing:
            summary.update(
                sm_clock_min_mhz=min(s["sm_clock_mhz"] for s in timing),
                sm_clock_median_mhz=statistics.median(s["sm_clock_mhz"] for s in timing),
                power_max_w=max(s["power_w"] for s in timing),
                temperature_max_c=max(s["temperature_c"] for s in timing),
                throttle_reasons=sorted({r for s in timing for r in s["throttle_reasons"]}),
            )
        if self.reason:
            summary["reason"] = self.reason
        return summary


def _nvml_handle(nvml: Any, index: int) -> Any:
    """NVML's handle of CUDA device ``index``: by UUID where torch knows it, since NVML numbers the GPUs
    regardless of ``CUDA_VISIBLE_DEVICES`` (an xdist worker's device 0 may be the machine's GPU 5)."""
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return nvml.nvmlDeviceGetHandleByIndex(index)


class DeviceClockRounds:
    """A round runner (``measure.RoundRunner``) that adds a device round after every host round.

    ``inner`` times the host rounds (``measure.BenchmarkRounds`` stores them in pytest-benchmark); the
    step it is given must be a ``measure.SyncedStep`` (work and synchronization apart), since the device
    round records its end event before synchronizing. ``event``, ``spin``, ``clock`` and ``cycles_per_s``
    default to CUDA events, ``torch.cuda._sleep``, ``time.perf_counter`` and the calibrated spin rate; the
    CPU tests pass a simulated GPU.
    """

    def __init__(self, inner: Callable[[Callable[[], None], int], list[float]], device: torch.device | str | None,
                 *, event: Callable[[], Event] | None = None, spin: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, cycles_per_s: float | None = None,
                 monitor: ClockMonitor | None = None, pause: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.event = event or _cuda_event
        self.spin = spin or torch.cuda._sleep
        self.clock = clock
        self._cycles_per_s = cycles_per_s
        self.device = None if device is None else torch.device(device)
        self.monitor = monitor if monitor is not None else ClockMonitor(
            None if self.device is None else (self.device.index or 0))
        self.pause = pause
        self.host_times_s: list[float] = []
        self.device_times_s: list[float] = []
        self.uncovered = 0
        self.retimed = False
        self._enqueue_s = 0.0
        self.monitor.sample("start")

    @property
    def cycles_per_s(self) -> float:
        """The spin kernel's ticks per second (calibrated on first use)."""
        if self._cycles_per_s is None:
            self._cycles_per_s = spin_cycles_per_s(str(self.device))
        return self._cycles_per_s

    def _device_round(self, step: Any) -> float:
        before_spin, start, end = self.event(), self.event(), self.event()
        spin_s = SPIN_FACTOR * self._enqueue_s + SPIN_FLOOR_S
        host_start = self.clock()
        before_spin.record()
        self.spin(int(spin_s * self.cycles_per_s))
        start.record()
        step.work()
        end.record()
        enqueue_s = self.clock() - host_start
        self.monitor.sample("timing")  # the GPU is running the step now
        step.sync()
        spun_s = before_spin.elapsed_time(start) / 1e3
        if enqueue_s > spun_s:
            self.uncovered += 1
        return elapsed_s(start, end)

    def __call__(self, step: Callable[[], None], n: int, before: Callable[[], None] | None = None) -> list[float]:
        """``n`` host rounds (``before`` runs ahead of each, as paired eager rounds do), each followed by a
        device round."""
        if not (hasattr(step, "work") and hasattr(step, "sync")):
            raise TypeError("DeviceClockRounds needs a measure.SyncedStep (work and sync apart), got "
                            f"{type(step).__name__}")

        def host_step() -> None:
            start = self.clock()
            step.work()
            self._enqueue_s = self.clock() - start
            step.sync()

        host: list[float] = []
        for _ in range(n):
            host += self.inner(host_step, 1) if before is None else self.inner(host_step, 1, before)
            self.device_times_s.append(self._device_round(step))
        self.host_times_s += host
        return host

    def retime_if_throttled(self, time_again: Callable[[], list[float]], times: list[float]) -> list[float]:
        """Re-time once, after a pause, if the clock fell during timing; returns the host rounds kept."""
        if not self.monitor.throttled():
            return times
        self.pause(THROTTLE_PAUSE_S)
        self.retimed = True
        self.host_times_s.clear()
        self.device_times_s.clear()
        self.uncovered = 0
        self.monitor.samples = [s for s in self.monitor.samples if s["when"] != "timing"]
        _clear_stored_rounds(self.inner)
        return time_again()

    def record_fields(self) -> dict[str, Any]:
        """The record's device-clock and clock fields for the rounds run."""
        self.monitor.sample("end")
        clocks = self.monitor.summary()
        clocks["retimed_after_throttle"] = self.retimed
        fields: dict[str, Any] = {"clocks": clocks, "throttled": self.monitor.throttled(),
                                  "device_timer": DEVICE_TIMER}
        if self.device_times_s:
            device_median = statistics.median(self.device_times_s)
            fields.update(device_times_s=list(self.device_times_s), device_time_median_s=device_median,
                          device_rounds_uncovered=self.uncovered,
                          launch_bound=launch_bound(statistics.median(self.host_times_s), device_median))
        return fields


def elapsed_s(start: Event, end: Event) -> float:
    """Seconds between two recorded events (CUDA events report milliseconds)."""
    return start.elapsed_time(end) / 1e3


def launch_bound(host_median_s: float, device_median_s: float, margin: float = LAUNCH_BOUND_MARGIN) -> bool:
    """True when the host's step time exceeds the device's by more than ``margin`` (a fraction)."""
    return host_median_s > (1 + margin) * device_median_s


def _clear_stored_rounds(runner: Any) -> None:
    """Forget the host rounds a pytest-benchmark runner stored, so its stats hold only the re-timed ones."""
    benchmark = getattr(runner, "benchmark", None)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        stats.stats.data.clear()
