"""Every command in README.md and docs/*.md is run, or validated where it cannot run here, so the docs cannot rot.

The convention (docs/README.md states it for writers):

- A ```sh block is run in document order, in a scratch copy of the checkout (``benchmarks/``, ``tests/``,
  ``reports/``, ``pyproject.toml``, ``Makefile``; ``.venv`` linked), as one bash script, so an ``export``
  holds for the rest of its block. Each command must exit 0, or the status its trailing comment states
  (``# exit 1``, ``# exit 0 or 1``). The run is narrowed to a tiny matrix by the environment
  (:data:`NARROW`: the ``PERFKIT_*`` variables a command's own options override) and sees no GPU.
- A ```sh block whose first line is ``# checked, not run: REASON`` (a GPU, SLURM, hours) is validated
  instead: a pytest command is collected (``--collect-only``, which parses every ``--perfkit-*`` option and
  name), a ``perfkit`` command is parsed by perfkit's own argument parser (and the pytest options after
  ``perfkit launch ... --`` are collected), a Python script's options must appear in its ``--help``.
- ``make TARGET`` is never run (it builds a venv and runs everything): its targets must be the Makefile's.
- A ```python block whose first line is ``# PATH.py`` is written to PATH in the scratch copy; any other
  ```python block is run there with the venv's python. Other blocks (```text, ```toml, ...) are shown only.

A command that fits none of these fails the test, so nothing in a shell block goes unchecked. The pages
are played at once, one per core: each is a chain of one-core processes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from perfkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "zsh"}
CHECKED = re.compile(r"#\s*checked, not run:\s*(\S.*)")
FILE_CAPTION = re.compile(r"#\s*([\w./-]+\.py)\s*$")
EXPECTED_STATUS = re.compile(r"#\s*exit\s+(\d+(?:\s+or\s+\d+)*)")
NARROW = {
    "PERFKIT_BLOCKS": "basic",
    "PERFKIT_MODES": "inference",
    "PERFKIT_VARIANTS": "eager",
    "PERFKIT_KERNELS": "none",
}
"""The tiny matrix every executed command runs (one cell, about a second), unless its own options say more."""
COPIED = ("benchmarks", "tests", "reports", "pyproject.toml", "Makefile")
PYTEST = (("pytest",), (".venv/bin/pytest",), ("python", "-m", "pytest"), (".venv/bin/python", "-m", "pytest"))
PERFKIT = (("perfkit",), (".venv/bin/perfkit",), ("python", "-m", "perfkit"), (".venv/bin/python", "-m", "perfkit"))
TIMEOUT_S = 300


@dataclass
class Block:
    """One fenced block of a page: its language, first line number and text."""

    language: str
    line: int
    text: str
    commands: list[tuple[int, str]] = field(default_factory=list)
    """Shell blocks: each command (continuation lines joined) with its line number in the page."""

    @property
    def checked_reason(self) -> str | None:
        """The reason of a ``# checked, not run:`` block, None for a block that runs."""
        first = self.text.splitlines()[0] if self.text.strip() else ""
        match = CHECKED.fullmatch(first.strip())
        return match.group(1) if match else None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order, shell blocks split into commands."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"\s*```(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        block = Block(opening.group(1).lower(), i + 1, "\n".join(lines[i + 1:end]) + "\n")
        if block.language in SHELL_LANGUAGES:
            block.commands = _commands(lines[i + 1:end], first_line=i + 2)
        found.append(block)
        i = end + 1
    return found


def _commands(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    commands, pending, start = [], "", 0
    for n, line in enumerate(lines, first_line):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start if pending else n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((start, pending + line.strip()))
        pending = ""
    assert not pending, f"line {start}: a command ends in a continuation"
    return commands


def _comment(command: str) -> str:
    """The trailing comment of a shell command: from the first unquoted ``#`` that starts a word."""
    quote, previous = None, " "
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and previous.isspace():
            return command[i:]
        previous = char
    return ""


def expected_statuses(command: str) -> set[int]:
    """The statuses a command may exit with: those its trailing ``# exit N [or M]`` comment states, else 0."""
    match = EXPECTED_STATUS.match(_comment(command))
    return {int(s) for s in re.findall(r"\d+", match.group(1))} if match else {0}


def scratch_env() -> dict[str, str]:
    """The environment every command of the docs runs in: the venv first on PATH, no GPU, no PERFKIT_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _scratch(tmp_path: Path) -> Path:
    """A copy of what the docs' commands read, with the checkout's venv linked, under ``tmp_path``."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, work / name)
    (work / ".venv").symlink_to(ROOT / ".venv")
    return work


def _run_block(block: Block, work: Path, env: dict[str, str], where: str) -> None:
    """Run a shell block as one bash script that stops at the first command with an unexpected status."""
    script = ["set -u"]
    for line, command in block.commands:
        assert shlex.split(command, comments=True)[:1] != ["make"], \
            f"{where}:{line}: make is never run here; give make commands a block of their own"
        allowed = " ".join(str(s) for s in sorted(expected_statuses(command)))
        script += [command, f'status=$?; case " {allowed} " in *" $status "*) ;; *) '
                   f'echo "{where}:{line}: exit $status, expected {allowed}" >&2; exit 97;; esac']
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env={**env, **NARROW},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{where}:{block.line}: the block failed\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def _program(words: list[str], programs: tuple[tuple[str, ...], ...]) -> list[str] | None:
    """The arguments after one of ``programs``' spellings, None when the command is none of them."""
    for spelling in programs:
        if tuple(words[:len(spelling)]) == spelling:
            return words[len(spelling):]
    return None


def _collect(args: list[str], work: Path, env: dict[str, str], where: str) -> None:
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", *args, "--collect-only", "-q",
                             "-p", "no:cacheprovider"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{where}: pytest {shlex.join(args)} does not collect\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _check_perfkit(args: list[str], work: Path, env: dict[str, str], where: str) -> None:
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"{where}: perfkit {shlex.join(args)} does not parse (exit {exit_.code})") from None
    if parsed.command == "launch":
        pytest_args = parsed.pytest_args[1:] if parsed.pytest_args[:1] == ["--"] else parsed.pytest_args
        _collect([parsed.benchmarks, *pytest_args], work, env, where)


def _check_script(words: list[str], work: Path, env: dict[str, str], where: str) -> None:
    script = words[1]
    assert (work / script).is_file(), f"{where}: no script {script}"
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), script, "--help"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{where}: {script} --help fails\n{result.stderr[-3000:]}"
    for option in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
        assert option in result.stdout, f"{where}: {script} has no option {option}"


def _check_make(targets: list[str], where: str) -> None:
    declared = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target in (t for t in targets if "=" not in t):
        assert target in declared, f"{where}: make {target}: no such target in the Makefile ({sorted(declared)})"


def _check_command(command: str, work: Path, env: dict[str, str], where: str) -> None:
    """Validate a command that is not run: by pytest's collection, perfkit's parser, or the script's --help."""
    assigned, words = _split_env(shlex.split(command, comments=True))
    env = {**env, **assigned}
    if words[:1] == ["make"]:
        _check_make(words[1:], where)
    elif (args := _program(words, PYTEST)) is not None:
        _collect(args, work, env, where)
    elif (args := _program(words, PERFKIT)) is not None:
        _check_perfkit(args, work, env, where)
    elif words[0] in ("python", "python3", ".venv/bin/python") and words[1:2] and words[1].endswith(".py"):
        _check_script(words, work, env, where)
    else:
        raise AssertionError(f"{where}: no way to check `{command}`; run it, or teach tests/test_docs.py")


def _make_only(block: Block) -> bool:
    return bool(block.commands) and all(shlex.split(c, comments=True)[:1] == ["make"] for _, c in block.commands)


def play(page: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Run (or check) every block of ``page`` in order in a scratch copy under ``tmp_path``; raises on a failure."""
    work, name = _scratch(tmp_path), page.relative_to(ROOT).as_posix()
    for block in blocks(page):
        where = f"{name}:{block.line}"
        if block.language == "python":
            caption = FILE_CAPTION.fullmatch(block.text.splitlines()[0].strip())
            if caption:
                (work / caption.group(1)).parent.mkdir(parents=True, exist_ok=True)
                (work / caption.group(1)).write_text(block.text)
                continue
            result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", block.text], cwd=work,
                                    env={**env, "PYTHONPATH": str(work)}, capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
            assert result.returncode == 0, f"{where}: the snippet fails\n{result.stderr[-3000:]}"
        elif block.language in SHELL_LANGUAGES:
            assert block.commands, f"{where}: an empty shell block"
            if block.checked_reason or _make_only(block):
                for line, command in block.commands:
                    _check_command(command, work, env, f"{name}:{line}")
            else:
                _run_block(block, work, env, name)


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Exception | None]:
    """Every page played at once, as many at a time as there are cores (each is a chain of one-core
    processes): each page's failure, or None."""
    env = scratch_env()

    def outcome(page: Path) -> Exception | None:
        try:
            play(page, tmp_path_factory.mktemp(page.stem), env)
        except Exception as error:  # handed to the page's own test, which raises it
            return error
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(PAGES, pool.map(outcome, PAGES), strict=True))


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_command_of_the_page_runs(page: Path, played: dict[Path, Exception | None]) -> None:
    if played[page] is not None:
        raise played[page]


def test_the_options_table_is_the_plugins() -> None:
    """docs/matrix.md's option table has a row for each ``--perfkit-*`` option, with its variable, and no more."""
    from perfkit.matrix.options import OPTIONS

    text = (ROOT / "docs" / "matrix.md").read_text()
    rows = re.findall(r"^\|\s*`(--perfkit-[\w-]+)`\s*\|\s*([^|]*?)\s*\|", text, flags=re.M)
    documented = {flag: (env.strip("`") if env not in ("", "—", "-") else None) for flag, env in rows}
    assert len(documented) == len(rows), "an option has two rows in docs/matrix.md"
    assert documented == {option.flag: option.env for option in OPTIONS}


def test_no_fence_hides_a_command() -> None:
    """Every fence names its language: a command in a bare fence would escape the test above."""
    for page in PAGES:
        for block in blocks(page):
            assert block.language, f"{page.relative_to(ROOT)}:{block.line}: a fence without a language " \
                                   "(```sh for commands, ```text for output)"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_link_between_the_pages_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)}: the link {target} points at nothing"
            assert not anchor or anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading #{anchor} " \
                                                             f"in {linked.relative_to(ROOT)}"


def test_expected_statuses() -> None:
    assert expected_statuses("perfkit compare a b   # exit 0 or 1: 1 on a regression") == {0, 1}
    assert expected_statuses("perfkit history x  # exit 2") == {2}
    assert expected_statuses("perfkit list 'a#b'   # lists them") == {0}
    assert expected_statuses("perfkit list") == {0}
    assert expected_statuses("perfkit list   # the user's blocks too") == {0}
