"""The tensor-level memory model (``perfkit.measure.memory_model``), ``perfkit memory``, and the plan a cell makes
from it before allocating: predicted OOM and the correctness gate's batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from perfkit import cli
from perfkit.measure import QUICK_POLICY, TimingPolicy, measure_cell, memory_model, step_counts
from perfkit.measure.memory_model import CATEGORIES, plan_cell_memory, predict_step_memory
from perfkit.registry import Entry, get_entry

FAST = TimingPolicy(min_rounds=6, max_rounds=12, max_time_s=0.2, warmup_batch_s=0.005, warmup_max_s=0.05)

GiB = 2**30


def test_categories_add_up_and_name_what_a_training_step_keeps():
    p = predict_step_memory("basic", "eager", "training", 4, bench_shape=False)
    assert sum(p.at_peak.values()) == p.peak_bytes
    params = sum(t.numel() * 4 for t in __import__("perfkit").create("basic").parameters())
    assert p.at_peak["parameters"] == params
    assert p.category_peaks["gradients"] == params and p.category_peaks["optimizer_state"] == params
    assert p.at_peak["inputs"] >= 4 * 64 * 8 * 8 * 4  # the input batch (and the loss target)
    assert p.category_peaks["activations"] > 0 and p.category_peaks["temporaries"] > 0
    assert p.before_step_bytes == params * 2 + p.at_peak["buffers"] + p.at_peak["inputs"]
    assert p.modules and p.modules[0].activation_bytes >= p.modules[-1].activation_bytes
    inference = predict_step_memory("basic", "eager", "inference", 4, bench_shape=False)
    assert inference.category_peaks["gradients"] == inference.category_peaks["optimizer_state"] == 0


def test_variants_change_what_they_should():
    eager = predict_step_memory("basic", "eager", "training", 4, bench_shape=False)
    bf16 = predict_step_memory("basic", "bf16", "training", 4, bench_shape=False)
    assert bf16.category_peaks["parameters"] == eager.category_peaks["parameters"]  # autocast keeps fp32 weights
    assert bf16.category_peaks["activations"] != eager.category_peaks["activations"]
    compiled = predict_step_memory("basic", "channels_last+compile", "training", 4, bench_shape=False)
    assert compiled.variant == "channels_last+compile" and "predicted as its eager module" in compiled.notes[0]
    f64 = predict_step_memory("basic", "eager", "training", 4, bench_shape=False, dtype=torch.float64)
    assert f64.category_peaks["parameters"] == 2 * eager.category_peaks["parameters"]


def _slope_ratio(name: str, variant: str) -> float:
    """Activation bytes' slope from depth 4 to 8 over the slope from 2 to 4: 1 for a line."""
    kept = [predict_step_memory(name, variant, "training", 2, bench_shape=False,
                                overrides={"num_layers": depth}).category_peaks["activations"]
            for depth in (2, 4, 8)]
    return (kept[2] - kept[1]) / 4 / ((kept[1] - kept[0]) / 2)


@pytest.mark.parametrize("name", ["dense", "dense_plain"])
def test_fused_dense_block_activations_grow_linearly_the_reference_quadratically(name):
    # The reference keeps every layer's growing concat and its normalized copy (1.19 for the BC block, whose
    # 4k bottleneck outputs add a linear part; 1.26 for the plain block). The fused block keeps one buffer
    # and recomputes the normalized prefix in backward, through its ops' fake implementations here.
    assert _slope_ratio(name, "eager") > 1.1
    pytest.importorskip("triton")
    assert _slope_ratio(name, "triton") == pytest.approx(1.0, abs=1e-9)


def test_resnet50_at_batch_256_is_predicted_in_seconds():
    p = predict_step_memory("resnet50", "eager", "training", 256)
    assert 15 * GiB < p.peak_bytes < 30 * GiB  # ~20 GiB of activations, as measured on GPUs for fp32 at 256
    assert p.category_peaks["parameters"] == 25_557_032 * 4


def test_cli_prints_the_table_and_json(capsys):
    assert cli.main(["memory", "basic", "--batch", "2", "--shape", "64,8,8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for category in CATEGORIES:
        assert category in out
    assert "BasicBlock" in out and "peak rise" in out
    assert cli.main(["memory", "basic", "--batch", "2", "--shape", "64,8,8", "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shape"] == [2, 64, 8, 8] and data["peak_rise_bytes"] == data["peak_bytes"] - data[
        "before_step_bytes"]


@pytest.mark.parametrize("args, message", [
    (["memory", "nope"], "unknown block or network 'nope'; valid names: alexnet"),
    (["memory", "basic", "--batch", "0"], "batch 0 must be a positive integer"),
    (["memory", "basic", "--shape", "3,4"], "basic takes 3 (C,H,W)"),
    (["memory", "basic", "--variant", "fast"], "valid atoms: eager"),
    (["profile", "basic", "--batch", "-2", "-o", "unused"], "batch -2 must be a positive integer"),
])
def test_bad_input_is_a_clear_error(capsys, args, message):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_profile_on_a_missing_gpu_names_the_valid_devices(capsys, tmp_path):
    assert cli.main(["profile", "basic", "--device", "cuda", "-o", str(tmp_path)]) == 2
    assert "device 'cuda' is not available; valid here: cpu" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_step_that_cannot_fit_is_recorded_oom_without_allocating(monkeypatch):
    """A planted "the device has 1 GiB free": ResNet-50 training at batch 256 is predicted at ~20 GiB."""
    monkeypatch.setattr(memory_model, "free_memory_bytes", lambda device: GiB)
    def no_input(*args, **kwargs):
        raise AssertionError("the cell allocated its input batch")

    monkeypatch.setattr(Entry, "example_input", no_input)
    record = measure_cell("resnet50", "eager", "training", 256, "cpu", bench_shape=True, policy=QUICK_POLICY)
    assert record.status == "oom" and record.reason.startswith("predicted: the step needs at least")
    assert "1.00 GiB free" in record.reason
    assert record.predicted_peak_bytes > 15 * GiB and record.rel_error is None and not record.times_s
    assert record.params == 25_557_032


def test_the_gate_runs_at_the_largest_batch_whose_reference_fits(monkeypatch):
    variant = predict_step_memory("basic", "eager", "inference", 8, bench_shape=False).peak_bytes
    reference = {b: predict_step_memory("basic", "eager", "inference", b, bench_shape=False,
                                        dtype=torch.float64).peak_bytes for b in (3, 4, 8)}
    # Free memory where the variant fits at batch 8, but the float64 reference (plus the float32 model and
    # input it runs beside) fits only up to batch 3.
    before = predict_step_memory("basic", "eager", "inference", 8, bench_shape=False).before_step_bytes
    free = int((reference[3] + before) / memory_model.REFERENCE_HEADROOM) + 1
    assert variant <= free < (reference[4] + before) / memory_model.REFERENCE_HEADROOM
    plan = plan_cell_memory("basic", "eager", "inference", 8, bench_shape=False, device="cpu", free_bytes=free)
    assert plan.variant_fits and plan.gate_batch == 3

    monkeypatch.setattr(memory_model, "free_memory_bytes", lambda device: free)
    record = measure_cell("basic", "channels_last", "inference", 8, "cpu", bench_shape=False, policy=QUICK_POLICY,
                          memory_model="exact")
    assert record.status == "ok" and record.gate_batch == 3 and record.batch == 8
    assert record.input_shape[0] == 8 and record.rel_error < record.tolerance


def test_a_quiet_machine_gates_at_the_timed_batch():
    record = measure_cell("basic", "eager", "training", 4, "cpu", bench_shape=False, policy=QUICK_POLICY,
                          memory_model="exact")
    assert record.status == "ok" and record.gate_batch == 4
    assert record.predicted_memory["category_peaks"]["activations"] > 0
    # The measured CPU peak includes oneDNN's scratch; the prediction is tensors only.
    assert record.predicted_peak_rise_bytes <= record.peak_memory_rise_bytes * 1.5


def test_no_usdt_line_reaches_the_user():
    code = ("from perfkit.measure.memory import cpu_step_memory; import torch; "
            "cpu_step_memory(lambda: torch.ones(8) * 2); print('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "done"
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["basic", "dense_plain", "inception", "d2l_resnet18"])
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_the_meta_pass_bounds_the_exact_prediction(name: str, mode: str) -> None:
    """What lets the matrix skip the memory model where memory is plentiful: the allocation bound is above
    the exact float32 peak, and twice it above the float64 reference's."""
    entry = get_entry(name)
    bound = step_counts(entry, 4, False, mode, entry.kind == "block").bound_bytes
    float32 = predict_step_memory(name, "eager", mode, 4, bench_shape=False).peak_bytes
    float64 = predict_step_memory(name, "eager", mode, 4, bench_shape=False, dtype=torch.float64).peak_bytes
    assert float32 <= bound and float64 <= 2 * bound
    assert bound < 20 * float32  # a bound, not a number too large to decide anything


def test_auto_skips_the_memory_model_only_where_memory_is_plentiful(monkeypatch):
    entry = get_entry("basic")
    bound = step_counts(entry, 4, False, "training", True).bound_bytes
    record = measure_cell("basic", "eager", "training", 4, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok" and record.predicted_peak_bytes is None
    assert record.predicted_memory["method"] == "bound" and record.predicted_memory["bound_bytes"] == bound
    assert "--perfkit-memory-model exact" in record.predicted_memory["notes"][0]
    # Free memory below four times the bound: the exact prediction runs, as it does on every GPU.
    monkeypatch.setattr(memory_model, "free_memory_bytes", lambda device: 3 * bound)
    record = measure_cell("basic", "eager", "training", 4, "cpu", bench_shape=False, policy=FAST)
    assert record.status == "ok" and record.predicted_peak_bytes > 0 and record.gate_batch == 4
    assert record.predicted_memory["category_peaks"]["activations"] > 0
    with pytest.raises(ValueError, match="valid: auto, exact"):
        measure_cell("basic", "eager", "training", 4, "cpu", bench_shape=False, memory_model="always")
