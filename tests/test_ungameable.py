"""Results that cannot be gamed: the gate on several inputs and once more after timing, and the physical floor.

Each planted variant is a user atom (``perfkit.register_variant``) over a registered block, measured by the
matrix's own ``measure_cell`` against ceilings measured here, as a run measures them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import perfkit
from perfkit import registry, user_variants
from perfkit.env.ceilings import (
    IMPOSSIBLE_FRACTION,
    Floor,
    bytes_lower_bound,
    floor_fraction,
    impossible_reason,
    measure_cpu_ceilings,
    step_floor,
)
from perfkit.matrix.options import OptionError, parse_gate_seeds
from perfkit.measure import GATE_SEEDS, GroupCache, TimingPolicy, measure_cell
from perfkit.measure.correctness import INPUT_SEED_STRIDE, gate_input_seeds, recheck_seed
from perfkit.record import Record, append_jsonl
from perfkit.results import build_reports
from perfkit.results.frame import best_variants, fast_p, geomean_speedups, has_value, summary_frame

FAST = TimingPolicy(min_rounds=6, max_rounds=30, max_time_s=0.3, warmup_batch_s=0.005, warmup_max_s=0.1)
BLOCK = "test_conv64"
SHAPE = (64, 16, 16)


class Conv64(nn.Module):
    """A 3x3 convolution of 64 channels and a ReLU: 150 MFLOP a step at batch 8, a floor of a millisecond or
    more on a CPU, far above the microseconds of a step that does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class StaleAfter(nn.Module):
    """Planted: computes its first ``fresh_calls`` calls, then answers every call with the last of them."""

    def __init__(self, model: nn.Module, fresh_calls: int) -> None:
        super().__init__()
        self.model, self.fresh_calls, self.calls, self.kept = model, fresh_calls, 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.fresh_calls:
            self.kept = self.model(x)
        return self.kept


class CachedByInput(nn.Module):
    """Planted: computes an input it has not seen, and answers the same input object from its cache. Every
    timed step runs the same input, so each does nothing after the first; every check runs a new one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen, self.kept = model, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.seen:
            self.seen, self.kept = x, self.model(x)
        return self.kept


@pytest.fixture
def plant(monkeypatch):
    """Register the block and planted variants for one test; the registries are restored after."""
    registry._load()
    user_variants.load_user_variants()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(user_variants, "_USER_VARIANTS", dict(user_variants._USER_VARIANTS))
    perfkit.register(BLOCK, kind="block", bench_shape=SHAPE, test_shape=SHAPE)(Conv64)

    def variant(name: str, wrap) -> str:
        perfkit.register_variant(name, lambda model, *, mode, device: wrap(model), modes=("inference",))
        return name

    return variant


@pytest.fixture(scope="module")
def ceilings() -> dict:
    """This CPU's ceilings at torch's threads, measured as a run measures them (a smaller copy, to stay quick: a
    copy that stays in a cache reads faster, which only lowers the floor)."""
    return measure_cpu_ceilings(copy_bytes=64 * 2**20)


def test_the_gate_inputs_start_with_the_timed_one_and_the_fresh_one_is_none_of_them():
    assert gate_input_seeds(5) == [5, 5 + INPUT_SEED_STRIDE, 5 + 2 * INPUT_SEED_STRIDE]
    assert recheck_seed(5) == 5 + GATE_SEEDS * INPUT_SEED_STRIDE not in gate_input_seeds(5)
    with pytest.raises(ValueError, match="at least one input"):
        gate_input_seeds(0, 0)


def test_a_variant_that_returns_its_first_output_forever_fails_on_the_gates_second_input(plant, ceilings):
    stale = plant("stale_first", lambda model: StaleAfter(model, fresh_calls=1))
    record = measure_cell(BLOCK, stale, "inference", 8, "cpu", bench_shape=False, policy=FAST, ceilings=ceilings)
    assert record.status == "failed", record.reason
    # Right on the timed input (its first call), wrong on the next: never timed.
    assert record.rel_error < 1e-5 and record.gate_checks[1]["rel_error"] > 0.1
    assert f"on gate input 2 of {GATE_SEEDS} (seed {INPUT_SEED_STRIDE})" in record.reason
    assert not record.times_s and record.step_time_median_s is None


def test_a_variant_that_turns_stale_after_the_gate_fails_the_check_after_timing(plant, ceilings):
    stale = plant("stale_after_gate", lambda model: StaleAfter(model, fresh_calls=GATE_SEEDS))
    record = measure_cell(BLOCK, stale, "inference", 8, "cpu", bench_shape=False, policy=FAST, ceilings=ceilings)
    assert record.status == "failed", record.reason
    before, after = record.gate_checks[:-1], record.gate_checks[-1]
    assert [c["when"] for c in before] == ["before timing"] * GATE_SEEDS
    assert all(c["rel_error"] <= c["tolerance"] for c in before)
    assert after["when"] == "after timing" and after["rel_error"] > after["tolerance"]
    assert f"after timing, on a fresh input (seed {recheck_seed(0)})" in record.reason
    assert "stale" in record.reason and record.wall_split_s["post-timing check"] > 0


def test_a_step_that_does_nothing_after_its_first_call_is_impossible_and_never_ranked(plant, ceilings, tmp_path):
    cached = plant("cached_by_input", CachedByInput)
    groups = GroupCache()
    eager, planted = (measure_cell(BLOCK, v, "inference", 8, "cpu", bench_shape=False, policy=FAST, groups=groups,
                                   ceilings=ceilings) for v in ("eager", cached))
    # Honest eager runs above its floor; the planted step passes every correctness check, the one after
    # timing included, and was timed doing nothing.
    assert eager.status == "ok", eager.reason
    assert eager.step_time_median_s > eager.step_time_floor_s / IMPOSSIBLE_FRACTION
    assert planted.status == "impossible", planted.reason
    assert all(c["rel_error"] <= c["tolerance"] for c in planted.gate_checks) and len(planted.gate_checks) == 4
    assert planted.step_time_floor_bound == "compute" and planted.ceilings == ceilings
    assert planted.step_time_median_s * IMPOSSIBLE_FRACTION < planted.step_time_floor_s
    assert "under the step's physical floor" in planted.reason

    frame = summary_frame([eager, planted])
    assert not has_value(frame.set_index("variant").loc[cached, "speedup_vs_eager"])
    assert list(best_variants(frame)["variant"]) == ["eager"]
    assert fast_p(frame)["fast"][0.0] == 0.0
    assert geomean_speedups(frame).set_index("variant").loc[cached, "with_interval"] == 0

    path = tmp_path / "results.jsonl"
    for record in (eager, planted):
        append_jsonl(path, record)
    (folder,) = build_reports([path], tmp_path / "reports")
    readme = (folder / "README.md").read_text()
    assert "1 cell ran faster than this machine allows" in readme
    assert "IMPOSSIBLE (" in readme and "### Physical floor" in readme
    assert f"{eager.step_time_floor_s / eager.step_time_median_s:.0%} of floor (compute)" in readme


def test_an_honest_training_cell_passes_the_check_after_timing(plant, ceilings):
    """The timed SGD steps move the weights; the check after timing sets them back first."""
    record = measure_cell(BLOCK, "channels_last", "training", 8, "cpu", bench_shape=False, policy=FAST,
                          ceilings=ceilings)
    assert record.status == "ok", record.reason
    after = record.gate_checks[-1]
    assert after["when"] == "after timing" and after["input_seed"] == recheck_seed(0)
    assert after["rel_error"] <= after["tolerance"] and after["grad_rel_error"] <= after["grad_tolerance"]
    assert 0 < floor_fraction(record.step_time_floor_s, record.step_time_median_s) <= IMPOSSIBLE_FRACTION


def test_gate_seeds_sets_the_inputs_checked_before_timing(plant):
    record = measure_cell(BLOCK, "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST, gate_seeds=1)
    assert record.status == "ok", record.reason
    assert [(c["input_seed"], c["when"]) for c in record.gate_checks] == [(0, "before timing"),
                                                                          (recheck_seed(0, 1), "after timing")]
    # Without ceilings there is no floor, and nothing is judged impossible.
    assert record.ceilings is None and record.step_time_floor_s is None
    with pytest.raises(ValueError, match="gate_seeds must be at least 1"):
        measure_cell(BLOCK, "eager", "inference", 2, "cpu", bench_shape=False, gate_seeds=0)


def test_gate_seeds_option_parses_with_its_default_and_names_a_bad_value():
    assert parse_gate_seeds(None) == GATE_SEEDS and parse_gate_seeds("5") == 5
    for bad in ("0", "-1", "three"):
        with pytest.raises(OptionError, match=r"--perfkit-gate-seeds .*positive integer"):
            parse_gate_seeds(bad)


def test_the_floor_is_the_longer_of_compute_and_the_bytes_beyond_the_caches():
    ceilings = {"fp32_tflops": 1.0, "copy_gb_per_s": 10.0, "cache_bytes": 10**6}
    # 1 GFLOP at 1 TFLOP/s: 1 ms; 11 MB of which 10 MB cannot stay cached, at 10 GB/s: 1 ms... and a hair.
    assert step_floor(10**9, 10**6 + 10**7 + 10**4, ceilings, "float32") == Floor(pytest.approx(1.001e-3), "memory")
    assert step_floor(10**9, 10**6, ceilings, "float32") == Floor(pytest.approx(1e-3), "compute")
    # No measured bf16 peak and everything cached: no floor rather than a made-up one.
    assert step_floor(10**9, 10**6, ceilings, "bfloat16") is None
    assert step_floor(10**9, 10**6, None, "float32") is None
    floor = Floor(1e-3, "compute")
    assert impossible_reason(floor, 1e-3 / IMPOSSIBLE_FRACTION) is None
    assert "under the step's physical floor" in impossible_reason(floor, 1e-5)


def test_the_reports_bytes_bound_is_the_floors():
    from perfkit.results.frame import bytes_moved_lower_bound

    record = Record(block="b", variant="eager", mode="training", dtype="bfloat16", batch=8, status="ok",
                    params=1000, input_shape=[8, 3, 4, 4])
    assert bytes_moved_lower_bound(record) == bytes_lower_bound(1000, [8, 3, 4, 4], "bfloat16", "training") \
        == 2 * (3 * 1000 + 2 * 8 * 3 * 4 * 4)


def test_cpu_ceilings_are_measured_at_the_given_threads_and_leave_torchs_alone():
    before = torch.get_num_threads()
    ceilings = measure_cpu_ceilings(threads=1, matmul_n=256, copy_bytes=2**22, rounds=2)
    assert torch.get_num_threads() == before and ceilings["threads"] == 1
    assert ceilings["fp32_tflops"] > 0 and ceilings["copy_gb_per_s"] > 0 and ceilings["measure_s"] > 0
    assert ceilings["cache_bytes"] is None or ceilings["cache_bytes"] > 0
