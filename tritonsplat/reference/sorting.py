"""Depth sort of tile intersections and per-tile ranges, in pure PyTorch.

Torch twin of `tritonsplat.ops.sorting`: a stable sort of the int64 keys (camera | tile | depth
bits) orders every tile's list front to back, equal depths by Gaussian index; each tile's list is
then the half-open range [offsets[k], offsets[k + 1]) of the sorted arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .binning import DEPTH_BITS


class SortedTiles(NamedTuple):
    keys: torch.Tensor          # [M] int64, sorted
    gaussian_ids: torch.Tensor  # [M] int32 flat index c * N + g, in key order
    tile_offsets: torch.Tensor  # [C * n_tiles + 1] int64: tile k owns [offsets[k], offsets[k+1])


def sort_by_depth(keys: torch.Tensor, gaussian_ids: torch.Tensor, n_cameras: int,
                  n_tiles: int) -> SortedTiles:
    """Sort intersections by (camera, tile, depth), stably, and find each tile's range.

    Args:
        keys: [M] int64.  gaussian_ids: [M] int32.
    Returns:
        SortedTiles(keys [M], gaussian_ids [M], tile_offsets [C * n_tiles + 1] int64).
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    return SortedTiles(sorted_keys, gaussian_ids[order],
                       tile_ranges(sorted_keys, n_cameras * n_tiles))


def tile_ranges(sorted_keys: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Offsets of each (camera, tile) bin in the sorted keys: [n_bins + 1] int64."""
    bins = sorted_keys >> DEPTH_BITS
    boundaries = torch.arange(n_bins + 1, device=sorted_keys.device, dtype=torch.int64)
    return torch.searchsorted(bins, boundaries)
