"""The CI counter gate (``perfkit.baseline``): FLOPs, parameters and the memory model's per-category peaks of the
quick profile against the committed ``benchmarks/baselines/cpu-quick-counters.json``, identical on every machine.
Refresh on purpose with ``perfkit baseline --write``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from perfkit.baseline import (
    BASELINE_PATH,
    BASELINE_SCHEMA,
    BASELINE_VARIANTS,
    BaselineError,
    cell_counters,
    check_baseline,
    compute_baseline,
    diff_baseline,
    write_baseline,
)
from perfkit.registry import _REGISTRY, Entry, get_entry

INVARIANCE_CELLS = [("d2l_resnet18", "eager", "training"), ("basic", "channels_last", "training"),
                    ("dense_plain", "bf16", "inference"), ("dense_plain", "triton", "training")]


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
    assert {"basic", "dense_plain", "d2l_resnet18"} <= blocks
    fused = {key.split("/")[0] for key in cells if "/triton/" in key}
    assert {"wrc", "dense_plain", "basic"} <= fused and "inception" not in fused
    assert len(cells) == (len(BASELINE_VARIANTS) - 1) * 2 * len(blocks) + 2 * len(fused)
    for counters in cells.values():
        assert {"flops_per_step", "params", "predicted_peak_bytes", "predicted_activations_bytes"} <= set(counters)
        assert counters["predicted_parameters_bytes"] > 0 and counters["predicted_activations_bytes"] > 0


@pytest.mark.parametrize("name, variant, mode", INVARIANCE_CELLS)
def test_gated_figures_do_not_depend_on_threads_or_onednn(name, variant, mode):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = cell_counters(name, variant, mode, 8)
        torch.set_num_threads(2)
        two_threads = cell_counters(name, variant, mode, 8)
    finally:
        torch.set_num_threads(threads)
    with torch.backends.mkldnn.flags(enabled=False):
        no_onednn = cell_counters(name, variant, mode, 8)
    assert one_thread == two_threads == no_onednn


def test_gated_figures_do_not_depend_on_the_isa():
    """oneDNN reads ONEDNN_MAX_CPU_ISA once per process: each ISA cap runs in a fresh interpreter."""
    code = ("import json; from perfkit.baseline import cell_counters; "
            "print(json.dumps(cell_counters('d2l_resnet18', 'eager', 'training', 8)))")
    figures = []
    for isa in ("AVX2", "AVX512_CORE"):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        figures.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert figures[0] == figures[1] == cell_counters("d2l_resnet18", "eager", "training", 8)


class _KeepsTwice(nn.Module):
    """A planted change: the same conv-BN-ReLU stack run twice on copies of the input, so autograd keeps
    every saved activation twice, and the two results averaged (the output is the block's own)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.inner(x.clone()) + self.inner(x.clone()))


def test_a_block_keeping_twice_its_activations_fails_the_gate(monkeypatch):
    entry = get_entry("basic")
    before = cell_counters("basic", "eager", "training", 8)
    monkeypatch.setitem(_REGISTRY, "basic", Entry("basic", entry.kind, lambda **kw: _KeepsTwice(entry.factory(**kw)),
                                                  entry.bench_shape, entry.test_shape, entry.description,
                                                  entry.kwargs))
    after = cell_counters("basic", "eager", "training", 8)
    cell = "basic/eager/training/b8"
    base = {"schema": BASELINE_SCHEMA, "memory_method": "m", "batch": 8, "shape": "test"}
    problems = diff_baseline({**base, "cells": {cell: before}}, {**base, "cells": {cell: after}})
    line = next(p for p in problems if "predicted_activations_bytes" in p)
    assert line.startswith(f"{cell}: predicted_activations_bytes {before['predicted_activations_bytes']} -> ")
    ratio = after["predicted_activations_bytes"] / before["predicted_activations_bytes"]
    assert 1.9 <= ratio <= 2.1 and f"x{ratio:.3f}" in line


def test_schema_and_cell_set_changes_are_reported(current):
    stored = json.loads(json.dumps(current))
    cell = next(iter(stored["cells"]))
    del stored["cells"][cell]
    assert diff_baseline(stored, current) == [f"{cell}: in the quick profile but not in the baseline"]
    stored["schema"] = "other"
    assert diff_baseline(stored, current) == [f"baseline schema 'other', expected {BASELINE_SCHEMA!r}"]


def test_missing_baseline_says_how_to_create_it(tmp_path):
    problems = check_baseline(tmp_path / "none.json")
    assert len(problems) == 1 and "perfkit baseline --write" in problems[0]


def test_write_never_creates_folders(tmp_path):
    with pytest.raises(BaselineError, match="is not a folder"):
        write_baseline(tmp_path / "nowhere" / "counters.json")
    assert not (tmp_path / "nowhere").exists()


def test_an_installed_wheel_asks_for_a_path(monkeypatch, tmp_path, capsys):
    """From site-packages there is no benchmarks/ folder: `perfkit baseline` says to pass --path, exit 2."""
    from perfkit import baseline as gate
    from perfkit import cli

    monkeypatch.setattr(gate, "BASELINE_PATH", tmp_path / "site-packages" / "benchmarks" / "baselines" / "c.json")
    assert cli.main(["baseline", "--write"]) == 2
    assert "--path CHECKOUT/benchmarks/baselines/cpu-quick-counters.json" in capsys.readouterr().err
    assert not (tmp_path / "site-packages").exists()


def test_the_baseline_check_does_not_load_pytest():
    """`perfkit baseline` is a plain CLI command: reading the quick profile must not import the pytest plugin."""
    # Whether the counters still match is test_counters_match_the_committed_baseline's to say; here only the imports.
    code = ("import sys; from perfkit.cli import main; main(['baseline']); "
            "print(sorted(m for m in ('pytest', '_pytest') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
