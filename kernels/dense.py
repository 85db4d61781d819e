"""Fused BatchNorm+ReLU kernels and the memory-efficient DenseNet block built on them.

A dense layer computes ``conv(relu(bn(cat(x0, ..., x_{l-1}))))``. Eager PyTorch materializes each concat
and each BN/ReLU output and keeps them for backward, so a block's activation memory grows with the square
of its depth. Here (after Pleiss et al., 2017, *Memory-Efficient Implementation of DenseNets*):

* **One buffer.** The block allocates ``[N, C_in + L*k, H, W]`` once, in the input's memory format; the
  input goes into its channel prefix and layer ``l`` writes its ``k`` new channels after it. The concat
  is free, and every layer reads its channel prefix ``buffer[:, :C_l]`` in place (a strided view: the
  kernels take any strides, so neither NCHW nor channels_last is ever copied).
* **One kernel for BN+ReLU of the prefix** (``_bn_relu_fwd_kernel``) writes the convolution's input
  directly, in the convolution's dtype.
* **Batch statistics once per channel.** A channel's batch mean and variance do not depend on which
  layer normalizes it, so they are computed once, when the channel is written (the statistics kernels of
  :mod:`perfkit.kernels.wrc`, Chan/Welford merges in float32), and every later layer reuses them with its
  own ``eps``, weight, bias and running-statistics update. Layer ``l``'s forward then reads its prefix
  once, not three times.
* **Recompute in backward.** The op ``perfkit::dense_block_forward`` is one autograd node for the block. It
  saves the buffer (the block's output, which is needed anyway), the per-channel batch statistics, and
  for BC layers the 1×1 bottleneck output ``h`` (``4k`` channels, a fixed amount per layer) with its
  statistics. It does not save any normalized prefix or any concat: backward walks the layers in reverse,
  recomputes ``relu(bn(prefix))`` with the forward kernel, runs the convolution's backward
  (``aten.convolution_backward``), and applies BN+ReLU's backward (``_bn_relu_bwd_reduce_kernel`` then
  ``_bn_relu_bwd_dx_kernel``), adding the prefix gradient into one gradient buffer of the block's shape.
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
that calls :func:`dense_block`. Nothing runs at import time besides defining the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _library
from . import wrc as _wrc

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the kernels read and write; they accumulate in float32, so float64 is refused, not degraded."""

_REDUCTION_PROGRAMS = 512
"""Programs a split reduction aims for: a few per SM on an H100 (132 SMs), so a layer whose few channel
blocks alone would leave most SMs idle also splits its rows. Not yet tuned on a GPU."""


# --------------------------------------------------------------------------------------------------------
# Kernels. Every kernel sees a tensor as [R, C] with R = N*H*W rows: row r is (n, h, w) and the element's
# offset is n*stride_n + h*stride_h + w*stride_w + c*stride_c, so NCHW, channels_last and channel-prefix
# views of a larger buffer are all read in place. Tiles are [BLOCK_R, BLOCK_C].
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, H, W, stride_n, stride_h, stride_w):
    hw = H * W
    n = rows // hw
    rem = rows - n * hw
    h = rem // W
    w = rem - h * W
    return n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w


@triton.jit
def _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps):
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, weight, bias


@triton.jit
def _bn_relu_fwd_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, running_mean_ptr, running_var_ptr,
                        C, H, W, R, eps, momentum, unbias,
                        sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
                        UPDATE_RUNNING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y = relu((x - mean) * rstd * weight + bias)``; mean/var are batch or running statistics.

    UPDATE_RUNNING: the first row of programs also applies nn.BatchNorm2d's running update for its
    channels, ``running = (1 - momentum) * running + momentum * batch`` with the variance unbiased, so
    training costs no extra launch for it.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    x_offs = _row_offsets(rows, H, W, sx_n, sx_h, sx_w)[:, None] + cols.to(tl.int64)[None, :] * sx_c
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) first: the folded form x*scale + shift cancels when |mean| >> std.
    y = tl.maximum((x - mean[None, :]) * (rstd * weight)[None, :] + bias[None, :], 0.0)
    y_offs = _row_offsets(rows, H, W, sy_n, sy_h, sy_w)[:, None] + cols.to(tl.int64)[None, :] * sy_c
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if UPDATE_RUNNING:
        if tl.program_id(0) == 0:
            var = tl.load(var_ptr + cols, mask=col_mask, other=0.0)
            running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            running_mean = (1.0 - momentum) * running_mean + momentum * mean
            running_var = (1.0 - momentum) * running_var + momentum * (var * unbias)
            tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
            tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _bn_relu_bwd_reduce_kernel(x_ptr, dy_ptr, partial_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                               C, H, W, R, rows_per_split, eps,
                               sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per split: ``sum(g)`` and ``sum(g * xhat)`` per channel, g = dy masked by the ReLU."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & col_mask[None, :]
        x_offs = _row_offsets(rows, H, W, sx_n, sx_h, sx_w)[:, None] + cols.to(tl.int64)[None, :] * sx_c
        d_offs = _row_offsets(rows, H, W, sd_n, sd_h, sd_w)[:, None] + cols.to(tl.int64)[None, :] * sd_c
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        g = tl.where(xhat * weight[None, :] + bias[None, :] > 0.0, dy, 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_g_xhat += tl.sum(g * xhat, axis=0)
    base = partial_ptr + pid_s * C + cols
    tl.store(base, sum_g, mask=col_mask)
    tl.store(base + split * C, sum_g_xhat, mask=col_mask)


@triton.jit
def _bn_relu_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, dbias_ptr, dweight_ptr,
                           C, H, W, R, eps, inv_count,
                           sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, so_n, so_c, so_h, so_w,
                           BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx of BN+ReLU; with ACCUMULATE it is added to what dx already holds (the block's gradient buffer)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    col_off = cols.to(tl.int64)[None, :]
    x = tl.load(x_ptr + _row_offsets(rows, H, W, sx_n, sx_h, sx_w)[:, None] + col_off * sx_c,
                mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + _row_offsets(rows, H, W, sd_n, sd_h, sd_w)[:, None] + col_off * sd_c,
                 mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    g = tl.where(xhat * weight[None, :] + bias[None, :] > 0.0, dy, 0.0)
    if BATCH_STATS:
        # The batch mean and variance depend on x too: project out their directions.
        dbias = tl.load(dbias_ptr + cols, mask=col_mask, other=0.0)
        dweight = tl.load(dweight_ptr + cols, mask=col_mask, other=0.0)
        g = g - (dbias[None, :] + xhat * dweight[None, :]) * inv_count
    dx = g * (weight * rstd)[None, :]
    out_offs = _row_offsets(rows, H, W, so_n, so_h, so_w)[:, None] + col_off * so_c
    if ACCUMULATE:
        dx += tl.load(dx_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + out_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launch wrappers: check, allocate, launch.
# --------------------------------------------------------------------------------------------------------


def _alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every tensor a kernel here writes from scratch is allocated by this one function (tests poison it)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when channels are x's innermost dimension (also for a prefix view of such a buffer)."""
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def _tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide in channels where channels are contiguous, wide in rows where pixels are.

    About 2K elements a tile (4 warps, 16 elements a thread). Starting points for GPU tuning, not measured yet.
    """
    n, c, h, w = x.shape
    rows = n * h * w
    if _memory_format(x) == torch.channels_last:
        block_c = min(64, triton.next_power_of_2(c))
    else:
        block_c = min(4, triton.next_power_of_2(c))
    block_r = min(2048 // block_c, triton.next_power_of_2(rows))
    return block_r, block_c


def _split(rows: int, block_r: int, channel_blocks: int) -> tuple[int, int]:
    """(splits, rows_per_split) for a row reduction: enough programs to fill the device, whole tiles each."""
    splits = max(1, min(triton.cdiv(rows, block_r), _REDUCTION_PROGRAMS // channel_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    return triton.cdiv(rows, rows_per_split), rows_per_split


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, bfloat16, float16 or float64); got {x.dtype}")


def _check_channel_vectors(channels: int, device: torch.device, **vectors: torch.Tensor | None) -> None:
    for name, v in vectors.items():
        if v is None:
            raise ValueError(f"{name} is required (BatchNorm with affine=False is not supported)")
        if v.shape != (channels,) or v.device != device:
            raise ValueError(f"{name} must have shape ({channels},) on {device}; got {tuple(v.shape)} on {v.device}")


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of a 4-D tensor (any strides), float32 ``[C]`` each."""
    _check_4d(x, "x")
    n, c, h, w = x.shape
    rows = n * h * w
    if rows < 2:
        raise ValueError(f"batch statistics need more than 1 value per channel; got input of shape {tuple(x.shape)}")
    mean = _alloc((c,), torch.float32, x.device)
    var = _alloc((c,), torch.float32, x.device)
    _batch_norm_stats_into(x, mean, var)
    return mean, var


def _batch_norm_stats_into(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write x's per-channel mean and biased variance into the float32 vectors ``mean`` and ``var``.

    The statistics kernels are :mod:`perfkit.kernels.wrc`'s: one implementation for both fused blocks.
    """
    _wrc.batch_norm_stats_into(x, mean, var)


def bn_relu_apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None, *,
                  running: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """``relu((x - mean) / sqrt(var + eps) * weight + bias)`` in one pass; output dense in x's layout.

    ``running = (running_mean, running_var, momentum)``: also fold this batch's ``mean`` and biased ``var``
    (x's own statistics) into the running statistics in place, as nn.BatchNorm2d does in training.
    """
    _check_4d(x, "x")
    n, c, h, w = x.shape
    rows = n * h * w
    _check_channel_vectors(c, x.device, mean=mean, var=var, weight=weight, bias=bias)
    running_mean, running_var, momentum = running if running is not None else (mean, var, 0.0)
    if running is not None:
        _check_channel_vectors(c, x.device, running_mean=running_mean, running_var=running_var)
        if rows < 2:
            raise ValueError(f"the unbiased running variance needs more than 1 value per channel; got {tuple(x.shape)}")
    y = _alloc(x.shape, out_dtype or x.dtype, x.device, _memory_format(x))
    block_r, block_c = _tile(x)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(c, block_c))
    _bn_relu_fwd_kernel[grid](x, y, mean, var, weight, bias, running_mean, running_var, c, h, w, rows, float(eps),
                              float(momentum), rows / max(rows - 1, 1), *_strides(x), *_strides(y),
                              UPDATE_RUNNING=running is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return y


def bn_relu_backward(x: torch.Tensor, grad_y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor, eps: float, *, batch_stats: bool,
                     grad_x_accumulate: torch.Tensor | None = None, need_grad_x: bool = True,
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Backward of :func:`bn_relu_apply`: ``(grad_x, grad_weight, grad_bias)``.

    ``batch_stats``: mean/var were x's own batch statistics (training), so their gradient flows into x.
    ``grad_x_accumulate``: add grad_x into this tensor in place (and return it) instead of allocating one.
    """
    _check_4d(x, "x")
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}; got {tuple(grad_y.shape)}")
    n, c, h, w = x.shape
    _check_channel_vectors(c, x.device, mean=mean, var=var, weight=weight, bias=bias)
    rows = n * h * w
    block_r, block_c = _tile(x)
    channel_blocks = triton.cdiv(c, block_c)
    splits, rows_per_split = _split(rows, block_r, channel_blocks)
    partial = _alloc((2, splits, c), torch.float32, x.device)
    _bn_relu_bwd_reduce_kernel[(channel_blocks, splits)](
        x, grad_y, partial, mean, var, weight, bias, c, h, w, rows, rows_per_split, float(eps),
        *_strides(x), *_strides(grad_y), BLOCK_R=block_r, BLOCK_C=block_c)
    grad_bias, grad_weight = partial.sum(dim=1)
    grad_x = None
    if need_grad_x:
        if grad_x_accumulate is None:
            grad_x = _alloc(x.shape, x.dtype, x.device, _memory_format(x))
        else:
            if grad_x_accumulate.shape != x.shape:
                raise ValueError(f"grad_x_accumulate must have x's shape {tuple(x.shape)}; "
                                 f"got {tuple(grad_x_accumulate.shape)}")
            grad_x = grad_x_accumulate
        grid = (triton.cdiv(rows, block_r), channel_blocks)
        _bn_relu_bwd_dx_kernel[grid](
            x, grad_y, grad_x, mean, var, weight, bias, grad_bias, grad_weight, c, h, w, rows, float(eps),
            1.0 / rows, *_strides(x), *_strides(grad_y), *_strides(grad_x),
            BATCH_STATS=batch_stats, ACCUMULATE=grad_x_accumulate is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


# --------------------------------------------------------------------------------------------------------
# BN+ReLU as one differentiable op (what a kernel benchmark calls alone).
# --------------------------------------------------------------------------------------------------------


def _bn_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, training: bool, momentum: float | None, eps: float,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(y, mean, var, batch_stats), statistics picked as nn.BatchNorm2d picks them; running ones updated in training."""
    tracking = running_mean is not None and running_var is not None
    if not training and tracking:
        y = bn_relu_apply(x, running_mean, running_var, weight, bias, eps, out_dtype)
        return y, running_mean, running_var, False
    mean, var = batch_norm_stats(x)
    running = None
    if training and tracking:
        if momentum is None:
            raise ValueError("momentum is required when running statistics are updated (nn.BatchNorm2d passes "
                             "1/num_batches_tracked for momentum=None)")
        running = (running_mean, running_var, momentum)
    return bn_relu_apply(x, mean, var, weight, bias, eps, out_dtype, running=running), mean, var, True


@_library.op("bn_relu")
def _bn_relu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, batch_stats: bool,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)``: BN+ReLU with x's batch statistics (returned, float32) or the running ones (then
    ``mean`` and ``var`` are empty). Functional: :func:`bn_relu` updates the running statistics."""
    if batch_stats:
        mean, var = batch_norm_stats(x)
        return bn_relu_apply(x, mean, var, weight, bias, eps), mean, var
    empty = (x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32))
    return bn_relu_apply(x, running_mean, running_var, weight, bias, eps), *empty


@_bn_relu_op.register_fake
def _bn_relu_fake(x, weight, bias, running_mean, running_var, batch_stats, eps):
    channels = x.shape[1] if batch_stats else 0
    y = torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return y, x.new_empty((channels,), dtype=torch.float32), x.new_empty((channels,), dtype=torch.float32)


@_library.op("bn_relu_backward")
def _bn_relu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, eps: float, batch_stats: bool,
                         need_grad_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; grad_x is empty unless ``need_grad_x``."""
    grad_x, grad_weight, grad_bias = bn_relu_backward(x, grad_y, mean, var, weight, bias, eps,
                                                      batch_stats=batch_stats, need_grad_x=need_grad_x)
    # The two parameter gradients are rows of one sum: op outputs own their storage.
    return (grad_x if grad_x is not None else x.new_empty((0,)), grad_weight.clone(), grad_bias.clone())


@_bn_relu_backward_op.register_fake
def _bn_relu_backward_fake(grad_y, x, mean, var, weight, bias, eps, batch_stats, need_grad_x):
    grad_x = (torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
              if need_grad_x else x.new_empty((0,)))
    return grad_x, torch.empty_like(weight), torch.empty_like(bias)


def _bn_relu_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, batch_stats, eps = inputs
    _, mean, var = output
    # Saved: x, the parameters and the statistics used, not y (the consumer of y keeps it if it needs it).
    ctx.save_for_backward(x, weight, bias, *((mean, var) if batch_stats else (running_mean, running_var)))
    ctx.batch_stats, ctx.eps = batch_stats, eps
    ctx.mark_non_differentiable(mean, var)


def _bn_relu_backward_formula(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    need_grad_x = ctx.needs_input_grad[0]
    grad_x, grad_weight, grad_bias = torch.ops.perfkit.bn_relu_backward(grad_y, x, mean, var, weight, bias, ctx.eps,
                                                                        ctx.batch_stats, need_grad_x)
    return grad_x if need_grad_x else None, grad_weight, grad_bias, None, None, None, None


_bn_relu_op.register_autograd(_bn_relu_backward_formula, setup_context=_bn_relu_setup_context)


def bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
            running_var: torch.Tensor | None, *, training: bool, momentum: float | None = 0.1,
            eps: float = 1e-5) -> torch.Tensor:
    """``relu(F.batch_norm(x, ...))`` fused: same arguments and running-statistics update, differentiable.

    ``x`` may be any strided 4-D tensor, a channel-prefix view of a larger buffer included (read in place).
    Training reads x twice (statistics, then normalize); eval once. See :func:`bn_relu_bytes_moved`.
    """
    _check_4d(x, "x")
    tracking = running_mean is not None and running_var is not None
    batch_stats = training or not tracking
    if training and tracking and momentum is None:
        raise ValueError("momentum is required when running statistics are updated (nn.BatchNorm2d passes "
                         "1/num_batches_tracked for momentum=None)")
    y, mean, var = torch.ops.perfkit.bn_relu(x, weight, bias, None if batch_stats else running_mean,
                                             None if batch_stats else running_var, batch_stats, eps)
    if training and tracking:
        n, _, h, w = x.shape
        with torch.no_grad():
            _update_running(NormState(True, running_mean, running_var, momentum, eps), mean, var,
                            n * h * w / max(n * h * w - 1, 1))
    return y


def bn_relu_bytes_moved(shape: Sequence[int], dtype: torch.dtype, *, training: bool,
                        out_dtype: torch.dtype | None = None, param_dtype: torch.dtype = torch.float32) -> int:
    """Least bytes :func:`bn_relu`'s forward must move: x read once, y written once, per-channel vectors.

    Per-channel: weight, bias and the two statistics read; in training the two running statistics also
    written. The kernels read x twice in training (the statistics must be complete before any element is
    normalized), so their achieved bandwidth against this figure tops out near 2/3 of the roofline there.
    """
    n, c, h, w = shape
    elements = n * c * h * w
    x_bytes = elements * torch.empty((), dtype=dtype).element_size()
    y_bytes = elements * torch.empty((), dtype=out_dtype or dtype).element_size()
    vector_bytes = c * torch.empty((), dtype=param_dtype).element_size()
    return x_bytes + y_bytes + vector_bytes * (6 if training else 4)


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
    buffer = _alloc((n, c_out, h, w), x.dtype, x.device, _memory_format(x))
    buffer[:, :c_in].copy_(x)
    stats_channels = _stats_channels(c_in, layers)
    channel_mean = channel_var = None
    if stats_channels:
        if n * h * w < 2:
            raise ValueError(f"batch statistics need more than 1 value per channel; got input {tuple(x.shape)}")
        channel_mean = _alloc((stats_channels,), torch.float32, x.device)
        channel_var = _alloc((stats_channels,), torch.float32, x.device)
        _batch_norm_stats_into(x, channel_mean[:c_in], channel_var[:c_in])
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
                a, mean2, var2, _ = _bn_relu_forward(hidden, layer.norm2_weight, layer.norm2_bias, norm2.running_mean,
                                                     norm2.running_var, norm2.training, None, norm2.eps)
                out = _conv_forward(a, layer.conv2_weight)
                del a
                saved = (hidden if keep_for_backward else None, mean2, var2)
            bottleneck_saved.append(saved)
            buffer[:, c:c + growth].copy_(out)
            if c + growth <= stats_channels:
                # From the buffer, not `out`: the statistics must be those of the stored (rounded) channels.
                _batch_norm_stats_into(buffer[:, c:c + growth], channel_mean[c:c + growth],
                                       channel_var[c:c + growth])
    return _BlockForward(buffer, channel_mean, channel_var, bottleneck_saved, conv_dtype)


def _dense_block_backward(grad_out: torch.Tensor, buffer: torch.Tensor, layers: Sequence[DenseLayerTensors],
                          state: _BlockForward, need_grad_x: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(grad_x, parameter gradients in :func:`_layer_params` order): the layers walked in reverse."""
    c_in = buffer.shape[1] - len(layers) * _growth(layers)
    growth = _growth(layers)
    # The gradient buffer: every layer adds its prefix's gradient into it; a channel's gradient is
    # complete once every later layer has been walked, which is when its own layer is reached.
    grad_buffer = grad_out.clone(memory_format=_memory_format(buffer))
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
    grad_x = grad_buffer[:, :c_in].contiguous(memory_format=_memory_format(buffer)) if need_grad_x else None
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
    fmt = _memory_format(x)
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
                          memory_format=_memory_format(buffer)) if need_grad_x else buffer.new_empty((0,)))
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


def _update_running(norm: NormState, mean: torch.Tensor, var: torch.Tensor, unbias: float) -> None:
    """nn.BatchNorm2d's running update from a batch's mean and biased variance (momentum resolved)."""
    momentum = norm.momentum
    if momentum is None:
        raise ValueError("momentum is required when running statistics are updated (nn.BatchNorm2d passes "
                         "1/num_batches_tracked for momentum=None)")
    norm.running_mean.mul_(1.0 - momentum).add_(mean.to(norm.running_mean.dtype), alpha=momentum)
    norm.running_var.mul_(1.0 - momentum).add_((var * unbias).to(norm.running_var.dtype), alpha=momentum)


def _layer_params(layer: DenseLayerTensors) -> list[torch.Tensor]:
    params = [layer.norm1_weight, layer.norm1_bias, layer.conv1_weight]
    if layer.bottleneck:
        params += [layer.norm2_weight, layer.norm2_bias, layer.conv2_weight]
    return params


def _check_block(x: torch.Tensor, layers: Sequence[DenseLayerTensors]) -> None:
    _check_4d(x, "x")
    if x.dtype not in _STORAGE_DTYPES:
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
        _check_channel_vectors(c, x.device, norm1_weight=layer.norm1_weight, norm1_bias=layer.norm1_bias)
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
                _update_running(norm1, channel_mean[:c], channel_var[:c], unbias)
            if layer.bottleneck:
                norm2 = layer.norm2
                if norm2.training and norm2.running_mean is not None:
                    _update_running(norm2, mean2[bc_index], var2[bc_index], unbias)
                bc_index += 1
    return buffer
