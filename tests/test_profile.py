"""``perfkit profile`` for real: a trace with the block's stage ranges, a top-operators table, and
TensorBoard's PyTorch profiler plugin listing the run over its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from perfkit.cli import main

TENSORBOARD = Path(sys.executable).with_name("tensorboard")


def trace_names(path: Path) -> set[str]:
    data = json.loads(path.read_text())
    assert isinstance(data["traceEvents"], list) and data["traceEvents"]
    return {event.get("name") for event in data["traceEvents"]}


@pytest.fixture(scope="module")
def basic_training(tmp_path_factory) -> Path:
    """``perfkit profile basic --mode training`` into a fresh log folder; returns the folder."""
    logdir = tmp_path_factory.mktemp("profiles")
    status = main(["profile", "basic", "--mode", "training", "--batch", "2", "--shape", "test", "--device", "cpu",
                   "-o", str(logdir)])
    assert status == 0
    return logdir


def test_trace_has_the_block_stages(basic_training, capsys):
    run = basic_training / "basic-eager-training"
    traces = list(run.glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = trace_names(traces[0])
    assert {"block:basic", "conv:conv1", "bn:bn1", "conv:conv2", "epilogue:epilogue", "bn:epilogue.bn"} <= names
    assert any(name.startswith("ProfilerStep#") for name in names)
    table = (run / "top_operators.md").read_text()
    assert "| operator | calls | self CPU | total CPU | self memory |" in table
    assert "`aten::" in table and "| epilogue |" in table and "| conv |" in table


def test_concat_ranges_in_a_dense_block(tmp_path):
    assert main(["profile", "dense_plain", "--batch", "1", "--shape", "test", "--device", "cpu",
                 "-o", str(tmp_path)]) == 0
    names = trace_names(next((tmp_path / "dense_plain-eager-inference").glob("*.pt.trace.json")))
    assert "concat:dense_plain" in names
    assert "conv:layers.0.conv1" in names


def test_rerun_keeps_one_trace(basic_training, tmp_path):
    logdir = tmp_path / "logs"
    shutil.copytree(basic_training, logdir)
    assert main(["profile", "basic", "--mode", "training", "--batch", "2", "--shape", "test", "--device", "cpu",
                 "-o", str(logdir)]) == 0
    assert len(list((logdir / "basic-eager-training").glob("*.pt.trace.json"))) == 1


def test_bad_variant_and_unrunnable_variant_exit_2(tmp_path, capsys):
    assert main(["profile", "basic", "--variant", "bf16+fp16", "--device", "cpu", "-o", str(tmp_path)]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["profile", "basic", "--variant", "fp16", "--device", "cpu", "-o", str(tmp_path)]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_plugin_lists_the_run(basic_training, tmp_path):
    if not TENSORBOARD.exists():
        pytest.skip(f"{TENSORBOARD} is missing: install the dev extra (pip install -e '.[dev]') for TensorBoard "
                    "and torch-tb-profiler")
    port = _free_port()
    log = (tmp_path / "tensorboard.log").open("w")
    process = subprocess.Popen([str(TENSORBOARD), "--logdir", str(basic_training), "--port", str(port),
                                "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        runs, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/runs",
                                            timeout=5) as response:
                    runs = json.load(response)
                if "basic-eager-training" in runs["runs"]:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        assert runs is not None and "basic-eager-training" in runs["runs"], (
            f"plugin answered {runs}; log:\n{(tmp_path / 'tensorboard.log').read_text()[-2000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler/workers?"
                                    f"run=basic-eager-training&view=Overview", timeout=10) as response:
            assert "basic-eager-training" in json.load(response)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
