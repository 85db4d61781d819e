"""The tile space the ``bn_stats`` and ``wrc`` kernels walk, and the one allocator of every kernel output.

Those kernels walk an (N, C, H, W) tensor as tiles of ``[BLOCK_HW spatial positions, BLOCK_C channels]`` of
one sample, addressed through the tensor's own strides: ``n·stride_n + hw·stride_hw + c·stride_c``. The
channel is the reduction key, and the same code reads both layouts without a layout copy:

* NCHW (``stride_hw == 1``): a tile is a few channels' planes, contiguous along the spatial axis;
* channels_last (``stride_c == 1``): a tile is a few pixels' channel vectors, contiguous along channels, and
  when ``stride_n == H·W·stride_hw`` the batch folds into the spatial axis (one ``N·H·W``-long row space), so
  a 7×7 map's 49 rows per sample are not each padded up to a tile boundary.

Triton specializes integer arguments equal to 1 (and marks those divisible by 16), so the compiler sees
which tile axis is contiguous and aligned: compiled for sm_90, both layouts' loads and stores come out as
128-bit vector accesses when the strides are multiples of 16 (not for NCHW with H·W = 49 or 196).
Tensors whose H and W cannot be merged into one stride (a spatial crop) are copied once into their own
memory format (:func:`mergeable`); channel or batch slices run in place.

Host side: :class:`Space` sizes the tiles and grid from the tensors' shape and strides; :func:`allocate`
makes every buffer a launch writes. Device side: the ``@triton.jit`` helpers :func:`channel_block`,
:func:`tile`, :func:`load_tile` and :func:`store_tile` address one tile, masked at every boundary, loading
as float32 and casting once at the store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the kernels read and write; they accumulate in float32, so float64 is refused, not degraded."""

# Tile and grid sizing. Starting points, not measured: no GPU was available when these were written.
# GPU tuning goes here: BLOCK_HW/BLOCK_C per layout and dtype, num_warps (Triton's default 4), and
# MAX_PARTIALS (partials per channel vs. programs in flight) at the benchmark shapes.
TILE_ELEMENTS = 2048
"""Elements in one [BLOCK_HW, BLOCK_C] tile."""
MAX_BLOCK_C = 64
"""Widest channel block of a channels_last tile (64 float32 = two 128-byte lines per pixel)."""
MAX_BLOCK_HW = 1024
"""Longest spatial run of an NCHW tile."""
MAX_PARTIALS = 256
"""Most partial results per channel a reduction pass leaves for its finalize kernel.

A reduction program loops over enough tiles (a power of two, so few compiled variants) to stay under this:
ResNet-50's first stage at batch 256 channels_last has 25,088 tiles per channel block, which one tile per
program would turn into 25,088 partials, megabytes the finalize kernel reads on a handful of SMs.
"""
FINALIZE_TILE_ELEMENTS = 2048
"""Elements in one [BLOCK_P partials, BLOCK_C channels] tile of the finalize kernels."""


# --------------------------------------------------------------------------------------------------------------
# Device side: one tile's addresses, masks, loads and stores
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def channel_block(pid, C, BLOCK_C: tl.constexpr):
    """Channel offsets of channel block ``pid`` and their mask."""
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def tile(t, N, HW, c_mask, BLOCK_HW: tl.constexpr):
    """Sample index, spatial offsets and [BLOCK_HW, BLOCK_C] mask of tile ``t`` (tiles ordered sample-major)."""
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = t // hw_blocks
    hw = (t % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    # A tile past the last sample (the tail of a reduction program's loop) gets an empty spatial range.
    hw_mask = hw < tl.where(n < N, HW, 0)
    return n, hw, hw_mask[:, None] & c_mask[None, :]


@triton.jit
def load_tile(ptr, n, hw, c, stride_n, stride_c, stride_hw, mask):
    """The tile at sample ``n``, positions ``hw``, channels ``c`` as float32; 0 where masked."""
    offsets = n * stride_n + hw[:, None] * stride_hw + c[None, :] * stride_c
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, n, hw, c, stride_n, stride_c, stride_hw, value, mask):
    """Store a float32 tile at sample ``n``, positions ``hw``, channels ``c``, cast once to the tensor's dtype."""
    offsets = n * stride_n + hw[:, None] * stride_hw + c[None, :] * stride_c
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host side: allocation, layout and sizing
# --------------------------------------------------------------------------------------------------------------


def allocate(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every buffer a launch in perfkit.kernels writes (outputs, partials, statistics): tests poison this one."""
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format ``t`` is in, or for a non-dense view (a slice) the one its strides follow."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if t.stride(1) < t.stride(3) else torch.contiguous_format


def flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(stride_n, stride_c, stride_hw)`` if H and W merge into one strided axis, else None.

    They merge in every dense NCHW or channels_last tensor and in channel or batch slices of one; a spatial
    crop (``x[:, :, 1:, 1:]``) does not, and :func:`mergeable` copies it once into its memory format.
    """
    _, _, height, width = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if width == 1:
        return stride_n, stride_c, stride_h
    if height == 1 or stride_h == width * stride_w:
        return stride_n, stride_c, stride_w
    return None


def mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its spatial axes merge into one stride, otherwise a copy in its memory format."""
    if flat_strides(t) is not None:
        return t
    return t.contiguous(memory_format=memory_format(t))


class Space:
    """The (sample, spatial, channel) space every tile kernel walks, with each tensor's strides in it."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        batch, channels, height, width = tensors[0].shape
        strides = [flat_strides(t) for t in tensors]
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
            self.block_c = max(2, min(triton.next_power_of_2(channels), MAX_BLOCK_C))
            self.block_hw = max(2, min(triton.next_power_of_2(self.spatial), TILE_ELEMENTS // self.block_c))
        else:
            self.block_hw = max(2, min(triton.next_power_of_2(self.spatial), MAX_BLOCK_HW, TILE_ELEMENTS // 2))
            self.block_c = max(2, min(triton.next_power_of_2(channels), TILE_ELEMENTS // self.block_hw))
        self.tiles = self.batch * triton.cdiv(self.spatial, self.block_hw)
        self.channel_blocks = triton.cdiv(channels, self.block_c)

    def stride_args(self) -> list[int]:
        """The kernels' flat ``(stride_n, stride_c, stride_hw)`` arguments, one triple per tensor."""
        return [stride for triple in self.strides for stride in triple]


def reduction_split(tiles: int) -> tuple[int, int]:
    """``(TILES, partials)``: tiles per reduction program and the partials (programs per channel block)."""
    tiles_per_program = triton.next_power_of_2(triton.cdiv(tiles, MAX_PARTIALS))
    return tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def finalize_blocks(partials: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` of a finalize kernel's [partials, channels] tile.

    Channel blocks of 32 spread the finalize over C/32 programs (8 for C = 256) rather than one or two.
    """
    block_c = max(2, min(triton.next_power_of_2(channels), 32))
    block_p = max(2, min(triton.next_power_of_2(partials), FINALIZE_TILE_ELEMENTS // block_c))
    return block_p, block_c
