"""Regression tracking: ``perfkit compare BASE NEW [--threshold 5%]``.

Cells of the two runs are matched by their parameters (kind, block, variant, mode, dtype, batch) and their
device. For each timed pair: the ratio of median step times NEW/BASE with a bootstrap confidence interval
from the stored rounds, widened to the records' repeat intervals (:func:`repeat_interval`), a Mann-Whitney U
p-value (normal approximation, as asv uses a rank test; both in ``perfkit.stats``), and a verdict against the
threshold band ``[1/(1+t), 1+t]``, symmetric in log space as asv's ``--factor`` is:

- ``slower`` (a regression): the whole interval above ``1+t``;
- ``faster``: the whole interval below ``1/(1+t)``;
- ``unchanged``: the whole interval inside the band;
- ``noisy`` (too noisy to tell): the interval straddles an edge of the band;
- ``contended`` (not judged): either run's cell was timed while other processes took its cores
  (``perfkit.env.machine``): its ratio is shown, and it is never a regression, nor evidence of none;
- ``threads`` (not judged): the two cells ran with different intra-op thread counts (a busy machine makes
  the default choose fewer), so the ratio measures the threads, not the change.

Deterministic counters (FLOPs, parameters, bytes moved, and the peak memory when its method is exact)
are compared exactly; any increase is a regression. A cell that was ok and now fails, runs out of memory
or raises is a regression too. Exit status: 0 no regression, 1 regression, 2 bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perfkit.record import Record
from perfkit.results.load import ResultsError, device_name, device_slug, load_results, memory_is_exact
from perfkit.stats import CONFIDENCE, bootstrap_ratio_ci, mann_whitney_p

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
COUNTERS = ("flops_per_step", "params", "bytes_per_step", "peak_memory_rise_bytes")


class CompareError(ValueError):
    """Inputs that cannot be compared; the message says which and why."""


def parse_threshold(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05; a threshold must be positive."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"threshold {text!r} is not a number; give e.g. 5% or 0.05") from None
    if not value > 0:
        raise ValueError(f"threshold {text!r} must be positive, e.g. 5% or 0.05")
    return value


def _key(record: Record, cross_device: bool) -> tuple:
    params = (record.kind, record.block, record.variant, record.mode, record.dtype, record.batch)
    return params if cross_device else (device_slug(record.device), *params)


def _label(key: tuple, cross_device: bool) -> str:
    kind, block, variant, mode, dtype, batch = key if cross_device else key[1:]
    return f"{block} {variant} {mode} {dtype} b{batch}" + ("" if kind == "block" else f" [{kind}]")


# --------------------------------------------------------------------------------------------- verdicts

def repeat_interval(ratio: float, low: float, high: float, base: Record, new: Record) -> tuple[float, float]:
    """The NEW/BASE interval a verdict may trust: the rounds' bootstrap ``[low, high]``, widened to the
    larger of the two records' repeat intervals (``step_time_repeat_rel``). The bootstrap speaks of these
    two runs' rounds only; two runs in fresh processes differ by more
    (docs/methodology.md, "What the intervals mean")."""
    repeats = [r.step_time_repeat_rel for r in (base, new) if r.step_time_repeat_rel]
    if not repeats:
        return low, high
    widest = max(repeats)
    return min(low, ratio / (1 + widest)), max(high, ratio * (1 + widest))


def verdict(low: float, high: float, threshold: float) -> str:
    """``slower``, ``faster``, ``unchanged`` or ``noisy`` for an interval of the NEW/BASE ratio."""
    upper, lower = 1 + threshold, 1 / (1 + threshold)
    if low > upper:
        return "slower"
    if high < lower:
        return "faster"
    if lower <= low and high <= upper:
        return "unchanged"
    return "noisy"


# -------------------------------------------------------------------------------------------- comparing

@dataclass
class TimingRow:
    """The timing comparison of one cell."""

    label: str
    base_median_s: float
    new_median_s: float
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


@dataclass
class Finding:
    """A cell-level change outside the timings: a counter that moved, a status that changed."""

    label: str
    what: str
    base: object
    new: object
    regression: bool


@dataclass
class Comparison:
    """Everything ``perfkit compare`` found; ``regressions`` decides the exit status."""

    base_path: str
    new_path: str
    threshold: float
    cross_device: bool
    devices: tuple[str, str]
    timings: list[TimingRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unmatched_base: list[str] = field(default_factory=list)
    unmatched_new: list[str] = field(default_factory=list)

    @property
    def common_shift(self) -> float | None:
        """The median NEW/BASE ratio over the judged cells (None without any): how far the whole run moved."""
        ratios = [t.ratio for t in self.timings if t.verdict not in ("contended", "threads")]
        return float(np.median(ratios)) if ratios else None

    @property
    def regressions(self) -> list[str]:
        """Labels of every regression: slower cells, counters that rose, cells that stopped working."""
        return [t.label for t in self.timings if t.verdict == "slower"] + [
            f"{f.label}: {f.what}" for f in self.findings if f.regression]


def _cells(records: list[Record], path: str, cross_device: bool) -> dict[tuple, Record]:
    cells: dict[tuple, Record] = {}
    for record in records:
        key = _key(record, cross_device)
        if key in cells and cross_device and device_slug(cells[key].device) != device_slug(record.device):
            raise CompareError(f"{path} holds the cell {_label(key, True)} for several devices; "
                               "--allow-cross-device needs one device per file")
        cells.pop(key, None)
        cells[key] = record  # the last record of a cell wins, as in the report
    return cells


def _compare_counters(label: str, base: Record, new: Record, findings: list[Finding]) -> None:
    for counter in COUNTERS:
        before, after = getattr(base, counter), getattr(new, counter)
        if before is None or after is None or before == after:
            continue
        if counter == "peak_memory_rise_bytes":
            if base.memory_method != new.memory_method or not memory_is_exact(base):
                continue
        findings.append(Finding(label, counter, before, after, regression=after > before))


def compare_records(base: list[Record], new: list[Record], *, threshold: float = 0.05,
                    cross_device: bool = False, base_path: str = "BASE", new_path: str = "NEW") -> Comparison:
    """Compare two runs cell by cell; CompareError if their devices differ (unless ``cross_device``) or
    they have no cell in common."""
    base_devices = sorted({device_slug(r.device) for r in base})
    new_devices = sorted({device_slug(r.device) for r in new})
    if not base or not new:
        raise CompareError(f"{base_path if not base else new_path} holds no benchmark cells")
    if not cross_device and not set(base_devices) & set(new_devices):
        names = lambda rs: ", ".join(sorted({device_name(r.device) for r in rs}))  # noqa: E731
        raise CompareError(
            f"{base_path} ran on {names(base)} and {new_path} on {names(new)}: step times from different "
            "devices measure the hardware, not the change, so they are not compared. Compare runs from the "
            "same device, or pass --allow-cross-device to see the ratios anyway (no regression is then "
            "trusted to mean the code got slower).")
    base_cells, new_cells = _cells(base, base_path, cross_device), _cells(new, new_path, cross_device)
    common = [k for k in base_cells if k in new_cells]
    if not common:
        raise CompareError(f"{base_path} and {new_path} have no cell in common (matched by device, kind, block, "
                           f"variant, mode, dtype and batch; {len(base_cells)} and {len(new_cells)} cells)")
    comparison = Comparison(base_path, new_path, threshold, cross_device,
                            (", ".join(base_devices), ", ".join(new_devices)))
    comparison.unmatched_base = [_label(k, cross_device) for k in base_cells if k not in new_cells]
    comparison.unmatched_new = [_label(k, cross_device) for k in new_cells if k not in base_cells]
    for key in common:
        b, n = base_cells[key], new_cells[key]
        label = _label(key, cross_device)
        if b.status != n.status:
            broke = b.status == "ok" and n.status in ("failed", "oom", "error", "impossible")
            comparison.findings.append(Finding(label, "status", b.status, n.status, regression=broke))
        _compare_counters(label, b, n, comparison.findings)
        if b.status == n.status == "ok" and b.times_s and n.times_s:
            comparison.timings.append(_timing_row(label, b, n, threshold))
    return comparison


def _timing_row(label: str, base: Record, new: Record, threshold: float) -> TimingRow:
    """The step-time comparison of one cell timed in both runs."""
    base_median, new_median = float(np.median(base.times_s)), float(np.median(new.times_s))
    ratio = new_median / base_median
    low, high = repeat_interval(ratio, *bootstrap_ratio_ci(base.times_s, new.times_s), base, new)
    if base.contended or new.contended:
        judged = "contended"
    elif base.threads is not None and new.threads is not None and base.threads != new.threads:
        judged = "threads"
    else:
        judged = verdict(low, high, threshold)
    return TimingRow(label, base_median, new_median, ratio, low, high, mann_whitney_p(base.times_s, new.times_s),
                     judged)


# -------------------------------------------------------------------------------------------- rendering

def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


VERDICT_TEXT = {"slower": "SLOWER (regression)", "faster": "faster", "unchanged": "unchanged",
                "noisy": "too noisy to tell", "contended": "contended: not judged",
                "threads": "threads differ: not judged"}


COMMON_SHIFT_MIN_CELLS = 8
"""A run-wide shift is only told apart from a few cells' changes where there are this many cells."""


def _summary(c: Comparison) -> str:
    counts = {v: sum(t.verdict == v for t in c.timings) for v in VERDICT_TEXT}
    text = (f"{len(c.timings)} timed cells compared at ±{c.threshold:.0%}: " + ", ".join(
        f"{n} {VERDICT_TEXT[v]}" for v, n in counts.items() if n) + ".")
    regressions = c.regressions
    text += f" {len(regressions)} regression(s)." if regressions else " No regression."
    shift = c.common_shift
    if shift is not None and len(c.timings) >= COMMON_SHIFT_MIN_CELLS and \
            not 1 / (1 + c.threshold) <= shift <= 1 + c.threshold:
        text += (f" The median cell moved by x{shift:.3f}: when every cell moves alike, the machine's speed "
                 "(another tenant, its clock) is a likelier cause than the code; time both commits side by "
                 "side (back-to-back runs on the same machine) before believing it.")
    return text


def render(c: Comparison, fmt: str = "markdown") -> str:
    """The comparison as a markdown report or aligned plain text."""
    header = ("cell", "base", "new", "new/base", f"{CONFIDENCE:.0%} CI", "p (U test)", "verdict")
    rows = [(t.label, _time(t.base_median_s), _time(t.new_median_s), f"{t.ratio:.3f}",
             f"[{t.ci_low:.3f}, {t.ci_high:.3f}]", f"{t.p_value:.3g}", VERDICT_TEXT[t.verdict])
            for t in sorted(c.timings, key=lambda t: (t.verdict != "slower", t.label))]
    finding_header = ("cell", "what", "base", "new", "regression")
    finding_rows = [(f.label, f.what, f"{f.base:,}" if isinstance(f.base, int) else str(f.base),
                     f"{f.new:,}" if isinstance(f.new, int) else str(f.new), "yes" if f.regression else "no")
                    for f in c.findings]
    devices = c.devices[0] if c.devices[0] == c.devices[1] else f"{c.devices[0]} vs {c.devices[1]}"
    intro = [f"Comparing {c.base_path} (base) with {c.new_path} (new) on {devices}"
             + (" (cross-device: ratios compare hardware as much as code)" if c.cross_device else "") + ".",
             _summary(c)]
    unmatched = []
    if c.unmatched_base:
        unmatched.append(f"Only in base ({len(c.unmatched_base)}): " + ", ".join(c.unmatched_base))
    if c.unmatched_new:
        unmatched.append(f"Only in new ({len(c.unmatched_new)}): " + ", ".join(c.unmatched_new))
    if fmt == "markdown":
        def table(head: tuple, body: list[tuple]) -> list[str]:
            return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    *("| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in body)]
        lines = ["# perfkit compare", "", *intro, "", "## Step time", ""]
        lines += table(header, rows) if rows else ["No cell was timed in both runs."]
        if finding_rows:
            lines += ["", "## Counters and status", "", *table(finding_header, finding_rows)]
        if unmatched:
            lines += ["", "## Unmatched cells", "", *(f"- {u}" for u in unmatched)]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ValueError(f"format {fmt!r} is not one of markdown, text")

    def aligned(head: tuple, body: list[tuple]) -> list[str]:
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        return ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    lines = [*intro, ""]
    lines += aligned(header, rows) if rows else ["No cell was timed in both runs."]
    if finding_rows:
        lines += ["", "Counters and status:", *aligned(finding_header, finding_rows)]
    if unmatched:
        lines += ["", *unmatched]
    return "\n".join(lines) + "\n"


def compare_files(base_path: str | Path, new_path: str | Path, *, threshold: float = 0.05,
                  cross_device: bool = False) -> Comparison:
    """Load two results files (pytest-benchmark JSON or JSON lines) and compare them."""
    base, new = load_results(base_path), load_results(new_path)
    return compare_records(base.records, new.records, threshold=threshold, cross_device=cross_device,
                           base_path=str(base_path), new_path=str(new_path))


def run_compare(base_path: str, new_path: str, *, threshold: float = 0.05, cross_device: bool = False,
                fmt: str = "markdown") -> tuple[int, str]:
    """What ``perfkit compare`` prints and its exit status: 0 no regression, 1 regression, 2 bad input."""
    try:
        comparison = compare_files(base_path, new_path, threshold=threshold, cross_device=cross_device)
    except (ResultsError, CompareError) as exc:
        return EXIT_BAD_INPUT, f"perfkit compare: {exc}"
    return (EXIT_REGRESSION if comparison.regressions else EXIT_OK), render(comparison, fmt)
