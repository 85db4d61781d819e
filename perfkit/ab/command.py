"""``perfkit ab BASE HEAD``: its options (each parsed by the matrix's own ``parse_*``), the run, the output.

Exit status: 0 no regression, 1 a regression (a judged cell whose whole interval lies beyond the
threshold), 2 bad input (an unknown revision, a dirty checkout without ``--allow-dirty``, a bad option, a
side whose perfkit cannot be measured). A cell only one side has is listed, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

from perfkit.ab.format import DEFAULT_COMMENT, FORMATS, render_markdown, render_text, write_github, write_json
from perfkit.ab.run import AB_POLICY, AbSettings, CellResult, Workers, cell_specs, exit_status, run_cells
from perfkit.ab.worker import Worker, WorkerError
from perfkit.ab.worktree import AbInputError, open_sides
from perfkit.matrix.options import (
    OptionError,
    parse_batches,
    parse_blocks,
    parse_device,
    parse_modes,
    parse_threads,
    parse_variants,
)
from perfkit.matrix.profiles import PROFILES
from perfkit.results.compare import parse_threshold
from perfkit.variants import MODES

DEFAULT_BLOCKS = PROFILES["quick"].blocks
"""The blocks an A/B covers unless ``--blocks`` (or ``PERFKIT_BLOCKS``) says otherwise: the quick profile's."""
MATRIX_ENV = {"blocks": "PERFKIT_BLOCKS", "variants": "PERFKIT_VARIANTS", "modes": "PERFKIT_MODES",
              "batches": "PERFKIT_BATCHES", "device": "PERFKIT_DEVICE", "threads": "PERFKIT_THREADS"}
"""The matrix's variables, read where the option is not given, through the same parsers as the matrix's."""


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``ab`` and ``bisect`` share: which cells, on what, at which threshold and budget."""
    p.add_argument("--blocks", help="comma-separated block names or globs (default: $PERFKIT_BLOCKS, else the "
                   f"quick profile's: {','.join(DEFAULT_BLOCKS)})")
    p.add_argument("--variants", help="comma-separated variants (default: $PERFKIT_VARIANTS, else eager)")
    p.add_argument("--modes", help=f"comma-separated modes from {', '.join(MODES)} (default: both)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 8)")
    p.add_argument("--shape", choices=("test", "bench"), help="the entries' small test shape or their benchmark "
                   "shape (default: bench on a GPU, test on a CPU, as the full and quick profiles)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when a GPU is present)")
    p.add_argument("--threads", help="intra-op threads of each side (default: the cores not kept busy by others)")
    p.add_argument("--threshold", default="5%", help="the change that counts (default: 5%%): a regression is a "
                   "cell whose whole interval lies beyond it")
    p.add_argument("--budget-s", type=float, default=AB_POLICY.max_time_s, help="most seconds of timed rounds "
                   f"per cell, both sides together (default: {AB_POLICY.max_time_s:g})")
    p.add_argument("--allow-dirty", action="store_true", help="measure the committed revisions even though the "
                   "checkout has uncommitted changes to tracked files")


def add_ab_arguments(p: argparse.ArgumentParser) -> None:
    """``perfkit ab``'s arguments."""
    p.add_argument("base", help="the BASE side: a git revision (origin/main, HEAD~3, a hash) or a checkout folder")
    p.add_argument("head", help="the HEAD side, likewise")
    add_matrix_arguments(p)
    p.add_argument("--format", choices=FORMATS, default="text", help="text (default); markdown; github: the "
                   "text here, and markdown to $GITHUB_STEP_SUMMARY and --comment-file")
    p.add_argument("--json", metavar="PATH", help="also write every cell's result (ratio, interval, rounds' "
                   "medians, machine load) to PATH as JSON")
    p.add_argument("--comment-file", default=DEFAULT_COMMENT, help="the PR comment --format github writes "
                   f"(default: {DEFAULT_COMMENT})")


def _given(args: argparse.Namespace, name: str) -> str | None:
    return getattr(args, name) or os.environ.get(MATRIX_ENV[name]) or None


def resolve_settings(args: argparse.Namespace) -> AbSettings:
    """The A/B's settings from the options, but for its blocks (:func:`resolve_blocks`, once the sides are up)."""
    from perfkit.env.machine import default_threads

    try:
        threshold = parse_threshold(args.threshold)
    except ValueError as error:
        raise OptionError(f"--threshold: {error}") from None
    if not args.budget_s > 0:
        raise OptionError(f"--budget-s {args.budget_s:g}: give a positive number of seconds, e.g. 20")
    device = parse_device(_given(args, "device"))
    return AbSettings(
        blocks=[], variants=parse_variants(_given(args, "variants")) or ["eager"],
        modes=parse_modes(_given(args, "modes"), MODES), batches=parse_batches(_given(args, "batches")) or [8],
        bench_shape=(args.shape or ("bench" if device.type == "cuda" else "test")) == "bench",
        device=str(device), threads=parse_threads(_given(args, "threads")) or default_threads(),
        threshold=threshold, policy=dataclasses.replace(AB_POLICY, max_time_s=args.budget_s,
                                                        min_time_s=min(AB_POLICY.min_time_s, args.budget_s)))


def resolve_blocks(args: argparse.Namespace, settings: AbSettings, workers: tuple[Worker, Worker]) -> AbSettings:
    """``settings`` with the blocks ``--blocks`` names among those either side registers."""
    registered = sorted(set(workers[0].hello["blocks"]) | set(workers[1].hello["blocks"]))
    return dataclasses.replace(settings, blocks=parse_blocks(_given(args, "blocks"), registered, DEFAULT_BLOCKS))


def _progress(result: CellResult) -> None:
    if result.verdict:
        print(f"  {result.spec.name}: {result.verdict} x{result.ratio:.3f} [{result.ratio_low:.3f}, "
              f"{result.ratio_high:.3f}] after {result.pairs} pairs, {result.wall_s:.1f} s", file=sys.stderr)
    else:
        print(f"  {result.spec.name}: {result.status}: {result.reason}", file=sys.stderr)


def measure(workers: tuple[Worker, Worker], args: argparse.Namespace, settings: AbSettings,
            select: Callable[[str], bool] = lambda _: True) -> tuple[AbSettings, list[CellResult]]:
    """The A/B on two started workers over the cells the options (and ``select``, on a cell's name) pick."""
    settings = resolve_blocks(args, settings, workers)
    chosen = [s for s in cell_specs(settings) if select(s.name)]
    if not chosen:
        raise OptionError("no cell matches the options (and --cells); `perfkit list` names the blocks")
    return settings, run_cells(workers[0], workers[1], settings, chosen, progress=_progress)


def run_ab(args: argparse.Namespace) -> int:
    """``perfkit ab``: measure, print, write the github files; the exit status."""
    try:
        settings = resolve_settings(args)
        with open_sides(args.base, args.head, allow_dirty=args.allow_dirty) as (base, head):
            print(f"perfkit ab: BASE {base.spec} ({base.short}), HEAD {head.spec} ({head.short})", file=sys.stderr)
            with Workers(base, head, settings) as workers:
                settings, results = measure(workers, args, settings)
            text = render_text(results, base, head, settings.threshold)
            markdown = render_markdown(results, base, head, settings.threshold, settings.bench_shape)
    except (AbInputError, OptionError, WorkerError) as error:
        print(f"perfkit ab: {error}", file=sys.stderr)
        return 2
    print(markdown if args.format == "markdown" else text, end="")
    if args.json:
        write_json(results, base, head, Path(args.json))
    if args.format == "github":
        for path in write_github(markdown, Path(args.comment_file)):
            print(f"wrote {path}")
    return exit_status(results)
