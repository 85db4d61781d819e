""".github/workflows/perf.yml runs on the CPU: its own ``run:`` lines, 2 shards of a two-cell quick matrix.

The workflow is read with a small YAML reader (PyYAML is no dependency of perfkit) and played the way a
runner would: each job in a fresh copy of the checkout, artifacts uploaded and downloaded by the names and
paths the workflow gives, GitHub's ``${{ ... }}`` expressions substituted, each ``run:`` in the shell a
runner uses. ``make setup`` is not run (the venv is this one): its target must exist. So a renamed
option, verb or file breaks this test rather than the nightly GPU run.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "perf.yml"
KNOWN_ACTIONS = ("actions/checkout@v4", "actions/upload-artifact@v4", "actions/download-artifact@v4")
CONDITIONS = {"always()": True, "needs.shard.result != 'success'": False}
"""Every ``if:`` the workflow has, as it evaluates when every shard job succeeded."""
SMALL = {"SHARDS": "2", "PROFILE": "quick"}
"""The workflow's own variables, scaled down to the CPU."""
NARROW = {"PERFKIT_BLOCKS": "basic,wrc", "PERFKIT_MODES": "inference", "PERFKIT_VARIANTS": "eager",
          "PERFKIT_KERNELS": "none", "CUDA_VISIBLE_DEVICES": ""}
"""Two cells, one per shard, on the CPU."""
SHELLS = {None: ["bash", "-e"], "bash": ["bash", "--noprofile", "--norc", "-eo", "pipefail"]}
"""The commands a Linux runner runs a step's script with: its default, and ``shell: bash``."""
COPIED = ("benchmarks", "pyproject.toml", "Makefile")


# ------------------------------------------------------------------------------------------ a YAML reader

def _strip_comment(text: str) -> str:
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def _scalar(text: str) -> Any:
    text = _strip_comment(text).strip()
    if text[:1] == "[" and text[-1:] == "]":
        return [_scalar(part) for part in text[1:-1].split(",") if part.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    return int(text) if re.fullmatch(r"-?\d+", text) else (text or None)


class _Reader:
    """Block mappings, block sequences, flow sequences of scalars, ``|`` block scalars, comments: what
    GitHub workflows use. Anchors, multi-document files and folded scalars are not."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def _next(self) -> tuple[int, str] | None:
        """The next line that holds something (its indent and text), skipping blanks and comment lines."""
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and not line.lstrip().startswith("#"):
                return len(line) - len(line.lstrip()), line.strip()
            self.i += 1
        return None

    def block(self, indent: int) -> Any:
        first = self._next()
        if first is None or first[0] < indent:
            return None
        return self._sequence(first[0]) if first[1].startswith("- ") else self._mapping(first[0])

    def _sequence(self, indent: int) -> list[Any]:
        items = []
        while (line := self._next()) and line[0] == indent and line[1].startswith("- "):
            item = line[1][2:]
            if re.match(r"[\w.-]+:(\s|$)", item):
                # "- key: value" opens a mapping whose keys sit two columns in.
                self.lines[self.i] = " " * (indent + 2) + item
                items.append(self._mapping(indent + 2))
            else:
                self.i += 1
                items.append(_scalar(item))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while (line := self._next()) and line[0] == indent and not line[1].startswith("- "):
            key, _, rest = line[1].partition(":")
            self.i += 1
            rest = _strip_comment(rest).strip()
            if rest == "|":
                mapping[key] = self._literal(indent)
            elif rest:
                mapping[key] = _scalar(rest)
            else:
                below = self._next()
                mapping[key] = self.block(below[0]) if below and below[0] > indent else None
        return mapping

    def _literal(self, indent: int) -> str:
        body = []
        while self.i < len(self.lines) and (not self.lines[self.i].strip()
                                            or len(self.lines[self.i]) - len(self.lines[self.i].lstrip()) > indent):
            body.append(self.lines[self.i])
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        margin = min(len(line) - len(line.lstrip()) for line in body if line.strip())
        return "\n".join(line[margin:] for line in body) + "\n"


def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    """The workflow file as nested dicts and lists."""
    return _Reader(path.read_text()).block(0)


def test_the_reader_reads_what_the_workflow_uses() -> None:
    text = ("a: 1  # one\nb:\n  - x\n  - k: '#'\n    l: [p, 2]\nc: |\n  line 1\n\n    line 2 # kept\nd:\n"
            "e: \"quoted\"\nf: false\n")
    assert _Reader(text).block(0) == {"a": 1, "b": ["x", {"k": "#", "l": ["p", 2]}],
                                      "c": "line 1\n\n  line 2 # kept\n", "d": None, "e": "quoted", "f": False}


# ------------------------------------------------------------------------------------------ the workflow

def test_the_job_matrix_has_one_entry_per_shard() -> None:
    workflow = load_workflow()
    assert workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"] == list(range(1, workflow["env"]["SHARDS"] + 1))


def test_the_workflow_uses_only_what_this_test_can_play() -> None:
    """Actions, conditions and expressions this test knows how to play: a new one must be taught here."""
    workflow = load_workflow()
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            assert "run" in step or step.get("uses") in KNOWN_ACTIONS, step
            assert step.get("if") in (None, *CONDITIONS), step["if"]
    expressions = set(re.findall(r"\$\{\{\s*(.*?)\s*\}\}", WORKFLOW.read_text()))
    assert expressions <= {"matrix.shard", "env.SHARDS"}, expressions


def _substitute(text: str, shard: int | None) -> str:
    text = re.sub(r"\$\{\{\s*env\.SHARDS\s*\}\}", SMALL["SHARDS"], text)
    return re.sub(r"\$\{\{\s*matrix\.shard\s*\}\}", str(shard), text)


def _checkout(where: Path) -> Path:
    where.mkdir(parents=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, where / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, where / name)
    (where / "reports").mkdir()  # no committed baseline yet: the merge job must say so
    (where / ".venv").symlink_to(ROOT / ".venv")
    return where


class _Runner:
    """Plays the workflow's jobs; artifacts live in a folder per name, as the artifact service keeps them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.artifacts = tmp_path / "artifacts"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")} | SMALL | NARROW

    def job(self, name: str, steps: list[dict[str, Any]], shard: int | None = None,
            stop_at: str | None = None) -> Path:
        """Run ``steps`` in a fresh checkout up to the step named ``stop_at`` (excluded); returns the checkout."""
        work = _checkout(self.tmp_path / f"{name}-{shard or 0}")
        for step in steps:
            if stop_at is not None and step.get("name") == stop_at:
                break
            if CONDITIONS.get(step.get("if"), True):
                self.step(step, work, shard)
        return work

    def step(self, step: dict[str, Any], work: Path, shard: int | None) -> subprocess.CompletedProcess | None:
        """Play one step; a ``run:`` step that fails fails the test."""
        if step.get("uses", "").startswith("actions/checkout"):
            return None
        if step.get("uses", "").startswith("actions/upload-artifact"):
            return self._upload(step["with"], work, shard)
        if step.get("uses", "").startswith("actions/download-artifact"):
            return self._download(step["with"], work)
        result = self.script(step, work, shard)
        assert result.returncode == 0, f"{step.get('name', step['run'])}: exit {result.returncode}\n" \
                                       f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def script(self, step: dict[str, Any], work: Path, shard: int | None) -> subprocess.CompletedProcess:
        """Run a ``run:`` step (``make TARGET`` only checked: the venv is this checkout's)."""
        script = _substitute(step["run"], shard)
        if script.split()[:1] == ["make"]:
            targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
            assert set(script.split()[1:]) <= targets, script
            return subprocess.CompletedProcess(script, 0, "", "")
        return subprocess.run([*SHELLS[step.get("shell")], "-c", script], cwd=work, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def _upload(self, with_: dict[str, Any], work: Path, shard: int | None) -> None:
        name = _substitute(with_["name"], shard)
        for pattern in _substitute(with_["path"], shard).split():
            matched = glob.glob(pattern, root_dir=work)
            # A shard whose cells all went elsewhere writes nothing; the workflow says whether that may pass.
            assert matched or with_.get("if-no-files-found") in ("warn", "ignore"), \
                f"artifact {name}: nothing matches {pattern} in the job's checkout"
            for found in map(Path, matched):
                target = self.artifacts / name / (found.name if "*" in pattern else found)
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (work / found).is_dir() else shutil.copyfile)(work / found, target)

    def _download(self, with_: dict[str, Any], work: Path) -> None:
        assert with_.get("merge-multiple") is True, "the merge job expects every shard's files in one folder"
        names = sorted(p.name for p in self.artifacts.glob(with_["pattern"]))
        assert names, f"no artifact matches {with_['pattern']}"
        for name in names:
            shutil.copytree(self.artifacts / name, work / with_["path"], dirs_exist_ok=True)


def test_the_workflow_runs_on_the_cpu(tmp_path: Path) -> None:
    """Every shard, then the merge: a report, and a compare that needs a committed baseline of this device."""
    jobs = load_workflow()["jobs"]
    runner = _Runner(tmp_path)
    # The shard jobs run at once, as on their runners (and each is a one-core process).
    with ThreadPoolExecutor(max_workers=int(SMALL["SHARDS"])) as pool:
        list(pool.map(lambda shard: runner.job("shard", jobs["shard"]["steps"], shard),
                      range(1, int(SMALL["SHARDS"]) + 1)))
    compare = next(s for s in jobs["merge"]["steps"] if s.get("name", "").startswith("Compare"))
    work = runner.job("merge", jobs["merge"]["steps"], stop_at=compare["name"])
    assert sorted(p.name for p in (work / "out" / "reports").glob("*/README.md")), "the merge wrote no report"
    merged = [line for line in (work / "out" / "merged.jsonl").read_text().splitlines() if line.strip()]
    assert len(merged) == 2, merged

    refused = runner.script(compare, work, None)
    assert refused.returncode == 1 and "no committed baseline reports/" in refused.stdout, refused

    # The run itself as the committed baseline of its device: every cell unchanged, the step passes.
    device = subprocess.run([str(ROOT / ".venv" / "bin" / "perfkit"), "device", "out/merged.jsonl"], cwd=work,
                            env=runner.env, capture_output=True, text=True, check=True).stdout.strip()
    (work / "reports" / device).mkdir()
    shutil.copyfile(work / "out" / "merged.jsonl", work / "reports" / device / "bench.json")
    runner.step(compare, work, None)
    text = (work / "out" / "compare.md").read_text()
    assert "2 timed cells compared" in text and "No regression." in text, text

