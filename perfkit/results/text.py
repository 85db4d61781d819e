"""The report's words: a device page's sections and tables, the text of each cell, and the index's.

Every function returns markdown lines (or one cell's text) from the summary frame (``perfkit.results.frame``);
nothing here computes a figure or writes a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from perfkit.record import Record
from perfkit.results.compile_text import compile_legend, compile_lines, compile_marks
from perfkit.results.floor_text import floor_cell, floor_intro, impossible_line
from perfkit.results.frame import (
    FAST_P_THRESHOLDS,
    PREDICTED_CATEGORIES,
    REFERENCE_VARIANT,
    best_variants,
    block_rows,
    fast_p,
    flags,
    geomean_speedups,
    has_value,
    modes_of,
    ordered_variants,
    peak_tflops,
    uncontended,
    within_noise,
    worst_gate_check,
)
from perfkit.results.load import CEILINGS_FILE, Results, device_name

# ------------------------------------------------------------------------------------------------ cells

def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def _cell_escape(text: str, limit: int = 70) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_text(row: pd.Series) -> str | None:
    """How a cell that is not ``ok`` reads in every table: ``FAILED (err 3e-01)``, ``OOM``, ``skipped: …``."""
    status = row["status"]
    if status == "ok":
        return None
    if status == "failed":
        # The record's own errors count too: a record edited or written by hand may have no failing check.
        checks = row.get("gate_checks")
        worst = worst_gate_check([row, *(checks if isinstance(checks, list) else [])])
        err = max((e for e in (worst.get("rel_error"), worst.get("grad_rel_error")) if has_value(e)), default=None)
        when = ", after timing" if worst.get("when") == "after timing" else ""
        return f"FAILED (err {err:.0e}{when})" if err is not None else "FAILED"
    if status == "impossible":
        fraction = row.get("floor_fraction")
        return f"IMPOSSIBLE ({fraction:.3g}× under its floor)" if has_value(fraction) else "IMPOSSIBLE"
    if status == "oom":
        return "OOM"
    reason = row.get("reason")
    label = "ERROR" if status == "error" else status
    return f"{label}: {_cell_escape(reason, 60)}" if has_value(reason) and reason else label


def _flag_text(row: pd.Series) -> str:
    marks = flags(row)
    return f" ⚠ {', '.join(marks)}" if marks else ""


def ratio_text(ratio: float, low: float | None, high: float | None) -> str:
    """``1.34× [1.30, 1.38]``; ``no difference (0.98× [0.95, 1.01])`` when the interval contains 1.0."""
    if not (has_value(low) and has_value(high)):
        return f"{ratio:.2f}× (no interval)"
    text = f"{ratio:.2f}× [{low:.2f}, {high:.2f}]"
    return f"no difference ({text})" if low <= 1.0 <= high else text


def _speedup_text(row: pd.Series) -> str:
    status = status_text(row)
    if status:
        return status
    throughput = f"{_count(row['samples_per_s'])}/s" if has_value(row.get("samples_per_s")) else "no throughput"
    marks = _flag_text(row) + compile_marks(row)
    if not has_value(row.get("speedup_vs_eager")):
        return f"{throughput}, no eager reference{marks}"
    if row.get("speedup_method") == "reference":
        return f"reference · {throughput}{marks}"
    text = ratio_text(row["speedup_vs_eager"], row.get("speedup_ci_low"), row.get("speedup_ci_high"))
    return (text if within_noise(row) else f"**{text}**") + f" · {throughput}{marks}"


def _predicted_text(row: pd.Series) -> str:
    status = status_text(row)
    if status and row["status"] != "oom":
        return status
    predicted, measured = row.get("predicted_peak_rise_bytes"), row.get("peak_memory_rise_bytes")
    if not has_value(predicted):
        return "—" if not status else status
    split = " / ".join(_mib(row.get(f"predicted_{c}_at_peak_bytes") or 0) for c in PREDICTED_CATEGORIES)
    if not has_value(measured):
        return f"pred {_mib(predicted)} (act / tmp {split}) · not measured"
    ratio = f"{measured / predicted:.2f}×" if predicted else "—"
    return f"pred {_mib(predicted)} (act / tmp {split}) · meas {_mib(measured)} · {ratio}"


def _memory_text(row: pd.Series, memory_column: str) -> str:
    status = status_text(row)
    if status:
        return status
    if not has_value(row.get(memory_column)):
        return "—"
    ratio = row.get("memory_ratio_vs_eager")
    if not has_value(ratio):
        return _mib(row[memory_column])
    if row["variant"] == REFERENCE_VARIANT:
        return f"reference · {_mib(row[memory_column])}"
    if has_value(row.get("memory_ratio_ci_low")):
        text = "no difference (exact)" if ratio == 1.0 else f"{ratio:.2f}× (exact)"
    else:
        text = f"{ratio:.2f}× (one measurement, no interval)"
    return f"{text} · {_mib(row[memory_column])}"


def _errors_text(check: pd.Series | dict) -> str:
    parts = []
    for label, err, tol in (("", check.get("rel_error"), check.get("tolerance")),
                            ("grad ", check.get("grad_rel_error"), check.get("grad_tolerance"))):
        if has_value(err):
            mark = f" {'≤' if err <= tol else '>'} {tol:.0e}" if has_value(tol) else ""
            parts.append(f"{label}{err:.1e}{mark}")
    return "; ".join(parts)


def _error_text(row: pd.Series) -> str:
    """The timed input's errors, and the worst of the other inputs' where one is worse."""
    if row["status"] in ("oom", "error", "skipped"):
        return status_text(row)
    text = _errors_text(row)
    if not text:
        return "—"
    checks = row.get("gate_checks")
    worst = worst_gate_check(checks)
    if worst is not None and worst is not checks[0]:
        text += f" · worst of {len(checks)} inputs ({worst['when']}, seed {worst['input_seed']}): {_errors_text(worst)}"
    return text + {"ok": "", "impossible": " (IMPOSSIBLE time)"}.get(row["status"], " FAILED")


def _table(frame: pd.DataFrame, text: Callable[[pd.Series], str]) -> list[str]:
    """A markdown table, one row per block (and batch), one column per variant, each cell ``text(row)``."""
    variants = ordered_variants(frame)
    rows = block_rows(frame)
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


# ------------------------------------------------------------------------------------------ device page

def contended_line(frame: pd.DataFrame) -> str | None:
    """How many timed cells were contended, or None when none was."""
    timed = frame[frame["status"] == "ok"]
    n = len(timed) - len(uncontended(timed))
    if not n:
        return None
    return (f"**{n} of {len(timed)} timed cells were contended**: other processes took the cores they ran on "
            "(each cell's `machine_load` says how much). Their figures are shown with ⚠ but left out of fast_p, "
            "the geometric means and the best-variant choice; rerun on a quiet machine to rank them.")


def _fast_p_values(summary: dict[str, Any]) -> str:
    return " | ".join(f"{summary['fast'][p]:.0%}" if has_value(summary["fast"][p]) else "—"
                      for p in FAST_P_THRESHOLDS)


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """The device README's opening summary: fast_p per mode and every variant's geometric-mean speedup."""
    heads = " | ".join(f"fast_{p:g}" for p in FAST_P_THRESHOLDS)
    lines = ["## Summary", "",
             "fast_p: the fraction of (block, mode, batch) pairs where some variant is correct and faster than "
             "eager by more than p, the whole 95% interval beyond it (KernelBench's fast_p, with noise "
             "excluded).", "", f"| mode | pairs | {heads} |", "|---|---:|" + "---:|" * len(FAST_P_THRESHOLDS)]
    for mode in modes_of(frame):
        summary = fast_p(frame[frame["mode"] == mode])
        lines.append(f"| {mode} | {summary['pairs']} | {_fast_p_values(summary)} |")
    means = geomean_speedups(frame)
    lines += ["", "Geometric-mean speedup over eager per variant, across the blocks where it is correct, with its "
              "95% interval (from each cell's own interval).", "",
              "| mode | variant | correct / run | geomean speedup |", "|---|---|---:|---|"]
    for r in means.itertuples(index=False):
        text = ratio_text(r.geomean, r.ci_low, r.ci_high) if has_value(r.geomean) else "—"
        lines.append(f"| {r.mode} | `{r.variant}` | {r.correct} / {r.cells} | {text} |")
    return [*lines, ""]


def run_lines(results: Sequence[Results], records: Sequence[Record]) -> list[str]:
    """How and when each results file holding these ``records`` ran: cells, date, commit, command."""
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


def device_lines(device: dict[str, Any]) -> list[str]:
    """The device's identity: its record's fields as a table."""
    lines = ["## Device", "", "| field | value |", "|---|---|"]
    for key in sorted(device):
        value = device[key] if isinstance(device[key], str) else json.dumps(device[key])
        lines.append(f"| {key} | {_cell_escape(value, 120)} |")
    return [*lines, ""]


def head_lines(frame: pd.DataFrame, device: dict[str, Any], kept: Sequence[str]) -> list[str]:
    """The device page's title, its cells by status with links to the raw cells, and any contended warning."""
    statuses = ", ".join(f"{n} {s}" for s, n in frame["status"].value_counts().sort_index().items())
    links = "".join(f", [{name}]({name})" for name in kept)
    lines = [f"# perfkit report: {device_name(device)}", "",
             f"{len(frame)} cells: {statuses}. Raw cells: [summary.csv](summary.csv){links}.", ""]
    extra = [line for line in (contended_line(frame), impossible_line(frame)) if line]
    return lines + [line for text in extra for line in (text, "")]


def _speedup_lines(cells: pd.DataFrame, mode: str, heatmap: str) -> list[str]:
    return [f"## {mode.capitalize()}", "",
            "### Speedup over eager", "",
            "Eager's median step time over the variant's with its 95% interval (from interleaved paired "
            "rounds where the cell has them, else the bootstrap of the ratio of medians), then the "
            "variant's throughput. An interval containing 1.0 reads *no difference*; ⚠ marks noisy, "
            "contended, launch-bound or throttled cells. Cells that failed the correctness gate, ran out "
            "of memory, raised or were skipped say so instead.", "",
            *_table(cells, _speedup_text), *compile_legend(cells), "", f"![{mode} speedup heatmap]({heatmap})"]


def _memory_lines(cells: pd.DataFrame, mode: str, memory: str, methods: Sequence[str], bars: str | None) -> list[str]:
    lines = ["", "### Peak memory against eager", "",
             f"`{memory}` ({', '.join(methods) or 'method not recorded'}), as a ratio to eager's. "
             "A method that repeats exactly for the same code gives an exact ratio; any other is one "
             "measurement, and says it has no interval.", "",
             *_table(cells, lambda r: _memory_text(r, memory))]
    return lines + ["", f"![{mode} peak memory]({bars})"] if bars else lines


def _predicted_lines(cells: pd.DataFrame) -> list[str]:
    if "predicted_peak_rise_bytes" not in cells or not cells["predicted_peak_rise_bytes"].notna().any():
        return []
    return ["", "### Memory: predicted against measured", "",
            "The memory model's peak rise for the step (tensors only: `perfkit memory`), with its "
            "activations and temporaries at that peak, against the measured peak rise and their "
            "ratio. A ratio above 1 is what the step spent outside its tensors (library workspaces, "
            "allocator rounding); below 1 the measurement missed tensors or the variant keeps less "
            "than its eager module (a compiled graph).", "",
            *_table(cells, _predicted_text)]


def _correctness_lines(cells: pd.DataFrame) -> list[str]:
    return ["", "### Correctness", "",
            "Relative error ‖out − ref‖/‖ref‖ against the float64 reference (outputs, and gradients in "
            "training), against the dtype's tolerance.", "",
            *_table(cells, _error_text)]


def _floor_lines(cells: pd.DataFrame) -> list[str]:
    intro = floor_intro(cells)
    return [*intro, *_table(cells, lambda r: status_text(r) or floor_cell(r))] if intro else []


def _best_lines(best: pd.DataFrame) -> list[str]:
    lines = ["", "### Best variant per block", "",
             "The fastest variant beyond noise; among variants within noise of it, the simplest (fewest "
             "atoms). Eager where none is faster with 95% confidence.", "",
             "| block | batch | best | speedup | throughput |", "|---|---:|---|---|---:|"]
    for _, r in best.iterrows():
        name = f"`{r['variant']}`" + (" (no variant beats eager beyond noise)"
                                      if r["variant"] == REFERENCE_VARIANT else "")
        throughput = f"{_count(r['samples_per_s'])}/s" if has_value(r.get("samples_per_s")) else "—"
        speedup = "—" if r["variant"] == REFERENCE_VARIANT else ratio_text(
            r["speedup_vs_eager"], r.get("speedup_ci_low"), r.get("speedup_ci_high"))
        lines.append(f"| `{r['block']}` | {r['batch']} | {name} | {speedup}{_flag_text(r)} | {throughput} |")
    return [*lines, ""]


def mode_lines(cells: pd.DataFrame, mode: str, memory: str, methods: Sequence[str], best: pd.DataFrame,
               heatmap: str, bars: str | None) -> list[str]:
    """One mode's section of a device page: speedup, peak memory, predicted memory, correctness, physical
    floor, compile and best variant, for the block ``cells`` of that mode; ``heatmap`` and ``bars`` name its
    plots (no bars: None)."""
    return [*_speedup_lines(cells, mode, heatmap), *_memory_lines(cells, mode, memory, methods, bars),
            *_predicted_lines(cells), *_correctness_lines(cells), *_floor_lines(cells),
            *compile_lines(cells), *_best_lines(best[best["mode"] == mode])]


def kernel_lines(kernels: pd.DataFrame, ceilings: dict[str, float]) -> list[str]:
    """The kernels' table: median time, achieved GB/s, its share of the copy bandwidth, TFLOP/s."""
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
        gbps = r["achieved_gb_per_s"] if has_value(r.get("achieved_gb_per_s")) else (
            r["bytes_per_step"] / r["step_time_median_s"] / 1e9 if has_value(r.get("bytes_per_step")) else None)
        fraction = f"{gbps / copy:.0%}" if gbps is not None and copy else "—"
        tflops = f"{r['tflops_per_s']:.3g}" if has_value(r.get("tflops_per_s")) else "—"
        bandwidth = "—" if gbps is None else f"{gbps:.3g}"
        lines.append(f"| `{r['block']}` | `{r['variant']}` | {r['mode']} | {r['dtype']} | {r['batch']} | "
                     f"{r['step_time_median_s'] * 1e6:.1f} µs{_flag_text(r)} | {bandwidth} | {fraction} | {tflops} |")
    return [*lines, ""]


def roofline_lines(blocks: pd.DataFrame, kernels: pd.DataFrame, ceilings: dict[str, float]) -> list[str]:
    """The roofline's section: what the points are, the measured ceilings (or that none is known)."""
    copy = ceilings.get("copy_gb_per_s")
    peaks = {d: peak_tflops(ceilings, d) for d in sorted(set(blocks["dtype"]))} if not blocks.empty else {}
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


# ------------------------------------------------------------------------------------------------ index

_INDEX_INTRO = [
    "# perfkit reports", "",
    "Per device, fast_p: the fraction of (block, mode, batch) pairs where some variant is correct and "
    "faster than eager by more than p, its whole 95% interval beyond (KernelBench's fast_p, noise "
    "excluded). Then the best variant per block: the fastest beyond noise, the simplest among those "
    "within noise of it, eager where none is faster with 95% confidence. ⚠ marks noisy, contended, "
    "launch-bound or throttled cells. Each device's folder has the full tables, plots and raw cells.", ""]


def index_lines(frame: pd.DataFrame | None) -> list[str]:
    """The index of the device folders from every device's summary ``frame`` (None: no folder yet): per device
    and mode its fast_p, any contended warning, then per mode each block's best variant on every device."""
    if frame is None:
        return [*_INDEX_INTRO, "No device reports yet.", ""]
    devices = sorted(set(frame["device_slug"]))
    return [*_INDEX_INTRO, *_index_fast_p_lines(frame, devices), *_index_best_lines(frame, devices)]


def _index_fast_p_lines(frame: pd.DataFrame, devices: list[str]) -> list[str]:
    names = frame.drop_duplicates("device_slug").set_index("device_slug")["device_name"]
    heads = " | ".join(f"fast_{p:g}" for p in FAST_P_THRESHOLDS)
    lines = [f"| device | folder | mode | pairs | {heads} |", "|---|---|---|---:|" + "---:|" * len(FAST_P_THRESHOLDS)]
    for d in devices:
        cells = frame[frame["device_slug"] == d]
        for mode in modes_of(cells[cells["kind"] != "kernel"]):
            summary = fast_p(cells[cells["mode"] == mode])
            lines.append(f"| {names[d]} | [{d}/]({d}/README.md) | {mode} | {summary['pairs']} | "
                         f"{_fast_p_values(summary)} |")
    lines.append("")
    for d in devices:
        contended = contended_line(frame[frame["device_slug"] == d])
        if contended:
            lines += [f"`{d}`: {contended}", ""]
    return lines


def _index_best_lines(frame: pd.DataFrame, devices: list[str]) -> list[str]:
    best = best_variants(frame[frame["kind"] != "kernel"])
    lines: list[str] = []
    for mode in modes_of(frame):
        blocks = sorted(set(frame[(frame["mode"] == mode) & (frame["kind"] != "kernel")]["block"]))
        if not blocks:
            continue
        lines += [f"## {mode.capitalize()}", "", "| block | " + " | ".join(f"`{d}`" for d in devices) + " |",
                  "|---|" + "---|" * len(devices)]
        mode_best = best[best["mode"] == mode] if not best.empty else best
        for block in blocks:
            cells = [_index_best_cell(mode_best, block, device) for device in devices]
            lines.append(f"| `{block}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _index_best_cell(mode_best: pd.DataFrame, block: str, device: str) -> str:
    rows = mode_best[(mode_best["block"] == block) & (mode_best["device_slug"] == device)] \
        if not mode_best.empty else mode_best
    if rows.empty:
        return "—"
    r = rows.loc[rows["speedup_vs_eager"].idxmax()]
    if r["variant"] == REFERENCE_VARIANT:
        text = "`eager` (no variant faster beyond noise)"
    else:
        text = f"{ratio_text(r['speedup_vs_eager'], r['speedup_ci_low'], r['speedup_ci_high'])} `{r['variant']}`"
    return f"{text} (batch {r['batch']}){_flag_text(r)}"
