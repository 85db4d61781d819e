"""The memory-efficient DenseNet block on the fused BatchNorm+ReLU kernels of :mod:`perfkit.kernels.bn_relu`.

A dense layer computes ``conv(relu(bn(cat(x0, ..., x_{l-1}))))``. Eager PyTorch materializes each concat
and each BN/ReLU output and keeps them for backward, so a block's activation memory grows with the square
of its depth. Here (after Pleiss et al., 2017, *Memory-Efficient Implementation of DenseNets*):

* **One buffer.** The block allocates ``[N, C_in + L*k, H, W]`` once, in the input's memory format; the
  input goes into its channel prefix and layer ``l`` writes its ``k`` new channels after it. The concat
  is free, and every layer reads its channel prefix ``buffer[:, :C_l]`` in place (a strided view: the
  kernels take any strides, so neither NCHW nor channels_last is ever copied).
* **One kernel for BN+ReLU of the prefix** (:func:`perfkit.kernels.bn_relu.bn_relu_apply`) writes the
  convolution's input directly, in the convolution's dtype.
* **Batch statistics once per channel.** A channel's batch mean and variance do not depend on which
  layer normalizes it, so they are computed once, when the channel is written (the statistics kernels of
  :mod:`perfkit.kernels.bn_stats`, Chan/Welford merges in float32), and every later layer reuses them with its
  own ``eps``, weight, bias and running-statistics update. Layer ``l``'s forward then reads its prefix
  once, not three times.
* **Recompute in backward.** The op ``perfkit::dense_block_forward`` is one autograd node for the block. It
  saves the buffer (the block's output, which is needed anyway), the per-channel batch statistics, and
  for BC layers the 1×1 bottleneck output ``h`` (``4k`` channels, a fixed amount per layer) with its
  statistics. It does not save any normalized prefix or any concat: backward walks the layers in reverse,
  recomputes ``relu(bn(prefix))`` with the forward kernel, runs the convolution's backward
  (``aten.convolution_backward``), and applies BN+ReLU's backward (:func:`perfkit.kernels.bn_relu.bn_relu_backward`),
  adding the prefix gradient into one gradient buffer of the block's shape.
  What stays alive is linear in depth: buffer + gradient buffer + the ``h`` of every BC layer + the
  largest layer's transients. The price is one extra BN+ReLU pass over each prefix in backward; the 1×1
  convolution is not recomputed (saving ``h`` costs ``4k`` channels per layer, recomputing it a whole
  convolution per layer).

Version counters: everything backward reads (the buffer, which *is* the output, the parameters, the
statistics, each BC layer's ``h``, eval-mode running statistics) is saved through ``save_for_backward``
in the op's ``setup_context``, so an in-place change of any of them before backward raises autograd's
usual error, and ``saved_tensors_hooks`` see all of it. The Triton kernels write through raw pointers and
bump no version counter, so they only ever write tensors the op allocated; the running statistics are
updated by :func:`dense_block` with torch ops, outside the (functional) op.

Autocast: under ``torch.autocast`` the convolutions run in the autocast dtype, as eager ones would; the
BN+ReLU kernel writes the convolution input in that dtype directly (the cast is fused), and backward
repeats the same casts. BN statistics and reductions always accumulate in float32.

Everything here is plain functions over tensors; ``perfkit.fused.dense.FusedDenseBlock`` is the module
that calls :func:`dense_block`. Nothing runs at import time besides registering the ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _library, _tiles
from .bn_relu import (
    bn_relu_apply,
    bn_relu_backward,
    bn_relu_forward,
    buffer_memory_format,
    check_4d,
    check_channel_vectors,
    update_running_stats,
)
from .bn_stats import batch_norm_stats_into

# --------------------------------------------------------------------------------------------------------
# The dense block.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormState:
    """A BatchNorm's non-differentiable state for one call: its mode, running statistics, their update, eps."""

    training: bool
    """nn.BatchNorm2d's ``training``: batch statistics, and the running ones updated. Per norm, so a frozen
    (eval-mode) BatchNorm inside a training model is followed."""
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float | None
    """The exponential-average factor of this call (nn.BatchNorm2d's ``1/num_batches_tracked`` resolved)."""
    eps: float


class DenseLayerTensors(NamedTuple):
    """One dense layer: norm1 and conv1, and for BC layers norm2 and conv2 (None for plain layers)."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    norm1: NormState
    conv1_weight: torch.Tensor
    norm2_weight: torch.Tensor | None = None
    norm2_bias: torch.Tensor | None = None
    norm2: NormState | None = None
    conv2_weight: torch.Tensor | None = None

    @property
    def bottleneck(self) -> bool:
        """A BC layer: a 1×1 bottleneck convolution (with norm2) before the layer's last one."""
        return self.conv2_weight is not None


def _same_padding(weight: torch.Tensor) -> tuple[int, int]:
    """A dense layer keeps H and W (its output is concatenated): stride 1, padding (kernel - 1) / 2."""
    return weight.shape[2] // 2, weight.shape[3] // 2


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _conv_forward(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(z, weight.to(z.dtype), None, 1, _same_padding(weight))


def _conv_backward(grad_y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_z, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_y.to(z.dtype), z, weight.to(z.dtype), None, [1, 1], list(_same_padding(weight)), [1, 1], False,
        [0, 0], 1, [True, True, False])
    return grad_z, grad_weight.to(weight.dtype)


def _layer_channels(in_channels: int, growth_rate: int, index: int) -> int:
    return in_channels + index * growth_rate


@dataclass
class _BlockForward:
    """What a forward leaves for backward: the buffer, the channel statistics, each BC layer's h and stats."""

    buffer: torch.Tensor | None
    channel_mean: torch.Tensor | None
    """Batch mean of every channel a norm1 reads (all but the last layer's output), float32; None in eval."""
    channel_var: torch.Tensor | None
    bottleneck: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None]
    """Per layer: None (plain), or (h if kept for backward, norm2's mean, norm2's var)."""
    conv_dtype: torch.dtype


def _uses_batch_stats(norm: NormState) -> bool:
    return norm.training or norm.running_mean is None


def _norm_inputs(layer_norm: NormState, channel_mean: torch.Tensor | None, channel_var: torch.Tensor | None,
                 channels: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean, var, batch_stats) a layer's norm1 uses on its prefix: shared batch stats or its running ones."""
    if _uses_batch_stats(layer_norm):
        return channel_mean[:channels], channel_var[:channels], True
    return layer_norm.running_mean, layer_norm.running_var, False


def _growth(layers: Sequence[DenseLayerTensors]) -> int:
    return layers[0].conv2_weight.shape[0] if layers[0].bottleneck else layers[0].conv1_weight.shape[0]


def _stats_channels(c_in: int, layers: Sequence[DenseLayerTensors]) -> int:
    """Channels whose batch statistics a norm1 reads: all but the last layer's output (0 if none uses them)."""
    if not any(_uses_batch_stats(layer.norm1) for layer in layers):
        return 0
    return _layer_channels(c_in, _growth(layers), len(layers) - 1)


def _dense_block_forward(x: torch.Tensor, layers: Sequence[DenseLayerTensors], keep_for_backward: bool,
                         conv_dtype: torch.dtype) -> _BlockForward:
    """The block's forward; running statistics are not touched (the caller updates them from the outputs)."""
    n, c_in, h, w = x.shape
    growth = _growth(layers)
    c_out = _layer_channels(c_in, growth, len(layers))
    buffer = _tiles.allocate((n, c_out, h, w), x.dtype, x.device, buffer_memory_format(x))
    buffer[:, :c_in].copy_(x)
    stats_channels = _stats_channels(c_in, layers)
    channel_mean = channel_var = None
    if stats_channels:
        if n * h * w < 2:
            raise ValueError(f"batch statistics need more than 1 value per channel; got input {tuple(x.shape)}")
        channel_mean = _tiles.allocate((stats_channels,), torch.float32, x.device)
        channel_var = _tiles.allocate((stats_channels,), torch.float32, x.device)
        batch_norm_stats_into(x, channel_mean[:c_in], channel_var[:c_in])
    bottleneck_saved: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None] = []
    # The convolutions run in conv_dtype explicitly (autocast's choice), so backward can repeat them exactly.
    with torch.autocast(x.device.type, enabled=False):
        for index, layer in enumerate(layers):
            c = _layer_channels(c_in, growth, index)
            prefix = buffer[:, :c]
            norm1 = layer.norm1
            mean, var, _ = _norm_inputs(norm1, channel_mean, channel_var, c)
            z = bn_relu_apply(prefix, mean, var, layer.norm1_weight, layer.norm1_bias, norm1.eps, conv_dtype)
            out = _conv_forward(z, layer.conv1_weight)
            del z
            saved = None
            if layer.bottleneck:
                hidden = out
                norm2 = layer.norm2
                a, mean2, var2, _ = bn_relu_forward(hidden, layer.norm2_weight, layer.norm2_bias, norm2.running_mean,
                                                     norm2.running_var, norm2.training, None, norm2.eps)
                out = _conv_forward(a, layer.conv2_weight)
                del a
                saved = (hidden if keep_for_backward else None, mean2, var2)
            bottleneck_saved.append(saved)
            buffer[:, c:c + growth].copy_(out)
            if c + growth <= stats_channels:
                # From the buffer, not `out`: the statistics must be those of the stored (rounded) channels.
                batch_norm_stats_into(buffer[:, c:c + growth], channel_mean[c:c + growth],
                                       channel_var[c:c + growth])
    return _BlockForward(buffer, channel_mean, channel_var, bottleneck_saved, conv_dtype)


def _dense_block_backward(grad_out: torch.Tensor, buffer: torch.Tensor, layers: Sequence[DenseLayerTensors],
                          state: _BlockForward, need_grad_x: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(grad_x, parameter gradients in :func:`_layer_params` order): the layers walked in reverse."""
    c_in = buffer.shape[1] - len(layers) * _growth(layers)
    growth = _growth(layers)
    # The gradient buffer: every layer adds its prefix's gradient into it; a channel's gradient is
    # complete once every later layer has been walked, which is when its own layer is reached.
    grad_buffer = grad_out.clone(memory_format=buffer_memory_format(buffer))
    grads_per_layer = []
    with torch.autocast(buffer.device.type, enabled=False):
        for index in reversed(range(len(layers))):
            layer = layers[index]
            c = _layer_channels(c_in, growth, index)
            grad_out_l = grad_buffer[:, c:c + growth]
            grads = {}
            if layer.bottleneck:
                hidden, mean2, var2 = state.bottleneck[index]
                a = bn_relu_apply(hidden, mean2, var2, layer.norm2_weight, layer.norm2_bias, layer.norm2.eps)
                grad_a, grads["conv2"] = _conv_backward(grad_out_l, a, layer.conv2_weight)
                del a
                grad_hidden, grads["norm2_weight"], grads["norm2_bias"] = bn_relu_backward(
                    hidden, grad_a, mean2, var2, layer.norm2_weight, layer.norm2_bias, layer.norm2.eps,
                    batch_stats=_uses_batch_stats(layer.norm2))
                del grad_a
                grad_out_l = grad_hidden
            prefix = buffer[:, :c]
            mean, var, batch_stats = _norm_inputs(layer.norm1, state.channel_mean, state.channel_var, c)
            z = bn_relu_apply(prefix, mean, var, layer.norm1_weight, layer.norm1_bias, layer.norm1.eps,
                              state.conv_dtype)
            grad_z, grads["conv1"] = _conv_backward(grad_out_l, z, layer.conv1_weight)
            del z, grad_out_l
            _, grads["norm1_weight"], grads["norm1_bias"] = bn_relu_backward(
                prefix, grad_z, mean, var, layer.norm1_weight, layer.norm1_bias, layer.norm1.eps,
                batch_stats=batch_stats, grad_x_accumulate=grad_buffer[:, :c], need_grad_x=index > 0 or need_grad_x)
            del grad_z
            grads_per_layer.append(grads)
    grads_per_layer.reverse()
    param_grads = []
    for layer, grads in zip(layers, grads_per_layer, strict=True):
        param_grads += [grads["norm1_weight"], grads["norm1_bias"], grads["conv1"]]
        if layer.bottleneck:
            param_grads += [grads["norm2_weight"], grads["norm2_bias"], grads["conv2"]]
    grad_x = grad_buffer[:, :c_in].contiguous(memory_format=buffer_memory_format(buffer)) if need_grad_x else None
    return grad_x, param_grads


# --------------------------------------------------------------------------------------------------------
# The dense block as ops: perfkit::dense_block_forward (functional, autograd registered on it) and
# perfkit::dense_block_backward, each with a fake implementation. The layers travel as flat lists: the
# parameters in _layer_params order, and per BatchNorm (norm1, then norm2 for BC layers) whether it uses
# batch statistics, its eps, and its running mean and variance (None where batch statistics are used).
# The running statistics are not mutated by the op: dense_block updates them from the op's batch
# statistics with torch ops, which keeps the op functional (autograd cannot be registered on a mutating op).
# --------------------------------------------------------------------------------------------------------


def _layers_from(params: Sequence[torch.Tensor], stats: Sequence[torch.Tensor | None], norm_batch: Sequence[bool],
                 eps: Sequence[float], bottleneck: bool) -> list[DenseLayerTensors]:
    norms = [NormState(batch, None if batch else stats[2 * i], None if batch else stats[2 * i + 1], None, eps[i])
             for i, batch in enumerate(norm_batch)]
    per_layer = 6 if bottleneck else 3
    layers = []
    for i in range(len(params) // per_layer):
        p = params[i * per_layer:(i + 1) * per_layer]
        if bottleneck:
            layers.append(DenseLayerTensors(p[0], p[1], norms[2 * i], p[2], p[3], p[4], norms[2 * i + 1], p[5]))
        else:
            layers.append(DenseLayerTensors(p[0], p[1], norms[i], p[2]))
    return layers


@_library.op("dense_block_forward")
def _dense_block_forward_op(x: torch.Tensor, params: list[torch.Tensor], stats: list[torch.Tensor | None],
                            norm_batch: list[bool], eps: list[float], bottleneck: bool, conv_dtype: torch.dtype,
                            keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor],
                                                 list[torch.Tensor], list[torch.Tensor]]:
    """``(buffer, channel_mean, channel_var, hidden, mean2, var2)``; the last three one entry per BC layer.

    ``buffer`` is the block's output. The statistics are the batch ones (float32; empty where a norm uses
    its running statistics); ``hidden`` (each BC layer's 1×1 output) is empty unless ``keep``.
    """
    layers = _layers_from(params, stats, norm_batch, eps, bottleneck)
    state = _dense_block_forward(x, layers, keep, conv_dtype)
    hidden, mean2, var2 = [], [], []
    for layer, saved in zip(layers, state.bottleneck, strict=True):
        if layer.bottleneck:
            h, m, v = saved
            batch = _uses_batch_stats(layer.norm2)
            hidden.append(h if keep else x.new_empty((0,), dtype=conv_dtype))
            # Eval: the running statistics are inputs, and an output may not alias an input.
            mean2.append(m if batch else x.new_empty((0,), dtype=torch.float32))
            var2.append(v if batch else x.new_empty((0,), dtype=torch.float32))
    empty = (x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32))
    channel_mean, channel_var = (state.channel_mean, state.channel_var) if state.channel_mean is not None else empty
    return state.buffer, channel_mean, channel_var, hidden, mean2, var2


@_dense_block_forward_op.register_fake
def _dense_block_forward_fake(x, params, stats, norm_batch, eps, bottleneck, conv_dtype, keep):
    layers = _layers_from(params, stats, norm_batch, eps, bottleneck)
    n, c_in, h, w = x.shape
    growth = _growth(layers)
    fmt = buffer_memory_format(x)
    buffer = torch.empty((n, _layer_channels(c_in, growth, len(layers)), h, w), dtype=x.dtype, device=x.device,
                         memory_format=fmt)
    stats_channels = _stats_channels(c_in, layers)
    channel_mean = x.new_empty((stats_channels,), dtype=torch.float32)
    channel_var = x.new_empty((stats_channels,), dtype=torch.float32)
    hidden, mean2, var2 = [], [], []
    for index, layer in enumerate(layers):
        if not layer.bottleneck:
            continue
        if keep:
            # The convolution's own meta function gives h's strides, as the real convolution lays it out.
            z = torch.empty((n, _layer_channels(c_in, growth, index), h, w), dtype=conv_dtype, device=x.device,
                            memory_format=fmt)
            hidden.append(_conv_forward(z, layer.conv1_weight))
        else:
            hidden.append(x.new_empty((0,), dtype=conv_dtype))
        channels = layer.conv1_weight.shape[0] if _uses_batch_stats(layer.norm2) else 0
        mean2.append(x.new_empty((channels,), dtype=torch.float32))
        var2.append(x.new_empty((channels,), dtype=torch.float32))
    return buffer, channel_mean, channel_var, hidden, mean2, var2


@_library.op("dense_block_backward")
def _dense_block_backward_op(grad_out: torch.Tensor, buffer: torch.Tensor, params: list[torch.Tensor],
                             stats: list[torch.Tensor | None], channel_mean: torch.Tensor, channel_var: torch.Tensor,
                             hidden: list[torch.Tensor], mean2: list[torch.Tensor], var2: list[torch.Tensor],
                             norm_batch: list[bool], eps: list[float], bottleneck: bool, conv_dtype: torch.dtype,
                             need_grad_x: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(grad_x, parameter gradients)``; grad_x is empty unless ``need_grad_x``."""
    layers = _layers_from(params, stats, norm_batch, eps, bottleneck)
    saved, index2 = [], 0
    for layer in layers:
        if not layer.bottleneck:
            saved.append(None)
            continue
        norm2 = layer.norm2
        batch = _uses_batch_stats(norm2)
        saved.append((hidden[index2], mean2[index2] if batch else norm2.running_mean,
                      var2[index2] if batch else norm2.running_var))
        index2 += 1
    state = _BlockForward(None, channel_mean, channel_var, saved, conv_dtype)
    grad_x, grads = _dense_block_backward(grad_out, buffer, layers, state, need_grad_x)
    # A gradient has its parameter's dtype and strides (the fake implementation promises them) and its own
    # storage (BN+ReLU's weight and bias gradients are two rows of one sum; op outputs may not alias).
    owned, storages = [], set()
    for g, p in zip(grads, params, strict=True):
        if g.stride() != p.stride() or g.storage_offset() or g.untyped_storage().data_ptr() in storages:
            g = torch.empty_like(p).copy_(g)
        storages.add(g.untyped_storage().data_ptr())
        owned.append(g)
    return (grad_x if grad_x is not None else buffer.new_empty((0,))), owned


@_dense_block_backward_op.register_fake
def _dense_block_backward_fake(grad_out, buffer, params, stats, channel_mean, channel_var, hidden, mean2, var2,
                               norm_batch, eps, bottleneck, conv_dtype, need_grad_x):
    n, c_out, h, w = buffer.shape
    c_in = c_out - (len(params) // (6 if bottleneck else 3)) * (params[5] if bottleneck else params[2]).shape[0]
    grad_x = (torch.empty((n, c_in, h, w), dtype=buffer.dtype, device=buffer.device,
                          memory_format=buffer_memory_format(buffer)) if need_grad_x else buffer.new_empty((0,)))
    return grad_x, [torch.empty_like(p) for p in params]


def _dense_setup_context(ctx, inputs, output) -> None:
    x, params, stats, norm_batch, eps, bottleneck, conv_dtype, keep = inputs
    buffer, channel_mean, channel_var, hidden, mean2, var2 = output
    # Everything backward reads goes through save_for_backward: the buffer (the output), the parameters,
    # eval-mode running statistics, the batch statistics and each BC layer's h. Autograd's version counters
    # then catch an in-place change before backward (an optimizer step inside a gradient-accumulation
    # loop), and saved_tensors_hooks (offloading, checkpointing) see all of it.
    running = [t for t in stats if t is not None]
    ctx.save_for_backward(buffer, *params, *running, channel_mean, channel_var, *hidden, *mean2, *var2)
    ctx.layout = (len(params), [t is not None for t in stats], len(hidden))
    ctx.config = (list(norm_batch), list(eps), bottleneck, conv_dtype)
    ctx.mark_non_differentiable(channel_mean, channel_var, *hidden, *mean2, *var2)


def _dense_backward(ctx, grad_buffer, *_):
    saved = list(ctx.saved_tensors)
    n_params, present, n_bc = ctx.layout
    buffer, params, rest = saved[0], saved[1:1 + n_params], saved[1 + n_params:]
    running = iter(rest[:sum(present)])
    stats = [next(running) if is_present else None for is_present in present]
    rest = rest[sum(present):]
    channel_mean, channel_var = rest[0], rest[1]
    hidden, mean2, var2 = rest[2:2 + n_bc], rest[2 + n_bc:2 + 2 * n_bc], rest[2 + 2 * n_bc:2 + 3 * n_bc]
    norm_batch, eps, bottleneck, conv_dtype = ctx.config
    need_grad_x = ctx.needs_input_grad[0]
    grad_x, grads = torch.ops.perfkit.dense_block_backward(
        grad_buffer, buffer, params, stats, channel_mean, channel_var, hidden, mean2, var2, norm_batch, eps,
        bottleneck, conv_dtype, need_grad_x)
    # The returned structure mirrors the inputs' pytree: a list is a node only if it holds nothing but tensors.
    stats_grad = [None] * len(stats) if all(t is not None for t in stats) else None
    return grad_x if need_grad_x else None, list(grads), stats_grad, None, None, None, None, None


_dense_block_forward_op.register_autograd(_dense_backward, setup_context=_dense_setup_context)



def _layer_params(layer: DenseLayerTensors) -> list[torch.Tensor]:
    params = [layer.norm1_weight, layer.norm1_bias, layer.conv1_weight]
    if layer.bottleneck:
        params += [layer.norm2_weight, layer.norm2_bias, layer.conv2_weight]
    return params


def _check_block(x: torch.Tensor, layers: Sequence[DenseLayerTensors]) -> None:
    check_4d(x, "x")
    if x.dtype not in _tiles.STORAGE_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the fused dense block supports float32, bfloat16 and float16 (its "
                        "kernels accumulate in float32, so float64 would silently lose precision: use the "
                        "reference DenseBlock for float64)")
    if not layers:
        raise ValueError("a dense block needs at least one layer")
    bottleneck = layers[0].bottleneck
    growth = layers[0].conv2_weight.shape[0] if bottleneck else layers[0].conv1_weight.shape[0]
    for index, layer in enumerate(layers):
        if layer.bottleneck != bottleneck:
            raise ValueError(f"layer {index} is {'BC' if layer.bottleneck else 'plain'} but layer 0 is not; "
                             "a block's layers are all plain or all BC")
        c = _layer_channels(x.shape[1], growth, index)
        check_channel_vectors(c, x.device, norm1_weight=layer.norm1_weight, norm1_bias=layer.norm1_bias)
        last = layer.conv2_weight if bottleneck else layer.conv1_weight
        if layer.conv1_weight.shape[1] != c or last.shape[0] != growth:
            raise ValueError(f"layer {index}: conv1 must read {c} channels and the layer must write {growth}; "
                             f"got conv1 {tuple(layer.conv1_weight.shape)}, last conv {tuple(last.shape)}")
        for weight in (layer.conv1_weight, layer.conv2_weight):
            if weight is not None and (weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0):
                raise ValueError(f"layer {index}: dense convolutions keep H and W, so kernels must be odd; "
                                 f"got {tuple(weight.shape[2:])}")


def dense_block_op_args(x: torch.Tensor, layers: Sequence[DenseLayerTensors]) -> tuple:
    """The arguments of ``perfkit::dense_block_forward`` for ``layers`` on ``x`` (what :func:`dense_block` passes)."""
    params = [p for layer in layers for p in _layer_params(layer)]
    norms = [norm for layer in layers for norm in ((layer.norm1, layer.norm2) if layer.bottleneck else (layer.norm1,))]
    norm_batch = [_uses_batch_stats(norm) for norm in norms]
    stats = [t for norm, batch in zip(norms, norm_batch, strict=True)
             for t in ((None, None) if batch else (norm.running_mean, norm.running_var))]
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x, params, stats, norm_batch, [norm.eps for norm in norms], layers[0].bottleneck, _conv_dtype(x), keep


def dense_block(x: torch.Tensor, layers: Sequence[DenseLayerTensors]) -> torch.Tensor:
    """DenseNet block ``cat(x, f_0, f_1, ...)`` into one buffer, f_l = layer l on the channel prefix.

    Same result, gradients and running-statistics updates as the eager block (nn.BatchNorm2d semantics,
    each BatchNorm in its own ``NormState.training`` mode); training memory grows linearly in depth (see
    the module docstring). Differentiable when grad mode is on and x or a parameter requires grad;
    otherwise nothing is kept for backward.
    """
    _check_block(x, layers)
    buffer, channel_mean, channel_var, _, mean2, var2 = torch.ops.perfkit.dense_block_forward(
        *dense_block_op_args(x, layers))
    n, c_in, h, w = x.shape
    unbias = n * h * w / max(n * h * w - 1, 1)
    with torch.no_grad():
        bc_index = 0
        for index, layer in enumerate(layers):
            norm1 = layer.norm1
            if norm1.training and norm1.running_mean is not None:
                c = _layer_channels(c_in, _growth(layers), index)
                update_running_stats(norm1.running_mean, norm1.running_var, norm1.momentum, channel_mean[:c],
                                     channel_var[:c], unbias)
            if layer.bottleneck:
                norm2 = layer.norm2
                if norm2.training and norm2.running_mean is not None:
                    update_running_stats(norm2.running_mean, norm2.running_var, norm2.momentum, mean2[bc_index],
                                         var2[bc_index], unbias)
                bc_index += 1
    return buffer
