"""The two sides of an A/B: a git revision checked out in a temporary worktree, or a checkout folder as is.

A revision gets ``git worktree add --detach`` in a temporary folder, removed (and pruned) afterwards, so
the user's checkout is never switched. A revision is resolved to its commit before anything runs: an
unknown one is bad input. A side named by a revision measures the *committed* tree, so a checkout with
uncommitted changes to tracked files is refused (without ``--allow-dirty``): the user would think the
edits were measured.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path


class AbInputError(ValueError):
    """Bad input to ``perfkit ab`` or ``perfkit bisect`` (exit status 2); the message says what and what would do."""


@dataclass(frozen=True)
class Side:
    """One side of an A/B: what the user named, and the checkout folder that holds its code."""

    label: str
    """``BASE`` or ``HEAD`` (``GOOD`` or a commit in a bisection)."""
    spec: str
    """The revision or folder as given."""
    root: Path
    commit: str | None
    """The full commit hash, or None for a folder that is not a git checkout."""

    @property
    def short(self) -> str:
        """The commit's first 12 digits, or the folder: what a reproducing command names."""
        return self.commit[:12] if self.commit else str(self.root)


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def repository_root(where: Path) -> Path:
    """The top folder of the git checkout holding ``where``; bad input when there is none."""
    result = _git(["rev-parse", "--show-toplevel"], where)
    if result.returncode != 0:
        raise AbInputError(f"{where} is not inside a git checkout: give revisions from one, or two checkout "
                           "folders")
    return Path(result.stdout.strip())


def resolve_commit(repo: Path, revision: str) -> str:
    """The full hash of ``revision`` in ``repo``; an unknown revision is bad input."""
    result = _git(["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], repo)
    if result.returncode != 0:
        raise AbInputError(f"unknown revision {revision!r} in {repo}: give a commit, branch or tag "
                           "(`git log --oneline` lists them), or a checkout folder")
    return result.stdout.strip()


def check_clean(repo: Path) -> None:
    """Refuse a checkout whose tracked files have uncommitted changes (a revision would not include them)."""
    result = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    if result.returncode == 0 and result.stdout.strip():
        changed = ", ".join(line[3:] for line in result.stdout.splitlines()[:5])
        raise AbInputError(f"{repo} has uncommitted changes ({changed}, ...), which a revision does not include: "
                           "commit them, pass the checkout folder itself as a side, or --allow-dirty to measure "
                           "the committed revisions anyway")


def commit_subject(repo: Path, commit: str) -> str:
    """The first line of ``commit``'s message."""
    return _git(["log", "-1", "--format=%s", commit], repo).stdout.strip()


@contextmanager
def checkout(repo: Path, label: str, spec: str) -> Iterator[Side]:
    """The side ``spec`` names: a folder as is, or a revision in a temporary worktree removed on exit."""
    folder = Path(spec)
    if folder.is_dir() and (folder / "perfkit" / "__init__.py").exists():
        head = _git(["rev-parse", "HEAD"], folder)
        yield Side(label, spec, folder.resolve(), head.stdout.strip() if head.returncode == 0 else None)
        return
    commit = resolve_commit(repo, spec)
    where = Path(tempfile.mkdtemp(prefix=f"perfkit-ab-{label.lower()}-"))
    tree = where / "tree"
    added = _git(["worktree", "add", "--detach", "--quiet", str(tree), commit], repo)
    try:
        if added.returncode != 0:
            raise AbInputError(f"git worktree add for {spec!r} failed: {added.stderr.strip()}")
        if not (tree / "perfkit" / "__init__.py").exists():
            raise AbInputError(f"revision {spec!r} ({commit[:12]}) has no perfkit/ package to measure")
        yield Side(label, spec, tree, commit)
    finally:
        _git(["worktree", "remove", "--force", str(tree)], repo)
        shutil.rmtree(where, ignore_errors=True)
        _git(["worktree", "prune"], repo)


@contextmanager
def open_sides(base: str, head: str, *, repo: Path | None = None, allow_dirty: bool = False
               ) -> Iterator[tuple[Side, Side]]:
    """BASE and HEAD as checkouts, every revision resolved (and the tree checked clean) before either opens."""
    specs = (base, head)
    revisions = [s for s in specs if not (Path(s).is_dir() and (Path(s) / "perfkit" / "__init__.py").exists())]
    for spec in specs:
        if Path(spec).is_dir() and spec in revisions:
            raise AbInputError(f"{spec!r} is a folder without perfkit/__init__.py: give a perfkit checkout")
    if revisions:
        repo = repo or repository_root(Path.cwd())
        for spec in revisions:
            resolve_commit(repo, spec)
        if not allow_dirty:
            check_clean(repo)
    with ExitStack() as stack:
        yield (stack.enter_context(checkout(repo or Path.cwd(), "BASE", base)),
               stack.enter_context(checkout(repo or Path.cwd(), "HEAD", head)))
