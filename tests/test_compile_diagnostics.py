"""Compile diagnostics: a planted graph break shows in the record and the report, a clean model reads one graph
and no break, recompiles are counted per cell, and a torch without a source says so."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn

from perfkit import registry
from perfkit.measure import TimingPolicy, measure_cell
from perfkit.measure.compile_info import DIAGNOSTIC_FIELDS, CompileWatch, short_reason, time_split
from perfkit.record import Record
from perfkit.results.compile_text import LEGEND, compile_lines
from perfkit.results.frame import summary_frame
from perfkit.results.text import mode_lines

FAST = TimingPolicy(min_rounds=6, max_rounds=30, max_time_s=0.3, warmup_batch_s=0.005, warmup_max_s=0.1)
SHAPE = (4, 6, 6)


class CleanConv(nn.Module):
    """A convolution and a ReLU: dynamo captures it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class BrokenConv(CleanConv):
    """Planted: a graph break between the convolution and the ReLU, so dynamo makes two graphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._dynamo.graph_break()
        return torch.relu(y)


@pytest.fixture
def tiny(monkeypatch):
    """Register a module class under a throwaway name for one test (the registry is restored after)."""
    registry._load()

    def add(cls: type[nn.Module]) -> str:
        name = f"test_{cls.__name__.lower()}"
        monkeypatch.setitem(registry._REGISTRY, name, registry.Entry(name, "block", cls, SHAPE, SHAPE))
        return name

    return add


@pytest.mark.slow
def test_planted_graph_break_is_in_the_record_and_a_clean_model_is_one_graph(tiny):
    # Two tiny inductor compiles, the broken one first: the clean cell after it must not inherit its counts.
    broken = measure_cell(tiny(BrokenConv), "compile", "inference", 2, "cpu", bench_shape=False, policy=FAST,
                          flops=False)
    clean = measure_cell(tiny(CleanConv), "compile", "inference", 2, "cpu", bench_shape=False, policy=FAST,
                         flops=False)
    assert broken.status == "ok" and clean.status == "ok", (broken.reason, clean.reason)

    assert broken.graph_broken is True and broken.graph_breaks >= 1 and broken.compile_graphs >= 2
    assert len(broken.graph_break_reasons) == 1 and "graph_break()" in broken.graph_break_reasons[0]
    assert "\n" not in broken.graph_break_reasons[0]

    assert clean.graph_broken is False and clean.graph_breaks == 0 and clean.compile_graphs == 1
    assert clean.graph_break_reasons == []
    # Gated and timed at one batch size: nothing compiled again after the first call.
    assert clean.recompiles == 0 and clean.recompile_reasons == []
    for record in (broken, clean):
        split = record.compile_time_split_s
        assert set(split) == {"dynamo", "aot_autograd", "inductor", "rest"}
        # Warm, every graph came from the on-disk caches and inductor itself never ran.
        assert split["dynamo"] > 0 and (split["inductor"] > 0 or record.compile_cache == "warm")
        # The parts are torch's own times inside the first call: they add up to it.
        assert sum(split.values()) == pytest.approx(record.compile_time_s, abs=1e-5)
        assert split["rest"] >= 0
        assert record.compile_notes is None

    eager = measure_cell(tiny(BrokenConv), "eager", "inference", 2, "cpu", bench_shape=False, policy=FAST,
                         flops=False)
    assert eager.status == "ok" and all(getattr(eager, name) is None for name in DIAGNOSTIC_FIELDS)

    frame = summary_frame([eager, broken])
    section = "\n".join(mode_lines(frame, "inference", "peak_memory_bytes", [], frame.iloc[:0], "s.png", None))
    assert "✂ 1 graph break" in section and LEGEND in section
    assert "### Compile" in section and "Call to `torch._dynamo.graph_break()`" in section


def _compiled_twice(fn, *inputs: torch.Tensor) -> CompileWatch:
    """A watch over ``fn`` compiled with dynamo alone (no inductor: a fraction of a second) and called once per
    input, the first call read as the first call."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", dynamic=False)
    watch = CompileWatch()
    compiled(inputs[0])
    watch.first_call_fields(1.0)
    for x in inputs[1:]:
        compiled(x)
    return watch


def test_recompiles_count_from_the_first_call_to_the_cell_end():
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    watch = _compiled_twice(double, torch.ones(2), torch.ones(3), torch.ones(3))
    fields = watch.cell_fields()
    assert fields["recompiles"] == 1
    assert "size mismatch" in fields["recompile_reasons"][0]
    # A later watch (the next cell) starts at zero.
    assert _compiled_twice(double, torch.ones(2)).cell_fields()["recompiles"] == 0


def test_a_torch_without_compilation_metrics_says_so(monkeypatch):
    from torch._dynamo import utils

    monkeypatch.delattr(utils, "get_compilation_metrics")
    watch = CompileWatch()
    fields = watch.first_call_fields(0.5)
    assert "compile_time_split_s" not in fields and fields["graph_breaks"] == 0
    after = watch.cell_fields()
    assert "recompiles" not in after
    assert after["compile_notes"] == ["torch._dynamo.utils.get_compilation_metrics is missing in this torch: no "
                                      "recompile count and no compile time split"]


def test_metrics_without_a_recompile_reason_count_no_recompiles(monkeypatch):
    from perfkit.measure import compile_info

    old = dataclasses.make_dataclass("OldMetrics", [("is_forward", bool, True)])
    monkeypatch.setattr(compile_info, "_metrics_since", lambda start_us: ([old()], 64))
    fields = CompileWatch().cell_fields()
    assert "recompiles" not in fields
    assert fields["compile_notes"] == ["this torch's CompilationMetrics have no recompile_reason: recompiles not "
                                       "counted"]


def test_time_split_nests_torchs_times():
    forward = dataclasses.make_dataclass("Forward", [
        ("is_forward", bool, True), ("dynamo_cumulative_compile_time_us", int, 5_000_000),
        ("aot_autograd_cumulative_compile_time_us", int, 4_000_000),
        ("inductor_cumulative_compile_time_us", int, 3_000_000)])
    backward = dataclasses.make_dataclass("Backward", [
        ("is_forward", bool, False), ("backward_cumulative_compile_time_us", int, 2_000_000),
        ("inductor_cumulative_compile_time_us", int, 1_500_000)])
    assert time_split([forward(), backward()], 8.0) == {"dynamo": 1.0, "aot_autograd": 1.5, "inductor": 4.5,
                                                        "rest": 1.0}


def test_short_reason_keeps_the_first_line_and_the_explanation():
    reason = ("Data-dependent branching\n  Explanation: Detected data-dependent branching (e.g. `if my_tensor.sum() "
              "> 0:`).\n  Hint: Use `torch.cond`.\n\n  Developer debug context: ...")
    assert short_reason(reason) == ("Data-dependent branching: Detected data-dependent branching (e.g. `if "
                                    "my_tensor.sum() > 0:`).")
    assert short_reason("x" * 500).endswith("…") and len(short_reason("x" * 500)) == 160


def test_compile_table_marks_breaks_and_recompiles():
    cell = dict(block="basic", mode="inference", dtype="float32", batch=8, status="ok", step_time_median_s=1e-3,
                times_s=[1e-3] * 5)
    records = [Record(variant="eager", **cell),
               Record(variant="compile", compile_time_s=12.0, compile_cache="cold", compile_graphs=3,
                      graph_breaks=2, graph_broken=True, graph_break_reasons=["a | b"], recompiles=1,
                      recompile_reasons=["0/0: tensor 'x' size mismatch"],
                      compile_time_split_s={"dynamo": 1.0, "aot_autograd": 2.0, "inductor": 8.0, "rest": 1.0},
                      **cell)]
    lines = compile_lines(summary_frame(records))
    row = next(line for line in lines if line.startswith("| `basic`"))
    assert row == ("| `basic` | 8 | `compile` | 12.00 s (cold) | 1.00 / 2.00 / 8.00 / 1.00 | 3 | 2 ✂ | 1 ↻ | "
                   "a \\| b |")
    assert compile_lines(pd.DataFrame({"compile_time_s": [None]})) == []
