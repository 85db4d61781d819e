"""The fused BN+ReLU kernels and the memory-efficient dense block against float64 PyTorch references.

Runs on the CPU under ``TRITON_INTERPRET=1`` (``make test`` sets it): sizes are tiny because the interpreter
pays ~0.1 s a launch. Every tensor the kernels module allocates is poisoned with NaN (autouse fixture), so
an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import copy
import gc
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton kernels on CPU tensors: set TRITON_INTERPRET=1")

triton = pytest.importorskip("triton")

from perfkit.kernels import _tiles, bn_relu  # noqa: E402

from perfkit.blocks.densenet import DenseBlock  # noqa: E402
from perfkit.fused.dense import FusedDenseBlock  # noqa: E402
from perfkit.measure.memory import cpu_step_memory  # noqa: E402
from perfkit.testing import REL_TOLERANCE, assert_close, dtype_name, relative_error  # noqa: E402

LAYOUTS = ("nchw", "channels_last")


@pytest.fixture(autouse=True)
def _fresh_seed(request: pytest.FixtureRequest) -> None:
    """A different random draw for every test case (reproducible from its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill every tensor the kernels module allocates with NaN before a kernel writes it."""
    allocate = _tiles.allocate

    def poisoned(*args, **kwargs):
        return allocate(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(_tiles, "allocate", poisoned)


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _randomize_norms(module: nn.Module) -> None:
    """BatchNorms that are not the identity: random affine and running statistics."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def _make_block(bottleneck: bool, in_channels: int = 5, num_layers: int = 3, growth_rate: int = 3) -> DenseBlock:
    block = DenseBlock(in_channels, num_layers, growth_rate, bottleneck=bottleneck, bn_size=2)
    _randomize_norms(block)
    return block


def _random_input(shape: tuple[int, ...]) -> torch.Tensor:
    """Off-centre and scaled, so the batch statistics are far from (0, 1)."""
    return torch.randn(shape) * 1.5 + 0.7


def _assert_same_state(actual: nn.Module, expected: nn.Module, dtype: torch.dtype, grads: bool = True,
                       params: bool = False, grad_tolerance: dict[str, float] | None = None) -> None:
    """BatchNorm buffers of ``actual`` against the float64 ``expected``, and its gradients or parameters."""
    for (name, p), p64 in zip(actual.named_parameters(), expected.parameters(), strict=True):
        if grads:
            assert_close(p.grad, p64.grad, dtype, f"{name}.grad", (grad_tolerance or {}).get(name))
        if params:
            assert_close(p, p64, dtype, name)
    for (name, b), b64 in zip(actual.named_buffers(), expected.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(b64), f"{name}: {int(b)} vs {int(b64)}"
        else:
            assert_close(b, b64, dtype, name)


# ---------------------------------------------------------------------------------------------------------
# BN+ReLU alone
# ---------------------------------------------------------------------------------------------------------


def _bn_relu_input(layout: str, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A tensor in the named layout; "prefix" is a channel-prefix view of a larger channels_last buffer."""
    if layout == "prefix":
        n, c, h, w = shape
        buffer = _to_layout(_random_input((n, c + 3, h, w)), "channels_last").to(dtype)
        return buffer[:, :c]
    return _to_layout(_random_input(shape), layout).to(dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", [*LAYOUTS, "prefix"])
def test_bn_relu_matches_batch_norm_relu(layout: str, dtype: torch.dtype, training: bool) -> None:
    shape = (3, 5, 7, 7)  # C not a power of two, H*W = 49
    x = _bn_relu_input(layout, dtype, shape).requires_grad_(True)
    norm = nn.BatchNorm2d(shape[1], momentum=0.3)
    _randomize_norms(norm)
    norm = norm.to(dtype)
    norm64 = copy.deepcopy(norm).double().train(training)
    x64 = x.detach().double().requires_grad_(True)

    y = bn_relu.bn_relu(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, training=training,
                      momentum=norm.momentum, eps=norm.eps)
    expected = torch.relu(norm64(x64))
    grad = torch.randn(shape, dtype=torch.float64)
    y.backward(grad.to(dtype))
    expected.backward(grad)

    assert y.dtype == dtype
    assert_close(y, expected, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "x.grad")
    assert_close(norm.weight.grad, norm64.weight.grad, dtype, "weight.grad")
    assert_close(norm.bias.grad, norm64.bias.grad, dtype, "bias.grad")
    assert_close(norm.running_mean, norm64.running_mean, dtype, "running_mean")
    assert_close(norm.running_var, norm64.running_var, dtype, "running_var")


def test_split_reduction_matches_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tiles force many row splits, so the gradient partials run (statistics: kernels.bn_stats)."""
    monkeypatch.setattr(bn_relu, "_tile_shape", lambda x: (16, 4))
    x = _to_layout(_random_input((3, 6, 7, 7)) * 10 + 100, "channels_last")  # large mean against the spread
    mean, var = bn_relu.batch_norm_stats(x)
    x64 = x.double()
    assert_close(mean, x64.mean(dim=(0, 2, 3)), torch.float32, "mean")
    assert_close(var, x64.var(dim=(0, 2, 3), unbiased=False), torch.float32, "var")

    weight, bias = torch.rand(6) + 0.5, torch.rand(6) - 0.5
    grad_y = torch.randn_like(x)
    grad_x, grad_weight, grad_bias = bn_relu.bn_relu_backward(x, grad_y, mean, var, weight, bias, 1e-5,
                                                            batch_stats=True)
    x64.requires_grad_(True)
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    torch.relu(F.batch_norm(x64, None, None, w64, b64, training=True, eps=1e-5)).backward(grad_y.double())
    assert_close(grad_x, x64.grad, torch.float32, "grad_x")
    assert_close(grad_weight, w64.grad, torch.float32, "grad_weight")
    assert_close(grad_bias, b64.grad, torch.float32, "grad_bias")


def test_bn_relu_bytes_moved_counts_each_tensor_once() -> None:
    n, c, h, w = 2, 3, 4, 5
    elements = n * c * h * w
    assert bn_relu.bn_relu_bytes_moved((n, c, h, w), torch.bfloat16, training=False) == elements * 2 * 2 + c * 4 * 4
    assert bn_relu.bn_relu_bytes_moved((n, c, h, w), torch.float32, training=True) == elements * 4 * 2 + c * 4 * 6


# ---------------------------------------------------------------------------------------------------------
# The dense block
# ---------------------------------------------------------------------------------------------------------


def _compare_block(block: DenseBlock, layout: str, dtype: torch.dtype, training: bool,
                   shape: tuple[int, int, int, int] = (2, 5, 5, 6), grads: bool = True,
                   eager_relative_grads: bool = False) -> None:
    """Fused forward + backward against the reference block run in float64 on copies of the same weights.

    ``grads=False``: check the output and running statistics only (see ``test_dense_block_bf16_storage``).
    ``eager_relative_grads``: each gradient's bound is the table's plus 3x the error of the eager block run
    in the same storage dtype (the noise floor of that dtype at this size).
    """
    block = block.to(dtype).train(training)
    reference = copy.deepcopy(block).double()
    fused = FusedDenseBlock.from_reference(block)
    x = _to_layout(_random_input(shape), layout).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)

    out = fused(x)
    expected = reference(x64)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    out.backward(grad.to(dtype))
    expected.backward(grad)

    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    tolerance: dict[str, float] = {}
    if eager_relative_grads:
        eager = copy.deepcopy(block)
        x_eager = x.detach().clone().requires_grad_(True)
        eager(x_eager).backward(grad.to(dtype))
        floor = REL_TOLERANCE[dtype_name(dtype)]
        tolerance["x"] = floor + 3 * relative_error(x_eager.grad, x64.grad)
        for (name, p), p64 in zip(eager.named_parameters(), reference.parameters(), strict=True):
            tolerance[name] = floor + 3 * relative_error(p.grad, p64.grad)
    assert_close(out, expected, dtype, "output")
    if grads:
        assert_close(x.grad, x64.grad, dtype, "x.grad", tolerance.get("x"))
    _assert_same_state(block, reference, dtype, grads=grads, grad_tolerance=tolerance)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bottleneck", [False, True], ids=["plain", "bc"])
def test_dense_block_matches_reference(bottleneck: bool, layout: str, training: bool) -> None:
    _compare_block(_make_block(bottleneck), layout, torch.float32, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("bottleneck", "layout"), [(False, "nchw"), (True, "channels_last")], ids=["plain", "bc"])
def test_dense_block_bf16_storage(bottleneck: bool, layout: str, training: bool) -> None:
    """bf16 block: output and running statistics always, gradients in eval mode.

    In training mode at these sizes (60 values a channel) BN's backward subtracts nearly equal
    bf16-rounded terms: eager PyTorch's own bf16 gradients are 1-25% off the float64 ones, and two
    correct implementations differ from each other by as much (measured over 12 seeds), so no bound
    tighter than that noise would mean anything. Eval mode folds BN, but a gradient there still passes
    through every later layer's bf16 convolution backward and bf16 gradient sums (a BN bias gradient is a
    sum of 60 mixed-sign bf16 terms; eager bf16 is up to 6% off here): bounded against eager bf16's error.
    """
    _compare_block(_make_block(bottleneck), layout, torch.bfloat16, training=training, grads=not training,
                   eager_relative_grads=True)


def test_dense_block_under_autocast() -> None:
    """torch.autocast(bf16): convolutions in bf16 as eager's, float32 parameters get float32 gradients."""
    block = _make_block(True, num_layers=2)
    reference = copy.deepcopy(block).double()
    x = _to_layout(_random_input((2, 5, 5, 6)), "channels_last").bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedDenseBlock.from_reference(block)(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(x.detach().double()), torch.bfloat16, "output")
    assert x.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in block.parameters())


def test_dense_block_single_image_momentum_none() -> None:
    """N = 1 and momentum=None (a cumulative running average from num_batches_tracked), eval input of H*W = 49."""
    block = _make_block(True, in_channels=4, num_layers=2, growth_rate=4)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.num_batches_tracked.fill_(4)
    _compare_block(block, "channels_last", torch.float32, training=True, shape=(1, 4, 7, 7))


def test_dense_block_follows_frozen_batch_norms() -> None:
    """A training block with some BatchNorms frozen (eval mode), as when fine-tuning: each keeps its own mode."""
    block = _make_block(True).train()
    block.layers[0].norm1.eval()
    block.layers[2].norm2.eval()
    reference = copy.deepcopy(block).double()
    x = _to_layout(_random_input((2, 5, 5, 6)), "nchw").requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out, expected = FusedDenseBlock.from_reference(block)(x), reference(x64)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    out.backward(grad.float())
    expected.backward(grad)
    assert_close(out, expected, torch.float32, "output")
    assert_close(x.grad, x64.grad, torch.float32, "x.grad")
    _assert_same_state(block, reference, torch.float32)


def test_dense_block_without_grad_keeps_nothing() -> None:
    """Inference: no autograd node, the output equals the reference's, and the running stats are untouched."""
    block = _make_block(True).eval()
    before = [b.clone() for b in block.buffers()]
    x = _random_input((2, 5, 5, 6))
    with torch.no_grad():
        out = FusedDenseBlock.from_reference(block)(x)
        expected = copy.deepcopy(block).double()(x.double())
    assert out.grad_fn is None
    assert_close(out, expected, torch.float32, "output")
    for b, b0 in zip(block.buffers(), before, strict=True):
        assert torch.equal(b, b0)


def test_dense_block_trains_like_reference() -> None:
    """Three SGD steps (momentum, weight decay) on a BC block: parameters and running stats stay together."""
    block = _make_block(True, num_layers=3)
    reference = copy.deepcopy(block).double()
    fused = FusedDenseBlock.from_reference(block)
    opt = torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt64 = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        x = _to_layout(_random_input((2, 5, 5, 6)), "channels_last")
        target = torch.randn(2, block.out_channels, 5, 6, dtype=torch.float64)
        for model, optimizer, inp in ((fused, opt, x), (reference, opt64, x.double())):
            optimizer.zero_grad()
            loss = ((model(inp) - target.to(inp.dtype)) ** 2).mean()
            loss.backward()
            optimizer.step()
    _assert_same_state(block, reference, torch.float32, grads=False, params=True)


def test_from_reference_shares_the_reference_modules() -> None:
    block = _make_block(True)
    fused = FusedDenseBlock.from_reference(block)
    assert fused.layers is block.layers
    assert fused.out_channels == block.out_channels
    assert [id(p) for p in fused.parameters()] == [id(p) for p in block.parameters()]


def test_rejects_what_it_cannot_compute() -> None:
    block = _make_block(False)
    with pytest.raises(ValueError, match="expected 5 input channels"):
        FusedDenseBlock.from_reference(block)(torch.randn(2, 4, 5, 5))
    block.layers[1].conv1 = nn.Conv2d(8, 3, kernel_size=3, padding=1, stride=2, bias=False)
    with pytest.raises(ValueError, match="stride 1"):
        FusedDenseBlock.from_reference(block)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu.batch_norm_stats(torch.randn(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------------------
# Memory: linear in depth
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def _interpreter_frees_at_once() -> Iterator[None]:
    """Make the Triton interpreter release kernel arguments when the launch returns, as a GPU launch does.

    The interpreter (triton 3.9, ``GridExecutor._init_args_hst``) keeps every argument's storage in a
    recursive closure, a reference cycle that lives until Python's cyclic GC happens to run. Measured
    as is, tensors the block has dropped stay live for an arbitrary while and the figures depend on GC
    timing. Collecting after each launch restores the lifetimes the code asks for; ``gc.freeze`` keeps
    those collections cheap. Torch's own allocations are otherwise untouched: the interpreter computes
    in NumPy, which torch's profiler does not see.
    """
    from triton.runtime.interpreter import GridExecutor

    launch = GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()

    gc.collect()
    gc.freeze()
    GridExecutor.__call__ = launch_then_collect
    try:
        yield
    finally:
        GridExecutor.__call__ = launch
        gc.unfreeze()


def _training_memory(model: nn.Module, reference: DenseBlock) -> tuple[int, int]:
    """(bytes live between forward and backward, training step's peak rise), CPU allocator events.

    A step of ``reference`` first, so one-time allocations (oneDNN primitives for these convolution shapes)
    stay out of the figure; the fused block runs the same convolutions, and its kernels allocate through
    torch only what they return (a warm-up of its own would cost interpreter time and change nothing).
    """
    x = _to_layout(_random_input((2, reference.in_channels, 12, 12)), "channels_last").requires_grad_(True)
    grad = _to_layout(torch.randn(2, reference.out_channels, 12, 12), "channels_last")
    reference(x).backward(grad)
    for p in [x, *model.parameters()]:
        p.grad = None
    outputs = []
    forward = cpu_step_memory(lambda: outputs.append(model(x)))
    backward = cpu_step_memory(lambda: outputs.pop().backward(grad))
    return forward.retained_bytes, max(forward.peak_rise_bytes, forward.retained_bytes + backward.peak_rise_bytes)


def _curvature(figures: list[int]) -> tuple[float, float]:
    """(first slope, relative change of slope) of figures at depths 2, 4, 8: 0 for a line, > 0 for a parabola."""
    f2, f4, f8 = figures
    slope_low, slope_high = (f4 - f2) / 2, (f8 - f4) / 4
    return slope_low, (slope_high - slope_low) / slope_low


@pytest.mark.slow
@pytest.mark.parametrize("bottleneck", [False, True], ids=["plain", "bc"])
def test_training_memory_is_linear_in_depth(bottleneck: bool) -> None:
    """Reference activation memory grows quadratically in depth, the fused block's linearly.

    Two figures per depth L = 2, 4, 8, for both blocks, from ``perfkit.measure.memory.cpu_step_memory``:

    * kept: bytes live between forward and backward (the output plus everything saved for backward).
      The reference keeps each layer's concat and normalized concat (sum of C_l: quadratic); the fused
      block keeps its buffer, per-channel statistics and each BC layer's bottleneck output: exactly
      linear, so its slope does not change at all.
    * peak: the whole training step's peak rise. The fused block's backward adds a gradient buffer and
      one layer's transients (recomputed BN+ReLU output, convolution-backward workspaces), all
      proportional to C_l, so it is linear up to the CPU convolution's workspaces, which change shape
      with the channel count at these tiny sizes, and the weight gradients (quadratic in depth, as in
      any DenseNet; they are small here). Its slope may drift, far less than the reference's.
    """
    in_channels, growth_rate = 4, 4
    kept = {"reference": [], "fused": []}
    peak = {"reference": [], "fused": []}
    with _interpreter_frees_at_once():
        for depth in (2, 4, 8):
            ref = _make_block(bottleneck, in_channels, depth, growth_rate)
            for name, model in (("reference", ref), ("fused", FusedDenseBlock.from_reference(ref))):
                kept_bytes, peak_bytes = _training_memory(model, ref)
                kept[name].append(kept_bytes)
                peak[name].append(peak_bytes)
    figures = f"kept {kept}, peak {peak}"
    _, fused_kept_bend = _curvature(kept["fused"])
    _, ref_kept_bend = _curvature(kept["reference"])
    assert abs(fused_kept_bend) < 0.01, f"fused block's saved memory is not linear in depth: {figures}"
    assert ref_kept_bend > 0.3, f"reference's saved memory should grow quadratically: {figures}"
    _, fused_peak_bend = _curvature(peak["fused"])
    _, ref_peak_bend = _curvature(peak["reference"])
    assert fused_peak_bend < ref_peak_bend / 2, f"fused step peak bends like the reference's: {figures}"
    assert peak["fused"][-1] < 0.6 * peak["reference"][-1], f"fused step peak not below reference at L=8: {figures}"
    print(f"dense block training memory (bytes), L = 2, 4, 8: {figures}")
