"""Fused BatchNorm+ReLU in Triton, forward and backward: the kernel of a dense layer and of a concat's BN-ReLU.

``relu((x − mean)/sqrt(var + eps)·weight + bias)`` over a 4-D tensor of any strides: the dense block
(:mod:`perfkit.kernels.dense`) calls it on each layer's channel prefix ``buffer[:, :C_l]``, read in place (a
strided view: neither NCHW nor channels_last is ever copied), and writes the convolution's input directly in
the convolution's dtype. ``mean``/``var`` are x's batch statistics (from :mod:`perfkit.kernels.bn_stats`) or
the running ones.

Kernels: ``_bn_relu_fwd_kernel`` (grid: row tiles, channel blocks; with the running-statistics update folded
into its first row of programs), then for backward ``_bn_relu_bwd_reduce_kernel`` (grid: channel blocks,
row splits; partial ``Σg`` and ``Σg·x̂`` per channel, g the ReLU-masked gradient) and
``_bn_relu_bwd_dx_kernel`` (optionally accumulating into an existing gradient buffer). All accumulate in
float32. :func:`bn_relu` is the differentiable entry point, the op ``perfkit::bn_relu`` with
``perfkit::bn_relu_backward``; the running statistics are updated outside the (functional) op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _library, _tiles
from .bn_stats import batch_norm_stats_into

__all__ = ["batch_norm_stats", "bn_relu", "bn_relu_apply", "bn_relu_backward", "bn_relu_bytes_moved"]

_REDUCTION_PROGRAMS = 512
"""Programs a split reduction aims for: a few per SM on an H100 (132 SMs), so a layer whose few channel
blocks alone would leave most SMs idle also splits its rows. Not yet tuned on a GPU."""

_MOMENTUM_REQUIRED = ("momentum is required when running statistics are updated (nn.BatchNorm2d passes "
                      "1/num_batches_tracked for momentum=None)")


# --------------------------------------------------------------------------------------------------------
# Kernels. Every kernel sees a tensor as [R, C] with R = N*H*W rows: row r is (n, h, w) and the element's
# offset is n*stride_n + h*stride_h + w*stride_w + c*stride_c, so NCHW, channels_last and channel-prefix
# views of a larger buffer are all read in place. Tiles are [BLOCK_R, BLOCK_C].
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid_r, pid_c, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows, channels, channel mask and [BLOCK_R, BLOCK_C] mask of the tile of program ``(pid_r, pid_c)``."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    return rows, cols, col_mask, (rows < R)[:, None] & col_mask[None, :]


@triton.jit
def _tile_offsets(rows, cols, H, W, stride_n, stride_c, stride_h, stride_w):
    """int64 element offsets of the [rows, cols] tile of a tensor with these strides."""
    hw = H * W
    n = rows // hw
    rem = rows - n * hw
    h = rem // W
    w = rem - h * W
    row_offsets = n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
    return row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps):
    """Per-channel mean, 1/std, weight and bias (float32)."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, weight, bias


@triton.jit
def _relu_gradient(x, dy, mean, rstd, weight, bias):
    """``(x̂, g)``: the normalized input and ``g = dy·[x̂·weight + bias > 0]``, the gradient past the ReLU."""
    xhat = (x - mean[None, :]) * rstd[None, :]
    return xhat, tl.where(xhat * weight[None, :] + bias[None, :] > 0.0, dy, 0.0)


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
    rows, cols, col_mask, mask = _tile(tl.program_id(0), tl.program_id(1), R, C, BLOCK_R, BLOCK_C)
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    x_offsets = _tile_offsets(rows, cols, H, W, sx_n, sx_c, sx_h, sx_w)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) first: the folded form x*scale + shift cancels when |mean| >> std.
    y = tl.maximum((x - mean[None, :]) * (rstd * weight)[None, :] + bias[None, :], 0.0)
    y_offsets = _tile_offsets(rows, cols, H, W, sy_n, sy_c, sy_h, sy_w)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
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
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + _tile_offsets(rows, cols, H, W, sx_n, sx_c, sx_h, sx_w), mask=mask, other=0.0)
        dy = tl.load(dy_ptr + _tile_offsets(rows, cols, H, W, sd_n, sd_c, sd_h, sd_w), mask=mask, other=0.0)
        xhat, g = _relu_gradient(x.to(tl.float32), dy.to(tl.float32), mean, rstd, weight, bias)
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
    rows, cols, col_mask, mask = _tile(tl.program_id(0), tl.program_id(1), R, C, BLOCK_R, BLOCK_C)
    mean, rstd, weight, bias = _load_channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, cols, col_mask, eps)
    x = tl.load(x_ptr + _tile_offsets(rows, cols, H, W, sx_n, sx_c, sx_h, sx_w), mask=mask, other=0.0)
    dy = tl.load(dy_ptr + _tile_offsets(rows, cols, H, W, sd_n, sd_c, sd_h, sd_w), mask=mask, other=0.0)
    xhat, g = _relu_gradient(x.to(tl.float32), dy.to(tl.float32), mean, rstd, weight, bias)
    if BATCH_STATS:
        # The batch mean and variance depend on x too: project out their directions.
        dbias = tl.load(dbias_ptr + cols, mask=col_mask, other=0.0)
        dweight = tl.load(dweight_ptr + cols, mask=col_mask, other=0.0)
        g = g - (dbias[None, :] + xhat * dweight[None, :]) * inv_count
    dx = g * (weight * rstd)[None, :]
    dx_offsets = _tile_offsets(rows, cols, H, W, so_n, so_c, so_h, so_w)
    if ACCUMULATE:
        dx += tl.load(dx_ptr + dx_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Checks, layout and sizing
# --------------------------------------------------------------------------------------------------------


def buffer_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when channels are x's innermost dimension (also for a prefix view of such a buffer)."""
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def check_4d(x: torch.Tensor, name: str) -> None:
    """Raise unless ``x`` is a 4-D [N, C, H, W] floating-point tensor."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, bfloat16, float16 or float64); got {x.dtype}")


def check_channel_vectors(channels: int, device: torch.device, **vectors: torch.Tensor | None) -> None:
    """Raise unless every named vector is present, of shape ``(channels,)``, on ``device``."""
    for name, v in vectors.items():
        if v is None:
            raise ValueError(f"{name} is required (BatchNorm with affine=False is not supported)")
        if v.shape != (channels,) or v.device != device:
            raise ValueError(f"{name} must have shape ({channels},) on {device}; got {tuple(v.shape)} on {v.device}")


def _tile_shape(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide in channels where channels are contiguous, wide in rows where pixels are.

    About 2K elements a tile (4 warps, 16 elements a thread). Starting points for GPU tuning, not measured yet.
    """
    n, c, h, w = x.shape
    rows = n * h * w
    if buffer_memory_format(x) == torch.channels_last:
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


# --------------------------------------------------------------------------------------------------------
# Launch wrappers: check, allocate, launch.
# --------------------------------------------------------------------------------------------------------


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of a 4-D tensor (any strides), float32 ``[C]`` each."""
    check_4d(x, "x")
    n, c, h, w = x.shape
    rows = n * h * w
    if rows < 2:
        raise ValueError(f"batch statistics need more than 1 value per channel; got input of shape {tuple(x.shape)}")
    mean = _tiles.allocate((c,), torch.float32, x.device)
    var = _tiles.allocate((c,), torch.float32, x.device)
    batch_norm_stats_into(x, mean, var)
    return mean, var


def bn_relu_apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None, *,
                  running: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """``relu((x - mean) / sqrt(var + eps) * weight + bias)`` in one pass; output dense in x's layout.

    ``running = (running_mean, running_var, momentum)``: also fold this batch's ``mean`` and biased ``var``
    (x's own statistics) into the running statistics in place, as nn.BatchNorm2d does in training.
    """
    check_4d(x, "x")
    n, c, h, w = x.shape
    rows = n * h * w
    check_channel_vectors(c, x.device, mean=mean, var=var, weight=weight, bias=bias)
    running_mean, running_var, momentum = running if running is not None else (mean, var, 0.0)
    if running is not None:
        check_channel_vectors(c, x.device, running_mean=running_mean, running_var=running_var)
        if rows < 2:
            raise ValueError(f"the unbiased running variance needs more than 1 value per channel; got {tuple(x.shape)}")
    y = _tiles.allocate(x.shape, out_dtype or x.dtype, x.device, buffer_memory_format(x))
    block_r, block_c = _tile_shape(x)
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
    check_4d(x, "x")
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}; got {tuple(grad_y.shape)}")
    if need_grad_x and grad_x_accumulate is not None and grad_x_accumulate.shape != x.shape:
        raise ValueError(f"grad_x_accumulate must have x's shape {tuple(x.shape)}; "
                         f"got {tuple(grad_x_accumulate.shape)}")
    n, c, h, w = x.shape
    check_channel_vectors(c, x.device, mean=mean, var=var, weight=weight, bias=bias)
    rows = n * h * w
    block_r, block_c = _tile_shape(x)
    channel_blocks = triton.cdiv(c, block_c)
    splits, rows_per_split = _split(rows, block_r, channel_blocks)
    partial = _tiles.allocate((2, splits, c), torch.float32, x.device)
    _bn_relu_bwd_reduce_kernel[(channel_blocks, splits)](
        x, grad_y, partial, mean, var, weight, bias, c, h, w, rows, rows_per_split, float(eps),
        *_strides(x), *_strides(grad_y), BLOCK_R=block_r, BLOCK_C=block_c)
    grad_bias, grad_weight = partial.sum(dim=1)
    grad_x = None
    if need_grad_x:
        grad_x = grad_x_accumulate
        if grad_x is None:
            grad_x = _tiles.allocate(x.shape, x.dtype, x.device, buffer_memory_format(x))
        _bn_relu_bwd_dx_kernel[(triton.cdiv(rows, block_r), channel_blocks)](
            x, grad_y, grad_x, mean, var, weight, bias, grad_bias, grad_weight, c, h, w, rows, float(eps),
            1.0 / rows, *_strides(x), *_strides(grad_y), *_strides(grad_x),
            BATCH_STATS=batch_stats, ACCUMULATE=grad_x_accumulate is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float | None,
                         mean: torch.Tensor, var: torch.Tensor, unbias: float) -> None:
    """nn.BatchNorm2d's running update from a batch's mean and biased variance (momentum resolved)."""
    if momentum is None:
        raise ValueError(_MOMENTUM_REQUIRED)
    running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_((var * unbias).to(running_var.dtype), alpha=momentum)


def bn_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
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
            raise ValueError(_MOMENTUM_REQUIRED)
        running = (running_mean, running_var, momentum)
    return bn_relu_apply(x, mean, var, weight, bias, eps, out_dtype, running=running), mean, var, True


# --------------------------------------------------------------------------------------------------------
# BN+ReLU as one differentiable op (what a kernel benchmark calls alone): perfkit::bn_relu (functional:
# bn_relu updates the running statistics) with autograd registered on it, and perfkit::bn_relu_backward.
# --------------------------------------------------------------------------------------------------------


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
    y = torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=buffer_memory_format(x))
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
    grad_x = (torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=buffer_memory_format(x))
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


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
            running_var: torch.Tensor | None, *, training: bool, momentum: float | None = 0.1,
            eps: float = 1e-5) -> torch.Tensor:
    """``relu(F.batch_norm(x, ...))`` fused: same arguments and running-statistics update, differentiable.

    ``x`` may be any strided 4-D tensor, a channel-prefix view of a larger buffer included (read in place).
    Training reads x twice (statistics, then normalize); eval once. See :func:`bn_relu_bytes_moved`.
    """
    check_4d(x, "x")
    tracking = running_mean is not None and running_var is not None
    batch_stats = training or not tracking
    if training and tracking and momentum is None:
        raise ValueError(_MOMENTUM_REQUIRED)
    y, mean, var = torch.ops.perfkit.bn_relu(x, weight, bias, None if batch_stats else running_mean,
                                             None if batch_stats else running_var, batch_stats, eps)
    if training and tracking:
        n, _, h, w = x.shape
        with torch.no_grad():
            update_running_stats(running_mean, running_var, momentum, mean, var, n * h * w / max(n * h * w - 1, 1))
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
