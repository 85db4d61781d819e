"""Timing that holds on a busy machine: paired rounds, contention detected, repeat intervals, shared groups."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from perfkit import registry
from perfkit.env.machine import LoadMonitor, available_cores
from perfkit.measure import (
    GroupCache,
    KernelBench,
    KernelCase,
    TimingPolicy,
    adaptive_pairs,
    adaptive_rounds,
    clock_rounds,
    measure_cell,
    pair_block,
    paired_rounds,
    stop_reason,
)
from perfkit.stats import median_ci_rel

SHAPE = (8, 12, 12)
POLICY = TimingPolicy(min_rounds=10, max_rounds=60, max_time_s=0.4, warmup_batch_s=0.01, warmup_max_s=0.2)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU: ~0.1-1 ms a step on a small CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.fixture
def conv_block(monkeypatch):
    registry._load()
    monkeypatch.setitem(registry._REGISTRY, "test_convblock",
                        registry.Entry("test_convblock", "block", ConvBlock, SHAPE, SHAPE))
    return "test_convblock"


def test_paired_rounds_interleave_and_stop_on_both_series():
    order = []
    times, baseline = paired_rounds(lambda: order.append("variant"), lambda: order.append("eager"), POLICY)
    assert len(times) == len(baseline) >= POLICY.min_rounds
    assert order[:4] == ["eager", "variant", "eager", "variant"]

    def run(step, n, before=None):
        return clock_rounds(step, n, before)

    times, baseline = paired_rounds(lambda: time.sleep(0.002), lambda: time.sleep(0.001), POLICY, run)
    assert len(times) == len(baseline)
    assert statistics.median(times) > statistics.median(baseline)


def test_pairs_alternate_in_blocks_sized_to_the_step():
    order = []
    times, baseline = paired_rounds(lambda: order.append("v"), lambda: order.append("e"), POLICY, block=3)
    assert len(times) == len(baseline) and len(times) % 3 == 0
    assert "".join(order[:12]) == "eeevvveeevvv"
    # ~10 ms a block: single rounds for long steps, at most 10 for short ones (whose caches the other
    # member's block evicts).
    assert (pair_block(0.05), pair_block(0.004), pair_block(0.0007), pair_block(1e-5), pair_block(0.0)) == \
        (1, 2, 10, 10, 1)


def test_blocks_keep_the_other_members_cache_misses_out_of_the_median():
    """A variant whose first round after eager's is twice as slow (its caches evicted): alternating single
    rounds times only cold rounds; blocks sized to the step time mostly warm ones, as the variant runs alone."""
    state = {"cold": True}

    def eager() -> None:
        state["cold"] = True

    def variant() -> None:
        time.sleep(0.002 if state["cold"] else 0.001)
        state["cold"] = False

    policy = TimingPolicy(min_rounds=10, max_rounds=60, max_time_s=1.0)
    single, _ = paired_rounds(variant, eager, policy, block=1)
    blocked, _ = paired_rounds(variant, eager, policy, block=pair_block(0.001))
    assert statistics.median(single) >= 0.002
    assert statistics.median(blocked) < 0.0015


def test_min_time_keeps_timing_a_short_step_after_its_target_is_met():
    policy = TimingPolicy(min_rounds=6, max_rounds=10_000, max_time_s=5.0, min_time_s=0.05)
    times = adaptive_rounds(lambda: None, policy, run=lambda step, n: [1e-4] * n)  # the CI is 0 at once
    assert 0.05 <= sum(times) < 0.05 + 2 * 1e-4
    assert stop_reason(median_ci_rel(times), len(times), sum(times), policy) == "median's 95% CI within ±2%"
    capped = adaptive_rounds(lambda: None, replace(policy, max_rounds=40), run=lambda step, n: [1e-4] * n)
    assert len(capped) == 40  # the round cap still wins
    pairs, baseline = adaptive_pairs(lambda n: ([1e-4] * n, [1e-4] * n), policy)
    assert 0.05 <= sum(pairs) + sum(baseline) < 0.05 + 4 * 1e-4  # the minimum covers both series


def test_monitor_sees_the_process_alone_or_not():
    monitor = LoadMonitor("cpu")
    monitor.start()
    time.sleep(0.05)
    load = monitor.stop(threads=1)
    assert load["cores_available"] == available_cores() and load["threads"] == 1
    assert load["wall_s"] >= 0.05 and load["process_cpu_s"] >= 0
    assert isinstance(load["contended"], bool) and "others_busy_cores" in load


def test_a_step_that_sleeps_is_not_waiting_for_a_core():
    """A sleeping (or GPU-waiting) step uses little CPU; it is not runnable, so it is not crowded out."""
    monitor = LoadMonitor("cpu")
    monitor.start()
    time.sleep(0.3)
    load = monitor.stop(threads=1)
    if load["runqueue_wait_s"] is None:
        pytest.skip("this kernel exposes no run-queue statistics (/proc/self/task/*/schedstat)")
    assert load["runqueue_wait_s"] < 0.1 * load["wall_s"]
    assert "run queue" not in (load["contended_reason"] or "")


def test_variants_share_the_groups_reference_and_eager(conv_block, monkeypatch):
    import perfkit.measure.correctness as correctness
    from perfkit.measure import GATE_SEEDS

    calls = []
    real = correctness._reference
    monkeypatch.setattr(correctness, "_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    groups = GroupCache()
    eager = measure_cell(conv_block, "eager", "training", 2, "cpu", bench_shape=False, policy=POLICY, groups=groups)
    variant = measure_cell(conv_block, "channels_last", "training", 2, "cpu", bench_shape=False, policy=POLICY,
                           groups=groups)
    assert eager.status == variant.status == "ok", (eager.reason, variant.reason)
    # One float64 reference per gate input and one for the fresh input after timing, for the whole group:
    # the second variant adds none.
    assert len(calls) == GATE_SEEDS + 1
    assert variant.eager_rel_error == eager.rel_error and variant.flops_per_step == eager.flops_per_step
    assert len(variant.eager_times_s) == len(variant.times_s) == variant.rounds
    assert variant.speedup_ci_low <= variant.speedup_vs_eager <= variant.speedup_ci_high
    assert variant.speedup_vs_eager == pytest.approx(
        statistics.median(e / v for e, v in zip(variant.eager_times_s, variant.times_s, strict=True)))
    assert "float64 reference" in eager.wall_split_s and "float64 reference" not in variant.wall_split_s


BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def test_busy_machine_is_flagged_and_paired_ratio_holds(conv_block):
    """Busy loops on every core: the cell is contended, and eager against itself still reads ~1."""
    cores = available_cores()
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=60)]) for _ in range(cores)]
    try:
        time.sleep(0.2)
        record = measure_cell(conv_block, "eager", "inference", 4, "cpu", bench_shape=False, paired=True,
                              policy=TimingPolicy(min_rounds=20, max_rounds=200, max_time_s=2.0,
                                                  warmup_batch_s=0.01, warmup_max_s=0.2), flops=False)
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()
    assert record.status == "ok", record.reason
    assert record.contended, record.machine_load
    # One busy loop per core beside this cell's threads: each side gets about half of every core.
    assert record.machine_load["others_busy_cores"] > 0.4 * cores
    if record.machine_load["runqueue_wait_s"] is not None:
        assert "waited" in record.machine_load["contended_reason"]  # its threads queued for a core
    assert 0.9 <= record.speedup_vs_eager <= 1.1, (record.speedup_vs_eager, record.machine_load)


def test_repeat_interval_covers_fresh_repeats(conv_block):
    """Four cells, five repeats each (fresh model and group every time): how often does the interval a record
    states hold the other repeats' medians? One thread: the claim is about the interval, and two threads on
    a shared 2-core runner add the OpenMP-barrier pathology the contention flag is for."""
    policy = TimingPolicy(min_rounds=10, max_rounds=60, max_time_s=0.2, warmup_batch_s=0.01, warmup_max_s=0.1)
    cells = [(conv_block, "inference", 4), (conv_block, "training", 4), ("basic", "inference", 2),
             ("basic", "training", 2)]
    covered_repeat = covered_within = pairs = 0
    contended = []
    for name, mode, batch in cells:
        records = [measure_cell(name, "eager", mode, batch, "cpu", bench_shape=False, policy=policy, flops=False,
                                threads=1) for _ in range(5)]
        assert all(r.status == "ok" for r in records), [r.reason for r in records]
        contended += [r.machine_load.get("contended_reason") for r in records if r.contended]
        for a in records:
            for b in records:
                if a is b:
                    continue
                deviation = abs(b.step_time_median_s / a.step_time_median_s - 1)
                pairs += 1
                covered_repeat += deviation <= a.step_time_repeat_rel
                covered_within += deviation <= a.step_time_ci_rel
    print(f"repeat interval covered {covered_repeat}/{pairs}, within-run CI {covered_within}/{pairs}; "
          f"{len(contended)} of 20 repeats contended")
    assert pairs == 80
    assert covered_repeat >= covered_within  # the repeat interval contains the within-run one by construction
    if contended:
        # Coverage is a claim about a machine that is alone; a shared runner moves medians by more than any
        # interval one run can state, and the contention flag is what says so. Seen on this 2-core machine
        # with four other test suites running beside it: 60/80 (and 72/80 quiet).
        pytest.skip(f"coverage {covered_repeat}/{pairs} not judged: {len(contended)} of 20 repeats contended "
                    f"({contended[0]})")
    assert covered_repeat >= 0.8 * pairs, (covered_repeat, covered_within)


def test_run_summary_counts_contended_cells_and_ranks_only_the_others():
    from perfkit.matrix.summary import run_summary
    from perfkit.record import Record

    def record(variant: str, speedup: float | None, contended: bool) -> Record:
        return Record(block="basic", variant=variant, mode="inference", dtype="float32", batch=8, status="ok",
                      speedup_vs_eager=speedup, speedup_ci_low=speedup and speedup * 0.9,
                      speedup_ci_high=speedup and speedup * 1.1, contended=contended,
                      machine_load={"contended_reason": "other processes kept 1.80 of the 2 cores busy"},
                      wall_split_s={"timed rounds": 3.0, "warm-up": 1.0})

    lines = run_summary([record("eager", None, False), record("bf16", 1.2, False),
                         record("channels_last", 148.6, True)])
    assert lines[0].startswith("perfkit: 3 cells timed, 1 contended")
    assert "basic-channels_last-inference-b8: other processes kept 1.80" in lines[1]
    assert "largest speedup of any cell, contended or not: 148.60x" in lines[2]
    assert "largest ranked speedup 1.20x [1.08, 1.32] (basic bf16" in lines[3]
    assert "wall time of the cells 12.0 s, 75% of it timed rounds" in lines[4]


def _bn_relu(x, weight, bias, running_mean, running_var, training):
    return torch.relu(torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training))


def _bn_relu_case(dtype: torch.dtype, layout: str, training: bool, device: torch.device) -> KernelCase:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(size, generator=generator).to(device, dtype).requires_grad_(training)
                       for size in ((2, 8, 4, 4), 8, 8))
    args = [x, weight, bias, torch.zeros(8, device=device), torch.ones(8, device=device), training]
    return KernelCase(args, [x, weight, bias] if training else [])


def test_a_kernel_variant_is_timed_beside_eager(monkeypatch):
    """perfkit.measure.kernel pairs a kernel variant's rounds with the eager expression's; here the "compile"
    variant is eager itself (no compile), so the pairs' ratio is ~1."""
    from perfkit.measure import kernel

    bench = KernelBench("bn_relu", {"cpu": (2, 8, 4, 4), "cuda": (2, 8, 4, 4)}, _bn_relu_case, _bn_relu, _bn_relu,
                        lambda x, training: 2 * x.numel() * x.element_size())
    monkeypatch.setattr(kernel, "_implementation", lambda bench, variant: bench.eager)

    class Disabled:
        disabled = True

    threads = torch.get_num_threads()
    record = kernel.measure_kernel(bench, "compile", "training", "float32", "nchw", torch.device("cpu"), POLICY,
                                   Disabled(), threads=1)
    assert record.status == "ok", record.reason
    assert record.threads == 1 and torch.get_num_threads() == threads  # set for the cell, then restored
    assert len(record.eager_times_s) == len(record.times_s) >= POLICY.min_rounds
    assert record.speedup_ci_low <= record.speedup_vs_eager <= record.speedup_ci_high
    assert 0.8 <= record.speedup_vs_eager <= 1.25, record.speedup_vs_eager
    assert record.machine_load["threads"] == 1 and isinstance(record.contended, bool)
    assert record.rel_error < 1e-5 and record.achieved_gb_per_s > 0 and record.pair_block >= 1


PAGE_FAULT_PROBE = """
import sys, torch
from perfkit.env.machine import minor_faults, pin_malloc
from perfkit.registry import get_entry
policy = pin_malloc()
entry = get_entry("bottleneck")
model, x = entry.create().eval(), entry.example_input(8)
with torch.inference_mode():
    for _ in range(10):
        model(x)
    before = minor_faults()
    for _ in range(50):
        model(x)
print(policy)
print((minor_faults() - before) / 50)
"""


def test_pinned_malloc_keeps_a_fresh_process_from_faulting_every_step():
    """A fresh process running only inference: with glibc's moving thresholds each bottleneck step mapped
    ~775 pages in again (1.4 ms against 0.41 ms); pinned, a step maps none and the cell times the same
    whatever ran before it. Measured in its own process, since pinning lasts for the process."""
    result = subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    policy, faults = result.stdout.strip().splitlines()[-2:]
    if not policy.startswith("glibc"):
        pytest.skip(f"malloc not pinned here: {policy}")
    assert float(faults) < 20, (policy, faults)
