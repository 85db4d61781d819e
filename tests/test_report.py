"""``perfkit report`` on a small real run of the quick profile, with a failed cell and a kernel cell planted
into a copy of its JSON lines."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from perfkit.cli import main
from perfkit.record import Record, append_jsonl, read_jsonl
from perfkit.results.load import device_slug, load_results

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """The quick profile's ``basic`` block in eager, channels_last and fp16 (skipped on the CPU), both modes:
    (benchmark JSON, JSON lines)."""
    out = tmp_path_factory.mktemp("run")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_matrix.py", "-q", "-p", "no:cacheprovider",
         "--perfkit-profile=quick", "--perfkit-blocks=basic", "--perfkit-variants=eager,channels_last,fp16",
         "--perfkit-memory-model=exact",
         f"--perfkit-jsonl={out / 'results.jsonl'}", f"--benchmark-json={out / 'bench.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "bench.json", out / "results.jsonl"


@pytest.fixture(scope="module")
def planted(run, tmp_path_factory) -> Path:
    """A copy of the run's JSON lines where channels_last training failed its gate yet ran 10x faster, plus
    a kernel cell."""
    records = read_jsonl(run[1])
    path = tmp_path_factory.mktemp("planted") / "planted.jsonl"
    for record in records:
        append_jsonl(path, record)
    cell = next(r for r in records if r.variant == "channels_last" and r.mode == "training")
    append_jsonl(path, dataclasses.replace(
        cell, status="failed", rel_error=0.3, reason="gradients relative error 3.000e-01 > 1.0e-04",
        step_time_median_s=cell.step_time_median_s / 10, samples_per_s=cell.samples_per_s * 10))
    append_jsonl(path, Record(
        block="wrc_epilogue", variant="triton", mode="inference", dtype="float32", batch=8, status="ok",
        kind="kernel", device=cell.device, step_time_median_s=1e-3, times_s=[1e-3] * 5, bytes_per_step=4 * 10**6,
        flops_per_step=10**6, achieved_gb_per_s=4.0))
    return path


def report(*args) -> int:
    """``perfkit report`` compared with no committed report: reports/ may hold this machine's own folder, and
    a test must not depend on which machine runs it (the comparison is tested in test_report_stats.py)."""
    argv = [str(a) for a in args]
    if "--baseline" not in argv and "--no-compare" not in argv:
        argv.append("--no-compare")
    return main(["report", *argv])


def test_report_from_the_real_run(run, tmp_path):
    bench, _ = run
    assert report(bench, "-o", tmp_path) == 0
    device = json.loads(bench.read_text())["machine_info"]["perfkit_device"]
    folder = tmp_path / device_slug(device)
    assert folder.name.startswith("cpu-")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", bench.name, "index.html", "memory-inference.png", "memory-training.png",
                     "roofline.png", "speedup-inference.png", "speedup-training.png", "summary.csv"]
    # The run's own JSON is kept beside its report: the baseline `perfkit compare` reads next time.
    assert (folder / bench.name).read_bytes() == bench.read_bytes()
    readme = (folder / "README.md").read_text()
    assert f"[{bench.name}]({bench.name})" in readme
    assert device["name"] in readme and "profile `quick`" in readme
    for text in ("## Inference", "## Training", "`basic`", "`eager`", "`channels_last`", "`fp16`",
                 "skipped: fp16 needs a CUDA GPU", "reference · ", "### Best variant per block", "## Summary",
                 "](speedup-training.png)", "](memory-inference.png)", "### Memory: predicted against measured"):
        assert text in readme, text
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    assert len(rows) == 6 and "times_s" not in rows[0]
    # Predicted (tensors only) against measured: every ok cell has both, the measured CPU peak adding oneDNN's
    # scratch to the tensors, so the ratio sits at or above about 1.
    for row in (r for r in rows if r["status"] == "ok"):
        predicted, measured = float(row["predicted_peak_rise_bytes"]), float(row["peak_memory_rise_bytes"])
        assert float(row["predicted_activations_at_peak_bytes"]) > 0 and 0.8 <= measured / predicted < 5, row
    assert "pred " in readme and " · meas " in readme
    assert {r["status"] for r in rows} == {"ok", "skipped"}
    index = (tmp_path / "README.md").read_text()
    assert f"[{folder.name}/]({folder.name}/README.md)" in index and "| `basic` |" in index


def test_failed_cell_never_reads_as_a_speedup(run, planted, tmp_path):
    assert report(run[0], planted, "-o", tmp_path, "--copy-gbps", "8") == 0
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    readme = (folder / "README.md").read_text()
    training = readme.split("## Training")[1]
    speedup_row = next(line for line in training.splitlines() if line.startswith("| `basic` |"))
    # The failed cell ran 10x faster, yet no ratio is shown for it: eager reads as the reference.
    assert "FAILED (err 3e-01)" in speedup_row and "reference · " in speedup_row
    assert "×" not in speedup_row
    best = training.split("### Best variant per block")[1]
    assert "`channels_last`" not in best
    # The kernel: 4 MB in 1 ms is 4 GB/s, half the 8 GB/s copy bandwidth given.
    assert "| `wrc_epilogue` | `triton` | inference | float32 | 8 | 1000.0 µs | 4 | 50% |" in readme
    assert (folder / "roofline.png").exists() and "](roofline.png)" in readme


def test_rerun_replaces_the_report(run, planted, tmp_path):
    assert report(run[0], planted, "-o", tmp_path) == 0
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (folder / "ceilings.json").write_text(json.dumps({"copy_gb_per_s": 16.0}))
    assert report(run[0], "-o", tmp_path) == 0  # no kernel cells this time
    assert "; 0 kernel cells by achieved GB/s" in (folder / "README.md").read_text()
    assert (folder / "ceilings.json").exists()
    first = (folder / "README.md").read_text()
    assert report(run[0], "-o", tmp_path) == 0
    assert (folder / "README.md").read_text() == first


def test_ceilings_file_gives_the_fraction(run, planted, tmp_path):
    records = read_jsonl(planted)
    folder = tmp_path / device_slug(records[0].device)
    folder.mkdir()
    (folder / "ceilings.json").write_text(json.dumps({"copy_gb_per_s": 16.0, "bf16_tflops": 1.0}))
    assert report(planted, "-o", tmp_path) == 0
    assert "| 4 | 25% |" in (folder / "README.md").read_text()


def test_json_and_jsonl_hold_the_same_cells(run):
    from_json, from_lines = load_results(run[0]).records, load_results(run[1]).records
    key = lambda r: (r.block, r.variant, r.mode, r.status)  # noqa: E731
    assert sorted(map(key, from_json)) == sorted(map(key, from_lines))
    timed = [r for r in from_json if r.status == "ok"]
    assert timed and all(len(r.times_s) == r.rounds for r in timed)


def test_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"benchmarks": [')
    assert report(tmp_path / "bad.json", "-o", tmp_path / "out") == 2
    assert "bad.json: line 1, column 17: invalid JSON: Expecting value" in capsys.readouterr().err
    # A truncated multi-line file: the error is on its last line, not on line 1.
    (tmp_path / "cut.json").write_text('{\n "benchmarks": [\n  {"name": "x",\n   "group": "ab')
    assert report(tmp_path / "cut.json", "-o", tmp_path / "out") == 2
    assert "cut.json: line 4, column 13: invalid JSON: Unterminated string starting at" in capsys.readouterr().err
    good = json.dumps(Record(block="basic", variant="eager", mode="inference", dtype="float32", batch=8,
                             status="skipped").to_dict())
    (tmp_path / "lines.jsonl").write_text(f'{good}\n{good}\n{{"schema": \n')
    assert report(tmp_path / "lines.jsonl", "-o", tmp_path / "out") == 2
    assert "lines.jsonl: line 3, column 12: invalid JSON: Expecting value" in capsys.readouterr().err
    assert report(tmp_path / "missing.json", "-o", tmp_path / "out") == 2
    assert "missing.json: cannot read" in capsys.readouterr().err


def _write_one_record(path: Path) -> Path:
    append_jsonl(path, Record(block="basic", variant="eager", mode="inference", dtype="float32", batch=8,
                              status="skipped", reason="planted"))
    return path


@pytest.mark.parametrize("verb", ["report", "history", "profile", "launch"])
def test_output_under_a_file_is_one_message_and_exit_2(verb, tmp_path, capsys):
    results = _write_one_record(tmp_path / "results.jsonl")
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "reports"
    argv = {"report": ["report", str(results), "--no-compare"], "history": ["history", str(results)],
            "profile": ["profile", "basic", "--shape", "test", "--batch", "1"],
            "launch": ["launch", "--shards", "1", "--executor", "local"]}[verb]
    # Checked before any work: launch would otherwise run its shards first, profile its model.
    assert main([*argv, "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"perfkit {verb}: -o {folder}: cannot create this folder: {tmp_path / 'a-file'} is a "
                           "file, not a folder; give a folder that exists or whose nearest existing parent is a "
                           "folder you can write in")


def test_output_folder_without_permission_says_so(tmp_path, capsys, monkeypatch):
    # Run as root, a read-only parent does not stop mkdir, so the refusal is planted where the OS would raise it.
    results = _write_one_record(tmp_path / "results.jsonl")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert report(results, "-o", tmp_path / "locked" / "out") == 2
    assert (f"-o {tmp_path / 'locked' / 'out'}: cannot create this folder: no permission to create folders in "
            f"{tmp_path}") in capsys.readouterr().err


def _render_in_chromium(url: str) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium (Debian's package or Playwright's)."""
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(name)), None)
    if binary:
        result = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no Chromium: neither a chromium/google-chrome binary on PATH nor Playwright "
                    "(apt-get install chromium, or pip install playwright && playwright install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch()
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        dom = page.content()
        browser.close()
    return dom


class _Tables(HTMLParser):
    """Every table of a page as rows of cell texts, with the attributes of each <table> and of <body>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[dict, list[list[str]]]] = []
        self.body: dict = {}
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append((dict(attrs), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "body":
            self.body = dict(attrs)
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_view_renders_sortable_tables_in_chromium(run, tmp_path):
    assert report(run[0], "-o", tmp_path, "--no-compare") == 0
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    readme = (folder / "README.md").read_text()
    # Table 1 is the geometric-mean speedup table; sort it by its last column, descending.
    dom = _render_in_chromium((folder / "index.html").as_uri() + "#sort=1,3,desc")
    page = _Tables()
    page.feed(dom)
    assert page.body.get("data-ready") == "1", "the page's script did not run"
    assert len(page.tables) == sum(1 for line in readme.splitlines() if line.startswith("|---"))
    attrs, rows = page.tables[1]
    assert rows[0] == ["mode", "variant", "correct / run", "geomean speedup"]
    assert attrs.get("data-sorted-by") == "3,desc"
    # channels_last in both modes has a geomean; fp16 (skipped on the CPU) has none and sorts after them.
    speedups = [float(re.search(r"([0-9.]+)×", r[3]).group(1)) for r in rows[1:3]]
    assert speedups == sorted(speedups, reverse=True) and {r[1] for r in rows[1:3]} == {"channels_last"}
    assert [r[3] for r in rows[3:]] == ["—", "—"]
    # The rendered speedup table holds the README's cells.
    speedup_rows = next(rows for _, rows in page.tables if rows[0][:3] == ["block", "batch", "eager"])
    assert speedup_rows[1][0] == "basic" and speedup_rows[1][2].startswith("reference · ")
    assert any(r.startswith("| `basic` | 8 | reference · ") for r in readme.splitlines())
    # Self-contained: every plot is embedded, none is linked.
    assert len(page.images) == len(list(folder.glob("*.png"))) and all(
        src.startswith("data:image/png;base64,") for src in page.images)
