"""Variant names, their errors, when they skip, and what applying one does to a module."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from perfkit.fused import FUSED_FOR
from perfkit.variants import VARIANTS, Variant, canonical_name, parse_variant


def test_atoms_parse_and_keep_their_name():
    for atom in VARIANTS:
        assert parse_variant(atom).name == atom


def test_order_does_not_matter():
    assert parse_variant("bf16+channels_last") == parse_variant("channels_last+bf16")
    assert canonical_name("compile+bf16+channels_last") == "channels_last+bf16+compile"
    assert canonical_name("max-autotune+triton+fp16") == "fp16+triton+max-autotune"


def test_fields():
    v = parse_variant("channels_last+fp16+cudagraphs")
    assert v == Variant(channels_last=True, amp_dtype=torch.float16, compile_mode="reduce-overhead")
    assert v.compute_dtype == "float16"
    assert parse_variant("eager") == Variant()
    assert parse_variant("eager").compute_dtype == "float32"
    assert parse_variant("bf16+max-autotune").compile_mode == "max-autotune"


@pytest.mark.parametrize("name, message", [
    ("bf16+fp32", "unknown variant atom(s) ['fp32']"),
    ("bf16+fp16", "bf16 and fp16"),
    ("compile+max-autotune", "compile and max-autotune are different torch.compile modes"),
    ("cudagraphs+compile", "choose one of compile, max-autotune, cudagraphs"),
    ("eager+channels_last", "'eager' is the untransformed reference"),
    ("bf16+bf16", "repeats an atom"),
])
def test_bad_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError) as info:
        parse_variant(name)
    assert message in str(info.value)


def test_unknown_atom_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid atoms: eager, channels_last, bf16, fp16, compile, max-autotune"):
        parse_variant("channel_last")


def test_skip_reasons_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    conv = nn.Conv2d(3, 3, 1)
    assert "fp16 needs a CUDA GPU" in parse_variant("fp16").skip_reason("cpu", conv)
    assert "cudagraphs needs a CUDA GPU" in parse_variant("cudagraphs").skip_reason("cpu", conv)
    assert parse_variant("bf16+channels_last").skip_reason("cpu", conv) is None
    assert "need a CUDA GPU (or TRITON_INTERPRET=1" in parse_variant("triton").skip_reason("cpu", conv)


def test_triton_needs_a_fusable_module_with_a_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parse_variant("triton").skip_reason("cpu", nn.Conv2d(3, 3, 1)).startswith(
        "triton: no fusable pattern in Conv2d (supported: ResidualEpilogue, DenseBlock")

    class Fusable(nn.Identity):
        pass

    monkeypatch.setitem(FUSED_FOR, Fusable, ("perfkit.fused.not_written_yet", "FusedThing"))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Fusable())
    reason = parse_variant("triton").skip_reason("cpu", model)
    assert reason == "the fused module perfkit.fused.not_written_yet is not available yet"


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())


def test_channels_last_converts_weights_and_input():
    model, x = _block(), torch.randn(2, 4, 5, 5)
    prepared = parse_variant("channels_last").apply(model, x, "inference")
    assert prepared.inputs.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.training
    out = prepared.forward()
    assert out.is_inference()
    torch.testing.assert_close(out, _block().eval()(x))


def test_bf16_is_autocast_with_float32_weights():
    model, x = _block(), torch.randn(2, 4, 5, 5)
    prepared = parse_variant("bf16").apply(model, x, "inference")
    with torch.inference_mode(), prepared.variant.autocast("cpu"):
        assert model[0](prepared.inputs).dtype == torch.bfloat16
    assert model[0].weight.dtype == torch.float32
    assert prepared.variant.compute_dtype == "bfloat16"


def test_training_step_updates_weights_and_drops_grads():
    model, x = _block(), torch.randn(2, 4, 5, 5)
    prepared = parse_variant("eager").apply(model, x, "training", input_requires_grad=True)
    assert model.training
    before = model[0].weight.detach().clone()
    out, grads = prepared.forward_backward()
    # One gradient per parameter, in the module's order, then the input's.
    assert [g.shape for g in grads] == [p.shape for p in model.parameters()] + [x.shape]
    assert all(g.abs().sum() > 0 for g in grads)
    prepared.zero_grad()
    prepared.step()
    assert not torch.equal(before, model[0].weight)
    assert all(p.grad is None for p in model.parameters()) and prepared.inputs.grad is None
    assert prepared.optimizer.param_groups[0]["momentum"] == 0.9


def test_the_loss_gives_a_batchnorm_output_a_gradient():
    # With out.sum() as the loss, a BatchNorm output's gradient reaching its input is zero; the step's
    # random projection is not.
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    prepared = parse_variant("eager").apply(bn, x, "training", input_requires_grad=True)
    _, grads = prepared.forward_backward()
    assert grads[-1].norm() > 1e-3 * x.numel() ** 0.5

    bn(x).sum().backward()
    assert x.grad.norm() < 1e-5


def test_triton_swap_sets_the_mode_of_the_fused_modules(monkeypatch, tmp_path):
    # A fused module is built fresh (in training mode); the cell's mode must reach it after the swap.
    (tmp_path / "fake_fused.py").write_text(textwrap.dedent("""
        from torch import nn


        class FakeFused(nn.Module):
            @classmethod
            def from_reference(cls, reference):
                return cls()

            def forward(self, x):
                return x
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    class Fusable(nn.Identity):
        pass

    monkeypatch.setitem(FUSED_FOR, Fusable, ("fake_fused", "FakeFused"))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Fusable())
    prepared = parse_variant("triton").apply(model, torch.randn(1, 3, 2, 2), "inference")
    assert type(prepared.module[1]).__name__ == "FakeFused"
    assert not any(m.training for m in prepared.module.modules())


class _Epilogue(nn.Module):
    """A residual epilogue written as torchvision writes it, and a BN-ReLU with no sum (not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv(torch.relu(self.bn1(x))))
        out += x
        return torch.relu(out)


def _interpreted_triton(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_the_triton_swap_says_what_it_fused(monkeypatch):
    _interpreted_triton(monkeypatch)
    import perfkit

    prepared = parse_variant("triton").apply(nn.Sequential(_Epilogue(), _Epilogue()), torch.randn(1, 4, 3, 3),
                                             "inference")
    assert prepared.record_fields == {"fused_modules": 2, "fused_kinds": {"FusedResidualEpilogue": 2}}
    # perfkit's own blocks are swapped by class, and counted the same way.
    prepared = parse_variant("triton").apply(perfkit.create("basic"), torch.randn(1, 64, 4, 4), "inference")
    assert prepared.record_fields == {"fused_modules": 1, "fused_kinds": {"FusedResidualEpilogue": 1}}
    assert parse_variant("channels_last").apply(_Epilogue(), torch.randn(1, 4, 3, 3), "inference").record_fields == {}


def test_a_triton_cell_records_its_fusions_and_a_model_without_any_is_skipped(monkeypatch):
    _interpreted_triton(monkeypatch)
    from perfkit import registry
    from perfkit.measure import measure_cell

    registry._load()
    for cls in (_Epilogue, nn.Identity):
        name = f"test_{cls.__name__.lower()}"
        monkeypatch.setitem(registry._REGISTRY, name, registry.Entry(name, "block", cls, (4, 3, 3), (4, 3, 3)))
    record = measure_cell("test__epilogue", "triton", "training", 2, "cpu", bench_shape=False)
    # Gated in the interpreter, not timed; the record says what ran fused.
    assert record.status == "skipped" and record.reason.startswith("correctness checked"), record.reason
    assert record.fused_modules == 1 and record.fused_kinds == {"FusedResidualEpilogue": 1}
    record = measure_cell("test_identity", "triton", "inference", 2, "cpu", bench_shape=False)
    assert record.status == "skipped" and record.reason.startswith("triton: no fusable pattern in Identity")
    assert record.rel_error is None and record.step_time_median_s is None
