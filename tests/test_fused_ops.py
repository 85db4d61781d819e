"""The fused kernels as torch.library ops: opcheck, no graph break, autograd's rules, the compiled variants.

The rules eager PyTorch keeps, each held by the fused blocks too: an in-place parameter change before
backward raises, a BatchNorm with ``track_running_stats=False`` leaves its buffers alone, float64 input is
refused with a clear error, and ``saved_tensors_hooks`` see every tensor backward reads.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)", allow_module_level=True)

from perfkit.kernels import dense, wrc  # noqa: E402, F401 (importing registers the ops)

from perfkit.blocks.densenet import DenseBlock  # noqa: E402
from perfkit.blocks.layers import ResidualEpilogue  # noqa: E402
from perfkit.fused import to_triton  # noqa: E402
from perfkit.measure import QUICK_POLICY, measure_cell  # noqa: E402
from perfkit.testing import assert_close  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _fresh_seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randomize_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)


def _dense_block(bottleneck: bool = True, num_layers: int = 2) -> DenseBlock:
    block = DenseBlock(5, num_layers, 3, bottleneck=bottleneck, bn_size=2)
    _randomize_norms(block)
    return block


def _epilogue() -> ResidualEpilogue:
    epilogue = ResidualEpilogue(5, alpha=0.7, beta=1.3, learnable=True)
    _randomize_norms(epilogue)
    return epilogue


# ----------------------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration and AOT dispatch tell the truth.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_opcheck_wrc_ops(training: bool, layout: str, dtype: str) -> None:
    """Odd shapes (3, 5, 7, 6): tiles end mid-row, channel blocks mid-block."""
    shape, fmt, dt = (3, 5, 7, 6), LAYOUTS[layout], DTYPES[dtype]
    y = torch.randn(shape, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    s = torch.randn(shape, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    weight, bias = torch.rand(5, requires_grad=True) + 0.5, torch.randn(5, requires_grad=True)
    alpha, beta = torch.tensor(0.7, requires_grad=True), torch.tensor(1.3, requires_grad=True)
    running_mean, running_var = torch.randn(5), torch.rand(5) + 0.5
    torch.library.opcheck(torch.ops.perfkit.bn_stats.default, (y.detach(), running_mean, running_var, None, 0.1))
    mean, var = (torch.ops.perfkit.bn_stats(y.detach(), None, None, None, None) if training
                 else (running_mean, running_var))
    torch.library.opcheck(torch.ops.perfkit.wrc_epilogue.default,
                          (y, s, mean, var, weight, bias, alpha, beta, training, 1e-5))
    dout = torch.randn(shape, dtype=dt).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.perfkit.wrc_backward.default,
                          (dout, y.detach(), s.detach(), weight.detach(), bias.detach(), alpha.detach(),
                           beta.detach(), mean, var, training, 1e-5, [True, True, True, True, False, True]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_opcheck_bn_relu_ops(batch_stats: bool, layout: str, dtype: str) -> None:
    """BN+ReLU on a channel prefix of a larger buffer (as a dense layer reads it), odd shapes."""
    buffer = torch.randn(3, 8, 5, 7, dtype=DTYPES[dtype]).contiguous(memory_format=LAYOUTS[layout])
    x = buffer[:, :5].detach().requires_grad_()
    weight, bias = torch.rand(5, requires_grad=True) + 0.5, torch.randn(5, requires_grad=True)
    running_mean, running_var = torch.randn(5), torch.rand(5) + 0.5
    args = (x, weight, bias, None if batch_stats else running_mean, None if batch_stats else running_var,
            batch_stats, 1e-5)
    torch.library.opcheck(torch.ops.perfkit.bn_relu.default, args)
    y, mean, var = torch.ops.perfkit.bn_relu(*args)
    if not batch_stats:
        mean, var = running_mean, running_var
    torch.library.opcheck(torch.ops.perfkit.bn_relu_backward.default,
                          (torch.randn_like(y), x.detach(), mean, var, weight.detach(), bias.detach(), 1e-5,
                           batch_stats, True))


@pytest.mark.parametrize(("bottleneck", "norms", "layout", "dtype"), [
    (True, "training", "nchw", "float32"), (True, "frozen", "channels_last", "bfloat16"),
    (False, "inference", "channels_last", "float32"), (False, "training", "nchw", "bfloat16"),
    (True, "inference", "nchw", "bfloat16"), (False, "frozen", "channels_last", "float32"),
])
def test_opcheck_dense_block_ops(bottleneck: bool, norms: str, layout: str, dtype: str) -> None:
    """Odd shapes (3, 5, 5, 7), growth 3; ``frozen``: a training block with its first BatchNorm in eval.

    Six cases cover each layout, dtype, norm mode and block kind (the full product costs ~2.5 minutes here).
    """
    block = to_triton(_dense_block(bottleneck=bottleneck).train(norms != "inference"))
    if norms == "frozen":
        block.layers[0].norm1.eval()
    x = torch.randn(3, 5, 5, 7).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with autocast:
        args = dense.dense_block_op_args(x, block.layer_tensors())
        torch.library.opcheck(torch.ops.perfkit.dense_block_forward.default, args)
        buffer, channel_mean, channel_var, hidden, mean2, var2 = torch.ops.perfkit.dense_block_forward(*args)
    _, params, stats, norm_batch, eps, bc, conv_dtype, _ = args
    grad = torch.randn_like(buffer)
    torch.library.opcheck(torch.ops.perfkit.dense_block_backward.default,
                          (grad, buffer.detach(), [p.detach() for p in params], stats, channel_mean, channel_var,
                           hidden, mean2, var2, norm_batch, eps, bc, conv_dtype, True))


# ----------------------------------------------------------------------------------------------------------
# torch.compile sees an op, not the interpreter's numpy code.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("block", ["wrc", "dense"])
def test_compiled_fused_block_has_no_graph_break(block: str) -> None:
    """dynamo traces the fused block into one graph holding the perfkit ops (no break, no interpreter code)."""
    if block == "wrc":
        model, inputs = to_triton(_epilogue().train()), (torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4))
    else:
        model, inputs = to_triton(_dense_block().train()), (torch.randn(2, 5, 4, 4),)
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    targets = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    expected = {"wrc": "perfkit.wrc_epilogue", "dense": "perfkit.dense_block_forward"}[block]
    assert any(expected in target for target in targets), targets


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["triton+compile", "channels_last+triton+compile",
                                     "channels_last+bf16+triton+compile"])
def test_triton_compile_variants_pass_the_gate(variant: str) -> None:
    """The hand-written kernels inside an otherwise compiled block, gate-checked in both modes.

    Under the interpreter a cell is gate-checked and then skipped for timing, with the gate's error in
    the reason; anything else (an error, a failed gate) is a different status.
    """
    for mode in ("inference", "training"):
        record = measure_cell("wrc", variant, mode, 4, device="cpu", bench_shape=False, policy=QUICK_POLICY)
        assert record.status in ("ok", "skipped"), (mode, record.status, record.reason)
        if record.status == "skipped":
            assert record.reason.startswith("correctness checked"), (mode, record.reason)


# ----------------------------------------------------------------------------------------------------------
# Eager's rules: version counters, untracked statistics, float64, saved-tensor hooks.
# ----------------------------------------------------------------------------------------------------------


def _dense_pair(**norm_overrides) -> tuple[DenseBlock, nn.Module]:
    reference = _dense_block()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            for name, value in norm_overrides.items():
                setattr(m, name, value)
    return reference, to_triton(_copy(reference))


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("block", ["dense", "wrc"])
def test_an_in_place_parameter_change_before_backward_raises_like_eager(block: str) -> None:
    if block == "dense":
        model = to_triton(_dense_block().train())
        inputs = (torch.randn(2, 5, 4, 4, requires_grad=True),)
        parameter = model.layers[0].conv1.weight
    else:
        model = to_triton(_epilogue().train())
        inputs = (torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4, requires_grad=True))
        parameter = model.bn.weight
    out = model(*inputs)
    with torch.no_grad():
        parameter.mul_(0.5)  # an optimizer step inside a gradient-accumulation loop
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("block", ["dense", "wrc"])
def test_track_running_stats_false_leaves_the_buffers_alone(block: str) -> None:
    reference = _dense_block() if block == "dense" else _epilogue()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False  # the buffers stay, as after load_state_dict of a tracked model
    fused = to_triton(_copy(reference).train())
    before = {k: v.clone() for k, v in fused.state_dict().items() if "running" in k or "num_batches" in k}
    assert before, "the test needs BatchNorms that keep their buffers"
    inputs = [torch.randn(2, 5, 4, 4)] if block == "dense" else [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)]
    fused_out = fused(*inputs)
    reference_out = reference.train()(*inputs)
    after = fused.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} moved in a training forward with track_running_stats=False"
    assert_close(fused_out, reference_out, torch.float32)


@pytest.mark.parametrize("block", ["dense", "wrc"])
def test_float64_is_refused_with_a_clear_error(block: str) -> None:
    model = to_triton(_dense_block() if block == "dense" else _epilogue()).double()
    inputs = [torch.randn(2, 5, 4, 4, dtype=torch.float64)] * (1 if block == "dense" else 2)
    with pytest.raises(TypeError, match="float64.*float32, bfloat16"):
        model(*inputs)


def _tensors_in(value, seen: set[int] | None = None) -> list[str]:
    """Paths of every tensor reachable from ``value`` through attributes, containers and dataclasses."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return ["tensor"]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return []
    return [f"{key}.{path}" for key, item in items for path in _tensors_in(item, seen)]


@pytest.mark.parametrize("block", ["dense", "dense_plain", "wrc"])
def test_saved_tensors_hooks_see_everything_backward_reads(block: str) -> None:
    """Nothing rides on ``ctx``: every tensor is packed by the hooks, and the gradient through hooks that
    swap each saved tensor for a copy (as ``save_on_cpu`` does) is exactly the gradient without them."""
    if block == "wrc":
        reference = _epilogue()
        inputs = [torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4, requires_grad=True)]
    else:
        reference = _dense_block(bottleneck=block == "dense")
        inputs = [torch.randn(2, 5, 4, 4, requires_grad=True)]

    def gradients(hooks: bool) -> tuple[list[torch.Tensor], int]:
        model = to_triton(_copy(reference).train())
        packed_bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal packed_bytes
            packed_bytes += t.numel() * t.element_size()
            return t.detach().clone()

        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*inputs)
        else:
            out = model(*inputs)
        node_state = {k: v for k, v in vars(out.grad_fn).items() if not k.startswith("__")} \
            if hasattr(out.grad_fn, "__dict__") else {}
        hidden = _tensors_in(node_state)
        assert not hidden, f"tensors kept on ctx, invisible to autograd's checks and hooks: {hidden}"
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(),
                                    [*inputs, *params])
        return list(grads), packed_bytes

    plain, _ = gradients(hooks=False)
    hooked, packed_bytes = gradients(hooks=True)
    for a, b in zip(plain, hooked, strict=True):
        assert torch.equal(a, b)
    assert packed_bytes > 0


@pytest.mark.parametrize("block", ["dense", "wrc"])
def test_fused_blocks_run_under_fake_tensor_mode(block: str) -> None:
    """What the memory model does: ``to_triton(model)``, then forward and backward on fake tensors. The fake
    implementations give the real op's shapes, dtypes and strides, and nothing launches a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    reference = _dense_block() if block == "dense" else _epilogue()
    count = 1 if block == "dense" else 2
    real_inputs = [torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last) for _ in range(count)]
    real_out = to_triton(_copy(reference).train())(*real_inputs)
    model = to_triton(_copy(reference).train())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        inputs = [mode.from_tensor(t).requires_grad_() for t in real_inputs]
        out = model(*inputs)
        out.sum().backward()
    assert (out.shape, out.stride(), out.dtype) == (real_out.shape, real_out.stride(), real_out.dtype)
    assert all(t.grad is not None and t.grad.shape == t.shape for t in inputs)
