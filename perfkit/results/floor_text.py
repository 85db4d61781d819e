"""The report's words for the physical floor: the warning over cells timed faster than the machine allows, and
each mode's table of the share of its floor every ranked cell reached (from the records' ``ceilings`` and
``step_time_floor_s``, ``perfkit.env.ceilings``)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from perfkit.env.ceilings import IMPOSSIBLE_FRACTION
from perfkit.results.frame import has_value


def ceilings_text(ceilings: dict[str, Any]) -> str:
    """``fp32 0.16 TFLOP/s, copy 13 GB/s, caches 484 MiB, 2 threads`` from a record's ``ceilings``."""
    parts = [f"{key.removesuffix('_tflops')} {ceilings[key]:.3g} TFLOP/s"
             for key in ("fp32_tflops", "bf16_tflops", "fp16_tflops") if has_value(ceilings.get(key))]
    if has_value(ceilings.get("copy_gb_per_s")):
        parts.append(f"copy {ceilings['copy_gb_per_s']:.3g} GB/s")
    if has_value(ceilings.get("cache_bytes")):
        parts.append(f"caches {ceilings['cache_bytes'] / 2**20:.0f} MiB")
    if has_value(ceilings.get("threads")):
        parts.append(f"{int(ceilings['threads'])} threads")
    method = f" ({ceilings['method']})" if ceilings.get("method") else ""
    return ", ".join(parts) + method


def _run_ceilings(frame: pd.DataFrame) -> dict[str, Any] | None:
    """The ceilings the frame's cells were bounded by (those of the first cell that has them)."""
    if "ceilings" not in frame:
        return None
    return next((c for c in frame["ceilings"] if isinstance(c, dict) and c), None)


def impossible_line(frame: pd.DataFrame) -> str | None:
    """How many cells were timed faster than the machine allows, or None when none was."""
    n = int((frame["status"] == "impossible").sum())
    if not n:
        return None
    return (f"**{n} cell{'s' if n > 1 else ''} ran faster than this machine allows**: more than "
            f"{IMPOSSIBLE_FRACTION:g}× under the step's physical floor from the run's measured ceilings, so the step "
            "did not do the work it is counted for (a cached output, a skipped step, an unsynchronized device). "
            "Recorded `impossible`, shown as IMPOSSIBLE, never ranked: left out of fast_p, the geometric means "
            "and the best variant.")


def floor_intro(cells: pd.DataFrame) -> list[str]:
    """The heading and caption of a mode's floor table; nothing when no cell has a floor."""
    if "step_time_floor_s" not in cells or not cells["step_time_floor_s"].notna().any():
        return []
    ceilings = _run_ceilings(cells)
    measured = f" Ceilings measured in the run: {ceilings_text(ceilings)}." if ceilings else ""
    return ["", "### Physical floor", "",
            "Each cell's physical floor over its median: the share of the device's ceilings the step reached. The "
            "floor is the longer of its FLOPs at the measured peak (`compute`) and the bytes it must move beyond "
            f"what the caches hold over from the step before at the copy bandwidth (`memory`).{measured} Above "
            "100%, the step beat the measured ceilings (a kernel better than the matmul that measured them, or "
            f"ceilings measured under load); more than {IMPOSSIBLE_FRACTION:g}× under its floor it is IMPOSSIBLE "
            "and never ranked.", ""]


def floor_cell(row: pd.Series) -> str:
    """``43% of floor (compute)`` for a cell with a floor; ``—`` for one without."""
    fraction, bound = row.get("floor_fraction"), row.get("step_time_floor_bound")
    if not has_value(fraction):
        return "—"
    return f"{fraction:.0%} of floor" + (f" ({bound})" if has_value(bound) else "")
