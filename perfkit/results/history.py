"""Regression history across commits: ``perfkit history [STORAGE] [--device D] [--cells PATTERN]``.

Runs are kept the way pytest-benchmark keeps them (``--benchmark-autosave``, ``--benchmark-storage``: one JSON
per run, so ``pytest-benchmark list`` and ``compare`` read them too). This module orders them by commit date
and follows each cell's median step time over the commits:

- every run gives the cell a point: the median of its rounds and the distribution-free 95% interval of that
  median (order statistics), in log space so a step reads as a ratio;
- a point's uncertainty is the larger of that interval's and the run-to-run scatter of the series (the
  median absolute deviation of successive differences, which a single step or a steady drift does not
  inflate): runs timed minutes apart differ by more than their own rounds say;
- steps are found by binary segmentation into constant pieces (the piecewise-constant model asv fits, found
  greedily): the split whose two medians differ most in units of their standard errors is kept when that
  difference exceeds ``STEP_Z`` and two constant pieces fit the stretch better (least absolute deviations)
  than one straight line; then each piece is searched again. A piece has at least two runs, except the
  newest, which may be the latest run alone: that is the run a CI gate must judge. Each step names the first
  commit after it;
- a piece without a step whose last third's median differs from its first third's beyond ``DRIFT_Z`` is a
  drift, reported with its slope per commit (Theil-Sen), never as a step.

The intervals and fits are ``perfkit.stats``'s; this module holds the thresholds, the runs and the output.

Exit status: 1 when the latest run of some cell sits on a step slower by more than the threshold, 0
otherwise, 2 on bad input. Drift is reported, not gated.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perfkit.record import Record
from perfkit.results.load import ResultsError, device_slug, load_results
from perfkit.results.plots import pyplot
from perfkit.stats import find_drift, find_steps, log_se, median_interval, run_scatter

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_STORAGE = ".benchmarks"
"""pytest-benchmark's default ``--benchmark-storage``."""
STEP_Z = 4.0
"""Standard errors two pieces' medians must differ by to be a step. The split is the best of up to n
candidates in each of many cells, so the bar is above the 1.96 of a single test: with it, twenty A/A runs
resampled from a real quick-profile run show no step in any of its 41 cells."""
DRIFT_Z = 3.0
"""Standard errors a piece's last third must differ from its first by to be reported as a drift."""


class HistoryError(ValueError):
    """Storage that cannot be read as a history of runs; the message says what and where."""


@dataclass
class Run:
    """One stored run: where it is, its commit and when that commit was made."""

    path: str
    commit: str
    commit_time: str
    datetime: str
    records: list[Record]


@dataclass
class Point:
    """One cell in one run: its median step time and the 95% interval of that median."""

    run: int
    commit: str
    median_s: float
    ci_low_s: float
    ci_high_s: float


@dataclass
class Step:
    """A change point: from ``index`` (the first run after it, at ``commit``) the median moved by ``ratio``."""

    index: int
    commit: str
    before_s: float
    after_s: float
    z: float

    @property
    def ratio(self) -> float:
        """The median after the step over the median before it (above 1: slower)."""
        return self.after_s / self.before_s


@dataclass
class Drift:
    """A steady change over points ``start``..``end`` (inclusive), ``per_commit`` relative change per run."""

    start: int
    end: int
    per_commit: float
    z: float


@dataclass
class CellHistory:
    """One cell's series over the runs and what was found in it."""

    device: str
    cell: str
    points: list[Point]
    steps: list[Step] = field(default_factory=list)
    drifts: list[Drift] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``device:block/variant/mode/dtype/bN``."""
        return f"{self.device}:{self.cell}"

    def regression(self, threshold: float, latest_run: int) -> Step | None:
        """The step the run ``latest_run`` sits on, when it made the cell slower by more than ``threshold``.

        None when the cell was not measured in that run: a cell that stopped running is not a timing.
        """
        if not self.steps or self.points[-1].run != latest_run:
            return None
        last = self.steps[-1]
        return last if last.ratio > 1 + threshold else None


# --------------------------------------------------------------------------------------------- analysis

def analyse(device: str, cell: str, points: list[Point]) -> CellHistory:
    """Steps and drifts of one cell's series of points (ordered by commit)."""
    history = CellHistory(device, cell, points)
    y = np.log([p.median_s for p in points])
    within = np.array([log_se(p.ci_low_s, p.ci_high_s) for p in points])
    u = np.maximum(within, run_scatter(y))
    bounds = [0]
    for index, z in find_steps(y, u, STEP_Z):
        before = float(np.exp(np.median(y[bounds[-1]:index])))
        bounds.append(index)
        history.steps.append(Step(index, points[index].commit, before, 0.0, z))
    bounds.append(len(points))
    for step, (lo, hi) in zip(history.steps, zip(bounds[1:-1], bounds[2:], strict=True), strict=True):
        step.after_s = float(np.exp(np.median(y[lo:hi])))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        drift = find_drift(y[lo:hi], u[lo:hi], DRIFT_Z)
        if drift:
            history.drifts.append(Drift(lo, hi - 1, *drift))
    return history


# ---------------------------------------------------------------------------------------------- storage

def _run_files(storage: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in storage:
        path = Path(str(item).removeprefix("file://"))
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise HistoryError(f"{path}: no such file or folder (give pytest-benchmark's --benchmark-storage "
                               f"folder, default {DEFAULT_STORAGE}, or run JSON files)")
    if not files:
        raise HistoryError(f"no run JSON in {', '.join(map(str, storage))}; store runs with "
                           "`pytest benchmarks/ --benchmark-autosave --benchmark-storage=DIR`")
    return files


def load_runs(storage: Sequence[str | Path]) -> list[Run]:
    """Every stored run, ordered by commit date (then run date); HistoryError names a file that is not one."""
    runs = []
    for path in _run_files(storage):
        try:
            results = load_results(path)
        except ResultsError as exc:
            raise HistoryError(str(exc)) from None
        if not results.run:
            raise HistoryError(f"{path}: not a pytest-benchmark run (no commit_info or datetime): history "
                               "needs runs stored by --benchmark-autosave or --benchmark-json")
        run = results.run
        runs.append(Run(str(path), run.get("commit") or "unknown", run.get("commit_time") or run.get("datetime", ""),
                        run.get("datetime", ""), results.records))
    runs.sort(key=lambda r: (r.commit_time, r.datetime))
    return runs


def cell_id(record: Record) -> str:
    """``block/variant/mode/dtype/bN``: what ``--cells`` globs match."""
    return f"{record.block}/{record.variant}/{record.mode}/{record.dtype}/b{record.batch}"


def histories(runs: list[Run], device: str = "*", cells: str = "*") -> list[CellHistory]:
    """One analysed series per timed cell matching the ``device`` and ``cells`` globs."""
    series: dict[tuple[str, str], list[Point]] = {}
    for index, run in enumerate(runs):
        for record in run.records:
            slug, name = device_slug(record.device), cell_id(record)
            if record.status != "ok" or not fnmatch.fnmatchcase(slug, device) or not fnmatch.fnmatchcase(name, cells):
                continue
            if record.times_s:
                low, median, high = median_interval(record.times_s)
            elif record.step_time_median_s:
                median = low = high = record.step_time_median_s
            else:
                continue
            series.setdefault((slug, name), []).append(Point(index, run.commit, median, low, high))
    return [analyse(slug, name, points) for (slug, name), points in sorted(series.items())]


# ----------------------------------------------------------------------------------------------- output

def _short(commit: str) -> str:
    return commit[:10]


def plot_histories(found: list[CellHistory], runs: list[Run], out_dir: Path) -> list[Path]:
    """One PNG per device, block and mode: each cell's median and interval over the commits, steps marked."""
    plt = pyplot()
    groups: dict[tuple[str, str, str], list[CellHistory]] = {}
    for history in found:
        block, _, mode, _, _ = history.cell.split("/")
        groups.setdefault((history.device, block, mode), []).append(history)
    written = []
    for (device, block, mode), members in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(runs) + 2), 4.0))
        for history in members:
            x = [p.run for p in history.points]
            median = np.array([p.median_s for p in history.points]) * 1e3
            low = median - np.array([p.ci_low_s for p in history.points]) * 1e3
            high = np.array([p.ci_high_s for p in history.points]) * 1e3 - median
            variant, _, dtype, batch = history.cell.split("/")[1:]
            line = ax.errorbar(x, median, yerr=[low, high], marker="o", ms=3, capsize=2, lw=1,
                               label=f"{variant} {dtype} {batch}")
            for step in history.steps:
                at = history.points[step.index].run - 0.5
                ax.axvline(at, color=line[0].get_color(), ls="--", lw=1)
                ax.annotate(f"{step.ratio - 1:+.0%} at {_short(step.commit)}", (at, median.max()),
                            fontsize=7, rotation=90, va="top", ha="right")
        ax.set_xticks(range(len(runs)), [_short(r.commit)[:7] for r in runs], rotation=90, fontsize=7)
        ax.set_yscale("log")  # variants differ by orders of magnitude; a step reads as the same height anywhere
        ax.set_xlabel("commit (ordered by commit date)")
        ax.set_ylabel("median step time (ms), 95% interval")
        ax.set_title(f"{device}: {block} {mode}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{device}-{block.replace(':', '_')}-{mode}.png"  # no colon from tv:/timm: names
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def render(found: list[CellHistory], runs: list[Run], threshold: float) -> tuple[list[str], list[str]]:
    """``(report lines, regressed lines)``: every step and drift, then the plain list of regressed cells."""
    lines = [f"{len(runs)} runs from {_short(runs[0].commit)} to {_short(runs[-1].commit)} (by commit date), "
             f"{len(found)} cells; steps beyond noise (z > {STEP_Z:g}), regression gate at +{threshold:.0%}."]
    for history in found:
        for step in history.steps:
            run = history.points[step.index].run + 1
            lines.append(f"step   {history.label}: {step.ratio - 1:+.1%} ({step.before_s * 1e3:.3g} -> "
                         f"{step.after_s * 1e3:.3g} ms) first at {step.commit} (run {run}, z {step.z:.1f})")
        for drift in history.drifts:
            first, last = history.points[drift.start].run + 1, history.points[drift.end].run + 1
            lines.append(f"drift  {history.label}: {drift.per_commit:+.2%} per commit over runs {first}..{last} "
                         f"(not a step; z {drift.z:.1f})")
    if len(lines) == 1:
        lines.append("No step and no drift.")
    regressed = []
    for history in found:
        step = history.regression(threshold, len(runs) - 1)
        if step:
            regressed.append(f"{history.label} {step.ratio - 1:+.1%} since {step.commit}")
    return lines, regressed


def run_history(storage: Sequence[str], *, device: str = "*", cells: str = "*", threshold: float = 0.05,
                out_dir: str | Path = "out/history") -> tuple[int, str]:
    """What ``perfkit history`` prints and its exit status (0 fine, 1 the latest run regressed, 2 bad input)."""
    try:
        runs = load_runs(storage)
        found = histories(runs, device, cells)
    except HistoryError as exc:
        return EXIT_BAD_INPUT, f"perfkit history: {exc}"
    if not found:
        devices = sorted({device_slug(r.device) for run in runs for r in run.records})
        return EXIT_BAD_INPUT, (f"perfkit history: no timed cell matches --device {device!r} and --cells {cells!r}; "
                                f"devices: {', '.join(devices)}; cells look like basic/eager/training/float32/b8")
    plots = plot_histories(found, runs, Path(out_dir))
    lines, regressed = render(found, runs, threshold)
    lines.append(f"plots: {len(plots)} PNG in {out_dir}/")
    if regressed:
        lines += ["", f"REGRESSED ({len(regressed)}): the latest run sits on a step slower than +{threshold:.0%}",
                  *regressed]
    return (EXIT_REGRESSION if regressed else EXIT_OK), "\n".join(lines) + "\n"
