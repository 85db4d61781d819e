"""The report's words for compiled cells: the marks of a graph break and a recompile in the speedup table, their
legend, and the Compile table of each mode (from the records' ``perfkit.measure.compile_info`` fields)."""

from __future__ import annotations

import pandas as pd

from perfkit.results.frame import has_value

SPLIT_PARTS = ("dynamo", "aot_autograd", "inductor", "rest")
"""The parts of a first call's compile time, in the order the Compile table shows them (the frame's
``compile_<part>_s`` columns)."""
LEGEND = ("✂ marks a compiled cell whose model dynamo broke into several graphs (the code between them runs in "
          "eager Python), ↻ one that compiled again after its first call (in warm-up or timing); the Compile table "
          "says where and why.")


def _plural(n: float, word: str) -> str:
    return f"{int(n)} {word}{'' if n == 1 else 's'}"


def compile_marks(row: pd.Series) -> str:
    """`` ✂ 2 graph breaks`` and `` ↻ 1 recompile`` where a compiled cell had them; nothing otherwise."""
    marks = ""
    if row.get("graph_broken") in (True, "True", "true") and has_value(row.get("graph_breaks")):
        marks += f" ✂ {_plural(row['graph_breaks'], 'graph break')}"
    if has_value(row.get("recompiles")) and row["recompiles"] > 0:
        marks += f" ↻ {_plural(row['recompiles'], 'recompile')}"
    return marks


def compile_legend(cells: pd.DataFrame) -> list[str]:
    """The legend line of the marks, where a cell of ``cells`` carries one; else no line."""
    marked = any(compile_marks(row) for _, row in cells.iterrows())
    return ["", LEGEND] if marked else []


def _reason(text: str, limit: int = 90) -> str:
    # A reason is one line already (compile_info.short_reason); a table cell also needs its pipes escaped.
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compile_row(r: pd.Series) -> str:
    """One compiled cell: its time and split, graphs, breaks, recompiles and the first reason for either."""
    split = " / ".join(f"{r[f'compile_{part}_s']:.2f}" if has_value(r.get(f"compile_{part}_s")) else "—"
                       for part in SPLIT_PARTS)
    counts = [f"{int(r[name])}" if has_value(r.get(name)) else "—"
              for name in ("compile_graphs", "graph_breaks", "recompiles")]
    marks = compile_marks(r)
    counts[1] += " ✂" if "✂" in marks else ""
    counts[2] += " ↻" if "↻" in marks else ""
    reasons = [*(r.get("graph_break_reasons") or []), *(r.get("recompile_reasons") or [])] if marks else []
    cache = f" ({r['compile_cache']})" if has_value(r.get("compile_cache")) else ""
    return (f"| `{r['block']}` | {r['batch']} | `{r['variant']}` | {r['compile_time_s']:.2f} s{cache} | {split} | "
            f"{' | '.join(counts)} | {_reason(reasons[0]) if reasons else '—'} |")


def compile_lines(cells: pd.DataFrame) -> list[str]:
    """A mode's Compile section: one row per compiled cell of ``cells``; no section where none compiled."""
    if "compile_time_s" not in cells or not cells["compile_time_s"].notna().any():
        return []
    compiled = cells[cells["compile_time_s"].notna()].sort_values(["block", "batch", "variant"], kind="stable")
    return ["", "### Compile", "",
            "What `torch.compile` made of each compiled cell, as PyTorch's dynamo benchmark harness counts it: the "
            "first call's time (cold: inductor generated code; warm: from its on-disk cache) split into dynamo's "
            "tracing, AOTAutograd, inductor and the rest (running the graphs); the graphs and graph breaks of that "
            "call; the recompiles until the cell ended; the first reason for a break or a recompile.", "",
            "| block | batch | variant | compile | dynamo / AOT / inductor / rest (s) | graphs | breaks | "
            "recompiles | first reason |", "|---|---:|---|---:|---|---:|---:|---:|---|",
            *(_compile_row(r) for _, r in compiled.iterrows())]
