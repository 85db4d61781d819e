"""Per-device reports from benchmark results: ``perfkit report RESULTS... -o reports/``.

Reads pytest-benchmark JSON files (the record of each cell is its ``extra_info``) and perfkit's JSON-lines
files, groups the cells by device and writes, for each device, ``<out>/<device-slug>/README.md`` (a summary
with fast_p and geometric means, how and when it ran, the device, per mode the speedup, memory and
correctness tables with 95% intervals, the best variant per block, the kernels against the copy bandwidth,
the roofline), the same page as a self-contained ``index.html``, ``summary.csv`` and PNG plots with fixed
names, so a re-run replaces the report. ``<out>/README.md`` indexes every device folder found there.

A run writes under ``out/reports`` and compares each device with its committed report in ``reports/``;
only ``--publish`` (``make publish``) writes into ``reports/``.

The report reads only records (``perfkit.record``): never the code that produced them. This module writes the
files; ``load`` reads the records, ``frame`` computes the figures, ``text``, ``plots`` and ``html`` show them, and
``compare`` judges a run against the committed one.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from perfkit.record import Record
from perfkit.results.compare import CompareError, compare_records, render
from perfkit.results.frame import FLAGS, best_variants, memory_column, modes_of, roofline_points, summary_frame
from perfkit.results.html import markdown_to_html
from perfkit.results.load import (
    CEILINGS_FILE,
    Results,
    ResultsError,
    device_name,
    device_slug,
    load_results,
    merge_records,
    read_ceilings,
)
from perfkit.results.plots import plot_memory_bars, plot_roofline, plot_speedup_heatmap
from perfkit.results.text import (
    device_lines,
    head_lines,
    index_lines,
    kernel_lines,
    mode_lines,
    roofline_lines,
    run_lines,
    summary_lines,
)

# Files this module writes into a device folder; anything else there (the committed run JSON, the
# ceilings) is left alone, and these are removed first so a re-run leaves no stale plot behind.
GENERATED_PATTERNS = ("README.md", "summary.csv", "speedup-*.png", "memory-*.png", "roofline.png", "compare.md",
                      "index.html")
BASELINE_DIR = "reports"
"""The committed reports: each device folder's results JSON is that device's baseline. A run writes its report
elsewhere (``out/reports``) and compares against it; only ``--publish`` writes here."""
DEFAULT_OUTPUT = "out/reports"
"""Where a run writes its reports unless told otherwise."""


# ------------------------------------------------------------------------------------------ device page

@dataclass
class DevicePage:
    """One device's report folder while it is written: its cells, its ceilings and the README's lines so far."""

    folder: Path
    frame: pd.DataFrame
    ceilings: dict[str, float]
    lines: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> pd.DataFrame:
        """The page's block cells (kernels have a table of their own): the ones its mode sections show."""
        return self.frame[self.frame["kind"] != "kernel"]


def write_device_report(slug: str, frame: pd.DataFrame, results: Sequence[Results], records: Sequence[Record],
                        out_dir: Path, copy_gbps: float | None = None) -> Path:
    """Write ``out_dir/slug/`` (README.md, index.html, summary.csv, PNGs) for one device's cells; returns the
    folder. The phases below each add their files and their part of the page, in the page's order."""
    page = _open_folder(out_dir / slug, frame, copy_gbps)
    _write_head(page, slug, results, records)
    best = best_variants(page.blocks)
    for mode in modes_of(page.blocks):
        _write_mode(page, mode, best)
    _write_kernels_and_roofline(page)
    _write_pages(page, records[0].device)
    return page.folder


def _open_folder(folder: Path, frame: pd.DataFrame, copy_gbps: float | None) -> DevicePage:
    """The device folder, emptied of what an earlier report wrote there, and its ceilings."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in GENERATED_PATTERNS:
        for stale in folder.glob(pattern):
            stale.unlink()
    return DevicePage(folder, frame, read_ceilings(folder, copy_gbps))


def _write_head(page: DevicePage, slug: str, results: Sequence[Results], records: Sequence[Record]) -> None:
    """The raw cells (summary.csv, the device's results files) and the page's opening: title, summary, the
    runs and the device."""
    page.frame.to_csv(page.folder / "summary.csv", index=False)
    kept = _keep_results(results, slug, page.folder)
    device = records[0].device
    page.lines += [*head_lines(page.frame, device, kept), *summary_lines(page.frame), *run_lines(results, records),
                   *device_lines(device)]


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


def _write_mode(page: DevicePage, mode: str, best: pd.DataFrame) -> None:
    """One mode's plots and section."""
    cells = page.blocks[page.blocks["mode"] == mode]
    memory = memory_column(page.frame)
    heatmap = f"speedup-{mode}.png"
    plot_speedup_heatmap(cells, mode, page.folder / heatmap)
    bars = None
    if cells[memory].notna().any():
        bars = f"memory-{mode}.png"
        plot_memory_bars(cells, mode, memory, page.folder / bars)
    methods = sorted(set(page.frame["memory_method"].dropna()))
    page.lines += mode_lines(cells, mode, memory, methods, best, heatmap, bars)


def _write_kernels_and_roofline(page: DevicePage) -> None:
    """The kernels' table and the roofline, each where the page has cells for it."""
    kernels = page.frame[page.frame["kind"] == "kernel"]
    if not kernels.empty:
        page.lines += kernel_lines(kernels, page.ceilings)
    roof_blocks, roof_kernels = roofline_points(page.frame)
    if not (roof_blocks.empty and roof_kernels.empty):
        plot_roofline(roof_blocks, roof_kernels, page.ceilings, page.folder / "roofline.png")
        page.lines += roofline_lines(roof_blocks, roof_kernels, page.ceilings)


def _write_pages(page: DevicePage, device: dict[str, Any]) -> None:
    """README.md, and the same page as a self-contained index.html (written last: it embeds the plots)."""
    (page.folder / "README.md").write_text("\n".join(page.lines))
    title = f"perfkit report: {device_name(device)}"
    (page.folder / "index.html").write_text(markdown_to_html(page.lines, title, page.folder))


# ------------------------------------------------------------------------------------------------ index

def write_index(out_dir: Path) -> Path:
    """``out_dir/README.md``: per device its fast_p line, and the best variant per block on every device."""
    summaries = sorted(out_dir.glob("*/summary.csv"))
    frame = None
    if summaries:
        frame = pd.concat([pd.read_csv(summary) for summary in summaries], ignore_index=True)
        for column in ("speedup_ci_low", "speedup_ci_high", *FLAGS):
            if column not in frame:  # a summary.csv written before intervals and flags existed
                frame[column] = math.nan
    (out_dir / "README.md").write_text("\n".join(index_lines(frame)))
    return out_dir / "README.md"


# -------------------------------------------------------------------------------------- with a baseline

def compare_with_baseline(slug: str, records: Sequence[Record], baseline_dir: Path,
                          threshold: float = 0.05) -> str | None:
    """``perfkit compare``'s text for ``records`` against the committed report of the same device folder.

    None where ``baseline_dir/slug`` holds no results JSON (no committed report for this device yet).
    """
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
        comparison = None if baseline_dir is None or same else compare_with_baseline(
            slug, device_records, Path(baseline_dir))
        folder = write_device_report(slug, cells.reset_index(drop=True), results, device_records, out_dir,
                                     copy_gbps)
        if comparison is None and baseline_dir is not None and not same:
            others = sorted(p.parent.name for p in Path(baseline_dir).glob("*/README.md") if p.parent.name != slug)
            print(f"{slug}: no committed report in {baseline_dir}/{slug}/ to compare with "
                  "(`make publish` makes this run the baseline)"
                  + (f"; committed reports of other machines ({', '.join(others)}) are not compared: their "
                     "timings measure the hardware, not the change" if others else ""))
        elif comparison is not None:
            (folder / "compare.md").write_text("```\n" + comparison + "```\n")
            print(f"{slug}: against the committed report in {baseline_dir}/{slug}/\n{comparison}")
        written.append(folder)
    write_index(out_dir)
    return written
