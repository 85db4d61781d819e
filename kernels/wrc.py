"""Fused weighted-residual epilogue ``out = relu(alpha * BN(y) + beta * s)`` in Triton, forward and backward.

``y`` is a residual branch's last convolution output (N, C, H, W), ``s`` the shortcut, ``alpha`` and ``beta``
0-dim tensors, ``BN`` a BatchNorm2d given by its weight, bias and running statistics. The public entry point is
:func:`wrc_epilogue`; :class:`perfkit.fused.wrc.FusedResidualEpilogue` is the module that calls it.

Every kernel walks the tile space of :mod:`perfkit.kernels._tiles` (``[BLOCK_HW, BLOCK_C]`` tiles of one
sample through each tensor's own strides, NCHW and channels_last alike, no layout copy). Passes (grid =
(tiles, channel blocks) unless said otherwise):

* training forward: the batch statistics (:mod:`perfkit.kernels.bn_stats`, the op ``perfkit::bn_stats``,
  which also updates the running statistics) → ``_wrc_fwd_kernel``.
* inference forward: ``_wrc_fwd_kernel`` alone, BN folded from the running statistics: one pass reading
  ``y`` and ``s`` and writing ``out``.
* backward: ``_wrc_bwd_reduce_kernel`` (partial per-channel sums of ``g``, ``g·ŷ``, ``g·s`` where ``g`` is
  the ReLU-masked output gradient) → ``_wrc_bwd_finalize_kernel`` (grid: channel blocks; dweight, dbias and
  the per-channel terms of dalpha and dbeta, whose final sum over C is a torch ``.sum()``) →
  ``_wrc_bwd_dx_kernel`` (dy and ds). Partial sums go through a buffer in a fixed order, never atomics, so
  results are deterministic run to run.

Forward and both backward tile kernels share one prologue (:func:`_epilogue_affine`: alpha, beta and the
per-channel scale and shift) and one pre-activation (:func:`_pre_activation`), so the ReLU mask backward
recomputes is forward's.

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

from . import _library, _tiles
from . import bn_stats as _bn_stats  # noqa: F401 - registers perfkit::bn_stats, which wrc_epilogue calls

__all__ = ["bytes_moved", "wrc_epilogue"]


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _epilogue_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, eps, c, c_mask):
    """Per-channel mean, 1/std, the folded ``scale = alpha·w/std`` and ``shift = alpha·b``, and beta (float32)."""
    alpha = tl.load(alpha_ptr).to(tl.float32)
    beta = tl.load(beta_ptr).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    w = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, alpha * w * rstd, alpha * b, beta


@triton.jit
def _pre_activation(y, s, mean, scale, shift, beta):
    """``alpha·BN(y) + beta·s`` as ``(y − mean)·scale + shift + beta·s``.

    Subtracting the mean first avoids the cancellation of ``y·scale − mean·scale`` when the mean is large
    against the spread. Forward and backward both call this, so the ReLU mask backward sees is forward's.
    """
    return (y - mean[None, :]) * scale[None, :] + shift[None, :] + beta * s


@triton.jit
def _relu_gradient(dout, y, s, mean, scale, shift, beta):
    """``g = dout·[z > 0]``, the gradient past the ReLU, with ``z`` recomputed as forward computed it.

    Masked elements load as 0, so their ``dout`` and hence their ``g`` are 0 whatever ``z`` is there.
    """
    return tl.where(_pre_activation(y, s, mean, scale, shift, beta) > 0.0, dout, 0.0)


@triton.jit
def _wrc_fwd_kernel(
    y_ptr, s_ptr, out_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, eps,
    N, C, HW, y_sn, y_sc, y_shw, s_sn, s_sc, s_shw, out_sn, out_sc, out_shw,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = relu((y − mean)·scale + shift + beta·s)`` for one tile; mean/var are batch or running stats."""
    c, c_mask = _tiles.channel_block(tl.program_id(1), C, BLOCK_C)
    n, hw, mask = _tiles.tile(tl.program_id(0), N, HW, c_mask, BLOCK_HW)
    mean, _, scale, shift, beta = _epilogue_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr,
                                                   eps, c, c_mask)
    y = _tiles.load_tile(y_ptr, n, hw, c, y_sn, y_sc, y_shw, mask)
    s = _tiles.load_tile(s_ptr, n, hw, c, s_sn, s_sc, s_shw, mask)
    out = tl.maximum(_pre_activation(y, s, mean, scale, shift, beta), 0.0)
    _tiles.store_tile(out_ptr, n, hw, c, out_sn, out_sc, out_shw, out, mask)


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
    c, c_mask = _tiles.channel_block(tl.program_id(1), C, BLOCK_C)
    mean, rstd, scale, shift, beta = _epilogue_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr,
                                                      eps, c, c_mask)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_yhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TILES):
        n, hw, mask = _tiles.tile(pid_t * TILES + i, N, HW, c_mask, BLOCK_HW)
        dout = _tiles.load_tile(dout_ptr, n, hw, c, dout_sn, dout_sc, dout_shw, mask)
        y = _tiles.load_tile(y_ptr, n, hw, c, y_sn, y_sc, y_shw, mask)
        s = _tiles.load_tile(s_ptr, n, hw, c, s_sn, s_sc, s_shw, mask)
        g = _relu_gradient(dout, y, s, mean, scale, shift, beta)
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
    c, c_mask = _tiles.channel_block(tl.program_id(0), C, BLOCK_C)
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
    c, c_mask = _tiles.channel_block(tl.program_id(1), C, BLOCK_C)
    n, hw, mask = _tiles.tile(tl.program_id(0), N, HW, c_mask, BLOCK_HW)
    mean, rstd, scale, shift, beta = _epilogue_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr,
                                                      eps, c, c_mask)
    dout = _tiles.load_tile(dout_ptr, n, hw, c, dout_sn, dout_sc, dout_shw, mask)
    y = _tiles.load_tile(y_ptr, n, hw, c, y_sn, y_sc, y_shw, mask)
    s = _tiles.load_tile(s_ptr, n, hw, c, s_sn, s_sc, s_shw, mask)
    g = _relu_gradient(dout, y, s, mean, scale, shift, beta)
    if WRITE_DY:
        if BATCH_STATS:
            mean_g = tl.load(sum_g_ptr + c, mask=c_mask, other=0.0) * inv_count
            mean_g_yhat = tl.load(sum_g_yhat_ptr + c, mask=c_mask, other=0.0) * inv_count
            yhat = (y - mean[None, :]) * rstd[None, :]
            dy = scale[None, :] * (g - mean_g[None, :] - yhat * mean_g_yhat[None, :])
        else:
            dy = scale[None, :] * g
        _tiles.store_tile(dy_ptr, n, hw, c, dy_sn, dy_sc, dy_shw, dy, mask)
    if WRITE_DS:
        _tiles.store_tile(ds_ptr, n, hw, c, ds_sn, ds_sc, ds_shw, beta * g, mask)


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
        if t.dtype not in _tiles.STORAGE_DTYPES:
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
        if t.dtype not in _tiles.STORAGE_DTYPES:
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


def _forward(y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch ``_wrc_fwd_kernel``: ``out`` in y's memory format, dtype promoted from y's and s's."""
    out = _tiles.allocate(y.shape, torch.promote_types(y.dtype, s.dtype), y.device, _tiles.memory_format(y))
    space = _tiles.Space([y, s, out])
    _library.launch(_wrc_fwd_kernel)[(space.tiles, space.channel_blocks)](
        y, s, out, mean, var, weight, bias, alpha, beta, eps, space.batch, space.channels, space.spatial,
        *space.stride_args(), BLOCK_HW=space.block_hw, BLOCK_C=space.block_c,
    )
    return out


def _channel_sums(dout: torch.Tensor, y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: float,
                  need_dalpha: bool, need_dbeta: bool) -> tuple[torch.Tensor, ...]:
    """Launch the backward's reduce and finalize kernels: ``(Σg, Σg·ŷ, dweight, dbias, dalpha, dbeta)``.

    The channel sums are float32 ``[C]``; dalpha and dbeta are None unless needed.
    """
    space = _tiles.Space([dout, y, s])
    channels, device = space.channels, y.device
    tiles_per_program, partials = _tiles.reduction_split(space.tiles)
    sum_g_part = _tiles.allocate((partials, channels), torch.float32, device)
    sum_g_yhat_part = _tiles.allocate((partials, channels), torch.float32, device)
    sum_g_s_part = _tiles.allocate((partials, channels), torch.float32, device) if need_dbeta else sum_g_part
    _library.launch(_wrc_bwd_reduce_kernel)[(partials, space.channel_blocks)](
        dout, y, s, mean, var, weight, bias, alpha, beta, eps, sum_g_part, sum_g_yhat_part,
        sum_g_s_part, space.batch, channels, space.spatial, *space.stride_args(),
        NEED_G_S=need_dbeta, BLOCK_HW=space.block_hw, BLOCK_C=space.block_c, TILES=tiles_per_program,
    )
    sum_g = _tiles.allocate((channels,), torch.float32, device)
    sum_g_yhat = _tiles.allocate((channels,), torch.float32, device)
    dweight = _tiles.allocate((channels,), weight.dtype, device)
    dbias = _tiles.allocate((channels,), bias.dtype, device)
    dalpha_channel = _tiles.allocate((channels,), torch.float32, device)
    dbeta_channel = _tiles.allocate((channels,), torch.float32, device) if need_dbeta else dalpha_channel
    block_p, block_c = _tiles.finalize_blocks(partials, channels)
    _library.launch(_wrc_bwd_finalize_kernel)[(triton.cdiv(channels, block_c),)](
        sum_g_part, sum_g_yhat_part, sum_g_s_part, partials, channels, weight, bias, alpha,
        sum_g, sum_g_yhat, dweight, dbias, dalpha_channel, dbeta_channel,
        NEED_G_S=need_dbeta, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    # The last C-to-1 sums stay in torch: C floats, deterministic, cheaper than a cross-program
    # reduction kernel or atomics for one scalar each.
    dalpha = dalpha_channel.sum().to(alpha.dtype).reshape(alpha.shape) if need_dalpha else None
    dbeta = dbeta_channel.sum().to(beta.dtype).reshape(beta.shape) if need_dbeta else None
    return sum_g, sum_g_yhat, dweight, dbias, dalpha, dbeta


def _input_gradients(dout: torch.Tensor, y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: float,
                     sum_g: torch.Tensor, sum_g_yhat: torch.Tensor, training: bool, need_dy: bool,
                     need_ds: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_wrc_bwd_dx_kernel``: ``(dy, ds)`` in y's and s's memory formats, None where not needed."""
    dy = _tiles.allocate(y.shape, y.dtype, y.device, _tiles.memory_format(y)) if need_dy else None
    ds = _tiles.allocate(s.shape, s.dtype, s.device, _tiles.memory_format(s)) if need_ds else None
    space = _tiles.Space([dout, y, s, dy if need_dy else y, ds if need_ds else s])
    count = y.shape[0] * y.shape[2] * y.shape[3]
    _library.launch(_wrc_bwd_dx_kernel)[(space.tiles, space.channel_blocks)](
        dout, y, s, dy if need_dy else y, ds if need_ds else s, mean, var, weight, bias, alpha, beta,
        eps, sum_g, sum_g_yhat, 1.0 / count, space.batch, space.channels, space.spatial,
        *space.stride_args(), BATCH_STATS=training, WRITE_DY=need_dy, WRITE_DS=need_ds,
        BLOCK_HW=space.block_hw, BLOCK_C=space.block_c,
    )
    return dy, ds


# --------------------------------------------------------------------------------------------------------------
# The ops: perfkit::wrc_epilogue (autograd registered on it) and perfkit::wrc_backward, each with a fake
# implementation for FakeTensorMode and torch.compile.
# --------------------------------------------------------------------------------------------------------------


@_library.op("wrc_epilogue")
def _wrc_epilogue_op(y: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, training: bool,
                     eps: float) -> torch.Tensor:
    """``relu(alpha·(y − mean)/sqrt(var + eps)·weight + alpha·bias + beta·s)``.

    ``training`` says that ``mean`` and ``var`` are y's own batch statistics, so backward differentiates
    through them; otherwise they are constants (the running statistics).
    """
    return _forward(_tiles.mergeable(y), _tiles.mergeable(s), mean, var, weight, bias, alpha, beta, eps)


@_wrc_epilogue_op.register_fake
def _wrc_epilogue_fake(y, s, mean, var, weight, bias, alpha, beta, training, eps):
    return torch.empty(tuple(y.shape), dtype=torch.promote_types(y.dtype, s.dtype), device=y.device,
                       memory_format=_tiles.memory_format(y))


@_library.op("wrc_backward")
def _wrc_backward_op(dout: torch.Tensor, y: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     alpha: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool,
                     eps: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    """``(dy, ds, dweight, dbias, dalpha, dbeta)``; a gradient whose ``needs`` flag is False is an empty tensor.

    An op cannot return None, and an empty placeholder keeps the fake implementation exact.
    """
    need_dy, need_ds, need_dweight, need_dbias, need_dalpha, need_dbeta = needs
    y, s, dout = _tiles.mergeable(y), _tiles.mergeable(s), _tiles.mergeable(dout)
    dweight = dbias = dalpha = dbeta = None
    sum_g = sum_g_yhat = mean  # placeholders for pointer arguments a constexpr branch never reads
    if (need_dy and training) or need_dweight or need_dbias or need_dalpha or need_dbeta:
        sum_g, sum_g_yhat, dweight, dbias, dalpha, dbeta = _channel_sums(
            dout, y, s, mean, var, weight, bias, alpha, beta, eps, need_dalpha, need_dbeta)
    dy = ds = None
    if need_dy or need_ds:
        dy, ds = _input_gradients(dout, y, s, mean, var, weight, bias, alpha, beta, eps, sum_g, sum_g_yhat,
                                  training, need_dy, need_ds)
    grads = (dy, ds, dweight if need_dweight else None, dbias if need_dbias else None, dalpha, dbeta)
    return tuple(y.new_empty((0,)) if g is None else g for g in grads)


@_wrc_backward_op.register_fake
def _wrc_backward_fake(dout, y, s, weight, bias, alpha, beta, mean, var, training, eps, needs):
    grads = (
        torch.empty(tuple(y.shape), dtype=y.dtype, device=y.device, memory_format=_tiles.memory_format(y)),
        torch.empty(tuple(s.shape), dtype=s.dtype, device=s.device, memory_format=_tiles.memory_format(s)),
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
