"""Stages 3 and 4: depth sort of the intersection keys and per-tile ranges.

Sort: `torch.sort(keys, stable=True)` (CUB radix sort on CUDA) over the keys of `ops.binning`: int32
camera | tile | depth rank when they fit, else int64 camera | tile | float32 depth bits; the stable
sort keeps Gaussian order for equal depths. A Triton radix sort or per-tile
segmented sort is not built: the choice is to be made by GPU measurement (not measured yet).
Tile ranges (Triton): each intersection compares its (camera, tile) bin with its neighbours'; the
first of a bin writes the start, the last writes the end. Empty tiles keep (0, 0).
Torch twin: `tritonsplat.reference.sorting`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.binning import DEPTH_BITS
from ._launch import cdiv, contiguous_inputs, launch_settings


@triton.jit
def _tile_ranges_kernel(
    sorted_keys_ptr,   # [M] int64 or int32 sorted keys
    ranges_ptr,        # out [C * n_tiles, 2] int64, zero-initialised
    n_intersections,
    shift,             # bits below the (camera, tile) bin
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # [BLOCK] int64
    mask = offsets < n_intersections
    tile_bin = (tl.load(sorted_keys_ptr + offsets, mask=mask, other=-1) >> shift).to(tl.int64)
    previous = tl.load(sorted_keys_ptr + offsets - 1, mask=mask & (offsets > 0), other=-1) >> shift
    following = tl.load(sorted_keys_ptr + offsets + 1, mask=(offsets + 1) < n_intersections, other=-1) >> shift
    first = mask & (previous != tile_bin)
    last = mask & (following != tile_bin)
    tl.store(ranges_ptr + tile_bin * 2, offsets, mask=first)
    tl.store(ranges_ptr + tile_bin * 2 + 1, offsets + 1, mask=last)


def sort_by_depth(keys: torch.Tensor,           # [M] int64 or int32
                  gaussian_ids: torch.Tensor    # [M] int32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the keys; returns (sorted keys [M] int64, ids in key order [M] int32)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    return sorted_keys, gaussian_ids[order]


@contiguous_inputs
def tile_ranges(sorted_keys: torch.Tensor,  # [M] int64 or int32
                n_bins: int, shift: int = DEPTH_BITS) -> torch.Tensor:
    """[start, end) of every (camera, tile) bin: [n_bins, 2] int64 ((0, 0) for empty bins).

    `shift`: bits below the bin in the key (32 for int64 depth-bit keys, the rank bits otherwise).
    """
    ranges = torch.zeros(n_bins, 2, dtype=torch.int64, device=sorted_keys.device)
    total = sorted_keys.numel()
    if total:
        launch = launch_settings("tile_ranges")
        _tile_ranges_kernel[(cdiv(total, launch.block),)](sorted_keys, ranges, total, shift, BLOCK=launch.block,
                                                          num_warps=launch.num_warps)
    return ranges
