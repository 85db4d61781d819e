"""Per-device reports from benchmark results: ``perfkit report RESULTS... -o reports/``.

Reads pytest-benchmark JSON files (the record of each cell is its ``extra_info``) and perfkit's JSON-lines
files, groups the cells by device and writes, for each device, ``<out>/<device-slug>/README.md`` (a summary
with fast_p and geometric means, how and when it ran, the device, per mode the speedup, memory and
correctness tables with 95% intervals, the best variant per block, the kernels against the copy bandwidth,
the roofline), the same page as a self-contained ``index.html``, ``summary.csv`` and PNG plots with fixed
names, so a re-run replaces the report. ``<out>/README.md`` indexes every device folder found there.

A run writes under ``out/reports`` and compares each device with its committed report in ``reports/``;
only ``--publish`` (``make publish``) writes into ``reports/``.

The report reads only records (``perfkit.record``): never the code that produced them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from perfkit.record import SCHEMA, Record

REFERENCE_VARIANT = "eager"
"""The variant every speedup and memory ratio is taken against."""
MODES = ("inference", "training")
CEILINGS_FILE = "ceilings.json"
"""Optional file in a device folder: ``{"copy_gb_per_s": ..., "bf16_tflops": ...}`` measured on that device."""
UNTIMED_CELLS_KEYS = ("perfkit_skipped_cells", "perfkit_failed_cells")
"""Top-level keys of a pytest-benchmark JSON under which the matrix keeps the records of cells it did not
time (pytest-benchmark writes only benchmarks that ran): skipped, and failed/oom/error."""
# Files this module writes into a device folder; anything else there (the committed run JSON, the
# ceilings) is left alone, and these are removed first so a re-run leaves no stale plot behind.
GENERATED_PATTERNS = ("README.md", "summary.csv", "speedup-*.png", "memory-*.png", "roofline.png", "compare.md",
                      "index.html")
BASELINE_DIR = "reports"
"""The committed reports: each device folder's results JSON is that device's baseline. A run writes its report
elsewhere (``out/reports``) and compares against it; only ``--publish`` writes here."""
DEFAULT_OUTPUT = "out/reports"


class ResultsError(ValueError):
    """A results file that cannot be read as perfkit results; the message names the file and the problem."""


@dataclass
class Results:
    """The records of one results file and what the file says about the run that made it."""

    path: str
    records: list[Record]
    run: dict[str, Any] = field(default_factory=dict)
    """datetime, commit, command and machine_info where the file has them (pytest-benchmark JSON only)."""


def _record(data: Any, where: str) -> Record:
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected a perfkit record (a JSON object), got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ResultsError(f"{where}: record schema {schema!r}; this perfkit reads {SCHEMA!r}")
    try:
        return Record.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"{where}: not a valid perfkit record: {exc}") from None


def _from_pytest_benchmark(data: dict[str, Any], path: str) -> Results:
    records = []
    for i, bench in enumerate(data["benchmarks"]):
        where = f"{path}: benchmarks[{i}] ({bench.get('fullname', bench.get('name', '?'))})"
        extra = bench.get("extra_info") or {}
        if "schema" not in extra:
            raise ResultsError(f"{where}: extra_info holds no perfkit record (no 'schema' key); "
                               "was this file written by perfkit's benchmarks/?")
        record = _record(extra, where)
        # The record's own rounds come first: for kernel cells they are device-event times after an L2
        # flush, where pytest-benchmark's stats.data holds host-clock times with launch latency. For
        # block cells the two are the same list; stats.data serves files whose records lack them.
        rounds = (bench.get("stats") or {}).get("data")
        if rounds and not record.times_s:
            record.times_s = [float(t) for t in rounds]
        records.append(record)
    for key in UNTIMED_CELLS_KEYS:
        for i, extra in enumerate(data.get(key) or []):
            records.append(_record(extra, f"{path}: {key}[{i}]"))
    machine = data.get("machine_info") or {}
    for record in records:
        _complete_cpu_identity(record.device, machine)
    commit = data.get("commit_info") or {}
    run = {
        "datetime": data.get("datetime"),
        "commit": commit.get("id"),
        "commit_time": commit.get("time"),
        "commit_dirty": commit.get("dirty"),
        "branch": commit.get("branch"),
        "command": machine.get("perfkit_command") or data.get("perfkit_command"),
        "profile": machine.get("perfkit_profile") or data.get("perfkit_profile"),
        "machine_info": machine,
    }
    return Results(path, records, {k: v for k, v in run.items() if v is not None})


def load_results(path: str | Path) -> Results:
    """Read a pytest-benchmark JSON or a JSON-lines file of records; ResultsError says what is wrong."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a text file (expected JSON or JSON lines)") from None
    if not text.strip():
        raise ResultsError(f"{path}: empty file (expected pytest-benchmark JSON or perfkit JSON lines)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_error:
        # Not one JSON document: JSON lines, one record per line.
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                # A first line that is not JSON on its own means one (broken) JSON document, whose parser
                # error knows the line and column; a later line is a broken line of a JSON-lines file.
                line_no, bad = (whole_error.lineno, whole_error) if n == 1 else (n, exc)
                raise ResultsError(f"{path}: line {line_no}, column {bad.colno}: invalid JSON: {bad.msg}") from None
            records.append(_record(item, f"{path}: line {n}"))
        return Results(path, records)
    if isinstance(data, dict) and "benchmarks" in data:
        if not isinstance(data["benchmarks"], list):
            raise ResultsError(f"{path}: 'benchmarks' is not a list; not a pytest-benchmark JSON file")
        return _from_pytest_benchmark(data, path)
    if isinstance(data, dict) and "schema" in data:
        return Results(path, [_record(data, f"{path}: line 1")])
    raise ResultsError(f"{path}: neither a pytest-benchmark JSON file (no 'benchmarks' list) nor perfkit "
                       "JSON lines (one record with a 'schema' key per line)")


# ---------------------------------------------------------------------------------------------- devices

def device_name(device: dict[str, Any]) -> str:
    """The device's marketing name: the GPU's name, else the CPU model, else ``"unknown device"``."""
    for key in ("name", "gpu_name", "cpu_model", "cpu", "processor"):
        value = device.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "unknown device"


def device_slug(device: dict[str, Any]) -> str:
    """A folder name that tells machines apart: ``"nvidia-h100-80gb-hbm3-79gib"``, ``"cpu-amd-epyc-2c-avx2"``.

    A GPU is its name and memory; a CPU its model, core count and widest ISA (``perfkit.env.device.ISA_LEVELS``),
    since two "AMD EPYC" virtual machines may differ in both. Only the hardware counts, never the driver or
    library versions: a regression against last month's torch on the same machine is exactly the comparison
    a report folder exists for. The record keeps the full identity.
    """
    name = device_name(device)
    slug = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", " ", name.lower())
    is_cpu = device.get("type") == "cpu"
    if is_cpu:
        slug += "".join(f" {part}" for part in (f"{device['cores']}c" if device.get("cores") else None,
                                                 device.get("isa")) if part)
    elif device.get("total_memory_bytes"):
        slug += f" {round(device['total_memory_bytes'] / 2**30)}gib"
    slug = re.sub(r"[^a-z0-9.]+", "-", slug).strip("-.")
    slug = re.sub(r"-+", "-", slug) or "unknown"
    return f"cpu-{slug}" if is_cpu and not slug.startswith("cpu") else slug


def _complete_cpu_identity(device: dict[str, Any], machine: dict[str, Any]) -> None:
    """Fill the CPU fields a record written before they existed lacks from pytest-benchmark's ``machine_info``.

    pytest-benchmark keeps py-cpuinfo's flags, family and model, so an old run still gets its ISA (and its
    folder name) from what was recorded on its own machine, never from the machine reading it.
    """
    cpu = machine.get("cpu") or {}
    if device.get("type") != "cpu" or "isa" in device or not cpu.get("flags"):
        return
    from perfkit.env.device import cpu_isa

    device["isa"] = cpu_isa(cpu["flags"])
    device.setdefault("vendor", cpu.get("vendor_id_raw"))
    device.setdefault("cpu_family", str(cpu["family"]) if "family" in cpu else None)
    device.setdefault("cpu_model_id", str(cpu["model"]) if "model" in cpu else None)


# ------------------------------------------------------------------------------------------------ cells

def cell_key(record: Record) -> tuple:
    """What makes two records the same cell on the same device."""
    return (device_slug(record.device), record.kind, record.block, record.variant, record.mode, record.dtype,
            record.batch)


def merge_records(results: Iterable[Results]) -> list[Record]:
    """Every record of ``results`` in order, a later record of the same cell replacing an earlier one.

    A JSON-lines file grows run after run, so its last record of a cell is the current one.
    """
    merged: dict[tuple, Record] = {}
    for result in results:
        for record in result.records:
            merged.pop(cell_key(record), None)
            merged[cell_key(record)] = record
    return list(merged.values())


FLAGS = ("noisy", "contended", "launch_bound", "throttled")
"""Boolean record fields that make a cell's timing less trustworthy; every table marks them. ``noisy`` is the
measurement's own; the others come from the timing and GPU measurements where a record has them."""
PAIRED_FIELDS = ("speedup_vs_eager", "speedup_ci_low", "speedup_ci_high")
"""Record fields of a speedup measured from eager and variant rounds interleaved in one cell, with its 95%
interval. Where a record has them they are the cell's speedup; else the bootstrap of the ratio of medians."""
FAST_P_THRESHOLDS = (0.0, 0.1, 0.5, 1.0)
Z95 = 1.959964


def _bootstrap_speedup(variant_s: Sequence[float], eager_s: Sequence[float]) -> tuple[float, float]:
    """95% interval of median(eager)/median(variant), each cell's rounds resampled on their own."""
    from perfkit.results.compare import bootstrap_ratio_ci

    return bootstrap_ratio_ci(variant_s, eager_s)


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
    if all(_present(v) for v in paired):
        return float(paired[0]), float(paired[1]), float(paired[2]), "paired"
    if eager is None or eager.status != "ok" or not eager.step_time_median_s or not record.step_time_median_s:
        return None
    ratio = eager.step_time_median_s / record.step_time_median_s
    if len(record.times_s) < 2 or len(eager.times_s) < 2:
        return ratio, math.nan, math.nan, "no rounds"
    low, high = _bootstrap_speedup(record.times_s, eager.times_s)
    return ratio, low, high, "bootstrap"


def _memory_exact(record: Record) -> bool:
    from perfkit.results.compare import _exact_memory

    return _exact_memory(record)


def summary_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per cell, every record field but the raw rounds, plus the ratios against ``eager``.

    ``speedup_vs_eager`` is the cell's speedup over eager (``speedup_interval``) with ``speedup_ci_low`` and
    ``speedup_ci_high``, its 95% interval, and ``speedup_method``. ``memory_ratio_vs_eager`` is the cell's
    peak memory over eager's; its interval is the point itself where the memory method repeats exactly
    (``perfkit.results.compare.EXACT_MEMORY_METHODS``) and empty otherwise (one measurement has no interval). All
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
        for flag in FLAGS:
            row[flag] = getattr(r, flag, None)
        speedup = speedup_interval(r, eager.get(group_of(r)))
        row["speedup_vs_eager"], row["speedup_ci_low"], row["speedup_ci_high"], row["speedup_method"] = \
            speedup if speedup else (None, None, None, None)
        row["_memory_exact"] = _memory_exact(r)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    group = ["device_slug", "kind", "block", "mode", "batch"]
    reference = frame[(frame["variant"] == REFERENCE_VARIANT) & (frame["status"] == "ok")]
    memory_column = "peak_memory_bytes" if frame["peak_memory_bytes"].notna().any() else "peak_memory_rise_bytes"
    reference = reference[group + [memory_column]].rename(columns={memory_column: "_ref_memory"}
                                                          ).drop_duplicates(group)
    frame = frame.merge(reference, on=group, how="left")
    ok = frame["status"] == "ok"
    frame["memory_ratio_vs_eager"] = (frame[memory_column] / frame["_ref_memory"]).where(ok)
    frame["memory_ratio_ci_low"] = frame["memory_ratio_vs_eager"].where(frame["_memory_exact"])
    frame["memory_ratio_ci_high"] = frame["memory_ratio_vs_eager"].where(frame["_memory_exact"])
    frame = frame.drop(columns=["_ref_memory", "_memory_exact"])
    return frame.sort_values(["device_slug", "kind", "block", "mode", "batch", "variant"], kind="stable",
                             ignore_index=True)


def within_noise(row: pd.Series | Any) -> bool:
    """True when the speedup's 95% interval contains 1.0 (or there is no interval): no difference from eager."""
    low, high = _get(row, "speedup_ci_low"), _get(row, "speedup_ci_high")
    return not (_present(low) and _present(high)) or low <= 1.0 <= high


def flags(row: pd.Series | Any) -> list[str]:
    """The ``FLAGS`` a cell carries, e.g. ``["noisy", "contended"]``."""
    return [f for f in FLAGS if _get(row, f) is True or _get(row, f) in ("True", "true", 1.0)]


def _get(row: Any, name: str) -> Any:
    return row.get(name) if hasattr(row, "get") else getattr(row, name, None)


# ----------------------------------------------------------------------------------------------- format

def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _cell_escape(text: str, limit: int = 70) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_text(row: pd.Series) -> str | None:
    """How a cell that is not ``ok`` reads in every table: ``FAILED (err 3e-01)``, ``OOM``, ``skipped: …``."""
    status = row["status"]
    if status == "ok":
        return None
    if status == "failed":
        err = max((e for e in (row.get("rel_error"), row.get("grad_rel_error")) if _present(e)), default=None)
        return f"FAILED (err {err:.0e})" if err is not None else "FAILED"
    if status == "oom":
        return "OOM"
    reason = row.get("reason")
    label = "ERROR" if status == "error" else status
    return f"{label}: {_cell_escape(reason, 60)}" if _present(reason) and reason else label


def _flag_text(row: pd.Series) -> str:
    marks = flags(row)
    return f" ⚠ {', '.join(marks)}" if marks else ""


def ratio_text(ratio: float, low: float | None, high: float | None) -> str:
    """``1.34× [1.30, 1.38]``; ``no difference (0.98× [0.95, 1.01])`` when the interval contains 1.0."""
    if not (_present(low) and _present(high)):
        return f"{ratio:.2f}× (no interval)"
    text = f"{ratio:.2f}× [{low:.2f}, {high:.2f}]"
    return f"no difference ({text})" if low <= 1.0 <= high else text


def _speedup_text(row: pd.Series) -> str:
    status = status_text(row)
    if status:
        return status
    throughput = f"{_count(row['samples_per_s'])}/s" if _present(row.get("samples_per_s")) else "no throughput"
    marks = _flag_text(row)
    if not _present(row.get("speedup_vs_eager")):
        return f"{throughput}, no eager reference{marks}"
    if row.get("speedup_method") == "reference":
        return f"reference · {throughput}{marks}"
    text = ratio_text(row["speedup_vs_eager"], row.get("speedup_ci_low"), row.get("speedup_ci_high"))
    return (text if within_noise(row) else f"**{text}**") + f" · {throughput}{marks}"


PREDICTED_CATEGORIES = ("activations", "temporaries")
"""The memory model's categories the report shows beside the measured peak (the rest sit in the prediction)."""


def _predicted_columns(prediction: dict[str, Any] | None) -> dict[str, Any]:
    """The record's ``predicted_memory`` flattened for the frame: each shown category at the predicted peak."""
    at_peak = (prediction or {}).get("at_peak") or {}
    return {f"predicted_{c}_at_peak_bytes": at_peak.get(c) for c in PREDICTED_CATEGORIES}


def _predicted_text(row: pd.Series) -> str:
    status = status_text(row)
    if status and row["status"] != "oom":
        return status
    predicted, measured = row.get("predicted_peak_rise_bytes"), row.get("peak_memory_rise_bytes")
    if not _present(predicted):
        return "—" if not status else status
    split = " / ".join(_mib(row.get(f"predicted_{c}_at_peak_bytes") or 0) for c in PREDICTED_CATEGORIES)
    if not _present(measured):
        return f"pred {_mib(predicted)} (act / tmp {split}) · not measured"
    ratio = f"{measured / predicted:.2f}×" if predicted else "—"
    return f"pred {_mib(predicted)} (act / tmp {split}) · meas {_mib(measured)} · {ratio}"


def _memory_text(row: pd.Series, memory_column: str) -> str:
    status = status_text(row)
    if status:
        return status
    if not _present(row.get(memory_column)):
        return "—"
    ratio = row.get("memory_ratio_vs_eager")
    if not _present(ratio):
        return _mib(row[memory_column])
    if row["variant"] == REFERENCE_VARIANT:
        return f"reference · {_mib(row[memory_column])}"
    if _present(row.get("memory_ratio_ci_low")):
        text = "no difference (exact)" if ratio == 1.0 else f"{ratio:.2f}× (exact)"
    else:
        text = f"{ratio:.2f}× (one measurement, no interval)"
    return f"{text} · {_mib(row[memory_column])}"


def _error_text(row: pd.Series) -> str:
    if row["status"] in ("oom", "error", "skipped"):
        return status_text(row)
    parts = []
    for label, err, tol in (("", row.get("rel_error"), row.get("tolerance")),
                            ("grad ", row.get("grad_rel_error"), row.get("grad_tolerance"))):
        if _present(err):
            mark = f" {'≤' if err <= tol else '>'} {tol:.0e}" if _present(tol) else ""
            parts.append(f"{label}{err:.1e}{mark}")
    if not parts:
        return "—"
    return "; ".join(parts) + ("" if row["status"] == "ok" else " FAILED")


def _ordered_variants(frame: pd.DataFrame) -> list[str]:
    variants = list(dict.fromkeys(frame["variant"]))
    return sorted(variants, key=lambda v: (v != REFERENCE_VARIANT, v.count("+"), v))


def _block_rows(frame: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted(frame[["block", "batch"]].drop_duplicates().itertuples(index=False, name=None))


def _row_label(block: str, batch: int, batches: int) -> str:
    return f"`{block}` (batch {batch})" if batches > 1 else f"`{block}`"


def _table(frame: pd.DataFrame, text) -> list[str]:
    """A markdown table, one row per block (and batch), one column per variant, each cell ``text(row)``."""
    variants = _ordered_variants(frame)
    rows = _block_rows(frame)
    lines = ["| block | batch | " + " | ".join(f"`{v}`" for v in variants) + " |",
             "|---|---:|" + "---|" * len(variants)]
    by_cell = {(r.block, r.batch, r.variant): r for r in frame.itertuples(index=False)}
    for block, batch in rows:
        cells = []
        for variant in variants:
            record = by_cell.get((block, batch, variant))
            cells.append("" if record is None else text(pd.Series(record._asdict())))
        lines.append(f"| `{block}` | {batch} | " + " | ".join(cells) + " |")
    return lines


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


def contended_line(frame: pd.DataFrame) -> str | None:
    """How many timed cells were contended, or None when none was."""
    timed = frame[frame["status"] == "ok"]
    n = len(timed) - len(uncontended(timed))
    if not n:
        return None
    return (f"**{n} of {len(timed)} timed cells were contended**: other processes took the cores they ran on "
            "(each cell's `machine_load` says how much). Their figures are shown with ⚠ but left out of fast_p, "
            "the geometric means and the best-variant choice; rerun on a quiet machine to rank them.")


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
    return {"pairs": n, "fast": {p: (sum(1 for x in best_low if _present(x) and x > 1 + p) / n if n else math.nan)
                                 for p in thresholds}}


def geomean_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant and mode: geometric-mean speedup over eager across blocks, with a 95% interval.

    Each cell's log-speedup carries the standard error its own interval implies ((log high − log low) /
    2·1.96); the mean of n of them has the root of their summed squares over n. The interval is thus the
    measurement noise of these blocks, not a claim about blocks not measured. Cells without an interval,
    and contended ones, are left out and counted. Columns: mode, variant, cells, correct, with_interval, geomean, ci_low, ci_high.
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
            logs = [math.log(v) for v in usable["speedup_vs_eager"]]
            errors = [(math.log(h) - math.log(lo)) / (2 * Z95)
                      for lo, h in zip(usable["speedup_ci_low"], usable["speedup_ci_high"], strict=True)]
            mean = sum(logs) / len(logs)
            half = Z95 * math.sqrt(sum(e * e for e in errors)) / len(errors)
            row.update(geomean=math.exp(mean), ci_low=math.exp(mean - half), ci_high=math.exp(mean + half))
        rows.append(row)
    return pd.DataFrame(rows, columns=["mode", "variant", "cells", "correct", "with_interval", "geomean", "ci_low",
                                       "ci_high"])


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """The device README's opening summary: fast_p per mode and every variant's geometric-mean speedup."""
    heads = " | ".join(f"fast_{p:g}" for p in FAST_P_THRESHOLDS)
    lines = ["## Summary", "",
             "fast_p: the fraction of (block, mode, batch) pairs where some variant is correct and faster than "
             "eager by more than p, the whole 95% interval beyond it (KernelBench's fast_p, with noise "
             "excluded).", "", f"| mode | pairs | {heads} |", "|---|---:|" + "---:|" * len(FAST_P_THRESHOLDS)]
    for mode in _modes(frame):
        summary = fast_p(frame[frame["mode"] == mode])
        values = " | ".join(f"{summary['fast'][p]:.0%}" if _present(summary["fast"][p]) else "—"
                            for p in FAST_P_THRESHOLDS)
        lines.append(f"| {mode} | {summary['pairs']} | {values} |")
    means = geomean_speedups(frame)
    lines += ["", "Geometric-mean speedup over eager per variant, across the blocks where it is correct, with its "
              "95% interval (from each cell's own interval).", "",
              "| mode | variant | correct / run | geomean speedup |", "|---|---|---:|---|"]
    for r in means.itertuples(index=False):
        text = ratio_text(r.geomean, r.ci_low, r.ci_high) if _present(r.geomean) else "—"
        lines.append(f"| {r.mode} | `{r.variant}` | {r.correct} / {r.cells} | {text} |")
    return [*lines, ""]


def _modes(frame: pd.DataFrame) -> list[str]:
    present = set(frame["mode"])
    return [m for m in MODES if m in present] + sorted(present - set(MODES))


# ------------------------------------------------------------------------------------------------ plots

def _plot_speedup_heatmap(frame: pd.DataFrame, mode: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    variants = _ordered_variants(frame)
    rows = _block_rows(frame)
    values = np.full((len(rows), len(variants)), np.nan)
    labels = [["" for _ in variants] for _ in rows]
    muted = [[False for _ in variants] for _ in rows]
    by_cell = {(r.block, r.batch, r.variant): r for r in frame.itertuples(index=False)}
    short = {"failed": "FAIL", "oom": "OOM", "error": "ERR", "skipped": "skip"}
    for i, (block, batch) in enumerate(rows):
        for j, variant in enumerate(variants):
            r = by_cell.get((block, batch, variant))
            if r is None:
                continue
            if r.status != "ok":
                labels[i][j] = short[r.status]
            elif _present(r.speedup_vs_eager):
                values[i, j] = r.speedup_vs_eager
                labels[i][j] = f"{r.speedup_vs_eager:.2f}" + ("*" if flags(r) else "")
                muted[i][j] = variant != REFERENCE_VARIANT and within_noise(r)
    finite = values[np.isfinite(values)]
    spread = max(abs(np.log2(finite)).max(), 0.1) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(variants), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(np.log2(values), cmap="RdYlGn", norm=TwoSlopeNorm(0.0, -spread, spread), aspect="auto")
    for i in range(len(rows)):
        for j in range(len(variants)):
            if muted[i][j]:
                # Within noise: grey and hatched over its colour, so it never reads as a win or a loss.
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.5", hatch="///",
                                       lw=0))
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    batches = frame.groupby("block")["batch"].nunique()
    ax.set_yticks(range(len(rows)), [_row_label(b, n, batches[b]).replace("`", "") for b, n in rows])
    ax.set_title(f"{mode}: speedup over eager (median step time)\nhatched: 95% interval contains 1.0; "
                 "*: noisy, contended, launch-bound or throttled", fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_memory_bars(frame: pd.DataFrame, mode: str, memory_column: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    ok = frame[(frame["status"] == "ok") & frame[memory_column].notna()]
    variants = _ordered_variants(ok)
    rows = _block_rows(ok)
    by_cell = {(r.block, r.batch, r.variant): getattr(r, memory_column) for r in ok.itertuples(index=False)}
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.4 * len(rows) * max(len(variants), 1)), 4.0))
    for j, variant in enumerate(variants):
        heights = [by_cell.get((b, n, variant), np.nan) / 2**20 for b, n in rows]
        ax.bar(np.arange(len(rows)) + j * width, heights, width, label=variant)
    ax.set_xticks(np.arange(len(rows)) + width * (len(variants) - 1) / 2, [b for b, _ in rows], rotation=30,
                  ha="right")
    ax.set_ylabel(f"{memory_column.replace('_bytes', '').replace('_', ' ')} (MiB)")
    ax.set_title(f"{mode}: peak memory of a step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ELEMENT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of a cell's compute dtype: the fewest its tensors can be stored in, for the lower bound."""


def bytes_moved_lower_bound(row: pd.Series | Any) -> float | None:
    """The fewest bytes a block's step can move: its weights and its input read once each (training: weights
    read in forward and backward and their gradients written, input read twice), in its compute dtype.

    A cell's own ``bytes_per_step`` (a kernel's exact count) comes first. The bound ignores activations
    and outputs, so it overstates the arithmetic intensity: a block placed right of the ridge by it may
    still be memory-bound, never the reverse.
    """
    if _present(_get(row, "bytes_per_step")):
        return float(_get(row, "bytes_per_step"))
    params, shape = _get(row, "params"), _get(row, "input_shape")
    if isinstance(shape, str):
        shape = json.loads(shape) if shape.startswith("[") else None
    if not _present(params) or not shape:
        return None
    size = ELEMENT_BYTES.get(_get(row, "dtype"), 4)
    training = _get(row, "mode") == "training"
    return size * (params * (3 if training else 1) + math.prod(shape) * (2 if training else 1))


def _peak_tflops(ceilings: dict[str, float], dtype: str) -> float | None:
    key = {"bfloat16": "bf16_tflops", "float16": "fp16_tflops", "float32": "fp32_tflops"}.get(dtype)
    return ceilings.get(key) if key else None


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


def _plot_roofline(blocks: pd.DataFrame, kernels: pd.DataFrame, ceilings: dict[str, float], path: Path) -> None:
    """Blocks by arithmetic intensity against the measured ceilings; kernels' GB/s against copy bandwidth.
    A panel is drawn only where it has points; a ceiling only where one was measured."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    panels = [p for p, data in (("roof", blocks), ("bandwidth", kernels)) if not data.empty]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    copy = ceilings.get("copy_gb_per_s")
    if "roof" in axes:
        ax = axes["roof"]
        modes = {"inference": "o", "training": "^"}
        for i, (variant, cells) in enumerate(blocks.groupby("variant", sort=True)):
            for mode, mode_cells in cells.groupby("mode"):
                ax.scatter(mode_cells["intensity"], mode_cells["tflops"], s=22, marker=modes.get(mode, "s"),
                           color=f"C{i % 10}", label=f"{variant} {mode}")
        for _, r in blocks[blocks["variant"] == REFERENCE_VARIANT].iterrows():
            ax.annotate(r["block"], (r["intensity"], r["tflops"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        xs = np.logspace(np.log10(blocks["intensity"].min() / 3), np.log10(blocks["intensity"].max() * 3), 200)
        for style, dtype in zip(("-", "--", ":", "-."), sorted(set(blocks["dtype"])), strict=False):
            peak = _peak_tflops(ceilings, dtype)
            if copy or peak:
                roof = np.minimum(xs * copy / 1e3 if copy else np.inf, peak or np.inf)
                ax.plot(xs, roof, "k" + style, lw=1, label=f"ceiling {dtype}: " + ", ".join(
                    t for t in (f"{copy:.0f} GB/s" if copy else "", f"{peak:g} TFLOP/s" if peak else "") if t))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("arithmetic intensity (FLOP / lower bound of bytes moved)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("blocks" + ("" if copy or any(_peak_tflops(ceilings, d) for d in set(blocks["dtype"]))
                                 else " (no measured ceiling for this device)"), fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    if "bandwidth" in axes:
        ax = axes["bandwidth"]
        labels = (kernels["block"] + " " + kernels["variant"] + " " + kernels["mode"]).tolist()
        ax.barh(range(len(labels)), kernels["gbps"])
        for i, value in enumerate(kernels["gbps"]):
            ax.annotate(f"{value:.3g}", (value, i), fontsize=7, xytext=(2, -3), textcoords="offset points")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if copy:
            ax.axvline(copy, color="k", lw=1, label=f"copy {copy:.0f} GB/s")
            ax.legend(fontsize=8)
        ax.set_xlabel("achieved GB/s (bytes the kernel must move / median time)")
        ax.set_title("kernels" + ("" if copy else " (no measured copy bandwidth for this device)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _roofline_lines(blocks: pd.DataFrame, kernels: pd.DataFrame, ceilings: dict[str, float]) -> list[str]:
    copy = ceilings.get("copy_gb_per_s")
    peaks = {d: _peak_tflops(ceilings, d) for d in sorted(set(blocks["dtype"]))} if not blocks.empty else {}
    known = [f"copy {copy:g} GB/s"] if copy else []
    known += [f"{d} {v:g} TFLOP/s" for d, v in peaks.items() if v]
    caption = ("Ceilings measured on this device: " + ", ".join(known) + f" (from `{CEILINGS_FILE}` or "
               "`--copy-gbps`)." if known else
               f"No ceiling is known for this device (no `{CEILINGS_FILE}` with `copy_gb_per_s` and "
               "`fp32_tflops`/`bf16_tflops`, no `--copy-gbps`): the points stand without a roof.")
    return ["## Roofline", "",
            f"{len(blocks)} block cells placed by arithmetic intensity: FLOPs over a lower bound of the bytes a step "
            "moves (weights and input read once; in training weights read twice, their gradients written and "
            "the input read twice; in the compute dtype; activations ignored, so the intensity is an upper "
            f"bound); {len(kernels)} kernel cells by achieved GB/s. {caption}", "",
            "![roofline](roofline.png)", ""]


# ------------------------------------------------------------------------------------------------ write

def read_ceilings(device_dir: Path, copy_gbps: float | None) -> dict[str, float]:
    """The device's measured ceilings: ``ceilings.json`` in its folder, ``copy_gbps`` overriding the copy rate."""
    ceilings: dict[str, float] = {}
    path = device_dir / CEILINGS_FILE
    if path.exists():
        try:
            ceilings = {k: float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ResultsError(f"{path}: expected {{\"copy_gb_per_s\": number, \"bf16_tflops\": number}}: {exc}"
                               ) from None
    if copy_gbps is not None:
        ceilings["copy_gb_per_s"] = float(copy_gbps)
    return ceilings


def _run_lines(results: Sequence[Results], records: Sequence[Record]) -> list[str]:
    lines = ["## How and when it ran", ""]
    ids = {id(r) for r in records}
    for result in results:
        run = result.run
        cells = sum(id(r) in ids for r in result.records)
        if not cells:
            continue
        commit = run.get("commit")
        commit_text = f"`{commit[:12]}`" + (" (uncommitted changes)" if run.get("commit_dirty") else "") \
            if commit else "unknown"
        lines.append(f"- `{Path(result.path).name}`: {cells} cells"
                     + (f", run {run['datetime']}" if run.get("datetime") else "")
                     + f", commit {commit_text}"
                     + (f", profile `{run['profile']}`" if run.get("profile") else ""))
        if run.get("command"):
            lines.append(f"  - command: `{run['command']}`")
    lines.append("")
    return lines


def _device_lines(device: dict[str, Any]) -> list[str]:
    lines = ["## Device", "", "| field | value |", "|---|---|"]
    for key in sorted(device):
        value = device[key] if isinstance(device[key], str) else json.dumps(device[key])
        lines.append(f"| {key} | {_cell_escape(value, 120)} |")
    return [*lines, ""]


def _kernel_lines(kernels: pd.DataFrame, ceilings: dict[str, float]) -> list[str]:
    copy = ceilings.get("copy_gb_per_s")
    lines = ["## Kernels", "",
             "Achieved bandwidth from the bytes a kernel must move (each input read once, each output written "
             "once) over its median time"
             + (f"; the fraction is of the measured copy bandwidth, {copy:.0f} GB/s." if copy else
                f"; no copy bandwidth was given (`--copy-gbps` or `{CEILINGS_FILE}`), so no fraction.")
             + " ⚠ marks noisy, contended, launch-bound or throttled cells.", "",
             "| kernel | variant | mode | dtype | batch | median | GB/s | of copy | TFLOP/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for _, r in kernels.iterrows():
        status = status_text(r)
        if status:
            lines.append(f"| `{r['block']}` | `{r['variant']}` | {r['mode']} | {r['dtype']} | {r['batch']} | "
                         f"{status} | | | |")
            continue
        gbps = r["achieved_gb_per_s"] if _present(r.get("achieved_gb_per_s")) else (
            r["bytes_per_step"] / r["step_time_median_s"] / 1e9 if _present(r.get("bytes_per_step")) else None)
        fraction = f"{gbps / copy:.0%}" if gbps is not None and copy else "—"
        tflops = f"{r['tflops_per_s']:.3g}" if _present(r.get("tflops_per_s")) else "—"
        bandwidth = "—" if gbps is None else f"{gbps:.3g}"
        lines.append(f"| `{r['block']}` | `{r['variant']}` | {r['mode']} | {r['dtype']} | {r['batch']} | "
                     f"{r['step_time_median_s'] * 1e6:.1f} µs{_flag_text(r)} | {bandwidth} | {fraction} | {tflops} |")
    return [*lines, ""]


def _keep_results(results: Sequence[Results], slug: str, device_dir: Path) -> list[str]:
    """Copy each results file whose cells all ran on this device into its folder; returns the names.

    The copy is what ``perfkit compare`` reads as this device's baseline when a new run is made.
    """
    kept = []
    for result in results:
        source = Path(result.path)
        if result.records and all(device_slug(r.device) == slug for r in result.records):
            target = device_dir / source.name
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
            kept.append(source.name)
    return kept


def write_device_report(slug: str, frame: pd.DataFrame, results: Sequence[Results], records: Sequence[Record],
                        out_dir: Path, copy_gbps: float | None = None) -> Path:
    """Write ``out_dir/slug/`` (README.md, summary.csv, PNGs) for one device's cells; returns the folder."""
    import matplotlib

    matplotlib.use("Agg")
    device_dir = out_dir / slug
    device_dir.mkdir(parents=True, exist_ok=True)
    for pattern in GENERATED_PATTERNS:
        for stale in device_dir.glob(pattern):
            stale.unlink()
    ceilings = read_ceilings(device_dir, copy_gbps)
    frame.to_csv(device_dir / "summary.csv", index=False)
    kept = _keep_results(results, slug, device_dir)
    device = records[0].device
    memory_column = "peak_memory_bytes" if frame["peak_memory_bytes"].notna().any() else "peak_memory_rise_bytes"
    methods = sorted(set(frame["memory_method"].dropna()))
    lines = [f"# perfkit report: {device_name(device)}", "",
             f"{len(frame)} cells: " + ", ".join(f"{n} {s}" for s, n in frame["status"].value_counts().sort_index()
                                                  .items()) + ". Raw cells: [summary.csv](summary.csv)"
             + "".join(f", [{name}]({name})" for name in kept) + ".", ""]
    contended = contended_line(frame)
    if contended:
        lines += [contended, ""]
    lines += summary_lines(frame)
    lines += _run_lines(results, records)
    lines += _device_lines(device)
    blocks = frame[frame["kind"] != "kernel"]
    best = best_variants(blocks)
    for mode in [m for m in MODES if m in set(blocks["mode"])] + sorted(set(blocks["mode"]) - set(MODES)):
        cells = blocks[blocks["mode"] == mode]
        heatmap = f"speedup-{mode}.png"
        _plot_speedup_heatmap(cells, mode, device_dir / heatmap)
        lines += [f"## {mode.capitalize()}", "",
                  "### Speedup over eager", "",
                  "Eager's median step time over the variant's with its 95% interval (from interleaved paired "
                  "rounds where the cell has them, else the bootstrap of the ratio of medians), then the "
                  "variant's throughput. An interval containing 1.0 reads *no difference*; ⚠ marks noisy, "
                  "contended, launch-bound or throttled cells. Cells that failed the correctness gate, ran out "
                  "of memory, raised or were skipped say so instead.", ""]
        lines += _table(cells, _speedup_text)
        lines += ["", f"![{mode} speedup heatmap]({heatmap})", "", "### Peak memory against eager", "",
                  f"`{memory_column}` ({', '.join(methods) or 'method not recorded'}), as a ratio to eager's. "
                  "A method that repeats exactly for the same code gives an exact ratio; any other is one "
                  "measurement, and says it has no interval.", ""]
        lines += _table(cells, lambda r: _memory_text(r, memory_column))
        if cells[memory_column].notna().any():
            bars = f"memory-{mode}.png"
            _plot_memory_bars(cells, mode, memory_column, device_dir / bars)
            lines += ["", f"![{mode} peak memory]({bars})"]
        if "predicted_peak_rise_bytes" in cells and cells["predicted_peak_rise_bytes"].notna().any():
            lines += ["", "### Memory: predicted against measured", "",
                      "The memory model's peak rise for the step (tensors only: `perfkit memory`), with its "
                      "activations and temporaries at that peak, against the measured peak rise and their "
                      "ratio. A ratio above 1 is what the step spent outside its tensors (library workspaces, "
                      "allocator rounding); below 1 the measurement missed tensors or the variant keeps less "
                      "than its eager module (a compiled graph).", ""]
            lines += _table(cells, _predicted_text)
        lines += ["", "### Correctness", "",
                  "Relative error ‖out − ref‖/‖ref‖ against the float64 reference (outputs, and gradients in "
                  "training), against the dtype's tolerance.", ""]
        lines += _table(cells, _error_text)
        lines += ["", "### Best variant per block", "",
                  "The fastest variant beyond noise; among variants within noise of it, the simplest (fewest "
                  "atoms). Eager where none is faster with 95% confidence.", "",
                  "| block | batch | best | speedup | throughput |", "|---|---:|---|---|---:|"]
        for _, r in best[best["mode"] == mode].iterrows():
            name = f"`{r['variant']}`" + (" (no variant beats eager beyond noise)"
                                          if r["variant"] == REFERENCE_VARIANT else "")
            throughput = f"{_count(r['samples_per_s'])}/s" if _present(r.get("samples_per_s")) else "—"
            speedup = "—" if r["variant"] == REFERENCE_VARIANT else ratio_text(
                r["speedup_vs_eager"], r.get("speedup_ci_low"), r.get("speedup_ci_high"))
            lines.append(f"| `{r['block']}` | {r['batch']} | {name} | {speedup}{_flag_text(r)} | {throughput} |")
        lines.append("")
    kernels = frame[frame["kind"] == "kernel"]
    if not kernels.empty:
        lines += _kernel_lines(kernels, ceilings)
    roof_blocks, roof_kernels = roofline_points(frame)
    if not (roof_blocks.empty and roof_kernels.empty):
        _plot_roofline(roof_blocks, roof_kernels, ceilings, device_dir / "roofline.png")
        lines += _roofline_lines(roof_blocks, roof_kernels, ceilings)
    (device_dir / "README.md").write_text("\n".join(lines))
    (device_dir / "index.html").write_text(markdown_to_html(lines, f"perfkit report: {device_name(device)}",
                                                            device_dir))
    return device_dir


HTML_SCRIPT = r"""
function cellValue(td) {
  const text = td.textContent.trim();
  const number = text.match(/^(reference|no difference \()?\s*([-+]?[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?)/i);
  if (text.startsWith("reference")) return 1.0;
  return number && number[2] !== undefined ? parseFloat(number[2]) : text.toLowerCase();
}
function sortTable(table, column, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a.cells[column]), y = cellValue(b.cells[column]);
    // Numbers before text ("—", statuses) whichever the direction, so cells without a value stay last.
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
    const order = x < y ? -1 : x > y ? 1 : 0;
    return descending ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
  table.dataset.sortedBy = column + (descending ? ",desc" : ",asc");
}
document.querySelectorAll("table.sortable").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
    th.title = "click to sort";
    th.addEventListener("click", () => sortTable(table, column, table.dataset.sortedBy === column + ",asc"));
  });
});
// index.html#sort=TABLE,COLUMN[,desc] opens with that table sorted (a link can share a view).
const wanted = location.hash.match(/^#sort=(\d+),(\d+)(,desc)?$/);
const target = wanted && document.querySelectorAll("table.sortable")[+wanted[1]];
if (target && +wanted[2] < target.tHead.rows[0].cells.length) sortTable(target, +wanted[2], !!wanted[3]);
document.body.dataset.ready = "1";
"""
HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; }
code { background: #f6f6f6; padding: 0 3px; }
img { max-width: 100%; }
"""


def _inline_html(text: str, folder: Path) -> str:
    """The inline markdown this module writes (code, bold, emphasis, links, images) as escaped HTML."""
    import base64
    import html

    out = html.escape(text, quote=False)

    def image(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.exists():
            return html.escape(match.group(1))
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{match.group(1)}" src="data:image/png;base64,{data}">'

    out = re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", image, out)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", out)


def markdown_to_html(lines: Sequence[str], title: str, folder: Path) -> str:
    """A self-contained page from the README this module wrote: headings, paragraphs, lists, tables (sortable by
    clicking a header) and the plots embedded as data URIs, so the one file can be mailed or archived."""
    import html

    body: list[str] = []
    table: list[list[str]] = []

    def split_row(line: str) -> list[str]:
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        return [c.strip().replace("\\|", "|") for c in cells]

    def flush_table() -> None:
        if not table:
            return
        head, rows = table[0], table[2:]
        body.append('<table class="sortable"><thead><tr>' + "".join(f"<th>{_inline_html(c, folder)}</th>"
                                                                      for c in head) + "</tr></thead><tbody>")
        body.extend("<tr>" + "".join(f"<td>{_inline_html(c, folder)}</td>" for c in row) + "</tr>" for row in rows)
        body.append("</tbody></table>")
        table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(split_row(line))
            continue
        flush_table()
        if not line.strip():
            continue
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline_html(heading.group(2), folder)}</h{level}>")
        elif line.lstrip().startswith("- "):
            body.append(f"<ul><li>{_inline_html(line.lstrip()[2:], folder)}</li></ul>")
        elif line.startswith("```"):
            continue
        else:
            body.append(f"<p>{_inline_html(line, folder)}</p>")
    flush_table()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{HTML_SCRIPT}</script>\n</body></html>\n")


def write_index(out_dir: Path) -> Path:
    """``out_dir/README.md``: per device its fast_p line, and the best variant per block on every device."""
    frames = []
    for summary in sorted(out_dir.glob("*/summary.csv")):
        frames.append(pd.read_csv(summary))
    lines = ["# perfkit reports", "",
             "Per device, fast_p: the fraction of (block, mode, batch) pairs where some variant is correct and "
             "faster than eager by more than p, its whole 95% interval beyond (KernelBench's fast_p, noise "
             "excluded). Then the best variant per block: the fastest beyond noise, the simplest among those "
             "within noise of it, eager where none is faster with 95% confidence. ⚠ marks noisy, contended, "
             "launch-bound or throttled cells. Each device's folder has the full tables, plots and raw cells.", ""]
    if not frames:
        (out_dir / "README.md").write_text("\n".join([*lines, "No device reports yet.", ""]))
        return out_dir / "README.md"
    frame = pd.concat(frames, ignore_index=True)
    for column in ("speedup_ci_low", "speedup_ci_high", *FLAGS):
        if column not in frame:  # a summary.csv written before intervals and flags existed
            frame[column] = math.nan
    devices = sorted(set(frame["device_slug"]))
    names = frame.drop_duplicates("device_slug").set_index("device_slug")["device_name"]
    heads = " | ".join(f"fast_{p:g}" for p in FAST_P_THRESHOLDS)
    lines += [f"| device | folder | mode | pairs | {heads} |",
              "|---|---|---|---:|" + "---:|" * len(FAST_P_THRESHOLDS)]
    for d in devices:
        cells = frame[frame["device_slug"] == d]
        for mode in _modes(cells[cells["kind"] != "kernel"]):
            summary = fast_p(cells[cells["mode"] == mode])
            values = " | ".join(f"{summary['fast'][p]:.0%}" if _present(summary["fast"][p]) else "—"
                                for p in FAST_P_THRESHOLDS)
            lines.append(f"| {names[d]} | [{d}/]({d}/README.md) | {mode} | {summary['pairs']} | {values} |")
    lines.append("")
    for d in devices:
        contended = contended_line(frame[frame["device_slug"] == d])
        if contended:
            lines += [f"`{d}`: {contended}", ""]
    best = best_variants(frame[frame["kind"] != "kernel"])
    for mode in _modes(frame):
        blocks = sorted(set(frame[(frame["mode"] == mode) & (frame["kind"] != "kernel")]["block"]))
        if not blocks:
            continue
        lines += [f"## {mode.capitalize()}", "", "| block | " + " | ".join(f"`{d}`" for d in devices) + " |",
                  "|---|" + "---|" * len(devices)]
        mode_best = best[best["mode"] == mode] if not best.empty else best
        for block in blocks:
            cells = []
            for device in devices:
                rows = mode_best[(mode_best["block"] == block) & (mode_best["device_slug"] == device)] \
                    if not mode_best.empty else mode_best
                if rows.empty:
                    cells.append("—")
                    continue
                r = rows.loc[rows["speedup_vs_eager"].idxmax()]
                if r["variant"] == REFERENCE_VARIANT:
                    text = "`eager` (no variant faster beyond noise)"
                else:
                    text = f"{ratio_text(r['speedup_vs_eager'], r['speedup_ci_low'], r['speedup_ci_high'])} " \
                           f"`{r['variant']}`"
                cells.append(f"{text} (batch {r['batch']}){_flag_text(r)}")
            lines.append(f"| `{block}` | " + " | ".join(cells) + " |")
        lines.append("")
    (out_dir / "README.md").write_text("\n".join(lines))
    return out_dir / "README.md"


def compare_with_baseline(slug: str, records: Sequence[Record], baseline_dir: Path,
                          threshold: float = 0.05) -> str | None:
    """``perfkit compare``'s text for ``records`` against the committed report of the same device folder.

    None where ``baseline_dir/slug`` holds no results JSON (no committed report for this device yet).
    """
    from perfkit.results.compare import CompareError, compare_records, render

    folder = baseline_dir / slug
    candidates = sorted([*folder.glob("*.json"), *folder.glob("*.jsonl")]) if folder.is_dir() else []
    candidates = [c for c in candidates if c.name != CEILINGS_FILE]
    if not candidates:
        return None
    base = merge_records(load_results(c) for c in candidates)
    try:
        comparison = compare_records(base, list(records), threshold=threshold,
                                     base_path=", ".join(map(str, candidates)), new_path="this run")
    except CompareError as exc:
        return f"No comparison with the committed report: {exc}\n"
    return render(comparison, "text")


def build_reports(paths: Sequence[str | Path], out_dir: str | Path, copy_gbps: float | None = None,
                  baseline_dir: str | Path | None = None) -> list[Path]:
    """Read ``paths``, write one report folder per device and the index; returns the device folders.

    With ``baseline_dir`` (the committed ``reports/``), each device whose folder there holds a results JSON is
    compared with it: the text goes to the device folder's ``compare.md`` and is printed.
    """
    results = [load_results(p) for p in paths]
    records = merge_records(results)
    if not records:
        raise ResultsError(f"no benchmark cells in {', '.join(map(str, paths))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    same = baseline_dir is not None and Path(baseline_dir).resolve() == out_dir.resolve()
    frame = summary_frame(records)
    written = []
    for slug, cells in frame.groupby("device_slug", sort=True):
        device_records = [r for r in records if device_slug(r.device) == slug]
        # Read before writing: the output folder may be the baseline's own when publishing.
        text = None if baseline_dir is None or same else compare_with_baseline(slug, device_records,
                                                                                Path(baseline_dir))
        folder = write_device_report(slug, cells.reset_index(drop=True), results, device_records, out_dir,
                                     copy_gbps)
        if text is None and baseline_dir is not None and not same:
            others = sorted(p.parent.name for p in Path(baseline_dir).glob("*/README.md") if p.parent.name != slug)
            print(f"{slug}: no committed report in {baseline_dir}/{slug}/ to compare with "
                  "(`make publish` makes this run the baseline)"
                  + (f"; committed reports of other machines ({', '.join(others)}) are not compared: their "
                     "timings measure the hardware, not the change" if others else ""))
        elif text is not None:
            (folder / "compare.md").write_text("```\n" + text + "```\n")
            print(f"{slug}: against the committed report in {baseline_dir}/{slug}/\n{text}")
        written.append(folder)
    write_index(out_dir)
    return written
