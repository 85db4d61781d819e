"""``perfkit history`` on runs built from the rounds of a real quick-profile run (the committed CPU report's
bench.json): A/A runs resampled from its rounds, a planted step, a planted slowdown in the latest run, and a
drift."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from perfkit.cli import main
from perfkit.results.history import Point, analyse
from perfkit.stats import median_interval

REPO = Path(__file__).resolve().parents[1]
REAL_RUN = next((REPO / "reports").glob("cpu-*/bench.json"))
MACHINE_ID = "Linux-CPython-3.11-64bit"
"""pytest-benchmark's storage keeps each machine's runs in a sub-folder named like this."""


@pytest.fixture(scope="module")
def real_run() -> dict:
    return json.loads(REAL_RUN.read_text())


def write_run(path: Path, template: dict, commit: str, commit_time: str, times: dict[int, list[float]]) -> None:
    """A run JSON like ``template`` (a pytest-benchmark JSON) at another commit, benchmark ``i`` with rounds
    ``times[i]``."""
    data = json.loads(json.dumps(template))
    data["commit_info"] = {**data.get("commit_info", {}), "id": commit, "time": commit_time}
    data["datetime"] = commit_time
    for index, rounds in times.items():
        bench = data["benchmarks"][index]
        bench["stats"]["data"] = rounds
        bench["extra_info"]["times_s"] = rounds
        bench["extra_info"]["step_time_median_s"] = float(np.median(rounds))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _commit(i: int) -> str:
    return f"{i:04d}" + "ab" * 18


def store_runs(storage: Path, template: dict, n: int, seed: int, scale=lambda run, bench: 1.0) -> None:
    """``n`` runs in pytest-benchmark's storage layout, every cell's rounds resampled from the real run's and
    multiplied by ``scale(run, benchmark index)``; commit ``i`` is dated hour ``i``, saved in reverse order
    so the history must order them by commit date."""
    rng = np.random.default_rng(seed)
    for i in reversed(range(n)):
        times = {j: (rng.choice(b["stats"]["data"], len(b["stats"]["data"])) * scale(i, j)).tolist()
                 for j, b in enumerate(template["benchmarks"])}
        write_run(storage / MACHINE_ID / f"{n - i:04d}_{_commit(i)}.json", template, _commit(i),
                  f"2026-11-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00", times)


def history(*args) -> int:
    return main(["history", *map(str, args)])


def _points(real_run: dict, index: int, factors: list[float], seed: int) -> list[Point]:
    """A series of one real cell's resampled medians, run ``i`` scaled by ``factors[i]``."""
    rng = np.random.default_rng(seed)
    data = np.asarray(real_run["benchmarks"][index]["stats"]["data"])
    points = []
    for i, factor in enumerate(factors):
        low, median, high = median_interval(rng.choice(data, data.size) * factor)
        points.append(Point(i, _commit(i), median, low, high))
    return points


@pytest.mark.parametrize("k", [3, 10, 16])
def test_planted_step_is_found_at_its_commit(real_run, k):
    for index in (4, 6, 13):  # eager, channels_last and a training cell of the real run
        found = analyse("cpu", "cell", _points(real_run, index, [1.0] * k + [1.1] * (20 - k), seed=k))
        assert [s.index for s in found.steps] == [k], (index, found.steps)
        assert found.steps[0].commit == _commit(k) and 1.05 < found.steps[0].ratio < 1.15
        assert found.regression(0.05, 19) is found.steps[0]


def test_drift_is_reported_as_drift_not_as_a_step(real_run):
    found = analyse("cpu", "cell", _points(real_run, 4, [1.005**i for i in range(10)], seed=1))
    assert found.steps == [] and len(found.drifts) == 1
    assert math.isclose(found.drifts[0].per_commit, 0.005, abs_tol=0.003)
    assert found.regression(0.05, 9) is None


def test_twenty_aa_runs_have_no_step_and_exit_0(real_run, tmp_path, capsys):
    store_runs(tmp_path / "storage", real_run, 20, seed=0)
    assert history(tmp_path / "storage", "-o", tmp_path / "plots") == 0
    out = capsys.readouterr().out
    assert "20 runs" in out and "41 cells" in out and "step  " not in out and "REGRESSED" not in out
    assert len(list((tmp_path / "plots").glob("*.png"))) == 16  # one per block (or kernel) and mode


def test_planted_slowdown_in_the_latest_run_names_cell_and_commit(real_run, tmp_path, capsys):
    planted = 6  # basic channels_last inference
    store_runs(tmp_path / "storage", real_run, 21, seed=0, scale=lambda i, j: 1.2 if (i, j) == (20, planted) else 1.0)
    assert history(tmp_path / "storage", "-o", tmp_path / "plots") == 1
    out = capsys.readouterr().out
    regressed = out.split("REGRESSED (1)")[1].strip().splitlines()[1:]
    assert regressed == [next(line for line in regressed if "basic/channels_last/inference/float32/b8" in line)]
    assert regressed[0].endswith(f"since {_commit(20)}")
    # --cells narrows the gate: the other cells alone pass.
    assert history(tmp_path / "storage", "--cells", "wrc/*", "-o", tmp_path / "plots") == 0


def test_bad_input_exits_2(real_run, tmp_path, capsys):
    assert history(tmp_path / "missing") == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert history(tmp_path / "empty") == 2
    assert "--benchmark-autosave" in capsys.readouterr().err
    store_runs(tmp_path / "storage", real_run, 2, seed=0)
    assert history(tmp_path / "storage", "--cells", "nothing*", "-o", tmp_path / "plots") == 2
    assert "no timed cell matches" in capsys.readouterr().err
    (tmp_path / "storage" / "broken.json").write_text("{")
    assert history(tmp_path / "storage") == 2
    assert "broken.json: line 1, column 2" in capsys.readouterr().err
