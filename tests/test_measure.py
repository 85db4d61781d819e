"""measure_cell: the correctness gate, faults recorded not raised, a timer that covers the work, the fields."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from torch import nn

import perfkit.measure.cell as cell_module
from perfkit import registry
from perfkit.env.device import device_identity
from perfkit.measure import TimingPolicy, adaptive_rounds, measure_cell, stop_reason, warm_up
from perfkit.measure.memory import METHOD
from perfkit.record import Record
from perfkit.stats import median_ci_rel
from perfkit.testing import ACCURACY_FLOOR, ACCURACY_MULTIPLIER, EAGER_SANITY_TOLERANCE, REL_TOLERANCE

FAST = TimingPolicy(min_rounds=6, max_rounds=30, max_time_s=0.3, warmup_batch_s=0.005, warmup_max_s=0.1)
SHAPE = (4, 6, 6)


class TinyConv(nn.Module):
    """A 3x3 convolution and BatchNorm: a block in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class TinyNet(TinyConv):
    """A network in miniature: logits, so the training loss is cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(super().forward(x).mean(dim=(2, 3)))


class Float32Bug(TinyConv):
    """Planted wrong variant: the float32 channels_last path scales the output by 1.001 (1e-3 off)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        wrong = x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        return out * 1.001 if wrong else out


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.02


class Float32GradBug(TinyConv):
    """Right output, gradients 2% off in the float32 channels_last path: only the training gate can catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        wrong = x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        return _WrongGrad.apply(out) if wrong else out


class EagerBug(TinyConv):
    """Eager itself is wrong (the float32 path 1% off): eager's own bound catches it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * 1.01 if x.dtype == torch.float32 else out


class OutOfMemory(TinyConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return super().forward(x)


class Sleeps(TinyConv):
    """Takes at least 20 ms of host time per forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return super().forward(x)


_pending: list[threading.Thread] = []


class AsyncSleeps(TinyConv):
    """Like a GPU: the forward returns at once and its 20 ms of work finishes later, until synchronized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = threading.Thread(target=time.sleep, args=(0.02,))
        work.start()
        _pending.append(work)
        return super().forward(x)


def _fake_synchronizer(device):
    def sync() -> None:
        while _pending:
            _pending.pop().join()

    return sync


@pytest.fixture
def tiny(monkeypatch):
    """Register a module class under a throwaway name for one test (the registry is restored after)."""
    registry._load()

    def add(cls: type[nn.Module], kind: str = "block") -> str:
        name = f"test_{cls.__name__.lower()}"
        monkeypatch.setitem(registry._REGISTRY, name, registry.Entry(name, kind, cls, SHAPE, SHAPE))
        return name

    return add


def test_ok_cell_has_every_field(tiny):
    record = measure_cell(tiny(TinyConv), "eager", "training", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok", record.reason
    assert record.reason is None
    assert (record.block, record.variant, record.mode, record.dtype, record.batch, record.kind) == (
        "test_tinyconv", "eager", "training", "float32", 2, "block")
    assert record.input_shape == [2, *SHAPE]
    assert record.device == device_identity("cpu") and record.device["name"]
    assert record.params == 4 * 8 * 9 + 16
    assert record.rel_error < 1e-5 and record.tolerance == EAGER_SANITY_TOLERANCE["float32"][0]
    assert record.eager_rel_error == record.rel_error and record.threads == torch.get_num_threads()
    assert record.speedup_vs_eager is None and record.eager_times_s is None  # eager is not paired with itself
    assert isinstance(record.contended, bool) and record.machine_load["cores_available"] >= 1
    assert record.step_time_repeat_rel > math.sqrt(2) * record.step_time_ci_rel
    assert record.wall_split_s["timed rounds"] == pytest.approx(sum(record.times_s))
    assert record.rounds == len(record.times_s) >= FAST.min_rounds
    assert record.step_time_p20_s <= record.step_time_median_s <= record.step_time_p80_s
    assert record.step_time_cv >= 0 and record.step_time_mean_s > 0
    assert record.samples_per_s == pytest.approx(2 / record.step_time_median_s)
    assert record.noise_bound_rel == FAST.target_ci_rel and isinstance(record.noisy, bool)
    assert record.warmup_steps >= 1 and record.warmup_time_s > 0 and record.compile_time_s is None
    assert record.peak_memory_bytes > record.peak_memory_rise_bytes > 0
    assert record.memory_method == METHOD
    # conv forward 2*N*Cout*Cin*9*H*W; backward twice that (input and weight gradients); BN/ReLU uncounted.
    conv = 2 * 2 * 8 * 4 * 9 * 6 * 6
    assert record.flops_per_step == 3 * conv
    assert record.tflops_per_s == pytest.approx(3 * conv / record.step_time_median_s / 1e12)
    assert Record.from_dict(record.to_dict()) == record


def test_network_trains_on_cross_entropy(tiny):
    record = measure_cell(tiny(TinyNet, "network"), "channels_last", "training", 3, "cpu", bench_shape=False,
                          policy=FAST)
    assert record.status == "ok", record.reason
    assert record.kind == "network" and record.rel_error < 1e-5


def test_cpu_memory_is_deterministic(tiny):
    name = tiny(TinyConv)
    first, second = (measure_cell(name, "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST, flops=False)
                     for _ in range(2))
    assert first.peak_memory_rise_bytes == second.peak_memory_rise_bytes
    # The output alone (2x8x6x6 float32) is live at the peak of an inference step.
    assert first.peak_memory_rise_bytes >= 2 * 8 * 6 * 6 * 4


def test_gate_fails_a_wrong_output(tiny):
    record = measure_cell(tiny(Float32Bug), "channels_last", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "failed"
    assert record.rel_error == pytest.approx(1e-3, rel=1e-2)
    expected = ACCURACY_MULTIPLIER * record.eager_rel_error + ACCURACY_FLOOR["float32"][0]
    assert record.tolerance == pytest.approx(expected)
    assert record.reason.startswith("output relative error 1.000e-03 > 1.0e-05 (float32: 3x eager's error + floor)")
    assert record.step_time_median_s is None and record.times_s == []


def test_gate_fails_a_wrong_gradient_in_training_only(tiny):
    name = tiny(Float32GradBug)
    assert measure_cell(name, "channels_last", "inference", 2, "cpu", bench_shape=False, policy=FAST).status == "ok"
    record = measure_cell(name, "channels_last", "training", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "failed"
    assert record.reason.startswith("gradients relative error")
    assert record.rel_error < 1e-5 and record.grad_rel_error > record.grad_tolerance


def test_eager_that_is_wrong_fails_its_own_bound(tiny):
    record = measure_cell(tiny(EagerBug), "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "failed" and "eager's own bound" in record.reason
    # Its variants are held to the fixed bound, not to a multiple of eager's own large error.
    variant = measure_cell(tiny(EagerBug), "channels_last", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert variant.status == "failed" and variant.tolerance == REL_TOLERANCE["float32"]


def test_oom_is_recorded_not_raised(tiny):
    record = measure_cell(tiny(OutOfMemory), "eager", "training", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "oom"
    assert record.batch == 2  # never shrunk
    assert record.reason.startswith("eager first call: torch.OutOfMemoryError: CUDA out of memory")


def test_compile_failure_is_recorded(tiny, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor could not lower aten.convolution")

    monkeypatch.setattr(torch, "compile", broken_compile)
    record = measure_cell(tiny(TinyConv), "compile", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "error"
    assert record.reason == "variant: RuntimeError: inductor could not lower aten.convolution"


def test_skip_says_why(tiny):
    record = measure_cell(tiny(TinyConv), "fp16", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "skipped" and "fp16 needs a CUDA GPU" in record.reason
    assert record.rel_error is None and record.times_s == []


def test_bad_arguments_raise():
    with pytest.raises(KeyError, match="valid names"):
        measure_cell("no_such_block", "eager", "inference", 2, "cpu", bench_shape=False)
    with pytest.raises(ValueError, match="valid modes: inference, training"):
        measure_cell("basic", "eager", "train", 2, "cpu", bench_shape=False)


def test_timer_covers_the_work(tiny):
    record = measure_cell(tiny(Sleeps), "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST, flops=False)
    assert record.status == "ok"
    assert min(record.times_s) >= 0.02


def test_timer_waits_for_an_asynchronous_device(tiny, monkeypatch):
    # The forward returns before its work is done, as a CUDA launch does; only the synchronization inside
    # the timed round makes the stored time cover the 20 ms of work.
    monkeypatch.setattr(cell_module, "synchronizer", _fake_synchronizer)
    record = measure_cell(tiny(AsyncSleeps), "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST,
                          flops=False)
    assert record.status == "ok"
    assert min(record.times_s) >= 0.02
    assert not _pending


@pytest.mark.slow
def test_compile_records_its_compile_time_apart(tiny):
    record = measure_cell(tiny(TinyConv), "compile", "inference", 2, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok", record.reason
    assert record.variant == "compile" and record.rel_error < 1e-5
    # The first call compiled; the steps after it are far faster than a compile.
    assert record.compile_time_s > 10 * record.step_time_median_s
    # Cold (inductor generated code) or warm (every graph from its on-disk cache): which one was timed.
    assert record.compile_cache in ("cold", "warm")


def test_adaptive_rounds_stop_when_steady_and_flag_noise():
    steady = adaptive_rounds(lambda: None, FAST, run=lambda step, n: [0.01] * n)
    assert len(steady) == FAST.min_rounds and median_ci_rel(steady) == 0

    noisy_policy = TimingPolicy(min_rounds=6, max_rounds=40, max_time_s=0.4)
    noisy = adaptive_rounds(lambda: None, noisy_policy, run=lambda step, n: [0.01, 0.03] * (n // 2) + [0.01] * (n % 2))
    # ±2% from a CI of ±100% would take thousands of rounds: once half the 0.4 s is spent, the rule stops.
    assert len(noisy) == 12 and median_ci_rel(noisy) > noisy_policy.target_ci_rel
    assert stop_reason(median_ci_rel(noisy), 12, sum(noisy), noisy_policy).startswith("stopped early at ±")
    reachable = TimingPolicy(min_rounds=6, max_rounds=40, max_time_s=100.0)
    slightly = adaptive_rounds(lambda: None, reachable, run=lambda step, n: [0.0100, 0.0106] * (n // 2)
                               + [0.01] * (n % 2))
    assert len(slightly) == 40  # within reach: it runs to the round cap
    assert stop_reason(median_ci_rel(slightly), 40, sum(slightly), reachable).startswith("round cap (40)")

    capped = adaptive_rounds(lambda: None, TimingPolicy(min_rounds=6, max_time_s=1.0),
                             run=lambda step, n: [0.01, 0.03] * (n // 2) + [0.01] * (n % 2))
    assert sum(capped) <= 1.0 + 0.03 * 6


def test_warm_up_ends_when_steady():
    # Batches of one step each: 60 ms, 40 ms, 20 ms, 20 ms -> the 3rd and 4th agree within 30%.
    durations = iter([0.06, 0.04] + [0.02] * 100)
    steps, seconds = warm_up(lambda: time.sleep(next(durations)),
                             TimingPolicy(warmup_batch_s=0.001, warmup_steady_rel=0.3, warmup_max_s=5.0))
    assert steps >= 4 and seconds >= 0.14
