"""Fused weighted-residual epilogue ``out = relu(alpha * BN(y) + beta * s)`` in Triton, forward and backward.

``y`` is a residual branch's last convolution output (N, C, H, W), ``s`` the shortcut, ``alpha`` and ``beta``
0-dim tensors, ``BN`` a BatchNorm2d given by its weight, bias and running statistics. The public entry point is
:func:`wrc_epilogue`; :class:`perfkit.fused.wrc.FusedResidualEpilogue` is the module that calls it.

Every kernel walks the tensor as tiles of ``[BLOCK_HW spatial positions, BLOCK_C channels]`` of one sample,
addressed through the tensor's own strides: ``n·stride_n + hw·stride_hw + c·stride_c``. The channel is the
reduction key, and the same code reads both layouts without a layout copy:

* NCHW (``stride_hw == 1``): a tile is a few channels' planes, contiguous along the spatial axis;
* channels_last (``stride_c == 1``): a tile is a few pixels' channel vectors, contiguous along channels, and
  when ``stride_n == H·W·stride_hw`` the batch folds into the spatial axis (one ``N·H·W``-long row space), so
  a 7×7 map's 49 rows per sample are not each padded up to a tile boundary.

Triton specializes integer arguments equal to 1 (and marks those divisible by 16), so the compiler sees
which tile axis is contiguous and aligned: compiled for sm_90, both layouts' loads and stores come out as
128-bit vector accesses when the strides are multiples of 16 (not for NCHW with H·W = 49 or 196).
Tensors whose H and W cannot be merged into one stride (a spatial crop) are copied once into their own
memory format (documented in :func:`_flat_strides`); channel or batch slices run in place.

Passes (grid = (tiles, channel blocks) unless said otherwise):

* training forward: ``_bn_stats_kernel`` (grid: reduction programs of ``TILES`` tiles, channel blocks;
  Welford/Chan partial mean and M2 per channel) →
  ``_bn_stats_finalize_kernel`` (grid: channel blocks; merges the partials, writes mean and biased variance,
  updates the running statistics as ``nn.BatchNorm2d`` does) → ``_wrc_fwd_kernel``.
* inference forward: ``_wrc_fwd_kernel`` alone, BN folded from the running statistics: one pass reading
  ``y`` and ``s`` and writing ``out``.
* backward: ``_wrc_bwd_reduce_kernel`` (partial per-channel sums of ``g``, ``g·ŷ``, ``g·s`` where ``g`` is
  the ReLU-masked output gradient) → ``_wrc_bwd_finalize_kernel`` (grid: channel blocks; dweight, dbias and
  the per-channel terms of dalpha and dbeta, whose final sum over C is a torch ``.sum()``) →
  ``_wrc_bwd_dx_kernel`` (dy and ds). Partial sums go through a buffer in a fixed order, never atomics, so
  results are deterministic run to run.

Saved for backward: ``y`` and ``s`` (the ReLU mask is recomputed from them rather than saving ``out``: a
network keeps ``y`` and ``s`` alive anyway for the convolutions around the epilogue, while ``out`` would be
one more activation; ``s`` is also what dbeta needs), the per-channel ``mean`` and biased ``var`` (float32,
``C`` each; the running statistics themselves in inference), and weight, bias, alpha, beta.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only where triton is absent
    raise ImportError(
        "perfkit.kernels.wrc needs triton (`pip install triton`); the `triton` variant is unavailable without it"
    ) from error

from . import _library

__all__ = ["batch_norm_stats_into", "bytes_moved", "wrc_epilogue"]

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile and grid sizing. Starting points, not measured: no GPU was available when these were written.
# GPU tuning goes here: BLOCK_HW/BLOCK_C per layout and dtype, num_warps (Triton's default 4), and
# _MAX_PARTIALS (partials per channel vs. programs in flight) at the benchmark shapes.
_TILE_ELEMENTS = 2048
"""Elements in one [BLOCK_HW, BLOCK_C] tile."""
_MAX_BLOCK_C = 64
"""Widest channel block of a channels_last tile (64 float32 = two 128-byte lines per pixel)."""
_MAX_BLOCK_HW = 1024
"""Longest spatial run of an NCHW tile."""
_MAX_PARTIALS = 256
"""Most partial results per channel a reduction pass leaves for its finalize kernel.

A reduction program loops over enough tiles (a power of two, so few compiled variants) to stay under this:
ResNet-50's first stage at batch 256 channels_last has 25,088 tiles per channel block, which one tile per
program would turn into 25,088 partials, megabytes the finalize kernel reads on a handful of SMs.
"""
_FINALIZE_TILE_ELEMENTS = 2048
"""Elements in one [BLOCK_P partials, BLOCK_C channels] tile of the finalize kernels."""


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(t, N, HW, BLOCK_HW: tl.constexpr):
    """Sample index, spatial offsets and spatial mask of tile ``t`` (tiles ordered sample-major)."""
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = t // hw_blocks
    hw = (t % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    # A tile past the last sample (the tail of a reduction program's loop) gets an empty spatial range.
    return n, hw, hw < tl.where(n < N, HW, 0)


@triton.jit
def _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps, c, c_mask):
    """Per-channel mean, 1/std and the folded ``scale = alpha·w/std``, ``shift = alpha·b`` (float32)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    w = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, alpha * w * rstd, alpha * b


@triton.jit
def _pre_activation(y, s, mean, scale, shift, beta):
    """``alpha·BN(y) + beta·s`` as ``(y − mean)·scale + shift + beta·s``.

    Subtracting the mean first avoids the cancellation of ``y·scale − mean·scale`` when the mean is large
    against the spread. Forward and backward both call this, so the ReLU mask backward sees is forward's.
    """
    return (y - mean[None, :]) * scale[None, :] + shift[None, :] + beta * s


@triton.jit
def _bn_stats_kernel(
    y_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr,
    N, C, HW, y_sn, y_sc, y_shw,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):
    """Partial count, mean and M2 (sum of squared deviations) per channel over ``TILES`` tiles.

    Each tile's mean and M2 are exact two-pass values over the tile held in registers; tiles merge by Chan's
    parallel update, never through E[y²]−E[y]², which cancels when the mean dominates the spread. Values are
    shifted by the program's first element of each channel first, so the sums stay small against the mean
    (a float32 sum of values near 1000 loses the low digits the mean needs).
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    first_tile = pid_t * TILES
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    first = y_ptr + (first_tile // hw_blocks) * y_sn + (first_tile % hw_blocks) * BLOCK_HW * y_shw + c * y_sc
    shift = tl.load(first, mask=c_mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES):
        n, hw, hw_mask = _tile(pid_t * TILES + i, N, HW, BLOCK_HW)
        mask = hw_mask[:, None] & c_mask[None, :]
        y = tl.load(y_ptr + n * y_sn + hw[:, None] * y_shw + c[None, :] * y_sc, mask=mask, other=0.0)
        y = tl.where(mask, y.to(tl.float32) - shift[None, :], 0.0)
        tile_count = tl.sum(mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(y, axis=0) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(mask, y - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        total = count + tile_count
        delta = tile_mean - mean
        tile_share = tile_count / tl.maximum(total, 1.0)
        mean += delta * tile_share
        m2 += tile_m2 + delta * delta * count * tile_share
        count = total
    offsets = pid_t * C + c
    tl.store(count_part_ptr + offsets, count, mask=c_mask)
    tl.store(mean_part_ptr + offsets, shift + mean, mask=c_mask)
    tl.store(m2_part_ptr + offsets, m2, mask=c_mask)


@triton.jit
def _bn_stats_finalize_kernel(
    count_part_ptr, mean_part_ptr, m2_part_ptr, P, C,
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, momentum,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge ``P`` partials per channel into the batch mean and biased variance; update running statistics.

    The running update is ``nn.BatchNorm2d``'s: ``r ← (1 − f)·r + f·x`` with the unbiased variance, where
    ``f`` is ``momentum`` or, with ``CUMULATIVE`` (momentum=None), ``1 / num_batches_tracked`` (read here so
    the host never waits on the device for the counter).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Means are merged relative to the first partial's, for the reason _bn_stats_kernel shifts its values.
    shift = tl.load(mean_part_ptr + c, mask=c_mask, other=0.0)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        part_count = tl.load(count_part_ptr + offsets, mask=mask, other=0.0)
        part_mean = tl.where(mask, tl.load(mean_part_ptr + offsets, mask=mask, other=0.0) - shift[None, :], 0.0)
        part_m2 = tl.load(m2_part_ptr + offsets, mask=mask, other=0.0)
        block_count = tl.sum(part_count, axis=0)
        block_mean = tl.sum(part_count * part_mean, axis=0) / tl.maximum(block_count, 1.0)
        deviation = part_mean - block_mean[None, :]
        block_m2 = tl.sum(part_m2 + part_count * deviation * deviation, axis=0)
        total = count + block_count
        delta = block_mean - mean
        block_share = block_count / tl.maximum(total, 1.0)
        mean += delta * block_share
        m2 += block_m2 + delta * delta * count * block_share
        count = total
    mean += shift
    tl.store(mean_ptr + c, mean, mask=c_mask)
    # Channels past C (masked) have count 0: the clamps keep them finite, the stores skip them.
    tl.store(var_ptr + c, m2 / tl.maximum(count, 1.0), mask=c_mask)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_tracked_ptr).to(tl.float32)
        else:
            factor = momentum
        running_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        running_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        running_mean = (1.0 - factor) * running_mean + factor * mean
        running_var = (1.0 - factor) * running_var + factor * (m2 / tl.maximum(count - 1.0, 1.0))
        tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _wrc_fwd_kernel(
    y_ptr, s_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, eps,
    N, C, HW, y_sn, y_sc, y_shw, s_sn, s_sc, s_shw, out_sn, out_sc, out_shw,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = relu((y − mean)·scale + shift + beta·s)`` for one tile; mean/var are batch or running stats."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n, hw, hw_mask = _tile(tl.program_id(0), N, HW, BLOCK_HW)
    mask = hw_mask[:, None] & c_mask[None, :]
    alpha = tl.load(alpha_ptr).to(tl.float32)
    beta = tl.load(beta_ptr).to(tl.float32)
    mean, rstd, scale, shift = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps, c, c_mask)
    y = tl.load(y_ptr + n * y_sn + hw[:, None] * y_shw + c[None, :] * y_sc, mask=mask, other=0.0)
    s = tl.load(s_ptr + n * s_sn + hw[:, None] * s_shw + c[None, :] * s_sc, mask=mask, other=0.0)
    z = _pre_activation(y.to(tl.float32), s.to(tl.float32), mean, scale, shift, beta)
    out = tl.maximum(z, 0.0)
    tl.store(out_ptr + n * out_sn + hw[:, None] * out_shw + c[None, :] * out_sc,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wrc_bwd_reduce_kernel(
    dout_ptr, y_ptr, s_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, eps,
    sum_g_part_ptr, sum_g_yhat_part_ptr, sum_g_s_part_ptr,
    N, C, HW, dout_sn, dout_sc, dout_shw, y_sn, y_sc, y_shw, s_sn, s_sc, s_shw,
    NEED_G_S: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):
    """Partial per-channel sums of ``g``, ``g·ŷ`` and (with ``NEED_G_S``) ``g·s`` over ``TILES`` tiles.

    ``g = dout · [z > 0]`` is the gradient past the ReLU and ``ŷ = (y − mean)/std``; ``z`` is recomputed.
    """
    pid_t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    alpha = tl.load(alpha_ptr).to(tl.float32)
    beta = tl.load(beta_ptr).to(tl.float32)
    mean, rstd, scale, shift = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps, c, c_mask)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_yhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES):
        n, hw, hw_mask = _tile(pid_t * TILES + i, N, HW, BLOCK_HW)
        mask = hw_mask[:, None] & c_mask[None, :]
        dout = tl.load(dout_ptr + n * dout_sn + hw[:, None] * dout_shw + c[None, :] * dout_sc, mask=mask, other=0.0)
        y = tl.load(y_ptr + n * y_sn + hw[:, None] * y_shw + c[None, :] * y_sc, mask=mask, other=0.0)
        s = tl.load(s_ptr + n * s_sn + hw[:, None] * s_shw + c[None, :] * s_sc, mask=mask, other=0.0)
        y = y.to(tl.float32)
        s = s.to(tl.float32)
        z = _pre_activation(y, s, mean, scale, shift, beta)
        g = tl.where(mask & (z > 0.0), dout.to(tl.float32), 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_g_yhat += tl.sum(g * ((y - mean[None, :]) * rstd[None, :]), axis=0)
        if NEED_G_S:
            sum_g_s += tl.sum(g * s, axis=0)
    offsets = pid_t * C + c
    tl.store(sum_g_part_ptr + offsets, sum_g, mask=c_mask)
    tl.store(sum_g_yhat_part_ptr + offsets, sum_g_yhat, mask=c_mask)
    if NEED_G_S:
        tl.store(sum_g_s_part_ptr + offsets, sum_g_s, mask=c_mask)


@triton.jit
def _wrc_bwd_finalize_kernel(
    sum_g_part_ptr, sum_g_yhat_part_ptr, sum_g_s_part_ptr, P, C, weight_ptr, bias_ptr, alpha_ptr,
    sum_g_ptr, sum_g_yhat_ptr, dweight_ptr, dbias_ptr, dalpha_channel_ptr, dbeta_channel_ptr,
    NEED_G_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the partials; write the channel sums, dweight, dbias and each channel's share of dalpha, dbeta.

    ``dweight = alpha·Σg·ŷ``, ``dbias = alpha·Σg``, ``dalpha_c = w·Σg·ŷ + b·Σg`` (= Σ g·BN(y)) and
    ``dbeta_c = Σg·s``; the sum of the per-channel shares over channels is left to the caller.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_g_yhat = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_g_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        acc_g += tl.load(sum_g_part_ptr + offsets, mask=mask, other=0.0)
        acc_g_yhat += tl.load(sum_g_yhat_part_ptr + offsets, mask=mask, other=0.0)
        if NEED_G_S:
            acc_g_s += tl.load(sum_g_s_part_ptr + offsets, mask=mask, other=0.0)
    sum_g = tl.sum(acc_g, axis=0)
    sum_g_yhat = tl.sum(acc_g_yhat, axis=0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    w = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(sum_g_ptr + c, sum_g, mask=c_mask)
    tl.store(sum_g_yhat_ptr + c, sum_g_yhat, mask=c_mask)
    tl.store(dweight_ptr + c, (alpha * sum_g_yhat).to(dweight_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dbias_ptr + c, (alpha * sum_g).to(dbias_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dalpha_channel_ptr + c, w * sum_g_yhat + b * sum_g, mask=c_mask)
    if NEED_G_S:
        tl.store(dbeta_channel_ptr + c, tl.sum(acc_g_s, axis=0), mask=c_mask)


@triton.jit
def _wrc_bwd_dx_kernel(
    dout_ptr, y_ptr, s_ptr, dy_ptr, ds_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, eps,
    sum_g_ptr, sum_g_yhat_ptr, inv_count,
    N, C, HW, dout_sn, dout_sc, dout_shw, y_sn, y_sc, y_shw, s_sn, s_sc, s_shw,
    dy_sn, dy_sc, dy_shw, ds_sn, ds_sc, ds_shw,
    BATCH_STATS: tl.constexpr, WRITE_DY: tl.constexpr, WRITE_DS: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``ds = beta·g`` and ``dy``: BN's backward through batch statistics, or a per-channel scale in inference.

    With batch statistics ``dy = alpha·w/std · (g − mean(g) − ŷ·mean(g·ŷ))``, the means over the channel's
    ``N·H·W`` elements (``inv_count`` = 1 / that); with running statistics ``dy = alpha·w/std · g``.
    """
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n, hw, hw_mask = _tile(tl.program_id(0), N, HW, BLOCK_HW)
    mask = hw_mask[:, None] & c_mask[None, :]
    alpha = tl.load(alpha_ptr).to(tl.float32)
    beta = tl.load(beta_ptr).to(tl.float32)
    mean, rstd, scale, shift = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha, eps, c, c_mask)
    dout = tl.load(dout_ptr + n * dout_sn + hw[:, None] * dout_shw + c[None, :] * dout_sc, mask=mask, other=0.0)
    y = tl.load(y_ptr + n * y_sn + hw[:, None] * y_shw + c[None, :] * y_sc, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + n * s_sn + hw[:, None] * s_shw + c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
    z = _pre_activation(y, s, mean, scale, shift, beta)
    g = tl.where(z > 0.0, dout.to(tl.float32), 0.0)
    if WRITE_DY:
        if BATCH_STATS:
            mean_g = tl.load(sum_g_ptr + c, mask=c_mask, other=0.0) * inv_count
            mean_g_yhat = tl.load(sum_g_yhat_ptr + c, mask=c_mask, other=0.0) * inv_count
            yhat = (y - mean[None, :]) * rstd[None, :]
            dy = scale[None, :] * (g - mean_g[None, :] - yhat * mean_g_yhat[None, :])
        else:
            dy = scale[None, :] * g
        tl.store(dy_ptr + n * dy_sn + hw[:, None] * dy_shw + c[None, :] * dy_sc,
                 dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if WRITE_DS:
        tl.store(ds_ptr + n * ds_sn + hw[:, None] * ds_shw + c[None, :] * ds_sc,
                 (beta * g).to(ds_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Layout and sizing
# --------------------------------------------------------------------------------------------------------------


def _allocate(size: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every buffer the launches write (outputs, partials, statistics) comes from here: tests poison it."""
    return torch.empty(size, dtype=dtype, device=device, memory_format=memory_format)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format ``t`` is in, or for a non-dense view (a slice) the one its strides follow."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if t.stride(1) < t.stride(3) else torch.contiguous_format


def _flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(stride_n, stride_c, stride_hw)`` if H and W merge into one strided axis, else None.

    They merge in every dense NCHW or channels_last tensor and in channel or batch slices of one; a spatial
    crop (``x[:, :, 1:, 1:]``) does not, and the caller copies it once into its memory format.
    """
    _, _, height, width = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if width == 1:
        return stride_n, stride_c, stride_h
    if height == 1 or stride_h == width * stride_w:
        return stride_n, stride_c, stride_w
    return None


def _mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its spatial axes merge into one stride, otherwise a copy in its memory format."""
    if _flat_strides(t) is not None:
        return t
    return t.contiguous(memory_format=_memory_format(t))


class _Space:
    """The (sample, spatial, channel) space every tile kernel walks, with each tensor's strides in it."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        batch, channels, height, width = tensors[0].shape
        strides = [_flat_strides(t) for t in tensors]
        self.channels = channels
        self.batch, self.spatial = batch, height * width
        # Fold the batch into the spatial axis when every tensor allows it (dense channels_last does), so a
        # tile spans samples instead of padding each sample's few pixels up to BLOCK_HW.
        if batch > 1 and all(sn == self.spatial * shw for sn, _, shw in strides):
            self.batch, self.spatial = 1, batch * height * width
            strides = [(0, sc, shw) for _, sc, shw in strides]
        self.strides = strides
        # The channel-fastest tile shape when the first tensor (y or dout) has unit channel stride.
        if tensors[0].stride(1) == 1 and channels > 1:
            self.block_c = max(2, min(triton.next_power_of_2(channels), _MAX_BLOCK_C))
            self.block_hw = max(2, min(triton.next_power_of_2(self.spatial), _TILE_ELEMENTS // self.block_c))
        else:
            self.block_hw = max(2, min(triton.next_power_of_2(self.spatial), _MAX_BLOCK_HW, _TILE_ELEMENTS // 2))
            self.block_c = max(2, min(triton.next_power_of_2(channels), _TILE_ELEMENTS // self.block_hw))
        self.tiles = self.batch * triton.cdiv(self.spatial, self.block_hw)
        self.channel_blocks = triton.cdiv(channels, self.block_c)

    def stride_args(self) -> list[int]:
        """The kernels' flat ``(stride_n, stride_c, stride_hw)`` arguments, one triple per tensor."""
        return [stride for triple in self.strides for stride in triple]


def _reduction_split(tiles: int) -> tuple[int, int]:
    """``(TILES, partials)``: tiles per reduction program and the partials (programs per channel block)."""
    tiles_per_program = triton.next_power_of_2(triton.cdiv(tiles, _MAX_PARTIALS))
    return tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def _finalize_blocks(partials: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` of a finalize kernel's [partials, channels] tile.

    Channel blocks of 32 spread the finalize over C/32 programs (8 for C = 256) rather than one or two.
    """
    block_c = max(2, min(triton.next_power_of_2(channels), 32))
    block_p = max(2, min(triton.next_power_of_2(partials), _FINALIZE_TILE_ELEMENTS // block_c))
    return block_p, block_c


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  running_mean: torch.Tensor | None, running_var: torch.Tensor | None, alpha: torch.Tensor,
                  beta: torch.Tensor, training: bool, momentum: float | None,
                  num_batches_tracked: torch.Tensor | None) -> None:
    """Raise a ValueError/TypeError naming what is wrong before anything is launched."""
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"y must be a 4-D (N, C, H, W) tensor, got {getattr(y, 'shape', type(y))}")
    if not isinstance(s, torch.Tensor) or s.shape != y.shape:
        raise ValueError(f"s must have y's shape {tuple(y.shape)}, got {tuple(getattr(s, 'shape', ()))}")
    for name, t in (("y", y), ("s", s)):
        if t.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16 (the kernels "
                            "accumulate in float32, so float64 would silently lose precision: use the reference "
                            "module for float64)")
    if weight is None or bias is None:
        raise ValueError("weight and bias are required (an affine BatchNorm2d); got None")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with the running statistics, but running_mean is None")
    if training and y.shape[0] * y.shape[2] * y.shape[3] < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(y.shape)}")
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    channels = y.shape[1]
    per_channel = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in per_channel.items():
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) for y's {channels} channels, got {tuple(t.shape)}")
        if t.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a per-channel vector)")
    for name, t in (("alpha", alpha), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-element floating-point tensor (0-dim Parameter or buffer), "
                             f"got {t!r}")
    named = {"y": y, "s": s, "alpha": alpha, "beta": beta, "num_batches_tracked": num_batches_tracked, **per_channel}
    for name, t in named.items():
        if t is not None and t.device != y.device:
            raise ValueError(f"{name} is on {t.device} but y is on {y.device}: every tensor must be on one device")
    # Fake tensors (the memory model, torch.compile's tracing) run the ops' fake implementations: no launch.
    if y.device.type == "cpu" and not _library.INTERPRETED and not is_fake(y):
        raise RuntimeError("the Triton kernels got CPU tensors: run on a GPU, or set TRITON_INTERPRET=1 before "
                           "importing perfkit.kernels.wrc to run them in Triton's (slow) CPU interpreter")
    for name, t in (("y", y), ("s", s)):
        span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
        if span >= 2**31:
            raise ValueError(f"{name} spans {span} elements; the kernels use 32-bit offsets (< 2**31)")


# --------------------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------------------


def _batch_stats(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 momentum: float | None, num_batches_tracked: torch.Tensor | None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (float32, into ``out`` if given); updates the running
    statistics if given."""
    space = _Space([y])
    channels, device = space.channels, y.device
    tiles_per_program, partials = _reduction_split(space.tiles)
    count_part = _allocate((partials, channels), torch.float32, device)
    mean_part = _allocate((partials, channels), torch.float32, device)
    m2_part = _allocate((partials, channels), torch.float32, device)
    if out is None:
        out = (_allocate((channels,), torch.float32, device), _allocate((channels,), torch.float32, device))
    mean, var = out
    grid = (partials, space.channel_blocks)
    _library.launch(_bn_stats_kernel)[grid](
        y, count_part, mean_part, m2_part, space.batch, channels, space.spatial, *space.stride_args(),
        BLOCK_HW=space.block_hw, BLOCK_C=space.block_c, TILES=tiles_per_program,
    )
    update = running_mean is not None
    cumulative = update and momentum is None
    block_p, block_c = _finalize_blocks(partials, channels)
    _library.launch(_bn_stats_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        count_part, mean_part, m2_part, partials, channels, mean, var,
        running_mean if update else mean, running_var if update else var,
        num_batches_tracked if cumulative else mean, 0.0 if momentum is None else float(momentum),
        UPDATE_RUNNING=update, CUMULATIVE=cumulative, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return mean, var


def _forward(y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch ``_wrc_fwd_kernel``: ``out`` in y's memory format, dtype promoted from y's and s's."""
    out = _allocate(tuple(y.shape), torch.promote_types(y.dtype, s.dtype), y.device, _memory_format(y))
    space = _Space([y, s, out])
    _library.launch(_wrc_fwd_kernel)[(space.tiles, space.channel_blocks)](
        y, s, out, mean, var, weight, bias, alpha, beta, eps, space.batch, space.channels, space.spatial,
        *space.stride_args(), BLOCK_HW=space.block_hw, BLOCK_C=space.block_c,
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# The ops: perfkit::bn_stats (mutates the running statistics), perfkit::wrc_epilogue (autograd registered on
# it) and perfkit::wrc_backward, each with a fake implementation for FakeTensorMode and torch.compile.
# --------------------------------------------------------------------------------------------------------------


@_library.op("bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 num_batches_tracked: torch.Tensor | None, momentum: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (float32); the running statistics, when given, updated in place.

    The update is the mutation this op declares. The op has no autograd of its own: the epilogue's backward
    (with ``training=True``) carries the gradient through the batch statistics, so callers pass ``y`` detached.
    """
    return _batch_stats(_mergeable(y), running_mean, running_var, momentum, num_batches_tracked)


@_bn_stats_op.register_fake
def _bn_stats_fake(y, running_mean, running_var, num_batches_tracked, momentum):
    channels = y.shape[1]
    return y.new_empty((channels,), dtype=torch.float32), y.new_empty((channels,), dtype=torch.float32)


@_library.op("wrc_epilogue")
def _wrc_epilogue_op(y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, training: bool,
                     eps: float) -> torch.Tensor:
    """``relu(alpha·(y − mean)/sqrt(var + eps)·weight + alpha·bias + beta·s)``.

    ``training`` says that ``mean`` and ``var`` are y's own batch statistics, so backward differentiates
    through them; otherwise they are constants (the running statistics).
    """
    return _forward(_mergeable(y), _mergeable(s), mean, var, weight, bias, alpha, beta, eps)


@_wrc_epilogue_op.register_fake
def _wrc_epilogue_fake(y, s, mean, var, weight, bias, alpha, beta, training, eps):
    return torch.empty(tuple(y.shape), dtype=torch.promote_types(y.dtype, s.dtype), device=y.device,
                       memory_format=_memory_format(y))


@_library.op("wrc_backward")
def _wrc_backward_op(dout: torch.Tensor, y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     alpha: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool,
                     eps: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    """``(dy, ds, dweight, dbias, dalpha, dbeta)``; a gradient whose ``needs`` flag is False is an empty tensor.

    An op cannot return None, and an empty placeholder keeps the fake implementation exact.
    """
    need_dy, need_ds, need_dweight, need_dbias, need_dalpha, need_dbeta = needs
    y, s, dout = _mergeable(y), _mergeable(s), _mergeable(dout)
    space = _Space([dout, y, s])
    channels, device = space.channels, y.device
    need_sums = (need_dy and training) or need_dweight or need_dbias or need_dalpha or need_dbeta
    dweight = dbias = dalpha = dbeta = None
    sum_g = sum_g_yhat = mean  # placeholders for pointer arguments a constexpr branch never reads
    if need_sums:
        tiles_per_program, partials = _reduction_split(space.tiles)
        sum_g_part = _allocate((partials, channels), torch.float32, device)
        sum_g_yhat_part = _allocate((partials, channels), torch.float32, device)
        sum_g_s_part = _allocate((partials, channels), torch.float32, device) if need_dbeta else sum_g_part
        _library.launch(_wrc_bwd_reduce_kernel)[(partials, space.channel_blocks)](
            dout, y, s, mean, var, weight, bias, alpha, beta, eps, sum_g_part, sum_g_yhat_part,
            sum_g_s_part, space.batch, channels, space.spatial, *space.stride_args(),
            NEED_G_S=need_dbeta, BLOCK_HW=space.block_hw, BLOCK_C=space.block_c, TILES=tiles_per_program,
        )
        sum_g = _allocate((channels,), torch.float32, device)
        sum_g_yhat = _allocate((channels,), torch.float32, device)
        dweight = _allocate((channels,), weight.dtype, device)
        dbias = _allocate((channels,), bias.dtype, device)
        dalpha_channel = _allocate((channels,), torch.float32, device)
        dbeta_channel = _allocate((channels,), torch.float32, device) if need_dbeta else dalpha_channel
        block_p, block_c = _finalize_blocks(partials, channels)
        _library.launch(_wrc_bwd_finalize_kernel)[(triton.cdiv(channels, block_c),)](
            sum_g_part, sum_g_yhat_part, sum_g_s_part, partials, channels, weight, bias, alpha,
            sum_g, sum_g_yhat, dweight, dbias, dalpha_channel, dbeta_channel,
            NEED_G_S=need_dbeta, BLOCK_P=block_p, BLOCK_C=block_c,
        )
        # The last C-to-1 sums stay in torch: C floats, deterministic, cheaper than a cross-program
        # reduction kernel or atomics for one scalar each.
        dalpha = dalpha_channel.sum().to(alpha.dtype).reshape(alpha.shape) if need_dalpha else None
        dbeta = dbeta_channel.sum().to(beta.dtype).reshape(beta.shape) if need_dbeta else None
    dy = _allocate(tuple(y.shape), y.dtype, device, _memory_format(y)) if need_dy else None
    ds = _allocate(tuple(s.shape), s.dtype, device, _memory_format(s)) if need_ds else None
    if need_dy or need_ds:
        dx_space = _Space([dout, y, s, dy if need_dy else y, ds if need_ds else s])
        count = y.shape[0] * y.shape[2] * y.shape[3]
        _library.launch(_wrc_bwd_dx_kernel)[(dx_space.tiles, dx_space.channel_blocks)](
            dout, y, s, dy if need_dy else y, ds if need_ds else s, mean, var, weight, bias, alpha, beta,
            eps, sum_g, sum_g_yhat, 1.0 / count, dx_space.batch, channels, dx_space.spatial,
            *dx_space.stride_args(), BATCH_STATS=training, WRITE_DY=need_dy, WRITE_DS=need_ds,
            BLOCK_HW=dx_space.block_hw, BLOCK_C=dx_space.block_c,
        )
    grads = (dy, ds, dweight if need_dweight else None, dbias if need_dbias else None, dalpha, dbeta)
    return tuple(y.new_empty((0,)) if g is None else g for g in grads)


@_wrc_backward_op.register_fake
def _wrc_backward_fake(dout, y, s, weight, bias, alpha, beta, mean, var, training, eps, needs):
    grads = (
        torch.empty(tuple(y.shape), dtype=y.dtype, device=y.device, memory_format=_memory_format(y)),
        torch.empty(tuple(s.shape), dtype=s.dtype, device=s.device, memory_format=_memory_format(s)),
        weight.new_empty(weight.shape), bias.new_empty(bias.shape), alpha.new_empty(alpha.shape),
        beta.new_empty(beta.shape),
    )
    return tuple(g if need else y.new_empty((0,)) for g, need in zip(grads, needs, strict=True))


def _wrc_setup_context(ctx, inputs, output) -> None:
    y, s, mean, var, weight, bias, alpha, beta, training, eps = inputs
    # Everything backward reads, parameters and statistics included, goes through save_for_backward:
    # autograd's version counters then catch an in-place change before backward (as eager's would), and
    # saved_tensors_hooks (offloading, checkpointing) see all the op keeps.
    ctx.save_for_backward(y, s, weight, bias, alpha, beta, mean, var)
    ctx.training, ctx.eps = training, eps


def _wrc_backward(ctx, dout):
    y, s, weight, bias, alpha, beta, mean, var = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 4, 5, 6, 7)]
    dy, ds, dweight, dbias, dalpha, dbeta = (
        g if need else None
        for g, need in zip(torch.ops.perfkit.wrc_backward(dout, y, s, weight, bias, alpha, beta, mean, var,
                                                          ctx.training, ctx.eps, needs), needs, strict=True))
    return dy, ds, None, None, dweight, dbias, dalpha, dbeta, None, None


_wrc_epilogue_op.register_autograd(_wrc_backward, setup_context=_wrc_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def wrc_epilogue(y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None, alpha: torch.Tensor,
                 beta: torch.Tensor, *, training: bool, momentum: float | None, eps: float,
                 num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(alpha * batch_norm(y) + beta * s)`` in fused Triton kernels, differentiable in y, s, weight, bias,
    alpha and beta.

    Arguments follow ``torch.nn.functional.batch_norm``: ``training=True`` normalizes with the batch
    statistics and, when ``running_mean``/``running_var`` are given, updates them in place as
    ``nn.BatchNorm2d`` does (``momentum``, or with ``momentum=None`` the cumulative average
    ``1 / num_batches_tracked``; unbiased variance for the running value, biased for normalizing), and
    increments ``num_batches_tracked`` when given. ``training=False`` folds the running statistics into a
    per-channel scale and shift: one pass reading ``y`` and ``s`` and writing the output.

    ``y`` and ``s`` are (N, C, H, W) float32, bfloat16 or float16, NCHW or channels_last (read in place, no
    layout copy); the output has y's memory format and the promoted dtype of y and s, as the reference's
    ``alpha * bn(y) + beta * s`` would. ``alpha`` and ``beta`` are 0-dim tensors (Parameters or buffers).
    """
    _check_inputs(y, s, weight, bias, running_mean, running_var, alpha, beta, training, momentum,
                  num_batches_tracked)
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if training:
        mean, var = torch.ops.perfkit.bn_stats(y.detach(), running_mean, running_var, num_batches_tracked, momentum)
    else:
        mean, var = running_mean, running_var
    return torch.ops.perfkit.wrc_epilogue(y, s, mean, var, weight, bias, alpha, beta, training, eps)


def batch_norm_stats_into(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write y's per-channel batch mean and biased variance into the contiguous float32 vectors ``mean`` and ``var``.

    The one BatchNorm-statistics kernel pair (``_bn_stats_kernel``, ``_bn_stats_finalize_kernel``) of both
    fused blocks: the dense block calls this for each channel slice it writes. ``y`` may be any channel or
    batch slice of a dense tensor (read in place).
    """
    _batch_stats(_mergeable(y), None, None, None, None, out=(mean, var))


def bytes_moved(y: torch.Tensor, training: bool, *, backward: bool = False) -> int:
    """Bytes the epilogue must move, each input read once and each output written once, for achieved GB/s.

    With ``E = y.numel() * y.element_size()`` (s and out taken to have y's dtype) and per-channel vectors
    counted as float32 (``4·C`` bytes each; negligible against ``E``):

    * forward: read y, s, write out → ``3E``; plus weight, bias, running mean and var read (inference) or
      weight, bias read and running mean and var read and written (training): ``4·4C`` or ``6·4C``.
    * backward (``backward=True``): read dout, y, s, write dy, ds → ``5E``; plus weight, bias, mean, var
      read and dweight, dbias written: ``6·4C``.

    This is the minimum, not what the implementation moves: the training forward reads y twice (statistics
    pass, then the epilogue: ``4E``), and the backward reads dout, y and s twice when it needs channel sums
    (training, or any parameter gradient: ``8E``); against this count those passes top out at 3/4 and 5/8
    of the device's bandwidth.
    """
    tensor_bytes = y.numel() * y.element_size()
    channel_bytes = 4 * y.shape[1]
    if backward:
        return 5 * tensor_bytes + 6 * channel_bytes
    return 3 * tensor_bytes + (6 if training else 4) * channel_bytes
