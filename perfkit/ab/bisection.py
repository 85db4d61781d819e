"""``perfkit bisect GOOD BAD --cells PATTERN``: the first commit where a cell slowed, each step an A/B.

The commits strictly after GOOD up to BAD (``git rev-list --ancestry-path``) are searched by halves. BAD is
measured against GOOD first: only the cells slower there are followed, and a range where none is slower
has nothing to find (exit 2). Each step is an interleaved A/B of GOOD (one worker, kept for the whole
search) against the middle commit (a worktree and worker of its own); a step where a followed cell is
slower moves the bad end, any other verdict the good end (said per step: an inconclusive step is a guess
the next steps test). A contended step is judged on its paired interval, and says it was contended. The
commit found is printed with the A/B that convicts it.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
from pathlib import Path

from perfkit.ab.command import add_matrix_arguments, measure, resolve_settings
from perfkit.ab.format import render_text
from perfkit.ab.run import AbSettings, CellResult, verdict
from perfkit.ab.worker import Worker, WorkerError
from perfkit.ab.worktree import AbInputError, Side, checkout, commit_subject, repository_root, resolve_commit
from perfkit.matrix.options import OptionError


def add_bisect_arguments(p: argparse.ArgumentParser) -> None:
    """``perfkit bisect``'s arguments."""
    p.add_argument("good", help="a revision where the cells were fast")
    p.add_argument("bad", help="a later revision where they are slow (a descendant of GOOD)")
    p.add_argument("--cells", required=True, help="glob over cells block/variant/mode/dtype/bN, e.g. "
                   "'basic/eager/*' (only the cells slower at BAD are followed)")
    add_matrix_arguments(p)


def commits_between(repo: Path, good: str, bad: str) -> list[str]:
    """The commits after ``good`` up to and including ``bad``, oldest first; bad input unless GOOD precedes BAD."""
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", good, bad], cwd=repo)
    if ancestor.returncode != 0 or good == bad:
        raise AbInputError(f"GOOD {good[:12]} is not an ancestor of BAD {bad[:12]}: give an older good commit")
    listed = subprocess.run(["git", "rev-list", "--reverse", "--ancestry-path", f"{good}..{bad}"], cwd=repo,
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


class Bisection:
    """GOOD's worker, kept for the whole search, and one A/B against any commit of the range."""

    def __init__(self, repo: Path, good: Side, args: argparse.Namespace, settings: AbSettings) -> None:
        self.repo = repo
        self.good = good
        self.args = args
        self.settings = settings
        self.worker = Worker("GOOD", good.root, settings.threads, settings.device)

    def ab(self, commit: str, cells: list[str]) -> tuple[Side, list[CellResult]]:
        """GOOD against ``commit`` over the cells whose names match one of ``cells``."""
        with checkout(self.repo, "HEAD", commit) as side:
            worker = Worker("HEAD", side.root, self.settings.threads, self.settings.device)
            try:
                self.settings, results = measure((self.worker, worker), self.args, self.settings,
                                                 select=lambda name: any(fnmatch.fnmatchcase(name, c) for c in cells))
            finally:
                worker.close()
        return side, results

    def close(self) -> None:
        """Stop GOOD's worker."""
        self.worker.close()


def _slower(results: list[CellResult], threshold: float) -> list[str]:
    """The cells slower at ``threshold``. A contended cell counts by its paired interval: a bisection needs
    a yes or no at every step, and pairing keeps the ratio honest when the machine is busy (an A/A beside
    other work read 0.99 [0.98, 0.99]); the step's line says it was contended."""
    return [r.spec.name for r in results if r.verdict == "slower"
            or (r.verdict == "contended" and verdict(r.ratio_low, r.ratio_high, threshold) == "slower")]


def _search(bisection: Bisection, commits: list[str], cells: list[str],
            convicting: tuple[Side, list[CellResult]]) -> tuple[str, Side, list[CellResult]]:
    """Halve ``commits`` (the last known slow) to the first slow one; that commit and its A/B."""
    low, high = -1, len(commits) - 1
    while high - low > 1:
        middle = (low + high) // 2
        side, results = bisection.ab(commits[middle], cells)
        slower = _slower(results, bisection.settings.threshold)
        verdicts = ", ".join(f"{r.spec.name} {r.verdict or r.status}" for r in results)
        print(f"perfkit bisect: {commits[middle][:12]} ({high - low - 1} left): {verdicts} -> "
              f"{'slow' if slower else 'not slow'}", file=sys.stderr)
        if slower:
            high, convicting = middle, (side, results)
        else:
            low = middle
    return commits[high], *convicting


def run_bisect(args: argparse.Namespace) -> int:
    """``perfkit bisect``: print the first slow commit and the A/B that convicts it; 2 on bad input."""
    try:
        settings = resolve_settings(args)
        repo = repository_root(Path.cwd())
        good, bad = resolve_commit(repo, args.good), resolve_commit(repo, args.bad)
        commits = commits_between(repo, good, bad)
        with checkout(repo, "GOOD", good) as good_side:
            bisection = Bisection(repo, good_side, args, settings)
            try:
                print(f"perfkit bisect: {len(commits)} commits after {good[:12]}; BAD first", file=sys.stderr)
                bad_side, results = bisection.ab(bad, [args.cells])
                cells = _slower(results, bisection.settings.threshold)
                if not cells:
                    raise AbInputError(f"no cell matching {args.cells!r} is slower at BAD {bad[:12]} than at GOOD "
                                       f"{good[:12]} at ±{bisection.settings.threshold:.0%}: nothing to bisect\n"
                                       + render_text(results, good_side, bad_side, bisection.settings.threshold))
                first, side, convicting = _search(bisection, commits, cells, (bad_side, results))
            finally:
                bisection.close()
    except (AbInputError, OptionError, WorkerError) as error:
        print(f"perfkit bisect: {error}", file=sys.stderr)
        return 2
    print(f"first slow commit: {first} {commit_subject(repo, first)}")
    print(render_text(convicting, good_side, side, settings.threshold), end="")
    return 0
