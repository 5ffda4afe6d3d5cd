"""Stage 2: tile binning (Triton): tiles per Gaussian, int64 offsets, one key per intersection.

Torch twin: `tritonsplat.reference.binning.bin_tiles` (tests compare keys and ids exactly).

A Gaussian's candidate tiles are those of its pixel box (centres within mean +- radius) or, for the
original's conventions, its tile rectangle. With the "ellipse" rule a candidate is kept only when the
alpha >= 1/255 level set, d^T conic d <= 2 ln(255 o) (extent x 1.001), meets the rectangle of the
tile's pixel centres [16 i + 0.5, 16 i + 15.5] (FlashGS, Speedy-Splat, StopThePop): the minimum of
the convex quadratic over the rectangle is 0 when the centre is inside, else it lies on an edge,
where it is a 1D quadratic minimised in closed form. Measured on the bench `random` scene (50k
Gaussians, 640x360): 1.003x the exact minimum, 0.78x the original's 3-sigma rectangle rule.

Per tile row the kept tiles are an interval (the level set is convex, so its intersection with the
row's band of pixel centres is convex, and so is that set's x-projection). Speedy-Splat (Hanson et
al. 2025, "AccuTile") computes these spans directly; here the span of each row comes in closed form
(below) and its two ends are then settled with the exact rectangle test above, stepping at most a
tile or two, so the kept set is the exact test's, at O(rows) work per Gaussian instead of O(tiles).
Closed form: with det = a c - b^2 and level L, the band dy in [y0, y1] meets the ellipse where
|dy| <= sqrt(a L / det); the right boundary x(dy) = (-b dy + sqrt(a L - det dy^2)) / a is concave
with its maximum sqrt(c L / det) at dy = -b sqrt(L / (c det)), so the band's largest x is x at that
dy clamped into the band; the smallest x likewise (mirror image).

Two launches of one kernel: EMIT=False counts the kept tiles of each (camera, Gaussian); after an
int64 inclusive prefix sum, EMIT=True writes key = (camera * n_tiles + tile) << 32 | float32 bits of
depth and value = c * N + g at the Gaussian's offset, in Gaussian order then row-major tile order (so
a stable sort orders equal depths by index). The emit pass stores at most the counted number of
entries per Gaussian and never past the buffer, whatever the two compiled variants compute.

Narrow keys: when bits(C * n_tiles) + bits(N) <= 31, the depth field is replaced by the Gaussian's
rank in its camera's stable depth order (one sort of C x N depths, whose indices are kept as
`TileBins.depth_order`), so the key fits an int32, determines the Gaussian, and the sort needs no
values; the resulting order is identical (camera, tile, depth, then index). The emit pass then walks
each camera's Gaussians in depth order (lane = rank), so it needs no inverse permutation.
`KEY_LAYOUT = "depth_bits"` forces the int64 layout (not yet measured on a GPU).

Host reads: one per call (the intersection count, needed to size the buffers), zero in capacity mode
(`max_intersections=N`: buffers of N entries, the count and an overflow flag stay on the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import types
from ..reference.binning import BINNING_EXTENT_MARGIN, check_key_capacity
from ..settings import RenderSettings
from ..types import TileBins
from . import _alloc
from ._launch import cdiv, contiguous_inputs, launch_settings

LEVEL_MARGIN = tl.constexpr(BINNING_EXTENT_MARGIN * BINNING_EXTENT_MARGIN)
# "auto": int32 depth-rank keys when they fit, else int64 depth bits; "depth_bits": always int64.
KEY_LAYOUT = "auto"
# Intersections are indexed with int32 downstream (ids, last contributors); a module name so tests can lower it.
MAX_INTERSECTIONS = types.MAX_INTERSECTIONS
# Padding keys of capacity mode: larger than every valid key, so they sort last.
PAD_KEY = {torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}


@triton.jit
def _edge_minimum(fixed, first, second, quadratic_fixed, quadratic_free, cross):
    """min over free in [first, second] of qf fixed^2 + 2 b fixed free + qfree free^2."""
    free = tl.minimum(tl.maximum((-cross * fixed) / quadratic_free, first), second)
    return quadratic_fixed * fixed * fixed + 2.0 * cross * fixed * free + quadratic_free * free * free


@triton.jit
def _tile_hit(tile_x, y_low, y_high, mean_x, width, conic_a, conic_b, conic_c, level, TILE_SIZE: tl.constexpr):
    """The exact test: does the level set meet tile column tile_x of the row whose pixel-centre band,
    relative to the mean, is [y_low, y_high]? (min of the conic quadratic over the rectangle <= level)"""
    x_low = (tile_x * TILE_SIZE).to(tl.float32) + 0.5 - mean_x
    x_high = tl.minimum(tile_x * TILE_SIZE + TILE_SIZE, width).to(tl.float32) - 0.5 - mean_x
    best = tl.minimum(
        tl.minimum(_edge_minimum(x_low, y_low, y_high, conic_a, conic_c, conic_b),
                   _edge_minimum(x_high, y_low, y_high, conic_a, conic_c, conic_b)),
        tl.minimum(_edge_minimum(y_low, x_low, x_high, conic_c, conic_a, conic_b),
                   _edge_minimum(y_high, x_low, x_high, conic_c, conic_a, conic_b)))
    inside = (x_low <= 0.0) & (x_high >= 0.0) & (y_low <= 0.0) & (y_high >= 0.0)
    best = tl.where(inside, 0.0, best)
    return best <= level


@triton.jit
def _any(flag):
    return tl.max(flag.to(tl.int32), axis=0) > 0


@triton.jit
def _row_span(tile_y, active, low_x, high_x, mean_x, mean_y, width, height, conic_a, conic_b, conic_c, level,
              TILE_SIZE: tl.constexpr, TILE_RULE: tl.constexpr):
    """First and last kept tile column of tile row `tile_y` ([BLOCK] int32 each; last < first: none)."""
    if TILE_RULE == 1:
        first = low_x
        last = tl.where(active, high_x - 1, low_x - 1)
    else:
        y_low = (tile_y * TILE_SIZE).to(tl.float32) + 0.5 - mean_y
        y_high = tl.minimum(tile_y * TILE_SIZE + TILE_SIZE, height).to(tl.float32) - 0.5 - mean_y
        # Closed-form x-extent of the level set within the band (module docstring).
        det = tl.maximum(conic_a * conic_c - conic_b * conic_b, 1e-30)
        y_reach = tl.sqrt(conic_a * level / det)
        band_low = tl.maximum(y_low, -y_reach)
        band_high = tl.minimum(y_high, y_reach)
        y_right = -conic_b * tl.sqrt(level / (conic_c * det))
        dy_right = tl.minimum(tl.maximum(y_right, band_low), band_high)
        dy_left = tl.minimum(tl.maximum(-y_right, band_low), band_high)
        root_right = tl.sqrt(tl.maximum(conic_a * level - det * dy_right * dy_right, 0.0))
        root_left = tl.sqrt(tl.maximum(conic_a * level - det * dy_left * dy_left, 0.0))
        x_right = (-conic_b * dy_right + root_right) / conic_a
        x_left = (-conic_b * dy_left - root_left) / conic_a
        # Tiles of the first and last pixel whose centre lies in [x_left, x_right] (clamped to the
        # candidates; a band that misses the ellipse gives the tile nearest to it, tested below).
        guess_first = tl.floor((tl.ceil(mean_x + x_left - 0.5)) / TILE_SIZE)
        guess_last = tl.floor((tl.floor(mean_x + x_right - 0.5)) / TILE_SIZE)
        top = (high_x - 1).to(tl.float32)
        guess_first = tl.minimum(tl.maximum(guess_first, low_x.to(tl.float32)), top).to(tl.int32)
        guess_last = tl.minimum(tl.maximum(guess_last, low_x.to(tl.float32)), top).to(tl.int32)
        guess_last = tl.maximum(guess_last, guess_first)
        # Settle both ends with the exact test: extend outwards while the neighbour is kept, then
        # shrink inwards while the end is not (float32 rounding moves the closed form by far less
        # than a tile, so each loop runs zero or one step in practice).
        first = guess_first
        grow = active & (first > low_x) & _tile_hit(first - 1, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                    conic_c, level, TILE_SIZE)
        while _any(grow):
            first = tl.where(grow, first - 1, first)
            grow = grow & (first > low_x) & _tile_hit(first - 1, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                      conic_c, level, TILE_SIZE)
        shrink = active & ~_tile_hit(first, y_low, y_high, mean_x, width, conic_a, conic_b, conic_c, level,
                                     TILE_SIZE)
        while _any(shrink):
            first = tl.where(shrink, first + 1, first)
            shrink = shrink & (first < high_x) & ~_tile_hit(first, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                            conic_c, level, TILE_SIZE)
        last = tl.maximum(guess_last, first)
        grow = active & (first < high_x) & (last < high_x - 1) & _tile_hit(
            last + 1, y_low, y_high, mean_x, width, conic_a, conic_b, conic_c, level, TILE_SIZE)
        while _any(grow):
            last = tl.where(grow, last + 1, last)
            grow = grow & (last < high_x - 1) & _tile_hit(last + 1, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                          conic_c, level, TILE_SIZE)
        shrink = active & (last >= first) & ~_tile_hit(last, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                       conic_c, level, TILE_SIZE)
        while _any(shrink):
            last = tl.where(shrink, last - 1, last)
            shrink = shrink & (last >= first) & ~_tile_hit(last, y_low, y_high, mean_x, width, conic_a, conic_b,
                                                           conic_c, level, TILE_SIZE)
        last = tl.where(active & (first < high_x), last, first - 1)
    return first, last


@triton.jit
def _bin_tiles_kernel(
    means2d_ptr,      # [C, N, 2] float32
    conics_ptr,       # [C, N, 3] float32
    opacities_ptr,    # [N] float32
    radii_ptr,        # [C, N] int32
    depths_ptr,       # [C, N] float32 (int64 keys only)
    depth_order_ptr,  # [C, N] int64 Gaussian of each depth rank (RANK_KEYS, EMIT only)
    inclusive_ptr,    # [C, N] int64 inclusive prefix sum of the counts (EMIT only)
    counts_ptr,       # [C, N] int32: out in the count pass, read by EMIT
    keys_ptr,         # out [capacity] int64, or int32 with RANK_KEYS (EMIT only)
    ids_ptr,          # out [capacity] int32 (EMIT only)
    n_gaussians, n_cameras, width, height, tiles_x, tiles_y, n_tiles, rank_bits, capacity,
    BLOCK: tl.constexpr, TILE_SIZE: tl.constexpr, TILE_RULE: tl.constexpr, EMIT: tl.constexpr,
    RANK_KEYS: tl.constexpr,
):
    block = tl.program_id(0)
    camera = tl.program_id(1)
    lanes = block * BLOCK + tl.arange(0, BLOCK)                       # [BLOCK] Gaussians, or ranks
    mask = lanes < n_gaussians
    if EMIT and RANK_KEYS:
        gaussian = tl.load(depth_order_ptr + camera.to(tl.int64) * n_gaussians + lanes, mask=mask, other=0)
    else:
        gaussian = lanes.to(tl.int64)
    row = camera.to(tl.int64) * n_gaussians + gaussian               # int64: row * 3 may pass 2^31
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
    rows = tl.where(visible & (high_x > low_x), tl.maximum(high_y - low_y, 0), 0)

    conic_a = tl.load(conics_ptr + row * 3 + 0, mask=visible, other=1.0)
    conic_b = tl.load(conics_ptr + row * 3 + 1, mask=visible, other=0.0)
    conic_c = tl.load(conics_ptr + row * 3 + 2, mask=visible, other=1.0)
    opacity = tl.load(opacities_ptr + gaussian, mask=mask, other=0.0)
    level = (2.0 * tl.log(tl.maximum(opacity * 255.0, 1.0))) * LEVEL_MARGIN
    if EMIT:
        stored = tl.load(counts_ptr + row, mask=visible, other=0)
        position = tl.load(inclusive_ptr + row, mask=visible, other=0) - stored
        if RANK_KEYS:
            depth_rank = lanes
        else:
            depth_bits = tl.load(depths_ptr + row, mask=visible, other=1.0).to(tl.int32, bitcast=True)
            depth_bits = depth_bits.to(tl.int64) & 0xFFFFFFFF
    count = tl.zeros([BLOCK], dtype=tl.int32)
    most_rows = tl.max(rows, axis=0)
    i = 0
    while i < most_rows:  # not range(): Triton 3.6's interpreter gives a 1-element array, not a scalar
        active = i < rows
        tile_y = low_y + i
        first, last = _row_span(tile_y, active, low_x, high_x, mean_x, mean_y, width, height, conic_a, conic_b,
                                conic_c, level, TILE_SIZE, TILE_RULE)
        span = tl.where(active, tl.maximum(last - first + 1, 0), 0)
        if EMIT:
            widest = tl.max(span, axis=0)
            j = 0
            while j < widest:
                # Never more entries than the count pass stored, never past the buffer.
                keep = (j < span) & (count < stored)
                target = position + count
                keep = keep & (target < capacity)
                tile_x = first + j
                if RANK_KEYS:
                    tile_bin = camera * n_tiles + tile_y * tiles_x + tile_x
                    tl.store(keys_ptr + target, (tile_bin << rank_bits) | depth_rank, mask=keep)
                else:
                    tile_bin = (camera * n_tiles + tile_y * tiles_x + tile_x).to(tl.int64)
                    tl.store(keys_ptr + target, (tile_bin << 32) | depth_bits, mask=keep)
                tl.store(ids_ptr + target, row.to(tl.int32), mask=keep)
                count += keep.to(tl.int32)
                j += 1
        else:
            count += span
        i += 1
    if not EMIT:
        tl.store(counts_ptr + row, count, mask=mask)


def _launch(means2d, conics, opacities, radii, depths, depth_order, inclusive, counts, keys, ids, settings, emit,
            rank_bits=0, capacity=0):
    n_cameras, n = radii.shape
    launch = launch_settings("binning")
    _bin_tiles_kernel[(cdiv(n, launch.block), n_cameras)](
        means2d, conics, opacities, radii, depths, depth_order, inclusive, counts, keys, ids,
        n, n_cameras, settings.width, settings.height, settings.tiles_x, settings.tiles_y, settings.n_tiles,
        rank_bits, capacity, BLOCK=launch.block, TILE_SIZE=settings.tile_size,
        TILE_RULE=1 if settings.tile_rule == "rectangle" else 0, EMIT=emit, RANK_KEYS=rank_bits > 0,
        num_warps=launch.num_warps)


def rank_key_bits(n_cameras: int, n_gaussians: int, settings: RenderSettings) -> int:
    """Bits of the depth-rank field when int32 keys fit (bins above ranks within 31 bits), else 0."""
    if KEY_LAYOUT != "auto" or n_gaussians == 0:
        return 0
    rank_bits = max(1, (n_gaussians - 1).bit_length())
    bin_bits = max(1, (n_cameras * settings.n_tiles - 1).bit_length())
    return rank_bits if rank_bits + bin_bits <= 31 else 0


def depth_order(depths: torch.Tensor) -> torch.Tensor:
    """Gaussian of each rank in its camera's stable front-to-back order: [C, N] int64."""
    return torch.sort(depths, dim=1, stable=True).indices


def check_max_intersections(max_intersections) -> None:
    if max_intersections is None:
        return
    if isinstance(max_intersections, bool) or not isinstance(max_intersections, int) or not (
            1 <= max_intersections <= MAX_INTERSECTIONS):
        raise ValueError(f"max_intersections: expected None or an int in 1..{MAX_INTERSECTIONS}, "
                         f"got {max_intersections!r}")


@contiguous_inputs
def bin_tiles(means2d: torch.Tensor,    # [C, N, 2] float32
              conics: torch.Tensor,     # [C, N, 3] float32
              opacities: torch.Tensor,  # [N] float32
              radii: torch.Tensor,      # [C, N] int32
              depths: torch.Tensor,     # [C, N] float32
              settings: RenderSettings, *, max_intersections: int | None = None) -> TileBins:
    """Count, prefix-sum (int64) and emit the tile intersections (Triton twin of
    `reference.binning.bin_tiles`).

    Args:
        max_intersections: None: size the buffers exactly (one host read, the count). N: capacity
            mode, buffers of N entries and no host read; `n_intersections` is then a 0-d int64 device
            tensor and `overflow` a 0-d bool device tensor (True: intersections past N were dropped).

    Returns:
        TileBins(keys [M] int64 (or int32 depth-rank keys, see the module docstring), gaussian_ids [M] int32,
        tiles_per_gaussian [C, N] int32, n_intersections, overflow, depth_order [C, N] int64 or None).

    Raises:
        ValueError: when the key does not fit the cameras x tiles, or the intersections exceed 2^31 - 1.
    """
    bins, _ = bin_tiles_with_checks(means2d, conics, opacities, radii, depths, settings,
                                    max_intersections=max_intersections)
    return bins


def bin_tiles_with_checks(means2d, conics, opacities, radii, depths, settings: RenderSettings, *,
                          max_intersections: int | None = None,
                          checks: torch.Tensor | None = None) -> tuple[TileBins, list[int] | None]:
    """`bin_tiles`, also bringing the device flags `checks` ([k] int64) to the host in the same
    transfer as the intersection count (default mode only); returns (bins, flags as ints or None)."""
    check_max_intersections(max_intersections)
    means2d, conics, opacities, radii, depths = (t.contiguous() for t in (means2d, conics, opacities, radii, depths))
    n_cameras, n = radii.shape
    check_key_capacity(n_cameras, settings)
    if n_cameras * n >= 2**31:
        raise ValueError(f"means: {n_cameras} cameras x {n} Gaussians exceed the int32 Gaussian ids; "
                         f"render fewer cameras per call")
    device = means2d.device
    capacity_mode = max_intersections is not None
    rank_bits = rank_key_bits(n_cameras, n, settings)
    key_dtype = torch.int32 if rank_bits else torch.int64
    counts = _alloc.empty(n_cameras, n, dtype=torch.int32, device=device)
    flags = None
    if n == 0:
        total_tensor = _alloc.zeros((), dtype=torch.int64, device=device)
        inclusive = None
    else:
        _launch(means2d, conics, opacities, radii, depths, radii, radii, counts, radii, radii, settings, emit=False)
        inclusive = torch.cumsum(counts.reshape(-1), 0, dtype=torch.int64)
        total_tensor = inclusive[-1]
    if capacity_mode:
        total = max_intersections
        keys = _alloc.full((total,), PAD_KEY[key_dtype], dtype=key_dtype, device=device)
        n_intersections, overflow = total_tensor, total_tensor > max_intersections
    else:
        if checks is not None and checks.numel():
            values = torch.cat([total_tensor.reshape(1), checks]).tolist()     # the one host read
            total, flags = values[0], values[1:]
        else:
            total = int(total_tensor)                                          # the one host read
        check_intersection_count(total)
        keys = _alloc.empty(total, dtype=key_dtype, device=device)
        n_intersections, overflow = total, None
    ids = _alloc.empty(keys.numel(), dtype=torch.int32, device=device)
    order = depth_order(depths) if rank_bits else None
    if n and keys.numel():
        _launch(means2d, conics, opacities, radii, depths, order if order is not None else radii, inclusive, counts,
                keys, ids, settings, emit=True, rank_bits=rank_bits, capacity=keys.numel())
    return TileBins(keys, ids, counts, n_intersections, overflow, order), flags


def check_intersection_count(total: int) -> None:
    if total > MAX_INTERSECTIONS:
        raise ValueError(f"tile intersections: {total} exceed the supported 2^31 - 1 = {MAX_INTERSECTIONS}; "
                         f"render fewer cameras or Gaussians per call, or at a lower resolution")


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The binning kernel's configurations (collected by `tritonsplat.aot`): count and emit for both
    tile rules, and the int32 rank-key emit, at 16-pixel tiles; `exhaustive` adds every tile size the
    pipeline accepts (4, 8, 32) and the rank-key emit with the rectangle rule."""
    from ._launch import kernel_signature

    launch = launch_settings("binning")
    types = {"radii_ptr": "*i32", "depth_order_ptr": "*i64", "inclusive_ptr": "*i64", "counts_ptr": "*i32",
             "keys_ptr": "*i64", "ids_ptr": "*i32"}
    variants = []

    def variant(name, tile_size, rule, emit, rank_keys):
        variants.append(dict(
            name=name, kernel="_bin_tiles_kernel",
            signature=kernel_signature(_bin_tiles_kernel, dict(types, keys_ptr="*i32") if rank_keys else types),
            constexprs=dict(BLOCK=launch.block, TILE_SIZE=tile_size, TILE_RULE=rule, EMIT=emit, RANK_KEYS=rank_keys),
            num_warps=launch.num_warps))

    for rule in (0, 1):
        for emit in (False, True):
            variant(f"bin_tiles[{'emit' if emit else 'count'},rule={rule}]", 16, rule, emit, False)
    variant("bin_tiles[emit,rule=0,rank_keys]", 16, 0, True, True)
    if exhaustive:
        for tile_size in (4, 8, 16, 32):
            for rule in (0, 1):
                if tile_size != 16:
                    for emit in (False, True):
                        variant(f"bin_tiles[{'emit' if emit else 'count'},rule={rule},tile={tile_size}]",
                                tile_size, rule, emit, False)
                if (tile_size, rule) != (16, 0):
                    variant(f"bin_tiles[emit,rule={rule},rank_keys,tile={tile_size}]", tile_size, rule, True, True)
    return variants
