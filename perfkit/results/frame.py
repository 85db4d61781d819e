"""The summary frame of a run's cells and what it says: speedups with their intervals, fast_p, geometric means,
the best variant per block, the cells a timing can trust, and the roofline's points.

Every figure here is a function of the records (``perfkit.results.load``) and ``perfkit.stats``; the texts and
plots that show them are ``text`` and ``plots``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from perfkit.env.ceilings import bytes_lower_bound, floor_fraction
from perfkit.env.ceilings import peak_tflops as peak_tflops  # the report's texts and plots read it from here
from perfkit.record import Record
from perfkit.results.load import device_name, device_slug, memory_is_exact
from perfkit.stats import bootstrap_ratio_ci, geomean_interval

REFERENCE_VARIANT = "eager"
"""The variant every speedup and memory ratio is taken against."""
MODES = ("inference", "training")
"""The modes in the order every table and summary shows them."""
FLAGS = ("noisy", "contended", "launch_bound", "throttled")
"""Boolean record fields that make a cell's timing less trustworthy; every table marks them. ``noisy`` is the
measurement's own; the others come from the timing and GPU measurements where a record has them."""
PAIRED_FIELDS = ("speedup_vs_eager", "speedup_ci_low", "speedup_ci_high")
"""Record fields of a speedup measured from eager and variant rounds interleaved in one cell, with its 95%
interval. Where a record has them they are the cell's speedup; else the bootstrap of the ratio of medians."""
FAST_P_THRESHOLDS = (0.0, 0.1, 0.5, 1.0)
"""The p of the fast_p the summaries state (a speedup's interval wholly above 1 + p)."""
PREDICTED_CATEGORIES = ("activations", "temporaries")
"""The memory model's categories the report shows beside the measured peak (the rest sit in the prediction)."""


def has_value(value: Any) -> bool:
    """Whether a frame's field holds a value: not None and not NaN (pandas' empty cell)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def worst_gate_check(checks: Any) -> dict[str, Any] | None:
    """Of a record's ``gate_checks``, the one furthest over (or nearest to) its tolerance, output or gradients;
    None without checks."""
    if not isinstance(checks, list) or not checks:
        return None

    def severity(check: dict[str, Any]) -> float:
        return max((check[err] / check[tol] for err, tol in (("rel_error", "tolerance"),
                                                               ("grad_rel_error", "grad_tolerance"))
                    if has_value(check.get(err)) and check.get(tol)), default=0.0)

    return max(checks, key=severity)


def _get(row: Any, name: str) -> Any:
    """A row's field, whether the row is a pandas Series or a record-like namedtuple."""
    return row.get(name) if hasattr(row, "get") else getattr(row, name, None)


def memory_column(frame: pd.DataFrame) -> str:
    """The peak-memory field the cells of ``frame`` are compared by: the peak where any cell has it, else the
    peak rise over the step's start."""
    return "peak_memory_bytes" if frame["peak_memory_bytes"].notna().any() else "peak_memory_rise_bytes"


def speedup_interval(record: Record, eager: Record | None) -> tuple[float, float, float, str] | None:
    """``(speedup, ci_low, ci_high, method)`` of ``record`` over its eager cell, or None if there is none.

    method is ``paired`` (the record's own interleaved-round speedup and interval), ``bootstrap`` (the ratio of
    the two cells' medians, its interval from their resampled rounds), ``reference`` (eager itself) or
    ``no rounds`` (a ratio without the rounds an interval needs: the interval is empty, never a made-up one).
    """
    if record.status != "ok":
        return None
    if record.variant == REFERENCE_VARIANT:
        return 1.0, 1.0, 1.0, "reference"
    paired = [getattr(record, name, None) for name in PAIRED_FIELDS]
    if all(has_value(v) for v in paired):
        return float(paired[0]), float(paired[1]), float(paired[2]), "paired"
    if eager is None or eager.status != "ok" or not eager.step_time_median_s or not record.step_time_median_s:
        return None
    ratio = eager.step_time_median_s / record.step_time_median_s
    if len(record.times_s) < 2 or len(eager.times_s) < 2:
        return ratio, math.nan, math.nan, "no rounds"
    low, high = bootstrap_ratio_ci(record.times_s, eager.times_s)
    return ratio, low, high, "bootstrap"


def _predicted_columns(prediction: dict[str, Any] | None) -> dict[str, Any]:
    """The record's ``predicted_memory`` flattened for the frame: each shown category at the predicted peak."""
    at_peak = (prediction or {}).get("at_peak") or {}
    return {f"predicted_{c}_at_peak_bytes": at_peak.get(c) for c in PREDICTED_CATEGORIES}


def _split_columns(split: dict[str, float] | None) -> dict[str, float]:
    """The record's ``compile_time_split_s`` flattened for the frame: ``compile_dynamo_s`` and so on, a column
    per part."""
    return {f"compile_{part}_s": seconds for part, seconds in (split or {}).items()}


def summary_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per cell, every record field but the raw rounds, plus the ratios against ``eager`` and
    ``floor_fraction``, the step's physical floor over its median (``perfkit.env.ceilings.floor_fraction``).

    ``speedup_vs_eager`` is the cell's speedup over eager (``speedup_interval``) with ``speedup_ci_low`` and
    ``speedup_ci_high``, its 95% interval, and ``speedup_method``. ``memory_ratio_vs_eager`` is the cell's
    peak memory over eager's; its interval is the point itself where the memory method repeats exactly
    (``perfkit.results.load.EXACT_MEMORY_METHODS``) and empty otherwise (one measurement has no interval). All
    are empty unless the cell and its eager reference are ``ok``. The flag columns (``FLAGS``) are always
    there, empty where the records do not say.
    """
    group_of = lambda r: (device_slug(r.device), r.kind, r.block, r.mode, r.batch)  # noqa: E731
    eager = {group_of(r): r for r in records if r.variant == REFERENCE_VARIANT and r.status == "ok"}
    rows = []
    for r in records:
        row = r.to_dict()
        del row["times_s"]
        device = row.pop("device")
        row = {"device_slug": device_slug(device), "device_name": device_name(device), **row}
        row.update(_predicted_columns(row.pop("predicted_memory", None)))
        row.update(_split_columns(row.pop("compile_time_split_s", None)))
        for flag in FLAGS:
            row[flag] = getattr(r, flag, None)
        speedup = speedup_interval(r, eager.get(group_of(r)))
        row["speedup_vs_eager"], row["speedup_ci_low"], row["speedup_ci_high"], row["speedup_method"] = \
            speedup if speedup else (None, None, None, None)
        row["_memory_exact"] = memory_is_exact(r)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    group = ["device_slug", "kind", "block", "mode", "batch"]
    reference = frame[(frame["variant"] == REFERENCE_VARIANT) & (frame["status"] == "ok")]
    memory = memory_column(frame)
    reference = reference[group + [memory]].rename(columns={memory: "_ref_memory"}).drop_duplicates(group)
    frame = frame.merge(reference, on=group, how="left")
    ok = frame["status"] == "ok"
    frame["memory_ratio_vs_eager"] = (frame[memory] / frame["_ref_memory"]).where(ok)
    frame["memory_ratio_ci_low"] = frame["memory_ratio_vs_eager"].where(frame["_memory_exact"])
    frame["memory_ratio_ci_high"] = frame["memory_ratio_vs_eager"].where(frame["_memory_exact"])
    frame = frame.drop(columns=["_ref_memory", "_memory_exact"])
    frame["floor_fraction"] = [floor_fraction(f if has_value(f) else None, m if has_value(m) else None)
                               for f, m in zip(frame["step_time_floor_s"], frame["step_time_median_s"], strict=True)]
    return frame.sort_values(["device_slug", "kind", "block", "mode", "batch", "variant"], kind="stable",
                             ignore_index=True)


def within_noise(row: pd.Series | Any) -> bool:
    """True when the speedup's 95% interval contains 1.0 (or there is no interval): no difference from eager."""
    low, high = _get(row, "speedup_ci_low"), _get(row, "speedup_ci_high")
    return not (has_value(low) and has_value(high)) or low <= 1.0 <= high


def flags(row: pd.Series | Any) -> list[str]:
    """The ``FLAGS`` a cell carries, e.g. ``["noisy", "contended"]``."""
    return [f for f in FLAGS if _get(row, f) is True or _get(row, f) in ("True", "true", 1.0)]


def ordered_variants(frame: pd.DataFrame) -> list[str]:
    """The variants in ``frame``: eager first, then by how many optimizations they compose, then by name."""
    variants = list(dict.fromkeys(frame["variant"]))
    return sorted(variants, key=lambda v: (v != REFERENCE_VARIANT, v.count("+"), v))


def block_rows(frame: pd.DataFrame) -> list[tuple[str, int]]:
    """The ``(block, batch)`` rows of ``frame``'s tables, sorted."""
    return sorted(frame[["block", "batch"]].drop_duplicates().itertuples(index=False, name=None))


def modes_of(frame: pd.DataFrame) -> list[str]:
    """The modes in ``frame``: ``MODES`` in their order, then any other, sorted."""
    found = set(frame["mode"])
    return [m for m in MODES if m in found] + sorted(found - set(MODES))


def atoms(variant: str) -> int:
    """How many optimizations a variant composes: 0 for eager, 2 for ``channels_last+bf16``."""
    return 0 if variant == REFERENCE_VARIANT else variant.count("+") + 1


def best_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """Per block, mode and batch, the variant to use: eager unless some ``ok`` cell is faster beyond noise.

    Among the cells whose speedup interval lies wholly above 1.0, those whose interval reaches the fastest
    one's lower bound are within noise of it; of these the simplest (fewest atoms) wins, then the faster.
    Failed, OOM, erroring and skipped cells never qualify, however fast they ran; nor do ``contended`` ones.
    Where no variant beats eager beyond noise, the row is eager's.
    """
    ok = frame[(frame["status"] == "ok") & frame["speedup_vs_eager"].notna()]
    if "contended" in ok:
        ok = ok[ok["contended"] != True]  # noqa: E712 (None, from records before the flag, is not contended)
    if ok.empty:
        return ok
    chosen = []
    for _, cells in ok.groupby(["device_slug", "kind", "block", "mode", "batch"], sort=True):
        faster = cells[(cells["variant"] != REFERENCE_VARIANT) & (cells["speedup_ci_low"] > 1.0)]
        if faster.empty:
            reference = cells[cells["variant"] == REFERENCE_VARIANT]
            chosen.append((reference if not reference.empty else cells.nlargest(1, "speedup_vs_eager")).index[0])
            continue
        top = faster.loc[faster["speedup_vs_eager"].idxmax()]
        tied = faster[faster["speedup_ci_high"] >= top["speedup_ci_low"]]
        order = tied.assign(_atoms=tied["variant"].map(atoms)).sort_values(
            ["_atoms", "speedup_vs_eager"], ascending=[True, False], kind="stable")
        chosen.append(order.index[0])
    return ok.loc[chosen].sort_values(["device_slug", "kind", "block", "mode", "batch"], ignore_index=True)


def uncontended(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows not flagged ``contended`` (None, from records before the flag, is not contended)."""
    if "contended" not in frame:
        return frame
    return frame[frame["contended"] != True]  # noqa: E712


def fast_p(frame: pd.DataFrame, thresholds: Sequence[float] = FAST_P_THRESHOLDS) -> dict[str, Any]:
    """KernelBench's fast_p over one device's (block, mode, batch) pairs with an ``ok`` eager cell.

    ``fast[p]`` is the fraction of pairs where some other variant is correct and faster than eager by more
    than ``p`` with 95% confidence (its speedup interval's lower bound above ``1 + p``): a speedup within
    noise does not count, nor does a ``contended`` cell. Returns ``{"pairs": n, "fast": {p: fraction}}``.
    """
    blocks = frame[frame["kind"] != "kernel"]
    reference = blocks[(blocks["variant"] == REFERENCE_VARIANT) & (blocks["status"] == "ok")]
    keys = ["device_slug", "block", "mode", "batch"]
    pairs = reference[keys].drop_duplicates()
    others = uncontended(blocks[(blocks["variant"] != REFERENCE_VARIANT) & (blocks["status"] == "ok")])
    lower = others.groupby(keys)["speedup_ci_low"].max()
    best_low = [lower.get(tuple(p), math.nan) for p in pairs.itertuples(index=False, name=None)]
    n = len(pairs)
    return {"pairs": n, "fast": {p: (sum(1 for x in best_low if has_value(x) and x > 1 + p) / n if n else math.nan)
                                 for p in thresholds}}


def geomean_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant and mode: geometric-mean speedup over eager across blocks, with a 95% interval.

    The interval is ``perfkit.stats.geomean_interval``'s, from each cell's own: the measurement noise of these
    blocks, not a claim about blocks not measured. Cells without an interval, and contended ones, are left out
    and counted. Columns: mode, variant, cells, correct, with_interval, geomean, ci_low, ci_high.
    """
    blocks = frame[(frame["kind"] != "kernel") & (frame["variant"] != REFERENCE_VARIANT)]
    rows = []
    for (mode, variant), cells in blocks.groupby(["mode", "variant"], sort=True):
        timed = uncontended(cells[(cells["status"] == "ok") & cells["speedup_vs_eager"].notna()])
        correct = int((cells["status"] == "ok").sum())
        usable = timed[timed["speedup_ci_low"].notna() & (timed["speedup_ci_low"] > 0)]
        row = {"mode": mode, "variant": variant, "cells": len(cells) - int((cells["status"] == "skipped").sum()),
               "correct": correct, "with_interval": len(usable), "geomean": math.nan, "ci_low": math.nan,
               "ci_high": math.nan}
        if len(usable):
            geomean, low, high = geomean_interval(usable["speedup_vs_eager"].tolist(),
                                                  usable["speedup_ci_low"].tolist(), usable["speedup_ci_high"].tolist())
            row.update(geomean=geomean, ci_low=low, ci_high=high)
        rows.append(row)
    return pd.DataFrame(rows, columns=["mode", "variant", "cells", "correct", "with_interval", "geomean", "ci_low",
                                       "ci_high"])


def bytes_moved_lower_bound(row: pd.Series | Any) -> float | None:
    """The fewest bytes a cell's step can move: its own ``bytes_per_step`` (a kernel's exact count), else a
    block's bound from its parameters and input (``perfkit.env.ceilings.bytes_lower_bound``, the one the
    cell's physical floor was measured against)."""
    if has_value(_get(row, "bytes_per_step")):
        return float(_get(row, "bytes_per_step"))
    params, shape = _get(row, "params"), _get(row, "input_shape")
    if isinstance(shape, str):
        shape = json.loads(shape) if shape.startswith("[") else None
    bound = bytes_lower_bound(int(params) if has_value(params) else None, shape, _get(row, "dtype"),
                              _get(row, "mode"))
    return None if bound is None else float(bound)


def roofline_points(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(blocks, kernels)`` ready to plot: ok block cells with a FLOP count, their ``intensity`` (FLOP/byte,
    from ``bytes_moved_lower_bound``) and ``tflops``; ok kernel cells with the bytes they move and ``gbps``."""
    ok = frame[(frame["status"] == "ok") & frame["step_time_median_s"].notna()]
    blocks = ok[(ok["kind"] != "kernel") & (ok["flops_per_step"].fillna(0) > 0)].copy()
    blocks["bytes_moved"] = [bytes_moved_lower_bound(r) for _, r in blocks.iterrows()]
    blocks = blocks[blocks["bytes_moved"].notna()]
    blocks["intensity"] = blocks["flops_per_step"] / blocks["bytes_moved"].astype(float)
    blocks["tflops"] = blocks["flops_per_step"] / blocks["step_time_median_s"] / 1e12
    kernels = ok[(ok["kind"] == "kernel") & ok["bytes_per_step"].notna()].copy()
    kernels["gbps"] = kernels["bytes_per_step"] / kernels["step_time_median_s"] / 1e9
    return blocks.reset_index(drop=True), kernels.reset_index(drop=True)
