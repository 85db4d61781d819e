"""Per-device reports from benchmark results: ``perfkit report RESULTS... -o reports/``.

Reads pytest-benchmark JSON files (the record of each cell is its ``extra_info``) and perfkit's JSON-lines
files, groups the cells by device and writes, for each device, ``reports/<device-slug>/README.md`` (how and
when it ran, the device, per mode the speedup, memory and correctness tables, the best variant per block,
the kernels against the copy bandwidth), ``summary.csv`` and PNG plots with fixed names, so a re-run
replaces the report. ``reports/README.md`` indexes every device folder found there.

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
GENERATED_PATTERNS = ("README.md", "summary.csv", "speedup-*.png", "memory-*.png", "roofline.png")


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
    commit = data.get("commit_info") or {}
    run = {
        "datetime": data.get("datetime"),
        "commit": commit.get("id"),
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
                bad = whole_error if n == 1 else exc
                raise ResultsError(f"{path}: line {n}: invalid JSON ({bad.msg} at column {bad.colno})") from None
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
    """A folder name for the device: ``"nvidia-h100-80gb-hbm3"``, ``"cpu-intel-xeon-platinum-8375c"``.

    Only the hardware counts, never the driver or library versions: a regression against last month's
    torch on the same GPU is exactly the comparison a report folder exists for.
    """
    name = device_name(device)
    slug = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", " ", name.lower())
    slug = re.sub(r"[^a-z0-9.]+", "-", slug).strip("-.")
    slug = re.sub(r"-+", "-", slug) or "unknown"
    is_cpu = device.get("type") == "cpu"
    return f"cpu-{slug}" if is_cpu and not slug.startswith("cpu") else slug


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


def summary_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per cell, every record field but the raw rounds, plus the ratios against ``eager``.

    ``speedup_vs_eager`` is eager's median step time over the cell's; ``memory_ratio_vs_eager`` the cell's
    peak memory over eager's. Both are empty unless the cell and its eager reference are ``ok``.
    """
    rows = []
    for r in records:
        row = r.to_dict()
        del row["times_s"]
        device = row.pop("device")
        row = {"device_slug": device_slug(device), "device_name": device_name(device), **row}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    group = ["device_slug", "kind", "block", "mode", "batch"]
    reference = frame[(frame["variant"] == REFERENCE_VARIANT) & (frame["status"] == "ok")]
    memory_column = "peak_memory_bytes" if frame["peak_memory_bytes"].notna().any() else "peak_memory_rise_bytes"
    reference = reference[group + ["step_time_median_s", memory_column]].rename(
        columns={"step_time_median_s": "_ref_time", memory_column: "_ref_memory"}).drop_duplicates(group)
    frame = frame.merge(reference, on=group, how="left")
    ok = frame["status"] == "ok"
    unpaired = frame["_ref_time"] / frame["step_time_median_s"]
    # A paired ratio (measured in the cell, interleaved with eager) wins over two cells timed apart.
    if "speedup_vs_eager" in frame:
        unpaired = frame["speedup_vs_eager"].astype(float).fillna(unpaired)
    frame["speedup_vs_eager"] = unpaired.where(ok)
    frame["memory_ratio_vs_eager"] = (frame[memory_column] / frame["_ref_memory"]).where(ok)
    frame = frame.drop(columns=["_ref_time", "_ref_memory"])
    return frame.sort_values(["device_slug", "kind", "block", "mode", "batch", "variant"], kind="stable",
                             ignore_index=True)


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


def _speedup_text(row: pd.Series) -> str:
    status = status_text(row)
    if status:
        return status
    throughput = f"{_count(row['samples_per_s'])}/s" if _present(row.get("samples_per_s")) else "no throughput"
    noisy = " (noisy)" if row.get("noisy") is True else ""
    if not _present(row.get("speedup_vs_eager")):
        return f"{throughput}, no eager reference{noisy}"
    return f"**{row['speedup_vs_eager']:.2f}×** · {throughput}{noisy}"


def _memory_text(row: pd.Series, memory_column: str) -> str:
    status = status_text(row)
    if status:
        return status
    if not _present(row.get(memory_column)):
        return "—"
    ratio = row.get("memory_ratio_vs_eager")
    return f"{ratio:.2f}× · {_mib(row[memory_column])}" if _present(ratio) else _mib(row[memory_column])


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


def best_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """Per block, mode and batch, the ``ok`` cell with the highest speedup over eager (eager itself if none).

    Failed, OOM, erroring and skipped cells never qualify, however fast they ran; nor do ``contended`` ones.
    """
    ok = frame[(frame["status"] == "ok") & frame["speedup_vs_eager"].notna()]
    if "contended" in ok:
        ok = ok[ok["contended"] != True]  # noqa: E712 (None, from records before the flag, is not contended)
    if ok.empty:
        return ok
    best = ok.loc[ok.groupby(["device_slug", "kind", "block", "mode", "batch"])["speedup_vs_eager"].idxmax()]
    return best.sort_values(["device_slug", "kind", "block", "mode", "batch"], ignore_index=True)


# ------------------------------------------------------------------------------------------------ plots

def _plot_speedup_heatmap(frame: pd.DataFrame, mode: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    variants = _ordered_variants(frame)
    rows = _block_rows(frame)
    values = np.full((len(rows), len(variants)), np.nan)
    labels = [["" for _ in variants] for _ in rows]
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
                labels[i][j] = f"{r.speedup_vs_eager:.2f}"
    finite = values[np.isfinite(values)]
    spread = max(abs(np.log2(finite)).max(), 0.1) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(variants), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(np.log2(values), cmap="RdYlGn", norm=TwoSlopeNorm(0.0, -spread, spread), aspect="auto")
    for i in range(len(rows)):
        for j in range(len(variants)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    batches = frame.groupby("block")["batch"].nunique()
    ax.set_yticks(range(len(rows)), [_row_label(b, n, batches[b]).replace("`", "") for b, n in rows])
    ax.set_title(f"{mode}: speedup over eager (median step time)")
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


def _plot_roofline(kernels: pd.DataFrame, ceilings: dict[str, float], path: Path) -> None:
    """Left: kernels with a FLOP count on the roofline; right: every kernel's achieved GB/s against copy."""
    import matplotlib.pyplot as plt
    import numpy as np

    ok = kernels[(kernels["status"] == "ok") & kernels["bytes_per_step"].notna()
                 & kernels["step_time_median_s"].notna()].reset_index(drop=True)
    labels = (ok["block"] + " " + ok["variant"] + " " + ok["mode"]).tolist()
    gbps = (ok["bytes_per_step"] / ok["step_time_median_s"] / 1e9).to_numpy()
    copy, peak = ceilings.get("copy_gb_per_s"), ceilings.get("bf16_tflops")
    fig, (roof_ax, bw_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    counted = ok["flops_per_step"].fillna(0) > 0
    intensity = (ok["flops_per_step"] / ok["bytes_per_step"])[counted].to_numpy(dtype=float)
    tflops = (ok["flops_per_step"] / ok["step_time_median_s"] / 1e12)[counted].to_numpy(dtype=float)
    counted_labels = [label for label, c in zip(labels, counted, strict=True) if c]
    for label, x, y in zip(counted_labels, intensity, tflops, strict=True):
        roof_ax.scatter(x, y, s=25)
        roof_ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if copy:
        xs = np.logspace(-2, 3, 200)
        roof = np.minimum(xs * copy / 1e3, peak) if peak else xs * copy / 1e3
        roof_ax.plot(xs, roof, "k-", lw=1,
                     label=f"copy {copy:.0f} GB/s" + (f", bf16 {peak:.0f} TFLOP/s" if peak else ""))
        roof_ax.legend(fontsize=8)
    roof_ax.set_xscale("log")
    roof_ax.set_yscale("log")
    roof_ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    roof_ax.set_ylabel("achieved TFLOP/s")
    roof_ax.set_title("roofline (kernels with a FLOP count)")
    bw_ax.barh(range(len(labels)), gbps)
    bw_ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if copy:
        bw_ax.axvline(copy, color="k", lw=1, label=f"copy {copy:.0f} GB/s")
        bw_ax.legend(fontsize=8)
    bw_ax.set_xlabel("achieved GB/s")
    bw_ax.set_title("bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
                f"; no copy bandwidth was given (`--copy-gbps` or `{CEILINGS_FILE}`), so no fraction."),
             "",
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
        lines.append(f"| `{r['block']}` | `{r['variant']}` | {r['mode']} | {r['dtype']} | {r['batch']} | "
                     f"{r['step_time_median_s'] * 1e6:.1f} µs | {'—' if gbps is None else f'{gbps:.1f}'} | "
                     f"{fraction} | {tflops} |")
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
                  "Eager's median step time over the variant's, then the variant's throughput. Cells that "
                  "failed the correctness gate, ran out of memory, raised or were skipped say so instead.", ""]
        lines += _table(cells, _speedup_text)
        lines += ["", f"![{mode} speedup heatmap]({heatmap})", "", "### Peak memory against eager", "",
                  f"`{memory_column}` ({', '.join(methods) or 'method not recorded'}), as a ratio to eager's.", ""]
        lines += _table(cells, lambda r: _memory_text(r, memory_column))
        if cells[memory_column].notna().any():
            bars = f"memory-{mode}.png"
            _plot_memory_bars(cells, mode, memory_column, device_dir / bars)
            lines += ["", f"![{mode} peak memory]({bars})"]
        lines += ["", "### Correctness", "",
                  "Relative error ‖out − ref‖/‖ref‖ against the float64 reference (outputs, and gradients in "
                  "training), against the dtype's tolerance.", ""]
        lines += _table(cells, _error_text)
        lines += ["", "### Best variant per block", "", "| block | batch | best | speedup | throughput |",
                  "|---|---:|---|---:|---:|"]
        for _, r in best[best["mode"] == mode].iterrows():
            name = f"`{r['variant']}`" + (" (no variant beats eager)" if r["variant"] == REFERENCE_VARIANT else "")
            throughput = f"{_count(r['samples_per_s'])}/s" if _present(r.get("samples_per_s")) else "—"
            lines.append(f"| `{r['block']}` | {r['batch']} | {name} | {r['speedup_vs_eager']:.2f}× | {throughput} |")
        lines.append("")
    kernels = frame[frame["kind"] == "kernel"]
    if not kernels.empty:
        lines += _kernel_lines(kernels, ceilings)
        _plot_roofline(kernels, ceilings, device_dir / "roofline.png")
        lines += ["![kernels against the roofline](roofline.png)", ""]
    (device_dir / "README.md").write_text("\n".join(lines))
    return device_dir


def write_index(out_dir: Path) -> Path:
    """``out_dir/README.md``: the best speedup per block on every device that has a folder in ``out_dir``."""
    frames = []
    for summary in sorted(out_dir.glob("*/summary.csv")):
        frames.append(pd.read_csv(summary))
    lines = ["# perfkit reports", "",
             "Best variant per block and device: the highest speedup over eager among the cells that passed "
             "the correctness gate. Each device's folder has the full tables, plots and raw cells.", ""]
    if not frames:
        (out_dir / "README.md").write_text("\n".join([*lines, "No device reports yet.", ""]))
        return out_dir / "README.md"
    frame = pd.concat(frames, ignore_index=True)
    devices = sorted(set(frame["device_slug"]))
    names = frame.drop_duplicates("device_slug").set_index("device_slug")["device_name"]
    lines += ["| device | folder |", "|---|---|"]
    lines += [f"| {names[d]} | [{d}/]({d}/README.md) |" for d in devices]
    lines.append("")
    best = best_variants(frame[frame["kind"] != "kernel"])
    for mode in [m for m in MODES if m in set(frame["mode"])] + sorted(set(frame["mode"]) - set(MODES)):
        lines += [f"## {mode.capitalize()}", "", "| block | " + " | ".join(f"`{d}`" for d in devices) + " |",
                  "|---|" + "---|" * len(devices)]
        mode_best = best[best["mode"] == mode] if not best.empty else best
        blocks = sorted(set(frame[(frame["mode"] == mode) & (frame["kind"] != "kernel")]["block"]))
        for block in blocks:
            cells = []
            for device in devices:
                rows = mode_best[(mode_best["block"] == block) & (mode_best["device_slug"] == device)] \
                    if not mode_best.empty else mode_best
                if rows.empty:
                    cells.append("—")
                    continue
                r = rows.loc[rows["speedup_vs_eager"].idxmax()]
                cells.append(f"{r['speedup_vs_eager']:.2f}× `{r['variant']}` (batch {r['batch']})")
            lines.append(f"| `{block}` | " + " | ".join(cells) + " |")
        lines.append("")
    (out_dir / "README.md").write_text("\n".join(lines))
    return out_dir / "README.md"


def build_reports(paths: Sequence[str | Path], out_dir: str | Path, copy_gbps: float | None = None) -> list[Path]:
    """Read ``paths``, write one report folder per device and the index; returns the device folders."""
    results = [load_results(p) for p in paths]
    records = merge_records(results)
    if not records:
        raise ResultsError(f"no benchmark cells in {', '.join(map(str, paths))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = summary_frame(records)
    written = []
    for slug, cells in frame.groupby("device_slug", sort=True):
        device_records = [r for r in records if device_slug(r.device) == slug]
        written.append(write_device_report(slug, cells.reset_index(drop=True), results, device_records, out_dir,
                                           copy_gbps))
    write_index(out_dir)
    return written
