"""The pytest-benchmark matrix end to end: options, ids, the JSON's fields, the JSON-lines file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from perfkit.matrix.config import resolve_matrix
from perfkit.matrix.options import OPTIONS, OptionError, option_values
from perfkit.record import Record, read_jsonl

ROOT = Path(__file__).resolve().parents[1]

# A plugin the benchmark run loads with -p: it registers two planted blocks, one whose float32 path is
# wrong and one that runs out of memory, so the run shows where failed and OOM cells end up.
PLANTED = textwrap.dedent('''
    import torch
    from torch import nn

    from perfkit.registry import register


    class _Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)


    @register("planted_wrong", kind="block", bench_shape=(4, 6, 6), test_shape=(4, 6, 6))
    class PlantedWrong(_Conv):
        def forward(self, x):
            out = self.conv(x)
            return out * 1.01 if x.dtype == torch.float32 else out


    @register("planted_oom", kind="block", bench_shape=(4, 6, 6), test_shape=(4, 6, 6))
    class PlantedOOM(_Conv):
        def forward(self, x):
            if x.dtype == torch.float32:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
            return self.conv(x)
''')


def _pytest(*args: str, env: dict[str, str] | None = None, plugin_dir: Path | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERFKIT_")}
    environ.update(env or {})
    if plugin_dir is not None:
        environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_run_writes_every_field(tmp_path):
    (tmp_path / "planted_blocks.py").write_text(PLANTED)
    out, jsonl = tmp_path / "bench.json", tmp_path / "results.jsonl"
    result = _pytest("-p", "planted_blocks", "--perfkit-blocks=basic,planted_*", "--perfkit-variants=eager,fp16",
                     "--perfkit-modes=inference,training", "--perfkit-batches=2", f"--perfkit-jsonl={jsonl}",
                     "--perfkit-device=cpu", "--perfkit-kernels=wrc_epilogue", f"--benchmark-json={out}",
                     plugin_dir=tmp_path, env={"PERFKIT_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # basic eager and the wrc_epilogue kernel's eager cell in both modes are timed; fp16 skips on the CPU
    # (and is no kernel variant); the planted blocks fail and run out of memory; the ceilings need a GPU.
    assert "4 passed, 7 skipped, 4 xfailed" in result.stdout
    assert "XFAIL benchmarks/test_matrix.py::test_matrix[planted_wrong-eager-inference-b2] - failed: output " \
           "relative error" in result.stdout

    data = json.loads(out.read_text())
    device = data["machine_info"]["perfkit_device"]
    assert device["type"] == "cpu" and device["name"] and device["torch"]
    assert data["perfkit_profile"] == "quick"
    assert data["perfkit_command"].startswith("PERFKIT_THREADS=1 pytest benchmarks/")  # reruns the same run

    fields = {f.name for f in dataclasses.fields(Record)}
    kernels = [b for b in data["benchmarks"] if "kernel" in b["params"]]
    assert {b["name"] for b in kernels} == {"test_kernel[wrc_epilogue-eager-inference-float32-nchw]",
                                            "test_kernel[wrc_epilogue-eager-training-float32-nchw]"}
    for bench in kernels:
        record = Record.from_dict(bench["extra_info"])
        assert record.kind == "kernel" and record.status == "ok" and record.rel_error < 1e-4
        assert bench["stats"]["data"] == record.times_s
        # y, s read and out written (training: and the backward's 5 tensors), float32 [2, 16, 8, 8].
        tensor = 2 * 16 * 8 * 8 * 4
        assert record.bytes_per_step >= (8 if record.mode == "training" else 3) * tensor
        assert record.achieved_gb_per_s == pytest.approx(record.bytes_per_step / record.step_time_median_s / 1e9)
        # Kernel cells run at the matrix's thread count and carry the machine's load, as block cells do.
        assert record.threads == 1 and record.machine_load["threads"] == 1
        assert isinstance(record.contended, bool) and record.timing_stop
        assert record.wall_split_s["timed rounds"] == pytest.approx(sum(record.times_s))

    timed = {(b["params"]["block"], b["params"]["mode"]): b for b in data["benchmarks"] if "block" in b["params"]}
    assert set(timed) == {("basic", "inference"), ("basic", "training")}
    for (_, mode), bench in timed.items():
        assert bench["params"] == {"block": "basic", "variant": "eager", "mode": mode, "dtype": "float32", "batch": 2}
        assert bench["group"] == f"basic-{mode}"
        assert bench["name"] == f"test_matrix[basic-eager-{mode}-b2]"
        info = bench["extra_info"]
        assert set(info) == fields
        record = Record.from_dict(info)
        assert record.status == "ok" and record.device == device
        assert record.samples_per_s and record.peak_memory_bytes and record.flops_per_step and record.rel_error < 1e-4
        # The allocator the cell ran with, and how many pages its rounds faulted in.
        assert record.machine_load["malloc"].startswith(("glibc, pinned by perfkit", "the C library's default"))
        assert record.machine_load["minor_faults_per_round"] >= 0
        # pytest-benchmark stored exactly the record's rounds: the synchronized step times.
        assert bench["stats"]["data"] == record.times_s
        assert bench["stats"]["rounds"] == record.rounds
        assert bench["options"]["warmup"] is False or bench["options"]["warmup"] == 0

    skipped = data["perfkit_skipped_cells"]
    assert len(skipped) == 6 and all("fp16 needs a CUDA GPU" in c["reason"] for c in skipped)
    failed = {(c["block"], c["mode"]): c for c in data["perfkit_failed_cells"]}
    assert {c["status"] for k, c in failed.items() if k[0] == "planted_wrong"} == {"failed"}
    assert {c["status"] for k, c in failed.items() if k[0] == "planted_oom"} == {"oom"}
    assert failed[("planted_wrong", "training")]["rel_error"] == pytest.approx(0.01, rel=1e-3)

    records = read_jsonl(jsonl)
    assert len(records) == 14
    assert sorted(r.status for r in records) == ["failed"] * 2 + ["ok"] * 4 + ["oom"] * 2 + ["skipped"] * 6


def test_ids_and_profile_defaults():
    result = _pytest("--collect-only", "-q", "--perfkit-device=cpu")
    assert result.returncode == 0, result.stderr
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines()
           if "test_matrix[" in line or "test_kernel[" in line]
    assert "basic-channels_last-training-b8" in ids
    assert "basic-compile-inference-b8" in ids
    # The quick profile compiles one small block only.
    assert not any(i.startswith("bottleneck-compile") for i in ids)
    assert "dense_bn_relu-triton-training-float32-nchw" in ids
    assert not any(i.startswith("wrc_epilogue-compile") for i in ids)
    assert len(ids) == len(set(ids))


def _resolve(**options: str):
    """The matrix resolved from command-line ``options`` (by name) and the PERFKIT_* variables, without pytest."""
    return resolve_matrix(option_values(lambda dest: options.get(dest.removeprefix("perfkit_"))))


def test_environment_selects_and_names_are_canonical(monkeypatch):
    for name, value in {"PERFKIT_BLOCKS": "wrc", "PERFKIT_VARIANTS": "bf16+channels_last",
                        "PERFKIT_MODES": "training", "PERFKIT_BATCHES": "3,5", "PERFKIT_DEVICE": "cpu",
                        "PERFKIT_ISOLATE": "1"}.items():
        monkeypatch.setenv(name, value)
    matrix = _resolve(modes="inference")  # an option wins over its variable
    assert matrix.cells() == [("wrc", "channels_last+bf16", "inference", "bfloat16", 3),
                              ("wrc", "channels_last+bf16", "inference", "bfloat16", 5)]
    assert matrix.profile_name == "quick" and str(matrix.jsonl) == "out/results.jsonl" and matrix.isolate


@pytest.mark.parametrize("option, message", [
    ({"blocks": "basic,no_such_block"}, "'no_such_block' matches no registered block or network; valid names: "),
    ({"variants": "bf16+fp16"}, "bf16 and fp16 are two autocast dtypes"),
    ({"variants": "fast"}, "valid atoms: eager, channels_last, bf16, fp16, compile, max-autotune, cudagraphs"),
    ({"modes": "train"}, "valid modes: inference, training"),
    ({"profile": "medium"}, "valid profiles: quick, full"),
    ({"batches": "0"}, "give positive integers"),
    ({"kernels": "wrc"}, "valid kernels: wrc_epilogue, dense_bn_relu (or none)"),
    ({"threads": "0"}, "--perfkit-threads '0': give a positive integer"),
    ({"threads": "many"}, "so 1.."),
])
def test_bad_options_name_the_valid_values(monkeypatch, option, message):
    for name in ("PERFKIT_BLOCKS", "PERFKIT_VARIANTS", "PERFKIT_MODES", "PERFKIT_PROFILE", "PERFKIT_BATCHES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OptionError) as info:
        _resolve(device="cpu", **option)
    assert message in str(info.value)
    if "blocks" in option:
        assert "basic" in str(info.value).split("valid names:")[1]


def test_a_variable_goes_through_its_options_parser(monkeypatch):
    """A bad PERFKIT_* value fails as the same value given as the option does."""
    for name in [k for k in os.environ if k.startswith("PERFKIT_")]:
        monkeypatch.delenv(name)
    with pytest.raises(OptionError) as from_option:
        _resolve(device="cpu", batches="0,2")
    monkeypatch.setenv("PERFKIT_BATCHES", "0,2")
    with pytest.raises(OptionError) as from_variable:
        _resolve(device="cpu")
    assert str(from_variable.value) == str(from_option.value)


def test_pytest_registers_exactly_the_option_table():
    result = _pytest("--help")
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"(--perfkit-[a-z-]+)", result.stdout))
    assert flags == {option.flag for option in OPTIONS}
    assert len(OPTIONS) == len(flags) and all(option.help and "\n" not in option.help for option in OPTIONS)
    for option in OPTIONS:
        assert option.env is None or option.env.startswith("PERFKIT_")


def test_a_bad_option_stops_pytest_with_the_valid_names():
    result = _pytest("--collect-only", "-q", "--perfkit-blocks=nope")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "'nope' matches no registered block or network; valid names: alexnet, basic" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device where every selected cell is skipped (no fp16)")
def test_a_run_with_no_timed_cell_still_writes_its_json(tmp_path):
    """pytest-benchmark writes nothing when no benchmark ran; the plugin writes the JSON with the cells listed."""
    out = tmp_path / "bench.json"
    result = _pytest("-q", "benchmarks/test_matrix.py", "--perfkit-blocks=basic", "--perfkit-variants=fp16",
                     "--perfkit-modes=inference", f"--perfkit-jsonl={tmp_path / 'r.jsonl'}", f"--benchmark-json={out}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmarks"] == [] and data["machine_info"]["perfkit_device"]["type"] == "cpu"
    assert [c["variant"] for c in data["perfkit_skipped_cells"]] == ["fp16"]
    assert "fp16 needs a CUDA GPU" in data["perfkit_skipped_cells"][0]["reason"]
