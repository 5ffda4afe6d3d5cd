"""Depth sort of tile intersections and per-tile ranges, in pure PyTorch.

Torch twin of `tritonsplat.ops.sorting`: a stable sort of the int64 keys (camera | tile | depth
bits) orders every tile's list front to back, equal depths by Gaussian index; each (camera, tile)
bin's list is then a half-open range of the sorted arrays. In capacity mode (`TileBins` with a 0-d
tensor count) only the first min(count, capacity) sorted entries take part: the padding keys sort
last, and their ids are 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..settings import RenderSettings
from .binning import DEPTH_BITS, TileBins


class SortedTiles(NamedTuple):
    """What `sort_intersections` returns: the compositor's tile lists."""

    keys: torch.Tensor          # [M] int64, sorted
    gaussian_ids: torch.Tensor  # [M] int32 flat index c * N + g, front to back within a bin
    tile_ranges: torch.Tensor   # [C * n_tiles, 2] int32 [start, end) of each bin, (0, 0) if empty


def sort_intersections(bins: TileBins, n_cameras: int, n_gaussians: int, settings: RenderSettings) -> SortedTiles:
    """Sort the intersections by (camera, tile, depth, index) and find each bin's range.

    Args:
        bins: TileBins of `reference.binning.bin_tiles` (int64 keys).
        n_cameras, n_gaussians: C and N (N is part of the Triton twin's key layout; unused here).
    Returns:
        SortedTiles(keys [M] sorted, gaussian_ids [M] int32, tile_ranges [C * n_tiles, 2] int32).
    """
    if bins.keys.dtype != torch.int64:
        raise ValueError(f"bins: the torch twin sorts int64 depth-bit keys, got {bins.keys.dtype}")
    sorted_keys, order = torch.sort(bins.keys, stable=True)
    sorted_ids = bins.gaussian_ids[order]
    n_bins = n_cameras * settings.n_tiles
    if isinstance(bins.n_intersections, torch.Tensor):
        n_valid = torch.clamp_max(bins.n_intersections, sorted_keys.numel())
        valid = torch.arange(sorted_keys.numel(), device=sorted_keys.device) < n_valid
        sorted_ids = torch.where(valid, sorted_ids, 0)
        bin_of_entry = torch.where(valid, sorted_keys >> DEPTH_BITS, n_bins)
    else:
        bin_of_entry = sorted_keys >> DEPTH_BITS
    boundaries = torch.searchsorted(bin_of_entry, torch.arange(n_bins + 1, device=sorted_keys.device))
    ranges = torch.stack([boundaries[:-1], boundaries[1:]], dim=-1)
    ranges = torch.where((ranges[:, 1] > ranges[:, 0])[:, None], ranges, 0).to(torch.int32)
    return SortedTiles(sorted_keys, sorted_ids, ranges)


class DepthOrder(NamedTuple):
    keys: torch.Tensor          # [M] int64, sorted
    gaussian_ids: torch.Tensor  # [M] int32 flat index c * N + g, in key order
    tile_offsets: torch.Tensor  # [C * n_tiles + 1] int64: bin k owns [offsets[k], offsets[k+1])


def sort_by_depth(keys: torch.Tensor, gaussian_ids: torch.Tensor, n_cameras: int,
                  n_tiles: int) -> DepthOrder:
    """Sort intersections by (camera, tile, depth), stably; bin boundaries as an offsets array.

    Args:
        keys: [M] int64.  gaussian_ids: [M] int32.
    Returns:
        DepthOrder(keys [M], gaussian_ids [M], tile_offsets [C * n_tiles + 1] int64).
    """
    sorted_keys, order = torch.sort(keys, stable=True)
    return DepthOrder(sorted_keys, gaussian_ids[order], tile_ranges(sorted_keys, n_cameras * n_tiles))


def tile_ranges(sorted_keys: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Offsets of each (camera, tile) bin in the sorted keys: [n_bins + 1] int64."""
    bins = sorted_keys >> DEPTH_BITS
    boundaries = torch.arange(n_bins + 1, device=sorted_keys.device, dtype=torch.int64)
    return torch.searchsorted(bins, boundaries)
