"""The CI counter gate: the quick profile's FLOPs, parameters and CPU peak memory against the committed
baseline ``benchmarks/baselines/cpu-quick-counters.json``. Refresh on purpose with ``perfkit baseline --write``."""

from __future__ import annotations

import json

import pytest

from perfkit.compare import (
    BASELINE_PATH,
    BASELINE_SCHEMA,
    cell_counters,
    check_baseline,
    compute_baseline,
    diff_baseline,
)
from perfkit.measure import QUICK_POLICY, measure_cell


@pytest.fixture(scope="module")
def current() -> dict:
    return compute_baseline()


def test_counters_match_the_committed_baseline(current):
    stored = json.loads(BASELINE_PATH.read_text())
    problems = diff_baseline(stored, current)
    assert not problems, "\n".join(
        ["counters moved (refresh on purpose with `perfkit baseline --write` and commit the file):", *problems])


def test_baseline_covers_the_quick_profile(current):
    cells = current["cells"]
    blocks = {key.split("/")[0] for key in cells}
    assert {"basic", "dense_plain"} <= blocks
    assert len(cells) == 4 * len(blocks)  # eager and channels_last, inference and training
    assert all(set(c) == {"flops_per_step", "params", "peak_memory_rise_bytes"} for c in cells.values())


def test_counters_are_those_the_matrix_records():
    record = measure_cell("basic", "eager", "training", 8, "cpu", bench_shape=False, policy=QUICK_POLICY)
    counters = cell_counters("basic", "eager", "training", 8)
    assert record.status == "ok"
    assert counters == {"flops_per_step": record.flops_per_step, "params": record.params,
                        "peak_memory_rise_bytes": record.peak_memory_rise_bytes}


def test_a_raised_counter_is_reported(current):
    stored = json.loads(json.dumps(current))
    cell = next(iter(stored["cells"]))
    stored["cells"][cell]["peak_memory_rise_bytes"] //= 2  # the baseline had half: the code now keeps twice
    problems = diff_baseline(stored, current)
    assert len(problems) == 1 and cell in problems[0] and "peak_memory_rise_bytes" in problems[0]
    assert "+100.00%" in problems[0]
    stored["schema"] = "other"
    assert diff_baseline(stored, current) == [f"baseline schema 'other', expected {BASELINE_SCHEMA!r}"]


def test_missing_baseline_says_how_to_create_it(tmp_path):
    problems = check_baseline(tmp_path / "none.json")
    assert len(problems) == 1 and "perfkit baseline --write" in problems[0]
