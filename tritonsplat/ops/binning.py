"""Stage 2: tile binning (Triton): tiles per Gaussian, int64 offsets, one key per intersection.

Torch twin: `tritonsplat.reference.binning.bin_tiles` (tests compare keys and ids exactly).

A Gaussian's candidate tiles are those of its pixel box (centres within mean +- radius) or, for the
original's conventions, its tile rectangle. With the "ellipse" rule a candidate is kept only when the
alpha >= 1/255 level set, d^T conic d <= 2 ln(255 o) (extent x 1.001), meets the rectangle of the
tile's pixel centres [16 i + 0.5, 16 i + 15.5] (FlashGS, Speedy-Splat, StopThePop): the minimum of
the convex quadratic over the rectangle is 0 when the centre is inside, else it lies on an edge,
where it is a 1D quadratic minimised in closed form. Measured on the bench `random` scene (50k
Gaussians, 640x360): 1.003x the exact minimum, 0.78x the original's 3-sigma rectangle rule.

Two launches of one kernel: EMIT=False counts the kept tiles of each (camera, Gaussian); after an
int64 exclusive prefix sum, EMIT=True writes key = (camera * n_tiles + tile) << 32 | float32 bits of
depth and value = c * N + g at the Gaussian's offset, in Gaussian order (so a stable sort orders
equal depths by index).

Narrow keys: when bits(C * n_tiles) + bits(N) <= 31, the depth field is replaced by the Gaussian's
rank in its camera's stable depth order (one sort of C x N depths), so the key fits an int32 and the
radix sort of the intersections needs half the passes; the resulting order is identical (camera, tile,
depth, then index). `KEY_LAYOUT = "depth_bits"` forces the int64 layout (not yet measured on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.binning import BINNING_EXTENT_MARGIN, TileBins, check_key_capacity
from ..settings import RenderSettings
from ._launch import cdiv, contiguous_inputs, launch_settings

LEVEL_MARGIN = tl.constexpr(BINNING_EXTENT_MARGIN * BINNING_EXTENT_MARGIN)
# "auto": int32 depth-rank keys when they fit, else int64 depth bits; "depth_bits": always int64.
KEY_LAYOUT = "auto"
# Intersections are indexed with int32 downstream (ids, last contributors).
MAX_INTERSECTIONS = 2**31 - 1


@triton.jit
def _edge_minimum(fixed, first, second, quadratic_fixed, quadratic_free, cross):
    """min over free in [first, second] of qf fixed^2 + 2 b fixed free + qfree free^2."""
    free = tl.minimum(tl.maximum((-cross * fixed) / quadratic_free, first), second)
    return quadratic_fixed * fixed * fixed + 2.0 * cross * fixed * free + quadratic_free * free * free


@triton.jit
def _bin_tiles_kernel(
    means2d_ptr,      # [C, N, 2] float32
    conics_ptr,       # [C, N, 3] float32
    opacities_ptr,    # [N] float32
    radii_ptr,        # [C, N] int32
    depths_ptr,       # [C, N] float32 (int64 keys) or [C, N] int32 depth ranks (RANK_KEYS)
    offsets_ptr,      # [C, N] int64 exclusive prefix sum of the counts (EMIT only)
    counts_ptr,       # out [C, N] int32 (count pass only)
    keys_ptr,         # out [M] int64, or int32 with RANK_KEYS (EMIT only)
    ids_ptr,          # out [M] int32 (EMIT only)
    n_gaussians, n_cameras, width, height, tiles_x, tiles_y, n_tiles, rank_bits,
    BLOCK: tl.constexpr, TILE_SIZE: tl.constexpr, TILE_RULE: tl.constexpr, EMIT: tl.constexpr,
    RANK_KEYS: tl.constexpr,
):
    block = tl.program_id(0)
    camera = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)                     # [BLOCK] Gaussians
    mask = offsets < n_gaussians
    row = camera.to(tl.int64) * n_gaussians + offsets                 # int64: row * 3 may pass 2^31
    radius = tl.load(radii_ptr + row, mask=mask, other=0).to(tl.float32)
    visible = mask & (radius > 0.0)
    mean_x = tl.load(means2d_ptr + row * 2 + 0, mask=mask, other=0.0)
    mean_y = tl.load(means2d_ptr + row * 2 + 1, mask=mask, other=0.0)

    if TILE_RULE == 1:
        # The original's rectangle around (mean - 0.5), truncating toward zero (getRect).
        low_x = tl.minimum(tl.maximum(((mean_x - 0.5 - radius) / TILE_SIZE).to(tl.int32), 0), tiles_x)
        low_y = tl.minimum(tl.maximum(((mean_y - 0.5 - radius) / TILE_SIZE).to(tl.int32), 0), tiles_y)
        high_x = tl.minimum(tl.maximum(((mean_x - 0.5 + radius + TILE_SIZE - 1) / TILE_SIZE).to(tl.int32), 0),
                            tiles_x)
        high_y = tl.minimum(tl.maximum(((mean_y - 0.5 + radius + TILE_SIZE - 1) / TILE_SIZE).to(tl.int32), 0),
                            tiles_y)
    else:
        # Pixels i with i + 0.5 in [mean - r, mean + r], clamped to the image, then their tiles.
        x0 = tl.minimum(tl.maximum(tl.ceil(mean_x - radius - 0.5), 0.0), width * 1.0).to(tl.int32)
        x1 = tl.minimum(tl.maximum(tl.floor(mean_x + radius - 0.5) + 1.0, 0.0), width * 1.0).to(tl.int32)
        y0 = tl.minimum(tl.maximum(tl.ceil(mean_y - radius - 0.5), 0.0), height * 1.0).to(tl.int32)
        y1 = tl.minimum(tl.maximum(tl.floor(mean_y + radius - 0.5) + 1.0, 0.0), height * 1.0).to(tl.int32)
        nonempty = (x1 > x0) & (y1 > y0)
        low_x = x0 // TILE_SIZE
        low_y = y0 // TILE_SIZE
        high_x = tl.where(nonempty, (x1 - 1) // TILE_SIZE + 1, low_x)
        high_y = tl.where(nonempty, (y1 - 1) // TILE_SIZE + 1, low_y)
    span_x = tl.maximum(high_x - low_x, 0)
    candidates = tl.where(visible, span_x * tl.maximum(high_y - low_y, 0), 0)
    safe_span = tl.maximum(span_x, 1)

    conic_a = tl.load(conics_ptr + row * 3 + 0, mask=visible, other=1.0)
    conic_b = tl.load(conics_ptr + row * 3 + 1, mask=visible, other=0.0)
    conic_c = tl.load(conics_ptr + row * 3 + 2, mask=visible, other=1.0)
    opacity = tl.load(opacities_ptr + offsets, mask=mask, other=0.0)
    level = (2.0 * tl.log(tl.maximum(opacity * 255.0, 1.0))) * LEVEL_MARGIN
    if EMIT:
        position = tl.load(offsets_ptr + row, mask=visible, other=0)
        if RANK_KEYS:
            depth_rank = tl.load(depths_ptr + row, mask=visible, other=0)
        else:
            depth_bits = tl.load(depths_ptr + row, mask=visible, other=1.0).to(tl.int32, bitcast=True)
            depth_bits = depth_bits.to(tl.int64) & 0xFFFFFFFF
    count = tl.zeros([BLOCK], dtype=tl.int32)
    most = tl.max(candidates, axis=0)
    i = 0
    while i < most:  # not range(most): Triton 3.6's interpreter gives a 1-element array, not a scalar
        active = i < candidates
        tile_x = low_x + i % safe_span
        tile_y = low_y + i // safe_span
        if TILE_RULE == 1:
            hit = active
        else:
            x_low = (tile_x * TILE_SIZE).to(tl.float32) + 0.5 - mean_x
            x_high = tl.minimum(tile_x * TILE_SIZE + TILE_SIZE, width).to(tl.float32) - 0.5 - mean_x
            y_low = (tile_y * TILE_SIZE).to(tl.float32) + 0.5 - mean_y
            y_high = tl.minimum(tile_y * TILE_SIZE + TILE_SIZE, height).to(tl.float32) - 0.5 - mean_y
            best = tl.minimum(
                tl.minimum(_edge_minimum(x_low, y_low, y_high, conic_a, conic_c, conic_b),
                           _edge_minimum(x_high, y_low, y_high, conic_a, conic_c, conic_b)),
                tl.minimum(_edge_minimum(y_low, x_low, x_high, conic_c, conic_a, conic_b),
                           _edge_minimum(y_high, x_low, x_high, conic_c, conic_a, conic_b)))
            inside = (x_low <= 0.0) & (x_high >= 0.0) & (y_low <= 0.0) & (y_high >= 0.0)
            best = tl.where(inside, 0.0, best)
            hit = active & (best <= level)
        if EMIT:
            target = position + count
            if RANK_KEYS:
                tile_bin = camera * n_tiles + tile_y * tiles_x + tile_x
                tl.store(keys_ptr + target, (tile_bin << rank_bits) | depth_rank, mask=hit)
            else:
                tile_bin = (camera * n_tiles + tile_y * tiles_x + tile_x).to(tl.int64)
                tl.store(keys_ptr + target, (tile_bin << 32) | depth_bits, mask=hit)
            tl.store(ids_ptr + target, row.to(tl.int32), mask=hit)
        count += hit.to(tl.int32)
        i += 1
    if not EMIT:
        tl.store(counts_ptr + row, count, mask=mask)


def _launch(means2d, conics, opacities, radii, depths, offsets, counts, keys, ids, settings, emit, rank_bits=0):
    n_cameras, n = radii.shape
    launch = launch_settings("binning")
    _bin_tiles_kernel[(cdiv(n, launch.block), n_cameras)](
        means2d, conics, opacities, radii, depths, offsets, counts, keys, ids,
        n, n_cameras, settings.width, settings.height, settings.tiles_x, settings.tiles_y, settings.n_tiles,
        rank_bits, BLOCK=launch.block, TILE_SIZE=settings.tile_size,
        TILE_RULE=1 if settings.tile_rule == "rectangle" else 0, EMIT=emit, RANK_KEYS=rank_bits > 0,
        num_warps=launch.num_warps)


def rank_key_bits(n_cameras: int, n_gaussians: int, settings: RenderSettings) -> int:
    """Bits of the depth-rank field when int32 keys fit (bins above ranks within 31 bits), else 0."""
    if KEY_LAYOUT != "auto" or n_gaussians == 0:
        return 0
    rank_bits = max(1, (n_gaussians - 1).bit_length())
    bin_bits = max(1, (n_cameras * settings.n_tiles - 1).bit_length())
    return rank_bits if rank_bits + bin_bits <= 31 else 0


def depth_ranks(depths: torch.Tensor) -> torch.Tensor:
    """Rank of each Gaussian in its camera's stable front-to-back order: [C, N] int32."""
    order = torch.sort(depths, dim=1, stable=True).indices
    ranks = torch.empty_like(order, dtype=torch.int32)
    positions = torch.arange(depths.shape[1], device=depths.device, dtype=torch.int32)
    ranks.scatter_(1, order, positions.expand_as(ranks).contiguous())
    return ranks


@contiguous_inputs
def bin_tiles(means2d: torch.Tensor,    # [C, N, 2] float32
              conics: torch.Tensor,     # [C, N, 3] float32
              opacities: torch.Tensor,  # [N] float32
              radii: torch.Tensor,      # [C, N] int32
              depths: torch.Tensor,     # [C, N] float32
              settings: RenderSettings) -> TileBins:
    """Count, prefix-sum (int64) and emit the tile intersections (Triton twin of
    `reference.binning.bin_tiles`).

    Returns:
        TileBins(keys [M] int64 (or int32 depth-rank keys, see the module docstring), gaussian_ids [M] int32,
        tiles_per_gaussian [C, N] int32).

    Raises:
        ValueError: when the key does not fit the cameras x tiles, or the intersections exceed 2^31 - 1.
    """
    n_cameras, n = radii.shape
    check_key_capacity(n_cameras, settings)
    if n_cameras * n >= 2**31:
        raise ValueError(f"means: {n_cameras} cameras x {n} Gaussians exceed the int32 Gaussian ids; "
                         f"render fewer cameras per call")
    device = means2d.device
    counts = torch.zeros(n_cameras, n, dtype=torch.int32, device=device)
    empty_keys = torch.empty(0, dtype=torch.int64, device=device)
    empty_ids = torch.empty(0, dtype=torch.int32, device=device)
    if n == 0:
        return TileBins(empty_keys, empty_ids, counts)
    dummy_offsets = torch.empty(1, dtype=torch.int64, device=device)
    _launch(means2d, conics, opacities, radii, depths, dummy_offsets, counts, empty_keys, empty_ids, settings,
            emit=False)
    inclusive = torch.cumsum(counts.reshape(-1).to(torch.int64), 0)
    total = int(inclusive[-1])
    check_intersection_count(total)
    offsets = (inclusive - counts.reshape(-1)).reshape(n_cameras, n)
    rank_bits = rank_key_bits(n_cameras, n, settings)
    keys = torch.empty(total, dtype=torch.int32 if rank_bits else torch.int64, device=device)
    ids = torch.empty(total, dtype=torch.int32, device=device)
    if total:
        key_source = depth_ranks(depths) if rank_bits else depths
        _launch(means2d, conics, opacities, radii, key_source, offsets, counts, keys, ids, settings, emit=True,
                rank_bits=rank_bits)
    return TileBins(keys, ids, counts)


def check_intersection_count(total: int) -> None:
    if total > MAX_INTERSECTIONS:
        raise ValueError(f"tile intersections: {total} exceed the supported 2^31 - 1 = {MAX_INTERSECTIONS}; "
                         f"render fewer cameras or Gaussians per call, or at a lower resolution")
