"""Stages 3 and 4: depth sort of the intersection keys and per-tile ranges.

Sort: `torch.sort(keys, stable=True)` (CUB radix sort on CUDA) over the keys of `ops.binning`: int32
camera | tile | depth rank when they fit, else int64 camera | tile | float32 depth bits; the stable
sort keeps Gaussian order for equal depths. With rank keys the key determines the Gaussian
(g = depth_order[camera, rank]), so only the keys are sorted and the ids are recovered in the
tile-ranges kernel; with int64 keys the kernel gathers ids[permutation] instead of a separate gather.
A Triton radix sort or per-tile segmented sort is not built: the choice is to be made by GPU
measurement (not measured yet).
Tile ranges (Triton): each intersection compares its (camera, tile) bin with its neighbours'; the
first of a bin writes the start, the last writes the end. Empty tiles keep (0, 0). Only the valid
entries take part (all of them, or in capacity mode the first min(count, capacity)), and a bin
outside [0, C * n_tiles) is never written.
Torch twin: `tritonsplat.reference.sorting`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.binning import DEPTH_BITS
from ..settings import RenderSettings
from ..types import SortedTiles, TileBins
from . import _alloc
from ._launch import cdiv, launch_settings
from .binning import rank_key_bits


@triton.jit
def _tile_ranges_kernel(
    sorted_keys_ptr,   # [M] int64 or int32 sorted keys
    source_ptr,        # [C, N] int64 depth order (RANK_KEYS) or [M] int64 sort permutation
    ids_ptr,           # [M] int32 ids in emit order (not RANK_KEYS)
    count_ptr,         # [] int64 intersection count on the device (COUNT_ON_DEVICE)
    ranges_ptr,        # out [C * n_tiles, 2] int32, zero-initialised
    sorted_ids_ptr,    # out [M] int32
    n_entries, n_bins, n_tiles, n_gaussians, shift, rank_mask,
    BLOCK: tl.constexpr, RANK_KEYS: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # [BLOCK] int64
    in_buffer = offsets < n_entries
    n_valid = n_entries
    if COUNT_ON_DEVICE:
        n_valid = tl.minimum(tl.load(count_ptr, mask=n_entries > 0, other=0), n_entries)
    mask = offsets < n_valid
    key = tl.load(sorted_keys_ptr + offsets, mask=mask, other=-1)
    tile_bin = (key >> shift).to(tl.int64)
    previous = tl.load(sorted_keys_ptr + offsets - 1, mask=mask & (offsets > 0), other=-1) >> shift
    following = tl.load(sorted_keys_ptr + offsets + 1, mask=(offsets + 1) < n_valid, other=-1) >> shift
    in_range = mask & (tile_bin >= 0) & (tile_bin < n_bins)
    first = in_range & (previous != tile_bin)
    last = in_range & (following != tile_bin)
    tl.store(ranges_ptr + tile_bin * 2, offsets.to(tl.int32), mask=first)
    tl.store(ranges_ptr + tile_bin * 2 + 1, (offsets + 1).to(tl.int32), mask=last)
    if RANK_KEYS:
        camera = tl.where(in_range, tile_bin // n_tiles, 0)
        rank = (key & rank_mask).to(tl.int64)
        row = camera * n_gaussians + tl.load(source_ptr + camera * n_gaussians + rank, mask=in_range, other=0)
    else:
        emitted = tl.load(source_ptr + offsets, mask=mask, other=0)
        row = tl.load(ids_ptr + emitted, mask=mask, other=0).to(tl.int64)
    # Entries past the valid count get row 0 (a valid row; no range points at them).
    tl.store(sorted_ids_ptr + offsets, tl.where(in_range, row, 0).to(tl.int32), mask=in_buffer)


def _launch_tile_ranges(sorted_keys, source, ids, count, n_bins, n_tiles, n_gaussians, shift, rank_bits):
    ranges = _alloc.zeros(n_bins, 2, dtype=torch.int32, device=sorted_keys.device)
    sorted_ids = _alloc.empty(sorted_keys.numel(), dtype=torch.int32, device=sorted_keys.device)
    total = sorted_keys.numel()
    if total:
        launch = launch_settings("tile_ranges")
        _tile_ranges_kernel[(cdiv(total, launch.block),)](
            sorted_keys, source, ids if ids is not None else sorted_ids,
            count if count is not None else ranges, ranges, sorted_ids,
            total, n_bins, n_tiles, n_gaussians, shift, (1 << rank_bits) - 1 if rank_bits else 0,
            BLOCK=launch.block, RANK_KEYS=rank_bits > 0, COUNT_ON_DEVICE=count is not None,
            num_warps=launch.num_warps)
    return ranges, sorted_ids


def sort_intersections(bins: TileBins, n_cameras: int, n_gaussians: int, settings: RenderSettings) -> SortedTiles:
    """Sort the intersections by (camera, tile, depth, index) and find each bin's range (Triton twin of
    `reference.sorting.sort_intersections`).

    Args:
        bins: TileBins of `ops.binning.bin_tiles` (int32 rank keys with `depth_order`, or int64 keys).
    Returns:
        SortedTiles(keys [M] sorted, gaussian_ids [M] int32, tile_ranges [C * n_tiles, 2] int32).
    """
    rank_keys = bins.keys.dtype == torch.int32
    if rank_keys and bins.depth_order is None:
        raise ValueError("bins: int32 rank keys need bins.depth_order (from ops.binning.bin_tiles)")
    rank_bits = rank_key_bits(n_cameras, n_gaussians, settings) if rank_keys else 0
    if rank_keys and rank_bits == 0:
        raise ValueError(f"bins: int32 keys do not fit {n_cameras} cameras x {settings.n_tiles} tiles x "
                         f"{n_gaussians} Gaussians")
    count = bins.n_intersections if isinstance(bins.n_intersections, torch.Tensor) else None
    n_bins = n_cameras * settings.n_tiles
    if rank_keys:
        # Unique keys (one per Gaussian and tile): the order is that of a stable sort; the permutation is unused.
        sorted_keys = torch.sort(bins.keys, stable=True).values
        ranges, sorted_ids = _launch_tile_ranges(sorted_keys, bins.depth_order, None, count, n_bins,
                                                 settings.n_tiles, n_gaussians, rank_bits, rank_bits)
    else:
        sorted_keys, permutation = torch.sort(bins.keys, stable=True)
        ranges, sorted_ids = _launch_tile_ranges(sorted_keys, permutation, bins.gaussian_ids, count, n_bins,
                                                 settings.n_tiles, n_gaussians, DEPTH_BITS, 0)
    return SortedTiles(sorted_keys, sorted_ids, ranges)


def sort_by_depth(keys: torch.Tensor,           # [M] int64 or int32
                  gaussian_ids: torch.Tensor    # [M] int32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the keys; returns (sorted keys [M], ids in key order [M] int32)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    return sorted_keys, gaussian_ids[order]


def tile_ranges(sorted_keys: torch.Tensor,  # [M] int64 or int32
                n_bins: int, shift: int = DEPTH_BITS) -> torch.Tensor:
    """[start, end) of every (camera, tile) bin: [n_bins, 2] int32 ((0, 0) for empty bins).

    `shift`: bits below the bin in the key (32 for int64 depth-bit keys, the rank bits otherwise).
    """
    identity = torch.arange(sorted_keys.numel(), device=sorted_keys.device, dtype=torch.int64)
    ids = _alloc.zeros(sorted_keys.numel(), device=sorted_keys.device, dtype=torch.int32)
    ranges, _ = _launch_tile_ranges(sorted_keys.contiguous(), identity, ids, None, n_bins, 1, 0, shift, 0)
    return ranges


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The tile-ranges kernel's configurations (collected by `tritonsplat.aot`): int64 / int32 rank
    keys, with the count as an argument or on the device (capacity mode)."""
    from ._launch import kernel_signature

    launch = launch_settings("tile_ranges")
    variants = []
    for rank_keys in (False, True):
        for on_device in (False, True):
            types = {"sorted_keys_ptr": "*i32" if rank_keys else "*i64", "source_ptr": "*i64", "ids_ptr": "*i32",
                     "count_ptr": "*i64", "ranges_ptr": "*i32", "sorted_ids_ptr": "*i32"}
            variants.append(dict(
                name=f"tile_ranges[{'rank_keys' if rank_keys else 'i64'}{',count_on_device' if on_device else ''}]",
                kernel="_tile_ranges_kernel", signature=kernel_signature(_tile_ranges_kernel, types),
                constexprs=dict(BLOCK=launch.block, RANK_KEYS=rank_keys, COUNT_ON_DEVICE=on_device),
                num_warps=launch.num_warps))
    return variants
