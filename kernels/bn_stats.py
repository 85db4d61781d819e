"""BatchNorm batch statistics in Triton: per-channel mean and biased variance, and nn.BatchNorm2d's running update.

The one statistics kernel pair of both fused blocks: the weighted-residual epilogue (:mod:`perfkit.kernels.wrc`)
normalizes with it in training, and the dense block (:mod:`perfkit.kernels.dense`) computes each channel's
statistics with it once, when the channel is written.

Two passes over the tile space of :mod:`perfkit.kernels._tiles`:

* ``_bn_stats_kernel`` (grid: reduction programs of ``TILES`` tiles, channel blocks): Welford/Chan partial
  count, mean and M2 per channel;
* ``_bn_stats_finalize_kernel`` (grid: channel blocks): merges the partials, writes mean and biased variance,
  updates the running statistics as ``nn.BatchNorm2d`` does.

Variance is never E[y²]−E[y]²: that difference cancels catastrophically when the mean is large against the
spread, which is exactly a BatchNorm input after a few epochs. Partials go through a buffer in a fixed order,
never atomics, so results are deterministic run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _library, _tiles

__all__ = ["batch_norm_stats_into"]


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _chan_merge(count, mean, m2, part_count, part_mean, part_m2):
    """Chan's parallel update: ``(count, mean, M2)`` of two disjoint sets from each set's own."""
    total = count + part_count
    delta = part_mean - mean
    part_share = part_count / tl.maximum(total, 1.0)
    return total, mean + delta * part_share, m2 + (part_m2 + delta * delta * count * part_share)


@triton.jit
def _bn_stats_kernel(
    y_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr,
    N, C, HW, y_sn, y_sc, y_shw,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):
    """Partial count, mean and M2 (sum of squared deviations) per channel over ``TILES`` tiles.

    Each tile's mean and M2 are exact two-pass values over the tile held in registers; tiles merge by Chan's
    parallel update. Values are shifted by the program's first element of each channel first, so the sums
    stay small against the mean (a float32 sum of values near 1000 loses the low digits the mean needs).
    """
    pid_t = tl.program_id(0)
    c, c_mask = _tiles.channel_block(tl.program_id(1), C, BLOCK_C)
    first_tile = pid_t * TILES
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    first = y_ptr + (first_tile // hw_blocks) * y_sn + (first_tile % hw_blocks) * BLOCK_HW * y_shw + c * y_sc
    shift = tl.load(first, mask=c_mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES):
        n, hw, mask = _tiles.tile(first_tile + i, N, HW, c_mask, BLOCK_HW)
        y = _tiles.load_tile(y_ptr, n, hw, c, y_sn, y_sc, y_shw, mask)
        y = tl.where(mask, y - shift[None, :], 0.0)
        tile_count = tl.sum(mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(y, axis=0) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(mask, y - tile_mean[None, :], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tl.sum(deviation * deviation, axis=0))
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
    c, c_mask = _tiles.channel_block(tl.program_id(0), C, BLOCK_C)
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
        count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
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


# --------------------------------------------------------------------------------------------------------------
# Launch wrapper and the op perfkit::bn_stats (mutates the running statistics), with its fake implementation
# --------------------------------------------------------------------------------------------------------------


def _batch_stats(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 momentum: float | None, num_batches_tracked: torch.Tensor | None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (float32, into ``out`` if given); updates the running
    statistics if given. ``y``'s spatial axes must merge (:func:`perfkit.kernels._tiles.mergeable`)."""
    space = _tiles.Space([y])
    channels, device = space.channels, y.device
    tiles_per_program, partials = _tiles.reduction_split(space.tiles)
    count_part = _tiles.allocate((partials, channels), torch.float32, device)
    mean_part = _tiles.allocate((partials, channels), torch.float32, device)
    m2_part = _tiles.allocate((partials, channels), torch.float32, device)
    if out is None:
        out = (_tiles.allocate((channels,), torch.float32, device), _tiles.allocate((channels,), torch.float32, device))
    mean, var = out
    _library.launch(_bn_stats_kernel)[(partials, space.channel_blocks)](
        y, count_part, mean_part, m2_part, space.batch, channels, space.spatial, *space.stride_args(),
        BLOCK_HW=space.block_hw, BLOCK_C=space.block_c, TILES=tiles_per_program,
    )
    update = running_mean is not None
    cumulative = update and momentum is None
    block_p, block_c = _tiles.finalize_blocks(partials, channels)
    _library.launch(_bn_stats_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        count_part, mean_part, m2_part, partials, channels, mean, var,
        running_mean if update else mean, running_var if update else var,
        num_batches_tracked if cumulative else mean, 0.0 if momentum is None else float(momentum),
        UPDATE_RUNNING=update, CUMULATIVE=cumulative, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return mean, var


@_library.op("bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 num_batches_tracked: torch.Tensor | None, momentum: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (float32); the running statistics, when given, updated in place.

    The update is the mutation this op declares. The op has no autograd of its own: the epilogue's backward
    (with ``training=True``) carries the gradient through the batch statistics, so callers pass ``y`` detached.
    """
    return _batch_stats(_tiles.mergeable(y), running_mean, running_var, momentum, num_batches_tracked)


@_bn_stats_op.register_fake
def _bn_stats_fake(y, running_mean, running_var, num_batches_tracked, momentum):
    channels = y.shape[1]
    return y.new_empty((channels,), dtype=torch.float32), y.new_empty((channels,), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def batch_norm_stats_into(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write y's per-channel batch mean and biased variance into the contiguous float32 vectors ``mean`` and ``var``.

    The dense block calls this for each channel slice it writes. ``y`` may be any channel or batch slice of a
    dense tensor (read in place).
    """
    _batch_stats(_tiles.mergeable(y), None, None, None, None, out=(mean, var))
