"""The fused weighted-residual epilogue (kernels/wrc.py, kernels/bn_stats.py, perfkit/fused/wrc.py) against
a float64 reference.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets), which is
slow: shapes stay tiny, and one case shrinks the tiles so tiny shapes still cross every tile, partial and
channel-block boundary. Every buffer the kernels write is allocated NaN-filled, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perfkit
from perfkit.blocks.layers import ResidualEpilogue, conv3x3
from perfkit.testing import assert_close

pytest.importorskip("triton")
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if not _INTERPRETED and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)", allow_module_level=True)
DEVICE = torch.device("cpu" if _INTERPRETED else "cuda")

from perfkit.kernels import _tiles, wrc  # noqa: E402

from perfkit.fused import fusable_modules, to_triton  # noqa: E402
from perfkit.fused.wrc import FusedResidualEpilogue  # noqa: E402

EPS = 1e-5


def reference_epilogue(y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, alpha: torch.Tensor,
                       beta: torch.Tensor, training: bool, momentum: float, eps: float) -> torch.Tensor:
    """``relu(alpha * BN(y) + beta * s)`` in plain PyTorch ops: the expression the kernels fuse."""
    return torch.relu(alpha * F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
                      + beta * s)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fill every buffer the kernels are to write with NaN, so an unwritten element cannot pass."""
    def allocate_nan(size, dtype, device, memory_format=torch.contiguous_format):
        return torch.empty(size, dtype=dtype, device=device, memory_format=memory_format).fill_(float("nan"))
    monkeypatch.setattr(_tiles, "allocate", allocate_nan)


@pytest.fixture(autouse=True)
def seeded(request):
    """A fresh, reproducible random stream per test case."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _inputs(shape, dtype, channels_last, s_dtype=None):
    """Random y (mean well away from 0, spread ≠ 1), s, and float32 BN parameters and statistics."""
    channels = shape[1]
    y = _layout((3.0 + 2.0 * torch.randn(shape)).to(DEVICE, dtype), channels_last)
    s = _layout(torch.randn(shape).to(DEVICE, s_dtype or dtype), channels_last)
    params = {
        "weight": (1.0 + 0.5 * torch.randn(channels)).to(DEVICE),
        "bias": (0.5 * torch.randn(channels)).to(DEVICE),
        "running_mean": (3.0 + torch.randn(channels)).to(DEVICE),
        "running_var": (2.0 + torch.rand(channels)).to(DEVICE),
        "alpha": (0.8 + 0.4 * torch.rand(())).to(DEVICE),
        "beta": (0.8 + 0.4 * torch.rand(())).to(DEVICE),
    }
    return y, s, params


def _run_both(y, s, params, *, training, learnable=True, momentum=0.1, dout=None):
    """Kernel and float64 reference on the same values; returns (outputs, grads, running stats) of each."""
    grad_names = ["y", "s", "weight", "bias"] + (["alpha", "beta"] if learnable else [])
    results = []
    for use_kernel in (True, False):
        cast = (lambda t: t.detach().clone()) if use_kernel else (lambda t: t.detach().double())
        tensors = {"y": cast(y), "s": cast(s), **{name: cast(value) for name, value in params.items()}}
        for name in grad_names:
            tensors[name].requires_grad_(True)
        args = [tensors[name] for name in ("y", "s", "weight", "bias", "running_mean", "running_var", "alpha",
                                           "beta")]
        if use_kernel:
            out = wrc.wrc_epilogue(*args, training=training, momentum=momentum, eps=EPS)
            grad = torch.randn(out.shape).to(DEVICE, out.dtype) if dout is None else dout
            dout_kernel = grad
        else:
            out = reference_epilogue(*args, training, momentum, EPS)
            grad = dout_kernel.double()
        out.backward(grad)
        grads = {name: tensors[name].grad for name in grad_names}
        results.append((out, grads, tensors["running_mean"], tensors["running_var"], tensors))
    return results


def _assert_matches(kernel, reference, storage_dtype, *, check_stats):
    out, grads, running_mean, running_var, tensors = kernel
    out64, grads64, running_mean64, running_var64, _ = reference
    assert_close(out, out64, storage_dtype, "out")
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == tensors[name].dtype and grad.shape == tensors[name].shape, name
        assert_close(grad, grads64[name], storage_dtype, f"d{name}")
    if check_stats:
        assert_close(running_mean, running_mean64, torch.float32, "running_mean")
        assert_close(running_var, running_var64, torch.float32, "running_var")


CASES = [
    # (shape, dtype, channels_last, training)
    pytest.param((2, 7, 7, 7), torch.float32, False, True, id="nchw-f32-train-C7-HW49"),
    pytest.param((2, 7, 7, 7), torch.float32, True, True, id="nhwc-f32-train-C7-HW49"),
    pytest.param((1, 3, 7, 7), torch.float32, False, True, id="nchw-f32-train-N1-C3"),
    pytest.param((1, 3, 7, 7), torch.float32, True, True, id="nhwc-f32-train-N1-C3"),
    pytest.param((2, 12, 4, 4), torch.bfloat16, True, True, id="nhwc-bf16-train"),
    pytest.param((2, 5, 3, 5), torch.float16, False, True, id="nchw-f16-train"),
    pytest.param((2, 7, 7, 7), torch.float32, False, False, id="nchw-f32-eval"),
    pytest.param((2, 7, 7, 7), torch.float32, True, False, id="nhwc-f32-eval"),
    pytest.param((3, 6, 2, 3), torch.bfloat16, False, False, id="nchw-bf16-eval"),
    pytest.param((2, 6, 4, 4), torch.float16, True, False, id="nhwc-f16-eval"),
]


@pytest.mark.parametrize("shape, dtype, channels_last, training", CASES)
def test_forward_backward_match_float64_reference(shape, dtype, channels_last, training):
    y, s, params = _inputs(shape, dtype, channels_last)
    kernel, reference = _run_both(y, s, params, training=training)
    assert kernel[0].dtype == dtype
    assert kernel[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _assert_matches(kernel, reference, dtype, check_stats=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_many_tiles_partials_and_channel_blocks(monkeypatch, channels_last):
    """Tiles of 16 elements: many tiles, several per reduction program with a tail past the last sample,
    several channel blocks, and finalize kernels looping over the partials."""
    monkeypatch.setattr(_tiles, "TILE_ELEMENTS", 16)
    monkeypatch.setattr(_tiles, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(_tiles, "MAX_BLOCK_HW", 8)
    monkeypatch.setattr(_tiles, "MAX_PARTIALS", 3)
    monkeypatch.setattr(_tiles, "FINALIZE_TILE_ELEMENTS", 8)
    y, s, params = _inputs((3, 6, 6, 3), torch.float32, channels_last)
    kernel, reference = _run_both(y, s, params, training=True)
    _assert_matches(kernel, reference, torch.float32, check_stats=True)


def test_variance_survives_a_large_mean():
    """Mean 1000, spread 1: E[y²]−E[y]² in float32 would lose most digits of the variance; two-pass does not.

    momentum=1 makes the running statistics the batch mean and unbiased variance. Gradients are left to the
    other tests: at this offset float32 rounding of ``z`` alone can flip the ReLU of an element sitting at
    ``z ≈ 0`` against the float64 reference, for any float32 implementation.
    """
    _, s, params = _inputs((2, 4, 6, 6), torch.float32, False)
    y = 1000.0 + torch.randn(2, 4, 6, 6, device=DEVICE)
    running_mean, running_var = params.pop("running_mean"), params.pop("running_var")
    out = wrc.wrc_epilogue(y, s, **params, running_mean=running_mean, running_var=running_var, training=True,
                           momentum=1.0, eps=EPS)
    y64 = y.double()
    expected = reference_epilogue(y64, s.double(), *(params[k].double() for k in ("weight", "bias")), None, None,
                                  params["alpha"].double(), params["beta"].double(), True, 1.0, EPS)
    assert_close(out, expected, torch.float32, "out")
    assert_close(running_mean, y64.mean(dim=(0, 2, 3)), torch.float32, "batch mean")
    assert_close(running_var, y64.var(dim=(0, 2, 3), unbiased=True), torch.float32, "batch variance")


def test_buffers_alpha_beta_get_no_gradient():
    """alpha, beta as buffers (the plain and scaled ResNet epilogues): the other gradients are still exact."""
    y, s, params = _inputs((2, 5, 4, 4), torch.float32, True)
    kernel, reference = _run_both(y, s, params, training=True, learnable=False)
    _assert_matches(kernel, reference, torch.float32, check_stats=True)
    assert kernel[4]["alpha"].grad is None and kernel[4]["beta"].grad is None


def test_bfloat16_parameters_and_statistics():
    """A model cast with .to(bfloat16): weight, bias, running statistics, alpha and beta all bf16."""
    y, s, params = _inputs((2, 6, 5, 5), torch.bfloat16, True)
    params = {name: value.to(torch.bfloat16) for name, value in params.items()}
    kernel, reference = _run_both(y, s, params, training=True)
    _assert_matches(kernel, reference, torch.bfloat16, check_stats=False)
    assert kernel[2].dtype == torch.bfloat16
    assert_close(kernel[2], reference[2], torch.bfloat16, "running_mean")
    assert_close(kernel[3], reference[3], torch.bfloat16, "running_var")


def test_mixed_dtypes_promote_like_the_reference():
    """bf16 y (a conv under autocast) with a float32 shortcut: out is float32, as alpha*bn(y) + beta*s is."""
    y, s, params = _inputs((2, 6, 4, 4), torch.bfloat16, True, s_dtype=torch.float32)
    kernel, reference = _run_both(y, s, params, training=True)
    assert kernel[0].dtype == torch.float32
    _assert_matches(kernel, reference, torch.bfloat16, check_stats=True)


def test_non_contiguous_inputs_and_gradient():
    """y a channel slice (read in place), s a spatial crop (copied), and an expanded (stride-0) output gradient."""
    big_y = _layout(3.0 + 2.0 * torch.randn(2, 9, 5, 5), True).to(DEVICE)
    big_s = torch.randn(2, 6, 7, 6, device=DEVICE)
    y, s = big_y[:, 2:8], big_s[:, :, 1:6, :5]
    assert not y.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous()
    _, _, params = _inputs((2, 6, 5, 5), torch.float32, False)
    dout = torch.ones((), device=DEVICE).expand(2, 6, 5, 5)
    kernel, reference = _run_both(y, s, params, training=True, dout=dout)
    _assert_matches(kernel, reference, torch.float32, check_stats=True)
    y_nchw = (3.0 + 2.0 * torch.randn(2, 9, 4, 4, device=DEVICE))[:, 1:6]
    _, s_nchw, params = _inputs((2, 5, 4, 4), torch.float32, False)
    kernel, reference = _run_both(y_nchw, s_nchw, params, training=True)
    _assert_matches(kernel, reference, torch.float32, check_stats=True)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_running_statistics_match_batchnorm2d(momentum):
    """Two training steps, then eval: running mean, var and num_batches_tracked equal nn.BatchNorm2d's."""
    reference = ResidualEpilogue(6, learnable=True).to(DEVICE)
    reference.bn.momentum = momentum
    fused = FusedResidualEpilogue.from_reference(copy.deepcopy(reference))
    for _ in range(2):
        y, s = 2.0 + torch.randn(2, 6, 3, 5, device=DEVICE), torch.randn(2, 6, 3, 5, device=DEVICE)
        assert_close(fused(y, s), reference(y, s), torch.float32, "out")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(fused.bn, name), getattr(reference.bn, name), torch.float32, name)
    assert fused.bn.num_batches_tracked.item() == reference.bn.num_batches_tracked.item() == 2
    fused.eval()
    reference.eval()
    y, s = 2.0 + torch.randn(2, 6, 3, 5, device=DEVICE), torch.randn(2, 6, 3, 5, device=DEVICE)
    assert_close(fused(y, s), reference(y, s), torch.float32, "eval out")
    assert fused.bn.num_batches_tracked.item() == 2


def test_untracked_statistics_use_the_batch_in_eval():
    """track_running_stats=False: batch statistics in eval too, as nn.BatchNorm2d does."""
    reference = ResidualEpilogue(4).to(DEVICE)
    reference.bn = nn.BatchNorm2d(4, track_running_stats=False).to(DEVICE)
    fused = FusedResidualEpilogue.from_reference(reference).eval()
    reference.eval()
    y, s = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 4, 3, 3, device=DEVICE)
    assert_close(fused(y, s), reference(y, s), torch.float32, "out")


def test_from_reference_shares_parameters_and_buffers():
    reference = ResidualEpilogue(5, alpha=0.2, learnable=False)
    fused = FusedResidualEpilogue.from_reference(reference)
    assert fused.bn is reference.bn
    assert fused.alpha is reference.alpha and fused.beta is reference.beta
    assert [name for name, _ in fused.named_buffers()] == [name for name, _ in reference.named_buffers()]
    assert fused.state_dict().keys() == reference.state_dict().keys()


class _TinyBlock(nn.Module):
    """conv → epilogue with the input as shortcut: the smallest real residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)
        self.epilogue = ResidualEpilogue(channels, alpha=0.9, beta=1.1, learnable=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.epilogue(self.conv(x), x)


def _train_both(reference: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Swap the fused epilogue into a copy of ``reference``; SGD both ``steps`` times; check each step."""
    fused = copy.deepcopy(reference)
    assert fusable_modules(fused)
    fused = to_triton(fused)
    with torch.no_grad():
        target = torch.randn(reference.eval()(x).shape, device=x.device)
    reference.train()
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in (reference, fused)]
    for step in range(steps):
        losses = []
        for model, optimizer in zip((reference, fused), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss)
        assert_close(losses[1], losses[0], torch.float32, f"loss at step {step}")
    for (name, value), (_, expected) in zip(fused.state_dict().items(), reference.state_dict().items(), strict=True):
        if value.is_floating_point():
            assert_close(value, expected, torch.float32, name)
        else:
            assert torch.equal(value, expected), name
    return fused


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_tiny_block_trains_like_the_reference(channels_last):
    reference = _TinyBlock(6).to(DEVICE)
    x = _layout(torch.randn(2, 6, 5, 5), channels_last).to(DEVICE)
    if channels_last:
        reference = reference.to(memory_format=torch.channels_last)
    fused = _train_both(reference, x)
    assert isinstance(fused.epilogue, FusedResidualEpilogue)


def test_registered_wrc_block_trains_like_the_reference():
    entry = perfkit.get_entry("wrc")
    reference = entry.create().to(DEVICE)
    _train_both(reference, entry.example_input(2, device=DEVICE))
    reference.eval()
    fused = copy.deepcopy(reference)
    fused = to_triton(fused)
    x = entry.example_input(2, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), reference(x), torch.float32, "eval output")


def test_small_wrc_resnet_trains_like_the_reference():
    """A WRC ResNet in miniature: stem, two stages of WRC blocks (the second strided, with a projection
    shortcut), pooling and a classifier, as ``wrc_resnet18`` is built, at a width the interpreter can train.

    ``wrc_resnet18`` itself is not trained here: at a CPU-sized input its last stage's BatchNorm sees two
    values per channel, where float32 and float64 gradients already disagree by orders of magnitude.
    """
    from perfkit.blocks.resnet import BasicBlock

    reference = nn.Sequential(
        conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 8, learnable=True), BasicBlock(8, 8, learnable=True),
        BasicBlock(8, 16, stride=2, learnable=True), BasicBlock(16, 16, learnable=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).to(DEVICE)
    fused = _train_both(reference, torch.randn(4, 3, 8, 8, device=DEVICE))
    assert sum(isinstance(m, FusedResidualEpilogue) for m in fused.modules()) == 4


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(s=a["s"][:, :-1]), ValueError, "s must have y's shape"),
    (lambda a: a.update(weight=a["weight"][:-1]), ValueError, r"weight must have shape \(6,\)"),
    (lambda a: a.update(y=a["y"].double()), TypeError, "float64"),
    (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias is on meta"),
    (lambda a: a.update(y=a["y"][:1, :, :1, :1], s=a["s"][:1, :, :1, :1]), ValueError, "more than 1 value"),
    (lambda a: a.update(alpha=torch.ones(2)), ValueError, "alpha must be a 1-element"),
    (lambda a: a.update(running_var=None), ValueError, "given together"),
], ids=["shape", "weight-shape", "float64", "device-mix", "one-value", "alpha-shape", "half-running"])
def test_clear_errors(mutate, error, match):
    y, s, params = _inputs((2, 6, 3, 3), torch.float32, False)
    args = {"y": y, "s": s, **params}
    mutate(args)
    with pytest.raises(error, match=match):
        wrc.wrc_epilogue(**args, training=True, momentum=0.1, eps=EPS)


def test_clear_errors_on_missing_statistics():
    y, s, params = _inputs((2, 6, 3, 3), torch.float32, False)
    params.update(running_mean=None, running_var=None)
    with pytest.raises(ValueError, match="running statistics"):
        wrc.wrc_epilogue(y, s, **params, training=False, momentum=0.1, eps=EPS)
    y, s, params = _inputs((2, 6, 3, 3), torch.float32, False)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        wrc.wrc_epilogue(y, s, **params, training=True, momentum=None, eps=EPS)


def test_bytes_moved_counts_each_tensor_once():
    y = torch.empty(2, 8, 4, 4, dtype=torch.bfloat16)
    tensor_bytes = 2 * 8 * 4 * 4 * 2
    assert wrc.bytes_moved(y, training=False) == 3 * tensor_bytes + 4 * 4 * 8
    assert wrc.bytes_moved(y, training=True) == 3 * tensor_bytes + 6 * 4 * 8
    assert wrc.bytes_moved(y, training=True, backward=True) == 5 * tensor_bytes + 6 * 4 * 8


def test_importing_perfkit_fused_needs_no_triton():
    """Without triton, perfkit, perfkit.kernels and perfkit.fused.wrc import; the fused module names what is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import perfkit, perfkit.kernels, perfkit.fused.wrc as f\n"
        "from perfkit.blocks.layers import ResidualEpilogue\n"
        "try:\n"
        "    f.FusedResidualEpilogue.from_reference(ResidualEpilogue(4))\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs triton" in result.stdout
