"""perfkit's ``--benchmark-json`` is pytest-benchmark's format: the fields continuous-benchmarking services'
pytest adapters read are there, typed as they parse them, and agree with perfkit's own record.

What the adapters read (their source, read on 2026-12-04):

- Bencher's ``python_pytest`` adapter (``bencher_adapter``, ``adapters/python/pytest.rs``) deserializes the
  file with serde into ``{machine_info: object, commit_info: object, benchmarks: [{fullname: string,
  stats: {mean, stddev, median, iqr}}]}``, each stat a float in seconds (``rust_decimal::serde::float``: a
  null or a NaN fails the whole file); the benchmark is keyed by ``fullname``; the value is ``mean`` ±
  ``stddev``, or ``median`` ± ``iqr`` with ``--average median``.
- github-action-benchmark's ``pytest`` tool (``src/extract.ts``, ``extractPytestResult``) runs ``JSON.parse``
  on the file (which rejects ``NaN`` and ``Infinity`` anywhere in it) and per benchmark reads ``fullname``
  (the name), ``stats.ops`` (the value, in iter/sec), ``stats.stddev``, ``stats.mean`` and ``stats.rounds``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHER_STATS = ("mean", "stddev", "median", "iqr")
ACTION_STATS = ("ops", "stddev", "mean", "rounds")


def _strict_json(text: str) -> dict[str, Any]:
    """Parse as JavaScript's JSON.parse and serde_json do: NaN, Infinity and -Infinity are errors."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON: JSON.parse and serde_json reject the whole file")

    return json.loads(text, parse_constant=refuse)


def check_adapters_can_read(text: str) -> list[dict[str, Any]]:
    """Assert what both adapters need of a pytest-benchmark JSON file; its benchmarks."""
    data = _strict_json(text)
    assert isinstance(data.get("machine_info"), dict) and isinstance(data.get("commit_info"), dict)
    benchmarks = data["benchmarks"]
    assert isinstance(benchmarks, list) and benchmarks, "no benchmarks: nothing for a dashboard"
    names = [b["fullname"] for b in benchmarks]
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names), "fullname must be unique"
    for bench in benchmarks:
        stats = bench["stats"]
        for key in {*BENCHER_STATS, *ACTION_STATS}:
            assert isinstance(stats.get(key), (int, float)) and not isinstance(stats[key], bool), (bench["fullname"],
                                                                                                 key)
            assert math.isfinite(stats[key]) and stats[key] >= 0, (bench["fullname"], key, stats[key])
        assert stats["mean"] > 0 and stats["median"] > 0 and isinstance(stats["rounds"], int) and stats["rounds"] >= 1
        assert stats["ops"] == pytest.approx(1 / stats["mean"], rel=1e-6), "ops is iterations per second"
    return benchmarks


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-cell matrix run's ``--benchmark-json``."""
    out = tmp_path_factory.mktemp("interop") / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")} | {
        "PERFKIT_BLOCKS": "basic", "PERFKIT_MODES": "inference", "PERFKIT_VARIANTS": "eager",
        "PERFKIT_KERNELS": "none", "PERFKIT_JSONL": str(out.with_suffix(".jsonl")), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_matrix.py", "-q", "-p", "no:cacheprovider",
                    "--benchmark-json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return out


def test_a_fresh_run_reads_in_bencher_and_github_action_benchmark(fresh_run: Path) -> None:
    (bench,) = check_adapters_can_read(fresh_run.read_text())
    # The dashboard's figure is perfkit's: the stored rounds are the record's timed rounds.
    record = bench["extra_info"]
    assert bench["stats"]["median"] == pytest.approx(record["step_time_median_s"], rel=1e-9)
    assert bench["stats"]["rounds"] == record["rounds"]
    assert "basic" in bench["fullname"] and bench["params"], bench["fullname"]


@pytest.mark.parametrize("path", sorted(ROOT.glob("reports/*/bench.json")), ids=lambda p: p.parent.name)
def test_the_committed_reports_read_in_both(path: Path) -> None:
    check_adapters_can_read(path.read_text())


def test_a_nan_anywhere_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN is not JSON"):
        _strict_json('{"benchmarks": [], "x": NaN}')
