"""``perfkit compare`` on real quick-profile runs: an A/A pair, a planted slowdown, a planted counter change,
and every kind of bad input (exit 2 with a message naming the problem)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perfkit.cli import main
from perfkit.results.compare import verdict

REPO = Path(__file__).resolve().parents[1]
SLEEP_PLUGIN = """
import os
import time

import torch
from torch import nn

from perfkit.registry import register


@register("sleep", kind="block", bench_shape=(4, 4, 4), test_shape=(4, 4, 4))
class Sleep(nn.Module):
    \"\"\"Sleeps PERFKIT_TEST_SLEEP_MS, then scales its input: a step time the machine's load barely moves.\"\"\"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        time.sleep(float(os.environ["PERFKIT_TEST_SLEEP_MS"]) / 1e3)
        return x * self.scale
"""


def matrix_run(out_dir: Path, sleep_ms: float) -> Path:
    """A real matrix run (``pytest benchmarks/test_matrix.py``) of a block whose step sleeps ``sleep_ms``,
    in eager and channels_last, both modes; returns its benchmark JSON (the JSON lines lie beside it).

    Timings of real blocks on a 2-core machine shared with other jobs swing by integer factors from one
    run to the next, so the A/A pair and the planted slowdown time a step made of a sleep: everything else
    (the gate, the rounds, the stored JSON, the comparison) is the real thing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sleep_block.py").write_text(SLEEP_PLUGIN)
    env = {**os.environ, "PERFKIT_TEST_SLEEP_MS": str(sleep_ms), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(out_dir), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_matrix.py", "-q", "-p", "no:cacheprovider",
         "-p", "sleep_block", "--perfkit-profile=quick", "--perfkit-blocks=sleep",
         "--perfkit-variants=eager,channels_last", f"--perfkit-jsonl={out_dir / 'results.jsonl'}",
         f"--benchmark-json={out_dir / 'bench.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir / "bench.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An A/A pair (two runs of the same code) and a run whose step sleeps 1.5 times as long."""
    base = tmp_path_factory.mktemp("compare")
    return matrix_run(base / "a", 50), matrix_run(base / "b", 50), matrix_run(base / "slow", 75)


def compare(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["compare", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def verdicts(out: str) -> list[str]:
    """The verdict of every timed cell in a markdown or text table."""
    rows = [row.strip("| ") for row in out.splitlines() if row.lstrip("| ").startswith("sleep ")]
    return [next(v for v in ("SLOWER (regression)", "faster", "unchanged", "too noisy to tell",
                                          "contended: not judged", "threads differ: not judged") if row.endswith(v))
            for row in rows]


def edited(source: Path, target: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return target


def test_a_a_pair_is_unchanged(runs, capsys):
    # 15%: an interval across two processes carries the CPU's 7% repeat floor (perfkit.stats.REPEAT_FLOOR_REL)
    # on top of the rounds' own spread, and a training step's backward and optimizer on a CPU shared with other
    # jobs spread a few percent: at 10% one A/A training cell read [0.927, 1.107], too noisy to tell
    # (2026-12-04, a clean clone's make test).
    status, out, _ = compare(capsys, runs[0], runs[1], "--threshold", "15%")
    assert status == 0, out
    assert "4 timed cells compared" in out
    assert verdicts(out) == ["unchanged"] * 4, out
    assert "No regression" in out


def test_a_verdict_allows_for_what_a_repeat_may_differ_by(runs, capsys):
    """The same file against itself: the ratio is 1.000, but each record says a fresh repeat may differ by
    7% or more on a CPU (REPEAT_FLOOR_REL), so "unchanged within ±5%" is more than the data can say."""
    status, out, _ = compare(capsys, runs[0], runs[0], "--format", "text")
    assert status == 0
    assert verdicts(out) == ["too noisy to tell"] * 4 and "No regression" in out
    status, out, _ = compare(capsys, runs[0], runs[0], "--format", "text", "--threshold", "10%")
    assert status == 0 and verdicts(out) == ["unchanged"] * 4


def test_sleeping_run_is_a_regression(runs, capsys):
    status, out, _ = compare(capsys, runs[0], runs[2], "--format", "text")
    assert status == 1, out
    assert verdicts(out) == ["SLOWER (regression)"] * 4 and "4 regression(s)" in out


def slow_down(data: dict, **extra_info) -> None:
    """Make channels_last training 1.5x slower in a run's JSON, and set ``extra_info`` fields of it."""
    bench = next(b for b in data["benchmarks"] if b["params"]["variant"] == "channels_last"
                 and b["params"]["mode"] == "training")
    bench["stats"]["data"] = [t * 1.5 for t in bench["stats"]["data"]]
    bench["extra_info"]["times_s"] = [t * 1.5 for t in bench["extra_info"]["times_s"]]
    bench["extra_info"].update(extra_info)


def test_planted_slowdown_in_one_cell_is_a_regression(runs, tmp_path, capsys):
    slow = edited(runs[0], tmp_path / "slow.json", slow_down)
    status, out, _ = compare(capsys, runs[0], slow, "--threshold", "10%")
    assert status == 1, out
    line = next(row for row in out.splitlines() if "sleep channels_last training" in row)
    assert "SLOWER (regression)" in line and "| 1.500 |" in line
    assert "1 regression(s)" in out
    assert sorted(verdicts(out)) == ["SLOWER (regression)"] + ["unchanged"] * 3


def test_a_contended_cell_is_shown_but_not_judged(runs, tmp_path, capsys):
    crowded = edited(runs[0], tmp_path / "crowded.json", lambda data: slow_down(data, contended=True))
    status, out, _ = compare(capsys, runs[0], crowded, "--threshold", "10%")
    assert status == 0, out  # 1.5x slower, but on a machine that was busy: not a regression
    line = next(row for row in out.splitlines() if "sleep channels_last training" in row)
    assert "contended: not judged" in line and "| 1.500 |" in line
    assert sorted(verdicts(out)) == ["contended: not judged"] + ["unchanged"] * 3

    def fewer_threads(data):
        for bench in data["benchmarks"]:
            bench["extra_info"]["threads"] = 1 if bench["extra_info"]["threads"] != 1 else 2

    status, out, _ = compare(capsys, runs[0], edited(runs[0], tmp_path / "threads.json", fewer_threads))
    assert status == 0 and verdicts(out) == ["threads differ: not judged"] * 4


def test_counter_increase_is_a_regression(runs, tmp_path, capsys):
    def more_flops(data):
        data["benchmarks"][0]["extra_info"]["flops_per_step"] += 1

    status, out, _ = compare(capsys, runs[0], edited(runs[0], tmp_path / "flops.json", more_flops))
    assert status == 1
    assert "flops_per_step" in out and "| yes |" in out


def test_cross_device_is_refused_with_the_reason(runs, tmp_path, capsys):
    def on_gpu(data):
        for bench in data["benchmarks"]:
            bench["extra_info"]["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}

    gpu = edited(runs[0], tmp_path / "gpu.json", on_gpu)
    status, out, err = compare(capsys, runs[0], gpu)
    assert status == 2 and out == ""
    assert "NVIDIA H100 80GB HBM3" in err and "not compared" in err and "--allow-cross-device" in err
    status, out, _ = compare(capsys, runs[0], gpu, "--allow-cross-device")
    assert status in (0, 1) and "cross-device" in out


@pytest.mark.parametrize("case, expected", [
    ("missing", "cannot read"),
    ("truncated", "invalid JSON"),
    ("schema", "record schema 'perfkit.record/0'"),
    ("not_perfkit", "extra_info holds no perfkit record"),
    ("nothing_in_common", "no cell in common"),
    ("empty", "empty file"),
])
def test_bad_input_exits_2_naming_the_problem(runs, tmp_path, capsys, case, expected):
    base = runs[0]
    text = base.read_text()
    new = tmp_path / f"{case}.json"
    if case == "truncated":
        new.write_text(text[: len(text) // 2])
    elif case == "empty":
        new.write_text("")
    elif case == "schema":
        edited(base, new, lambda d: d["benchmarks"][0]["extra_info"].update(schema="perfkit.record/0"))
    elif case == "not_perfkit":
        edited(base, new, lambda d: d["benchmarks"][0].update(extra_info={}))
    elif case == "nothing_in_common":
        edited(base, new, lambda d: [b["extra_info"].update(block="basic") for b in d["benchmarks"]])
    status, out, err = compare(capsys, base, new)
    assert status == 2, out + err
    assert expected in err and str(new) in err, err


def test_jsonl_and_json_of_one_run_compare_equal(runs, capsys):
    status, out, _ = compare(capsys, runs[0], runs[0].parent / "results.jsonl", "--threshold", "10%")
    assert status == 0 and verdicts(out) == ["unchanged"] * 4


@pytest.mark.parametrize("low, high, expected", [
    (1.06, 1.2, "slower"), (0.8, 0.9, "faster"), (0.97, 1.03, "unchanged"), (1.0, 1.08, "noisy"),
    (0.9, 1.0, "noisy"),
])
def test_verdict_against_the_band(low, high, expected):
    assert verdict(low, high, 0.05) == expected


def test_unmatched_cells_are_listed(runs, tmp_path, capsys):
    def drop_one(data):
        data["benchmarks"] = copy.deepcopy(data["benchmarks"][1:])

    status, out, _ = compare(capsys, runs[0], edited(runs[0], tmp_path / "fewer.json", drop_one))
    assert status == 0 and "Only in base (1)" in out


def test_threshold_parsing():
    from perfkit.results.compare import parse_threshold

    assert parse_threshold("5%") == pytest.approx(0.05) and parse_threshold("0.1") == pytest.approx(0.1)
    for bad in ("x", "-5%", "0"):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold(bad)


def test_a_run_wide_shift_is_told_apart_from_a_cells_change():
    from perfkit.record import Record
    from perfkit.results.compare import compare_records, render

    device = {"type": "cpu", "name": "AMD EPYC", "cores": 2, "isa": "avx2"}

    def run(factor_of) -> list[Record]:
        return [Record(block=f"b{i}", variant="eager", mode="inference", dtype="float32", batch=8, status="ok",
                       device=device, times_s=[1e-3 * factor_of(i) * (1 + 0.001 * k) for k in range(20)])
                for i in range(10)]

    base = run(lambda i: 1.0)
    everything = render(compare_records(base, run(lambda i: 1.3)), "text")
    assert "10 SLOWER (regression)" in everything and "The median cell moved by x1.300" in everything
    one_cell = render(compare_records(base, run(lambda i: 1.5 if i == 0 else 1.0)), "text")
    assert "1 SLOWER (regression)" in one_cell and "median cell moved" not in one_cell
