"""What ``torch.compile`` did in one cell: its graphs, graph breaks, recompiles and where the compile time went.

A compiled variant that is slow because dynamo broke the model into ten graphs, or recompiled at the timed
batch, reads from its times alone as "compile is slow". PyTorch's dynamo benchmark harness records these for
every model (``benchmarks/dynamo/common.py``: ``get_dynamo_stats`` before and after a run, subtracted); a
compiled cell here does the same, from two of torch's own sources:

- ``torch._dynamo.utils.counters``: ``stats.unique_graphs`` (each graph dynamo handed to the backend) and
  ``graph_break`` (each break's reason, counted every time a frame with it is traced);
- ``torch._dynamo.utils.get_compilation_metrics()``: one ``CompilationMetrics`` per frame compiled (and per
  backward graph compiled), with its recompile reason and the cumulative time of dynamo, AOTAutograd and
  inductor in it.

Both are process-wide. A :class:`CompileWatch` reads what changed since it started (the counters by
difference, the metrics by their start time), so a cell never counts another cell's compiles and nothing of
torch's is cleared. Where a torch lacks a source, the fields it would fill stay None and ``compile_notes``
says which source was missing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

MAX_REASONS = 3
"""Graph-break and recompile reasons a record keeps (the first distinct ones); the counts count them all."""
REASON_CHARS = 160
"""A reason's length in a record: torch's own runs to several lines of hints and a link."""

DIAGNOSTIC_FIELDS = ("compile_graphs", "graph_breaks", "graph_break_reasons", "graph_broken", "recompiles",
                     "recompile_reasons", "compile_time_split_s", "compile_notes")
"""The record fields a :class:`CompileWatch` fills; None in a cell that did not compile."""


def short_reason(reason: str) -> str:
    """One line of a dynamo reason: its first line and its ``Explanation:``, cut at :data:`REASON_CHARS`."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    if not lines:
        return ""
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines[1:]
                        if line.startswith("Explanation:")), "")
    text = f"{lines[0]}: {explanation}" if explanation else lines[0]
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _first_distinct(reasons: Iterable[str]) -> list[str]:
    """The first :data:`MAX_REASONS` distinct short reasons, in the order given."""
    return list(dict.fromkeys(short for short in map(short_reason, reasons) if short))[:MAX_REASONS]


def _counters() -> dict[str, Counter] | None:
    """A copy of dynamo's counters, or None where this torch has none."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return {group: Counter(values) for group, values in counters.items()}


def _metrics_since(start_us: int) -> tuple[list[Any], int | None] | None:
    """torch's ``CompilationMetrics`` that started at or after ``start_us`` (wall clock, µs) and how many
    torch keeps at most; None where this torch has no ``get_compilation_metrics``."""
    try:
        from torch._dynamo import utils
    except ImportError:
        return None
    if not hasattr(utils, "get_compilation_metrics"):
        return None
    kept = getattr(getattr(utils, "_compilation_metrics", None), "maxlen", None)
    # Runtime entries (autotuning at run time, CUDA graph recording) are not compiles.
    return [m for m in utils.get_compilation_metrics()
            if (getattr(m, "start_time_us", None) or 0) >= start_us and getattr(m, "is_runtime", False) is not True
            ], kept


def _us(metric: Any, name: str) -> float:
    return (getattr(metric, name, None) or 0) / 1e6


def time_split(metrics: Iterable[Any], first_call_s: float) -> dict[str, float]:
    """``compile_time_split_s`` of a first call that took ``first_call_s``: dynamo's own tracing, AOTAutograd
    (forward and backward graphs, less inductor), inductor's, and the rest of the call (running the graphs,
    guards, Python). torch's times nest: dynamo's frame time holds the backend's, which holds inductor's."""
    dynamo = aot = inductor = 0.0
    for m in metrics:
        inductor_s = _us(m, "inductor_cumulative_compile_time_us")
        inductor += inductor_s
        if getattr(m, "is_forward", True) is False:  # a backward graph: compiled by AOTAutograd, not traced
            aot += _us(m, "backward_cumulative_compile_time_us") - inductor_s
            continue
        backend_s = _us(m, "aot_autograd_cumulative_compile_time_us")
        dynamo += _us(m, "dynamo_cumulative_compile_time_us") - backend_s
        aot += backend_s - inductor_s
    split = {"dynamo": dynamo, "aot_autograd": aot, "inductor": inductor}
    split["rest"] = first_call_s - sum(split.values())
    return {part: round(seconds, 6) for part, seconds in split.items()}


def _inductor_cache_misses(counters: dict[str, Counter]) -> int:
    """Graphs inductor compiled (FX graph cache misses; bypasses count as misses)."""
    inductor = counters.get("inductor", Counter())
    return inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]


class CompileWatch:
    """What dynamo, AOTAutograd and inductor did from the watch's start: a compiled cell starts one right
    before its first call, reads :meth:`first_call_fields` after it, and :meth:`cell_fields` when it ends."""

    def __init__(self) -> None:
        self._start_us = time.time_ns() // 1000
        self._counters = _counters()
        self._notes: list[str] = []

    def _since(self) -> dict[str, Counter]:
        """The counters' increase since the start (Counter subtraction drops what did not grow)."""
        now = _counters() or {}
        return {group: values - self._counters.get(group, Counter()) for group, values in now.items()}

    def first_call_fields(self, first_call_s: float) -> dict[str, Any]:
        """The record's compile fields after the first call, which took ``first_call_s`` (it is the compile):
        ``compile_time_s``, ``compile_cache``, the graphs and graph breaks, and the time split."""
        fields: dict[str, Any] = {"compile_time_s": first_call_s}
        if self._counters is None:
            self._notes.append("torch._dynamo.utils.counters is missing in this torch: no graph, graph-break "
                               "or inductor cache counts")
        else:
            grown = self._since()
            breaks = grown.get("graph_break", Counter())
            fields.update(
                compile_cache="cold" if _inductor_cache_misses(grown) else "warm",
                compile_graphs=grown.get("stats", Counter())["unique_graphs"],
                graph_breaks=sum(breaks.values()),
                graph_break_reasons=_first_distinct(breaks),
                graph_broken=sum(breaks.values()) > 0)
        metrics = self._metrics()
        if metrics is not None:
            fields["compile_time_split_s"] = time_split(metrics, first_call_s)
        fields["compile_notes"] = list(self._notes) or None
        return fields

    def cell_fields(self) -> dict[str, Any]:
        """The recompiles from the start until now (a second batch size, a guard that failed in warm-up or
        timing): ``recompiles`` and the first ``recompile_reasons``."""
        metrics = self._metrics()
        if metrics is None:
            return {"compile_notes": list(self._notes) or None}
        forward = [m for m in metrics if getattr(m, "is_forward", True) is not False]
        if any(not hasattr(m, "recompile_reason") for m in forward):
            note = "this torch's CompilationMetrics have no recompile_reason: recompiles not counted"
            self._notes += [note] if note not in self._notes else []
            return {"compile_notes": list(self._notes)}
        reasons = [m.recompile_reason for m in forward if m.recompile_reason]
        return {"recompiles": len(reasons), "recompile_reasons": _first_distinct(reasons),
                "compile_notes": list(self._notes) or None}

    def _metrics(self) -> list[Any] | None:
        """The watch's ``CompilationMetrics``; None (with a note, once) where torch does not keep them."""
        found = _metrics_since(self._start_us)
        if found is None:
            note = ("torch._dynamo.utils.get_compilation_metrics is missing in this torch: no recompile count "
                    "and no compile time split")
            if note not in self._notes:
                self._notes.append(note)
            return None
        metrics, kept = found
        if kept is not None and len(metrics) >= kept:
            note = (f"torch keeps its last {kept} compilations and this cell made at least as many: the recompile "
                    "count and time split cover only those")
            if note not in self._notes:
                self._notes.append(note)
        return metrics
