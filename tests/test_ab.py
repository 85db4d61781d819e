"""``perfkit ab`` and ``perfkit bisect`` on throwaway git histories built here from this checkout's perfkit.

An A/A (a commit against itself) finds no regression; a commit whose basic block spins in its forward is
slower; bad input exits 2 before anything is timed; a bisection over 16 commits names the planted one.
Cells are the basic block's inference at its CPU test shape with small budgets, so the file runs in about
a minute. On a busy machine a cell is contended and not judged: the tests then check the measured ratio,
which pairing keeps honest, instead of the verdict.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from perfkit.ab.format import render_markdown, render_text, write_github
from perfkit.ab.run import CellResult, CellSpec, verdict
from perfkit.ab.worktree import Side
from perfkit.cli import main
from perfkit.stats import minimal_detectable_effect

ROOT = Path(__file__).resolve().parents[1]
CELL = ["--blocks", "basic", "--modes", "inference", "--variants", "eager", "--batches", "8", "--threads", "1"]
FORWARD = ("    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
           "        y = self.conv2(self.relu(self.bn1(self.conv1(x))))\n")
"""The basic block's forward in perfkit/blocks/resnet.py, where the planted slowdown goes."""


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-commit repository holding this checkout's committed perfkit and kernels (without ``perfkit ab``:
    a side that predates it is measured by the worker this perfkit ships)."""
    repo = tmp_path_factory.mktemp("ab") / "repo"
    repo.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "perfkit", "kernels", "pyproject.toml"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x"], cwd=repo, input=archive, check=True)
    _git(repo, "init", "-q")
    _commit(repo, "perfkit as it is")
    return repo


def plant_spin(repo: Path, seconds: float) -> None:
    """Make the basic block's forward busy-wait ``seconds`` more: extra work, the same outputs."""
    path = repo / "perfkit" / "blocks" / "resnet.py"
    text = path.read_text()
    assert FORWARD in text, "the basic block's forward moved: update FORWARD"
    spin = (f"        import time\n        _end = time.perf_counter() + {seconds!r}\n"
            "        while time.perf_counter() < _end:\n            pass\n")
    path.write_text(text.replace(FORWARD, FORWARD.split("\n")[0] + "\n" + spin + FORWARD.split("\n", 1)[1], 1))


def run_ab(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> tuple[int, dict]:
    monkeypatch.chdir(repo)
    out = tmp_path / "ab.json"
    status = main(["ab", *args, "--json", str(out)])
    return status, json.loads(out.read_text()) if out.exists() else {}


def test_a_commit_against_itself_is_no_regression(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    status, found = run_ab(repo, monkeypatch, tmp_path, "HEAD", "HEAD", *CELL, "--budget-s", "2", "--format",
                           "github", "--comment-file", str(tmp_path / "comment.md"))
    assert status == 0, capsys.readouterr()
    (cell,) = found["cells"]
    assert cell["status"] == "measured" and cell["verdict"] != "slower" and cell["outputs"] == "same", cell
    assert cell["ratio_low"] <= cell["ratio"] <= cell["ratio_high"] and cell["pairs"] >= 10, cell
    assert 0 < cell["detectable_rel"] < 0.5, cell
    assert found["base"]["commit"] == found["head"]["commit"]
    comment = (tmp_path / "comment.md").read_text()
    assert comment == summary.read_text() and "basic/eager/inference/float32/b8" in comment
    assert f"perfkit ab {found['base']['commit'][:12]} {found['head']['commit'][:12]} --blocks basic" in comment
    assert not list(Path("/tmp").glob(f"perfkit-ab-{os.getpid()}-*.log")), "a worker's log was left behind"


def test_a_planted_slowdown_is_a_regression(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    clone = tmp_path / "planted"
    shutil.copytree(repo, clone)
    plant_spin(clone, 3e-4)
    registry = clone / "perfkit" / "blocks" / "resnet.py"
    # A block only HEAD has: listed, never fatal.
    registry.write_text(registry.read_text().replace('@register("basic",', '@register("basic_head_only", kind="block", '
                        'bench_shape=(64, 56, 56), test_shape=(64, 8, 8), in_channels=64, out_channels=64)\n'
                        '@register("basic",', 1))
    _commit(clone, "planted: the basic block spins 0.3 ms")
    status, found = run_ab(clone, monkeypatch, tmp_path, "HEAD~1", "HEAD", *CELL[2:], "--blocks", "basic*",
                           "--budget-s", "3")
    cells = {c["cell"]: c for c in found["cells"]}
    only = cells["basic_head_only/eager/inference/float32/b8"]
    assert only["status"] == "only in HEAD" and only["verdict"] is None, only
    basic = cells["basic/eager/inference/float32/b8"]
    assert basic["ratio_low"] > 1.05, basic  # the spin is 40-100% of this step: pairing sees it, busy or not
    if basic["verdict"] == "contended":
        assert status == 0, "a contended cell is not judged, so it fails nothing"
    else:
        assert basic["verdict"] == "slower" and status == 1, (basic, capsys.readouterr())


def test_the_pull_request_job_fails_on_a_planted_regression(repo: Path, tmp_path: Path) -> None:
    """perf.yml's ab job, its ``run:`` lines played in a checkout whose origin/main lacks a planted spin."""
    # test_workflow.py reads the workflow as a runner would; loaded by path (pytest imports in importlib mode).
    spec = importlib.util.spec_from_file_location("_test_workflow", Path(__file__).with_name("test_workflow.py"))
    workflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workflow)
    job = workflow.load_workflow()["jobs"]["ab"]
    assert job["if"] == "github.event_name == 'pull_request'"
    clone = tmp_path / "pr"
    shutil.copytree(repo, clone)
    _git(clone, "update-ref", "refs/remotes/origin/main", "HEAD")
    plant_spin(clone, 3e-4)
    _commit(clone, "the PR: the basic block spins 0.3 ms")
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFKIT_", "GITHUB_"))} | {
        "PERFKIT_BLOCKS": "basic", "PERFKIT_MODES": "inference", "PERFKIT_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    (step,) = [s for s in job["steps"] if "run" in s and "perfkit ab" in s["run"]]
    result = subprocess.run([*workflow.SHELLS[step.get("shell")], "-c", step["run"]], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=300)
    found = json.loads((clone / "out" / "ab-verdicts.json").read_text())
    (cell,) = found["cells"]
    assert cell["ratio_low"] > 1.05, cell
    assert result.returncode == (0 if cell["verdict"] == "contended" else 1), (cell, result.stderr)
    comment = (clone / "out" / "ab-comment.md").read_text()
    assert comment == (tmp_path / "summary.md").read_text() and "basic/eager/inference/float32/b8" in comment
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert sorted(p.name for p in clone.glob(upload["with"]["path"])) == ["ab-comment.md", "ab-verdicts.json"]


def test_bad_input_exits_2(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    clone = tmp_path / "bad"
    shutil.copytree(repo, clone)
    monkeypatch.chdir(clone)
    assert main(["ab", "no-such-rev", "HEAD", *CELL]) == 2
    assert "unknown revision 'no-such-rev'" in capsys.readouterr().err
    assert main(["ab", "HEAD", "HEAD", *CELL, "--threshold", "five"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main(["ab", "HEAD", "HEAD", *CELL, "--modes", "sideways"]) == 2
    assert "valid modes: inference, training" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["ab", "HEAD", "HEAD", "--shape", "huge"])
    assert exited.value.code == 2
    (clone / "perfkit" / "stats.py").write_text((clone / "perfkit" / "stats.py").read_text() + "\n# an edit\n")
    assert main(["ab", "HEAD", "HEAD", *CELL]) == 2
    assert "uncommitted changes (perfkit/stats.py" in capsys.readouterr().err
    assert main(["bisect", "HEAD", "HEAD", "--cells", "*", *CELL]) == 2
    assert "is not an ancestor" in capsys.readouterr().err
    # A side whose perfkit lacks the small API the worker uses is refused by name.
    variants = clone / "perfkit" / "variants.py"
    variants.write_text(variants.read_text().replace("def parse_variant(", "def parse_variant_renamed("))
    _commit(clone, "parse_variant renamed")
    assert main(["ab", "HEAD~1", "HEAD", *CELL]) == 2
    assert "has no perfkit.variants.parse_variant" in capsys.readouterr().err


def test_bisect_names_the_planted_commit(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    clone = tmp_path / "history"
    shutil.copytree(repo, clone)
    planted = None
    for k in range(1, 17):  # 16 commits after GOOD; the 11th makes the basic block spin
        if k == 11:
            plant_spin(clone, 1e-3)
        (clone / "NOTES.txt").write_text(f"commit {k}\n")
        sha = _commit(clone, f"commit {k}")
        planted = sha if k == 11 else planted
    monkeypatch.chdir(clone)
    status = main(["bisect", "HEAD~16", "HEAD", "--cells", "basic/*", *CELL, "--budget-s", "1"])
    out = capsys.readouterr()
    assert status == 0, out
    assert out.out.startswith(f"first slow commit: {planted} commit 11"), out


def test_verdicts_and_detectable_effect() -> None:
    assert verdict(1.06, 1.10, 0.05) == "slower"
    assert verdict(0.90, 0.94, 0.05) == "faster"
    assert verdict(0.97, 1.04, 0.05) == "unchanged"
    assert verdict(1.02, 1.08, 0.05) == "inconclusive"
    # An interval of ±1% (in log) is 1.43 times that at 80% power: a change of 1% is caught half the time.
    assert minimal_detectable_effect(0.99, 1 / 0.99) == pytest.approx(0.0144, abs=2e-4)
    assert minimal_detectable_effect(1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="0 < low <= high"):
        minimal_detectable_effect(1.1, 1.0)


def test_the_github_comment_lists_regressions_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = Side("BASE", "origin/main", tmp_path, "a" * 40)
    head = Side("HEAD", "HEAD", tmp_path, "b" * 40)
    spec = CellSpec("basic", "eager", "training", 8)
    timed = dict(ratio=1.0, ratio_low=0.98, ratio_high=1.02, detectable_rel=0.03, pairs=200, base_median_s=1e-3,
                 head_median_s=1e-3, outputs="same")
    results = [CellResult(spec, "measured", verdict="unchanged", **timed),
               CellResult(CellSpec("new_block", "eager", "training", 8), "only in HEAD", reason="not in BASE"),
               CellResult(CellSpec("wrc", "eager", "training", 8), "measured", verdict="slower",
                          **{**timed, "ratio": 1.2, "ratio_low": 1.15, "ratio_high": 1.25,
                             "outputs": "CHANGED: output relative error 1.00e-02 > 1e-05"})]
    markdown = render_markdown(results, base, head, 0.05, bench_shape=False)
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "/b8" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| wrc/eager/training/float32/b8",
                                                    "| basic/eager/training/float32/b8",
                                                    "| new_block/eager/training/float32/b8"]
    assert "SLOWER | 1.200 [1.150, 1.250] | ±3.0%" in rows[0] and "CHANGED" in rows[0]
    assert "`perfkit ab aaaaaaaaaaaa bbbbbbbbbbbb --blocks wrc --variants eager --modes training" in rows[0]
    assert markdown.startswith("### perfkit ab: 1 regression(s)")
    assert "outputs CHANGED in 1" in render_text(results, base, head, 0.05)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert write_github(markdown, tmp_path / "c" / "comment.md") == [tmp_path / "c" / "comment.md"]
