"""An A/B's verdicts as text (the terminal), markdown (a PR comment), or github (both, into the job's summary).

Regressions come first, then cells too close to call, contended ones, faster, unchanged, and last the cells
that were not timed (on one side only, skipped, failed). Each timed row has the HEAD/BASE ratio with its
95% paired interval, the minimal detectable effect, both medians, and (markdown) the command that
reproduces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from perfkit.ab.run import CellResult, CellSpec
from perfkit.ab.worktree import Side

FORMATS = ("text", "markdown", "github")
DEFAULT_COMMENT = "out/ab-comment.md"
"""Where ``--format github`` writes the PR comment unless ``--comment-file`` says otherwise."""

_ORDER = {"slower": 0, "inconclusive": 1, "contended": 2, "faster": 3, "unchanged": 4}


def ordered(results: list[CellResult]) -> list[CellResult]:
    """Regressions first, then inconclusive, contended, faster, unchanged, and the cells not timed."""
    return sorted(results, key=lambda r: _ORDER.get(r.verdict or "", 5))


def reproduce(base: Side, head: Side, spec: CellSpec, threshold: float, bench_shape: bool) -> str:
    """The command that runs this one cell's A/B again."""
    shape = " --shape bench" if bench_shape else ""
    return (f"perfkit ab {base.short} {head.short} --blocks {spec.block} --variants {spec.variant} "
            f"--modes {spec.mode} --batches {spec.batch} --threshold {threshold:.0%}{shape}")


def summary_line(results: list[CellResult], threshold: float) -> str:
    """``N cells at ±5%: 1 slower, ...``: the counts by verdict, and the cells not timed."""
    timed = [r for r in results if r.verdict]
    counts = [f"{sum(r.verdict == v for r in timed)} {v}" for v in _ORDER if any(r.verdict == v for r in timed)]
    untimed = len(results) - len(timed)
    text = f"{len(timed)} cells timed at ±{threshold:.0%}: {', '.join(counts) or 'none'}"
    changed = sum(1 for r in timed if (r.outputs or "").startswith("CHANGED"))
    if changed:
        text += f"; outputs CHANGED in {changed}"
    return text + (f"; {untimed} not timed (listed below)" if untimed else "")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _row(r: CellResult) -> list[str]:
    if not r.verdict:
        return [r.spec.name, r.status, "-", "-", "-", "-", "-", r.reason or ""]
    verdict = r.verdict.upper() if r.verdict == "slower" else r.verdict
    return [r.spec.name, verdict, f"{r.ratio:.3f} [{r.ratio_low:.3f}, {r.ratio_high:.3f}]",
            f"±{r.detectable_rel:.1%}", _ms(r.base_median_s), _ms(r.head_median_s), str(r.pairs),
            r.outputs + (f"; contended: {r.contended_reason}" if r.contended_reason else "")]


HEADER = ["cell", "verdict", "HEAD/BASE [95%]", "detectable", "BASE ms", "HEAD ms", "pairs", "outputs"]


def render_text(results: list[CellResult], base: Side, head: Side, threshold: float) -> str:
    """A plain table for the terminal."""
    rows = [HEADER] + [_row(r) for r in ordered(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = [f"perfkit ab {base.spec} ({base.short}) -> {head.spec} ({head.short}): "
             f"{summary_line(results, threshold)}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(results: list[CellResult], base: Side, head: Side, threshold: float,
                    bench_shape: bool) -> str:
    """A markdown table ready to post as a PR comment, each timed row with its reproducing command."""
    regressions = sum(r.verdict == "slower" for r in results)
    title = f"{regressions} regression(s)" if regressions else "no regression"
    lines = [f"### perfkit ab: {title}", "",
             f"`{base.spec}` ({base.short}) against `{head.spec}` ({head.short}), rounds interleaved on one "
             f"machine. {summary_line(results, threshold)}.", "",
             "| " + " | ".join([*HEADER, "reproduce"]) + " |", "|" + " --- |" * (len(HEADER) + 1)]
    for r in ordered(results):
        command = f"`{reproduce(base, head, r.spec, threshold, bench_shape)}`" if r.verdict else ""
        lines.append("| " + " | ".join([*(c.replace("|", "\\|") for c in _row(r)), command]) + " |")
    lines += ["", "HEAD/BASE is HEAD's step time over BASE's (median over interleaved pairs; above 1 is slower), "
              "with its 95% bootstrap interval; a regression is a cell whose whole interval lies beyond "
              f"+{threshold:.0%}. *detectable*: the smallest change these rounds tell from noise 80% of the "
              "time. A contended cell ran beside other work and is not judged."]
    return "\n".join(lines) + "\n"


def write_github(markdown: str, comment_file: Path) -> list[Path]:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` (when set) and write it to ``comment_file``."""
    written = []
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(markdown)
        written.append(Path(summary))
    comment_file.parent.mkdir(parents=True, exist_ok=True)
    comment_file.write_text(markdown)
    written.append(comment_file)
    return written


def write_json(results: list[CellResult], base: Side, head: Side, path: Path) -> None:
    """Every cell's result as JSON: ``{"base": ..., "head": ..., "cells": [{"cell": name, ...}, ...]}``."""
    cells = [{"cell": r.spec.name, **dataclasses.asdict(r)} for r in results]
    sides = {side.label.lower(): {"spec": side.spec, "commit": side.commit, "root": str(side.root)}
             for side in (base, head)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**sides, "cells": cells}, indent=1))
