"""Kernel cells: each fused Triton kernel alone, against the same expression in eager PyTorch and compiled.

* ``wrc_epilogue``: ``relu(alpha * batch_norm(y) + beta * s)`` (``perfkit.kernels.wrc.wrc_epilogue``) at a
  ResNet stage-1 shape, y, s = [32, 256, 56, 56] on a GPU.
* ``dense_bn_relu``: the BN-ReLU of a dense layer's channel prefix (``perfkit.kernels.bn_relu.bn_relu``) at
  the last layer of DenseNet-121's third block, [32, 992, 14, 14] on a GPU.

This file declares each kernel's inputs, its eager expression and fused implementation, and the bytes a
step must move (the kernels' own ``bytes_moved`` figures); ``perfkit.measure.kernel`` gates and times them
(its docstring says how: L2 flushes and CUDA events on a GPU, paired rounds beside the eager expression).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from perfkit.measure import KernelBench, KernelCase, measure_kernel

SHAPES = {
    "wrc_epilogue": {"cpu": (2, 16, 8, 8), "cuda": (32, 256, 56, 56)},
    "dense_bn_relu": {"cpu": (2, 40, 4, 4), "cuda": (32, 992, 14, 14)},
}
MOMENTUM, EPS = 0.1, 1e-5


def _wrc_expression(y, s, weight, bias, running_mean, running_var, alpha, beta, training):
    return torch.relu(alpha * F.batch_norm(y, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
                      + beta * s)


def _bn_relu_expression(x, weight, bias, running_mean, running_var, training):
    return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS))


def _wrc_triton(y, s, weight, bias, running_mean, running_var, alpha, beta, training):
    from perfkit.kernels.wrc import wrc_epilogue

    return wrc_epilogue(y, s, weight, bias, running_mean, running_var, alpha, beta, training=training,
                        momentum=MOMENTUM, eps=EPS)


def _bn_relu_triton(x, weight, bias, running_mean, running_var, training):
    from perfkit.kernels.bn_relu import bn_relu

    return bn_relu(x, weight, bias, running_mean, running_var, training=training, momentum=MOMENTUM, eps=EPS)


def _wrc_bytes(x: torch.Tensor, training: bool) -> int:
    from perfkit.kernels.wrc import bytes_moved

    return bytes_moved(x, training) + (bytes_moved(x, training, backward=True) if training else 0)


def _bn_relu_bytes(x: torch.Tensor, training: bool) -> int:
    from perfkit.kernels.bn_relu import bn_relu_bytes_moved

    forward = bn_relu_bytes_moved(tuple(x.shape), x.dtype, training=training)
    if not training:
        return forward
    # Backward: read x and the output gradient, write the input gradient; per channel read weight, bias,
    # mean and var and write the weight and bias gradients (float32).
    return forward + 3 * x.numel() * x.element_size() + 6 * 4 * x.shape[1]


def make_case(kernel: str, dtype: torch.dtype, layout: str, training: bool, device: torch.device) -> KernelCase:
    """Random inputs (never zeros) of the kernel's shape on ``device``; parameters float32 as in a network."""
    shape = SHAPES[kernel][device.type if device.type in ("cpu", "cuda") else "cpu"]
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]

    def tensor(*size, scale=1.0, offset=0.0, dt=torch.float32, grad=False):
        t = (torch.randn(size, generator=generator) * scale + offset).to(device, dt)
        if len(size) == 4:
            t = t.contiguous(memory_format=memory_format)
        return t.requires_grad_(grad)

    x = tensor(*shape, dt=dtype, grad=training)
    weight, bias = tensor(c, scale=0.1, offset=1.0, grad=training), tensor(c, scale=0.1, grad=training)
    running_mean = tensor(c, scale=0.1)
    running_var = (torch.rand(c, generator=generator) + 0.5).to(device)
    if kernel == "wrc_epilogue":
        s = tensor(*shape, dt=dtype, grad=training)
        alpha, beta = tensor(scale=0.0, offset=0.8, grad=training), tensor(scale=0.0, offset=1.2, grad=training)
        args = [x, s, weight, bias, running_mean, running_var, alpha, beta, training]
    else:
        args = [x, weight, bias, running_mean, running_var, training]
    return KernelCase(args, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])


KERNELS = {
    "wrc_epilogue": KernelBench("wrc_epilogue", SHAPES["wrc_epilogue"], functools.partial(make_case, "wrc_epilogue"),
                                _wrc_expression, _wrc_triton, _wrc_bytes),
    "dense_bn_relu": KernelBench("dense_bn_relu", SHAPES["dense_bn_relu"],
                                 functools.partial(make_case, "dense_bn_relu"), _bn_relu_expression, _bn_relu_triton,
                                 _bn_relu_bytes),
}
"""Each kernel cell's declaration, by the name ``--perfkit-kernels`` selects."""


def test_kernel(benchmark, perfkit_matrix, perfkit_file_record, kernel: str, variant: str, mode: str, dtype: str,
                layout: str) -> None:
    """One kernel cell; its record is pytest-benchmark's extra_info and a line of the JSON-lines file."""
    benchmark.group = f"{kernel}-{mode}-{dtype}-{layout}"
    record = measure_kernel(KERNELS[kernel], variant, mode, dtype, layout, perfkit_matrix.device,
                            perfkit_matrix.profile.policy, benchmark, threads=perfkit_matrix.before_cell())
    perfkit_file_record(benchmark, record)
