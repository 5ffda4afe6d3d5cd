"""Stage 5: front-to-back alpha compositing per tile, and its back-to-front backward (Triton).

The compositor contract (shared with the torch twin `tritonsplat.reference.compositing.composite`,
same name and signature; both are tested on the same tensors):

Inputs
    means2d      [C, N, 2] float32  pixel coordinates (pixel (i, j) is centred at (i + .5, j + .5))
    conics       [C, N, 3] float32  (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    opacities    [N]       float32  activated opacities, or [C, N] per camera (antialiased mode)
    colors       [N, D] (shared by all cameras) or [C, N, D] float32, any D >= 1
    depths       [C, N]    float32  camera z of the means
    backgrounds  [C, D] float32 or None (black)
    tile_ranges  [C * n_tiles, 2] int32: [start, end) of bin b = c * n_tiles + tile in sorted_ids,
                 tile = ty * tiles_x + tx; (0, 0) for an empty bin
    sorted_ids   [M] int32: flat row c * N + g of each intersection, front to back within a bin
                 (equal depths by Gaussian index); M < 2^31 is checked by binning
Keywords
    outputs      subset of ("colors", "alphas", "depths", "median_depths"); fields not asked for are
                 None and cost nothing (compile-time flags of the kernels)
    color_grad_channels  k: only colors[..., :k] receive colour gradients (the others get zeros);
                 gradients of every other input still see all D channels (exact)
    absgrad, densify_channels/densify_grad, deterministic, means2d_for_absgrad: as in `rasterize`
Blending rule (Kerbl et al. 2023, Eq. 3; the original renderer's constants in `constants.py`)
    alpha = min(alpha_cap, o exp(-(a dx^2 + c dy^2) / 2 - b dx dy)), d = mean - pixel centre;
    skipped when alpha < 1/255 (or the exponent is positive); a pixel stops before the entry that
    would take T (1 - alpha) below 1e-4; colour = sum_i c_i alpha_i T_i + T_final background.
State saved for backward (`types.CompositeState`; the backward walks back to front from it)
    final_transmittance [C, H, W] float32
    last_index          [C, H, W] int32: index into sorted_ids of the last blended entry, -1: none
Outputs (`types.CompositeOutput`)
    colors        [C, H, W, D]
    alphas        [C, H, W, 1]  1 - final transmittance (computed as the sum of the blend weights)
    depths        [C, H, W, 1]  expected camera z, sum_i alpha_i T_i z_i / alpha, 0 where alpha = 0
                  (normalised inside the compositor; differentiable)
    median_depths [C, H, W, 1]  detached z of the entry at which T first falls below 0.5, else 0

Design (the loop of the CUDA rasterizers, written for Triton)
    One program per (camera, tile) bin, launched longest list first (longest-processing-time order,
    so the heavy tiles do not form the tail). Each thread owns PIXELS_PER_THREAD pixels of the tile:
    the pixel vector has shape [PIXELS_PER_THREAD, WARPS, LANES] so that reductions over the last
    axis stay inside a warp. The kernel walks the tile's list in batches of BATCH entries, each
    entry with scalar loads broadcast to the pixel vector (`tl.static_range`, unrolled): no
    [BATCH, pixels] temporaries, no cumulative products, no divisions in the forward.
    Per-Gaussian data are one packed record row (x, y, a, b, c, opacity, depth, colour_0..D-1),
    built by one `torch.cat` per call, plus one all-zero sentinel row (opacity 0: never blended);
    entries past a tile's end read the sentinel, and `sorted_ids` is padded by BATCH sentinels on
    both sides, so no per-entry load needs a mask. Offsets are int32 when the sizes fit (checked).
    Colour channels are compile-time: up to CHANNEL_CHUNK = 8 accumulators per launch; wider D runs
    one launch per chunk of 8 channels (the first also writes alphas, depths and the state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings
from ..types import ALL_OUTPUTS, CompositeOutput, CompositeState
from . import _alloc

MIN_ALPHA = tl.constexpr(constants.MIN_ALPHA)
TRANSMITTANCE_STOP = tl.constexpr(constants.TRANSMITTANCE_STOP)
MEDIAN_TRANSMITTANCE = tl.constexpr(constants.MEDIAN_TRANSMITTANCE)
NEG_LOG2E = tl.constexpr(-1.4426950408889634)     # -log2(e)
NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)

# Packed per-Gaussian record: x, y, conic a, b, c, opacity, depth, then the D colour channels.
RECORD_GEOMETRY = tl.constexpr(7)
# Colour channels per launch (one register accumulator each); wider D is processed in chunks.
CHANNEL_CHUNK = 8
# Gaussians per main-loop iteration (constexpr BATCH). Forward 16 at 2 pixels per thread, backward 8
# at 4 pixels per thread: see `python -m tritonsplat.aot` for the sm_90 figures of each choice.
FORWARD_BATCH = 16
BACKWARD_BATCH = 8
INT32_LIMIT = 2**31 - 1
# Deterministic backward: one row per intersection, columns in this order, colours last.
# (tl.constexpr so that the kernels can read them; `.value` is the int.)
ROW_MEANS2D, ROW_CONICS, ROW_OPACITY, ROW_DEPTH = tl.constexpr(0), tl.constexpr(2), tl.constexpr(5), tl.constexpr(6)
ROW_ABSGRAD, ROW_DENSIFY, ROW_COLORS = tl.constexpr(7), tl.constexpr(9), tl.constexpr(11)


@dataclass(frozen=True)
class PixelLayout:
    """How a tile's pixels map onto the threads of one program."""

    num_warps: int
    pixels_per_thread: int
    lanes: int            # pixels per warp row (32, or the tile's pixel count for 4x4 tiles)


def pixel_layout(tile_size: int, backward: bool, wide_geometry: bool = False) -> PixelLayout:
    """The launch layout of a tile size (4, 8, 16 or 32). More pixels per thread amortise the per-Gaussian
    scalar loads (forward) and the per-Gaussian warp reductions (backward) over more pixels.

    `wide_geometry`: the geometry launch of a backward with D > CHANNEL_CHUNK (q spans all D channels,
    the first 8 upstream gradients held in registers). At 8 pixels per thread it needs more than the
    255 registers (sm_90: 512 B spilled at 16-px tiles, 872 B at 32 px, D = 33); at 4 it compiles to
    254 / 255 registers without spilling (sm_90 / sm_80, triton 3.9), one register from spilling; at 2
    it keeps headroom."""
    pixels = tile_size * tile_size
    lanes = min(32, pixels)
    per_thread = {4: 1, 8: 2, 16: 8 if backward else 4, 32: 8}[tile_size]
    if backward and wide_geometry:
        per_thread = min(per_thread, 2)
    return PixelLayout(num_warps=pixels // (lanes * per_thread), pixels_per_thread=per_thread, lanes=lanes)


# --------------------------------------------------------------------------------------------------
# Shared device helpers (forward and backward must decide "blended" with the same arithmetic).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile_pixels(bin_index, n_tiles, tiles_x, width, height, TILE_SIZE: tl.constexpr, PIXELS_PER_THREAD: tl.constexpr,
                 WARPS: tl.constexpr, LANES: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Pixel coordinates [PIXELS_PER_THREAD, WARPS, LANES] of one bin's tile, and their image index."""
    camera = bin_index // n_tiles
    tile = bin_index - camera * n_tiles
    pixel = ((tl.arange(0, PIXELS_PER_THREAD)[:, None, None] * WARPS + tl.arange(0, WARPS)[None, :, None]) * LANES
             + tl.arange(0, LANES)[None, None, :])
    pixel_x = (tile % tiles_x) * TILE_SIZE + pixel % TILE_SIZE
    pixel_y = (tile // tiles_x) * TILE_SIZE + pixel // TILE_SIZE
    inside = (pixel_x < width) & (pixel_y < height)
    if INT64_OFFSETS:
        image_index = (camera.to(tl.int64) * height + pixel_y) * width + pixel_x
    else:
        image_index = (camera * height + pixel_y) * width + pixel_x
    return camera, pixel_x.to(tl.float32) + 0.5, pixel_y.to(tl.float32) + 0.5, inside, image_index


@triton.jit
def _record_base(record_ptr, ids_ptr, entry, first, last_entry, sentinel_row, record_width,
                 INT64_OFFSETS: tl.constexpr):
    """Row and record address of list entry `entry`; entries outside [first, last_entry) read the sentinel.
    The loads need no mask: `ids` is padded by BATCH sentinels on both sides."""
    row = tl.load(ids_ptr + entry, mask=None, other=None)
    row = tl.where((entry >= first) & (entry < last_entry), row, sentinel_row)
    if INT64_OFFSETS:
        return row, record_ptr + row.to(tl.int64) * record_width
    return row, record_ptr + row * record_width


@triton.jit
def _pair_alpha(base, pixel_cx, pixel_cy, alpha_cap):
    """Per-pixel alpha of the record at `base`. Written with explicit fma so that no compiler
    contraction choice can differ between the forward and the backward kernel."""
    mean_x = tl.load(base + 0, mask=None, other=None)
    mean_y = tl.load(base + 1, mask=None, other=None)
    conic_a = tl.load(base + 2, mask=None, other=None)
    conic_b = tl.load(base + 3, mask=None, other=None)
    conic_c = tl.load(base + 4, mask=None, other=None)
    opacity = tl.load(base + 5, mask=None, other=None)
    dx = mean_x - pixel_cx
    dy = mean_y - pixel_cy
    # power = -sigma log2(e), so that exp(-sigma) = exp2(power): the scale is folded into the three
    # per-Gaussian coefficients instead of costing a multiply per pair.
    power = tl.fma(dx, tl.fma(NEG_HALF_LOG2E * conic_a, dx, (NEG_LOG2E * conic_b) * dy),
                   ((NEG_HALF_LOG2E * conic_c) * dy) * dy)
    falloff = tl.math.exp2(power)
    gaussian_alpha = opacity * falloff
    alpha = tl.minimum(gaussian_alpha, alpha_cap)
    visible = (power <= 0.0) & (alpha >= MIN_ALPHA)
    return conic_a, conic_b, conic_c, dx, dy, falloff, gaussian_alpha, alpha, visible


@triton.jit
def _any(flag):
    """True if any element of a [PIXELS_PER_THREAD, WARPS, LANES] int32 flag is nonzero."""
    return tl.max(tl.max(tl.max(flag, axis=2), axis=1), axis=0) > 0


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _accumulate_channel(accumulator, weight, base, channel: tl.constexpr, CHANNELS: tl.constexpr):
    if CHANNELS > channel:
        accumulator = tl.fma(weight, tl.load(base + channel, mask=None, other=None), accumulator)
    return accumulator


@triton.jit
def _store_channel(out_colors_ptr, backgrounds_ptr, accumulator, transmittance, image_index, inside, camera,
                   n_channels, channel_offset, channel: tl.constexpr, CHANNELS: tl.constexpr,
                   HAS_BACKGROUND: tl.constexpr):
    if CHANNELS > channel:
        if HAS_BACKGROUND:
            background = tl.load(backgrounds_ptr + camera * n_channels + channel_offset + channel, mask=None,
                                 other=None)
            accumulator = tl.fma(transmittance, background, accumulator)
        tl.store(out_colors_ptr + image_index * n_channels + channel_offset + channel, accumulator, mask=inside)


@triton.jit
def _composite_forward_kernel(
    record_ptr,        # [C * N + 1, 7 + D] float32 packed records, last row the sentinel
    ids_ptr,           # [M] int32 sorted rows c * N + g (inside a buffer padded by BATCH sentinels each side)
    ranges_ptr,        # [C * n_tiles, 2] int32 [start, end) per bin
    order_ptr,         # [C * n_tiles] int32 bins, longest list first
    backgrounds_ptr,   # [C, D] float32 (HAS_BACKGROUND)
    out_colors_ptr,    # out [C, H, W, D] float32 (CHANNELS > 0)
    out_alphas_ptr,    # out [C, H, W] float32 sum of weights (ALPHAS)
    out_depths_ptr,    # out [C, H, W] float32 normalised expected depth (DEPTHS)
    out_median_ptr,    # out [C, H, W] float32 (MEDIAN)
    out_final_ptr,     # out [C, H, W] float32 final transmittance (STATE)
    out_last_ptr,      # out [C, H, W] int32 last blended entry, -1 none (STATE)
    out_count_ptr,     # out [C, H, W] int32 blended pairs per pixel (COUNT_PAIRS, tests only)
    record_width, n_channels, channel_offset, width, height, tiles_x, n_tiles, sentinel_row, alpha_cap,
    TILE_SIZE: tl.constexpr, BATCH: tl.constexpr, PIXELS_PER_THREAD: tl.constexpr, WARPS: tl.constexpr,
    LANES: tl.constexpr, CHANNELS: tl.constexpr, HAS_BACKGROUND: tl.constexpr, ALPHAS: tl.constexpr,
    DEPTHS: tl.constexpr, MEDIAN: tl.constexpr, STATE: tl.constexpr, COUNT_PAIRS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    bin_index = tl.load(order_ptr + tl.program_id(0), mask=None, other=None)
    camera, pixel_cx, pixel_cy, inside, image_index = _tile_pixels(
        bin_index, n_tiles, tiles_x, width, height, TILE_SIZE, PIXELS_PER_THREAD, WARPS, LANES, INT64_OFFSETS)
    start = tl.load(ranges_ptr + bin_index * 2, mask=None, other=None)
    end = tl.load(ranges_ptr + bin_index * 2 + 1, mask=None, other=None)

    zero = tl.zeros([PIXELS_PER_THREAD, WARPS, LANES], dtype=tl.float32)
    # T > 0 while a pixel is active; a stopped (or outside) pixel keeps -T, so |T| is its final
    # transmittance and T (1 - alpha) < 0 can never pass the blend test again: no separate flag.
    transmittance = tl.where(inside, 1.0, -1.0) + zero
    last = tl.full([PIXELS_PER_THREAD, WARPS, LANES], -1, dtype=tl.int32)
    count = tl.zeros([PIXELS_PER_THREAD, WARPS, LANES], dtype=tl.int32)
    depth_sum, weight_sum, median = zero, zero, zero
    color_0, color_1, color_2, color_3 = zero, zero, zero, zero
    color_4, color_5, color_6, color_7 = zero, zero, zero, zero
    colors_offset = RECORD_GEOMETRY + channel_offset
    batch_start = start
    any_active = _any((transmittance > 0.0).to(tl.int32))
    while (batch_start < end) & any_active:
        for j in tl.static_range(BATCH):
            entry = batch_start + j
            row, base = _record_base(record_ptr, ids_ptr, entry, start, end, sentinel_row, record_width,
                                     INT64_OFFSETS)
            _a, _b, _c, _dx, _dy, _falloff, _gaussian_alpha, alpha, visible = _pair_alpha(
                base, pixel_cx, pixel_cy, alpha_cap)
            after = tl.fma(-transmittance, alpha, transmittance)       # T (1 - alpha)
            blend = visible & (after >= TRANSMITTANCE_STOP)
            weight = tl.where(blend, alpha * transmittance, 0.0)
            colors = base + colors_offset
            color_0 = _accumulate_channel(color_0, weight, colors, 0, CHANNELS)
            color_1 = _accumulate_channel(color_1, weight, colors, 1, CHANNELS)
            color_2 = _accumulate_channel(color_2, weight, colors, 2, CHANNELS)
            color_3 = _accumulate_channel(color_3, weight, colors, 3, CHANNELS)
            color_4 = _accumulate_channel(color_4, weight, colors, 4, CHANNELS)
            color_5 = _accumulate_channel(color_5, weight, colors, 5, CHANNELS)
            color_6 = _accumulate_channel(color_6, weight, colors, 6, CHANNELS)
            color_7 = _accumulate_channel(color_7, weight, colors, 7, CHANNELS)
            if DEPTHS or MEDIAN:
                depth = tl.load(base + 6, mask=None, other=None)
                if DEPTHS:
                    depth_sum = tl.fma(weight, depth, depth_sum)
                if MEDIAN:
                    crossing = blend & (transmittance >= MEDIAN_TRANSMITTANCE) & (after < MEDIAN_TRANSMITTANCE)
                    median = tl.where(crossing, depth, median)
            if ALPHAS:
                weight_sum += weight
            if STATE:
                last = tl.where(blend, entry, last)
            if COUNT_PAIRS:
                count += blend.to(tl.int32)
            transmittance = tl.where(blend, after, tl.where(visible, -tl.abs(transmittance), transmittance))
        batch_start += BATCH
        any_active = _any((transmittance > 0.0).to(tl.int32))

    transmittance = tl.abs(transmittance)
    # The tile's indices again, from a fresh (volatile) load of the bin: kept live across the loop,
    # camera x height + row and camera x D were spilled on sm_80 (8-24 B, D = 3 and 4, Triton 3.9).
    bin_index = tl.load(order_ptr + tl.program_id(0), mask=None, other=None, volatile=True)
    camera, _cx, _cy, inside, image_index = _tile_pixels(
        bin_index, n_tiles, tiles_x, width, height, TILE_SIZE, PIXELS_PER_THREAD, WARPS, LANES, INT64_OFFSETS)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_0, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 0, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_1, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 1, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_2, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 2, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_3, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 3, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_4, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 4, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_5, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 5, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_6, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 6, CHANNELS, HAS_BACKGROUND)
    _store_channel(out_colors_ptr, backgrounds_ptr, color_7, transmittance, image_index, inside, camera, n_channels,
                   channel_offset, 7, CHANNELS, HAS_BACKGROUND)
    if ALPHAS:
        tl.store(out_alphas_ptr + image_index, weight_sum, mask=inside)
    if DEPTHS:
        covered = weight_sum > 0.0
        tl.store(out_depths_ptr + image_index, tl.where(covered, depth_sum / tl.where(covered, weight_sum, 1.0), 0.0),
                 mask=inside)
    if MEDIAN:
        tl.store(out_median_ptr + image_index, median, mask=inside)
    if STATE:
        tl.store(out_final_ptr + image_index, transmittance, mask=inside)
        tl.store(out_last_ptr + image_index, last, mask=inside)
    if COUNT_PAIRS:
        tl.store(out_count_ptr + image_index, count, mask=inside)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------
# Vector-Jacobian product of compositing (Kerbl et al. 2023 Eq. 3). Per pixel, blended list
# i = 1..n, w_i = alpha_i T_i, upstream g_C [D] (colours), g_A (alpha image), g_E (normalised depth
# E = Z / A with Z = sum_i w_i z_i and A = sum_i w_i = 1 - T_final), background bg. The depth output
# is the quotient, so its upstream splits exactly into g_Z = g_E / A and an alpha term
# -g_E E / A, giving g_A' = g_A - g_E E / A (both 0 where A = 0). With q_i = g_C . c_i + g_Z z_i:
#     g_c_i = w_i g_C,  g_z_i = w_i g_Z,
#     g_alpha_i = T_i q_i - (S_i + T_final (g_C . bg - g_A')) / (1 - alpha_i),  S_i = sum_{j > i} w_j q_j.
# alpha = min(cap, o G), G = exp(-sigma): below the cap g_o = G g_alpha, g_sigma = -o G g_alpha;
# sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = mean - pixel centre:
#     g_conic = g_sigma (dx^2 / 2, dx dy, dy^2 / 2),  g_mean = g_sigma (a dx + b dy, b dx + c dy).
# Saved by forward: T_final and the last blended index per pixel (and A, E for the depth term). The
# walk goes back to front one entry at a time: T_i = T_{i+1} / (1 - alpha_i), S accumulates w q.
# densify_grad repeats g_alpha with q restricted to the first k colour channels (no depth, no alpha,
# background only for those channels). Reduction: per Gaussian and quantity, the pixels of a thread
# are summed in registers, then across the warp (shuffles, no shared memory, no barrier), and each
# warp adds its partial with one relaxed atomic (skipped when it is zero: the Gaussian missed the
# warp). With DETERMINISTIC the warps' partials are summed in a fixed order and stored to one row
# per intersection (each intersection belongs to one program), reduced in a fixed order afterwards.
@triton.jit
def _pixel_sum(values, DETERMINISTIC: tl.constexpr):
    """Sum of [PIXELS_PER_THREAD, WARPS, LANES] values over the tile's pixels: inside each thread, then
    across each warp (shuffles only) -> [WARPS, 1] partials; DETERMINISTIC: over the warps too, a scalar."""
    lane_sums = tl.sum(values, axis=0)
    if DETERMINISTIC:   # one return: compiled Triton rejects two returns of different shapes
        total = tl.sum(tl.sum(lane_sums, axis=1), axis=0)
    else:
        total = tl.sum(lane_sums, axis=1, keep_dims=True)
    return total


@triton.jit
def _emit_gradient(grad_ptr, offset, partial, lane, valid, rows_ptr, row_offset, column: tl.constexpr,
                   DETERMINISTIC: tl.constexpr):
    """Add a per-Gaussian partial to its gradient: lane 0 of every warp adds its warp's partial with a
    relaxed atomic (skipped when the partial is zero, i.e. the Gaussian missed the warp); DETERMINISTIC:
    store the tile's sum to the entry's row (`valid` = the entry belongs to this tile)."""
    if DETERMINISTIC:
        tl.store(rows_ptr + row_offset + column, partial, mask=valid)
    else:
        values = partial + (lane * 0).to(tl.float32)                        # [WARPS, LANES]
        # `valid` as a [WARPS, LANES] mask: the interpreter rejects scalar & tensor masks.
        first_lane = lane == valid.to(tl.int32) - 1
        tl.atomic_add(grad_ptr + offset + lane * 0, values, mask=first_lane & (values != 0.0), sem="relaxed")


@triton.jit
def _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, channel: tl.constexpr,
                      LOADED: tl.constexpr):
    if LOADED > channel:
        return tl.load(grad_colors_ptr + image_index * n_channels + channel_offset + channel, mask=inside,
                       other=0.0)
    return tl.zeros_like(image_index.to(tl.float32))


@triton.jit
def _upstream(grad_colors_ptr, image_index, inside, n_channels, channel: tl.constexpr, upstream_0, upstream_1,
              upstream_2, upstream_3, upstream_4, upstream_5, upstream_6, upstream_7):
    """Upstream colour gradient of `channel`: the first 8 were loaded before the loop, wider D re-reads (L1)."""
    if channel == 0:
        return upstream_0
    if channel == 1:
        return upstream_1
    if channel == 2:
        return upstream_2
    if channel == 3:
        return upstream_3
    if channel == 4:
        return upstream_4
    if channel == 5:
        return upstream_5
    if channel == 6:
        return upstream_6
    if channel == 7:
        return upstream_7
    return tl.load(grad_colors_ptr + image_index * n_channels + channel, mask=inside, other=0.0)


@triton.jit
def _background_dot(backgrounds_ptr, grad_colors_ptr, image_index, inside, camera, n_channels, channel: tl.constexpr,
                    upstream_0, upstream_1, upstream_2, upstream_3, upstream_4, upstream_5, upstream_6, upstream_7):
    upstream = _upstream(grad_colors_ptr, image_index, inside, n_channels, channel, upstream_0, upstream_1,
                         upstream_2, upstream_3, upstream_4, upstream_5, upstream_6, upstream_7)
    return upstream * tl.load(backgrounds_ptr + camera * n_channels + channel, mask=None, other=None)


@triton.jit
def _color_gradient(grad_ptr, color_offset, weight, upstream, lane, valid, rows_ptr, row_offset,
                    channel: tl.constexpr, CHANNELS: tl.constexpr, DETERMINISTIC: tl.constexpr):
    if CHANNELS > channel:
        _emit_gradient(grad_ptr, color_offset + channel, _pixel_sum(weight * upstream, DETERMINISTIC), lane, valid,
                       rows_ptr, row_offset, ROW_COLORS + channel, DETERMINISTIC)


@triton.jit
def _composite_backward_kernel(
    record_ptr,              # [C * N + 1, 7 + D] float32 packed records (forward's)
    ids_ptr,                 # [M] int32 (padded by BATCH sentinels each side)
    ranges_ptr,              # [C * n_tiles, 2] int32
    order_ptr,               # [C * n_tiles] int32 bins, longest list first
    backgrounds_ptr,         # [C, D] float32 (HAS_BACKGROUND)
    final_ptr,               # [C, H, W] float32 final transmittance
    last_ptr,                # [C, H, W] int32 last blended entry
    alphas_ptr,              # [C, H, W] float32 A = sum of weights (DEPTH_GRAD)
    depths_ptr,              # [C, H, W] float32 normalised depth E (DEPTH_GRAD)
    grad_colors_ptr,         # [C, H, W, D] float32 upstream
    grad_alphas_ptr,         # [C, H, W] float32 upstream (ALPHA_GRAD)
    grad_depths_ptr,         # [C, H, W] float32 upstream of E (DEPTH_GRAD)
    out_grad_means2d_ptr,    # [C, N, 2] float32 (atomics)
    out_grad_conics_ptr,     # [C, N, 3]
    out_grad_opacities_ptr,  # [N] or [C, N]
    out_grad_colors_ptr,     # [N, D] or [C, N, D]
    out_grad_depths_ptr,     # [C, N]
    out_grad_abs_ptr,        # [C, N, 2] (ABSGRAD)
    out_grad_densify_ptr,    # [C, N, 2] (DENSIFY_CHANNELS > 0)
    rows_ptr,                # [M, 11 + D] float32 per-intersection sums (DETERMINISTIC)
    out_count_ptr,           # [C, H, W] int32 pairs walked per pixel (COUNT_PAIRS, tests only)
    record_width, n_gaussians, n_channels, channel_offset, color_row_shift, width, height, tiles_x, n_tiles,
    sentinel_row, alpha_cap, row_width,
    TILE_SIZE: tl.constexpr, BATCH: tl.constexpr, PIXELS_PER_THREAD: tl.constexpr, WARPS: tl.constexpr,
    LANES: tl.constexpr, CHANNELS: tl.constexpr, GEOMETRY: tl.constexpr, Q_CHANNELS: tl.constexpr,
    UPSTREAM_CHANNELS: tl.constexpr, HAS_BACKGROUND: tl.constexpr, ALPHA_GRAD: tl.constexpr, DEPTH_GRAD: tl.constexpr,
    DENSIFY_CHANNELS: tl.constexpr, ABSGRAD: tl.constexpr, DETERMINISTIC: tl.constexpr,
    COUNT_PAIRS: tl.constexpr, INT64_OFFSETS: tl.constexpr, PER_CAMERA_OPACITIES: tl.constexpr,
):
    # CHANNELS: colour channels [channel_offset, channel_offset + CHANNELS) that receive gradients here.
    # GEOMETRY: this launch also computes the geometry gradients (the first launch of a chunked backward);
    # then channel_offset = 0 and q spans Q_CHANNELS channels (the first min(Q_CHANNELS, 8) in registers).
    bin_index = tl.load(order_ptr + tl.program_id(0), mask=None, other=None)
    camera, pixel_cx, pixel_cy, inside, image_index = _tile_pixels(
        bin_index, n_tiles, tiles_x, width, height, TILE_SIZE, PIXELS_PER_THREAD, WARPS, LANES, INT64_OFFSETS)
    start = tl.load(ranges_ptr + bin_index * 2, mask=None, other=None)
    end = tl.load(ranges_ptr + bin_index * 2 + 1, mask=None, other=None)
    final = tl.load(final_ptr + image_index, mask=inside, other=1.0)
    last = tl.load(last_ptr + image_index, mask=inside, other=-1)
    # [WARPS, LANES] lane index in the layout of the pixel sums (for the atomics of lane 0).
    lane = tl.max(tl.arange(0, LANES)[None, None, :] + tl.zeros([PIXELS_PER_THREAD, WARPS, LANES], dtype=tl.int32),
                  axis=0)

    upstream_0 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 0,
                                    UPSTREAM_CHANNELS)
    upstream_1 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 1,
                                    UPSTREAM_CHANNELS)
    upstream_2 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 2,
                                    UPSTREAM_CHANNELS)
    upstream_3 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 3,
                                    UPSTREAM_CHANNELS)
    upstream_4 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 4,
                                    UPSTREAM_CHANNELS)
    upstream_5 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 5,
                                    UPSTREAM_CHANNELS)
    upstream_6 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 6,
                                    UPSTREAM_CHANNELS)
    upstream_7 = _upstream_channel(grad_colors_ptr, image_index, inside, n_channels, channel_offset, 7,
                                    UPSTREAM_CHANNELS)

    zero = tl.zeros([PIXELS_PER_THREAD, WARPS, LANES], dtype=tl.float32)
    grad_depth_sum = zero      # g_Z
    alpha_upstream = zero      # g_A'
    if ALPHA_GRAD:
        alpha_upstream = tl.load(grad_alphas_ptr + image_index, mask=inside, other=0.0)
    if DEPTH_GRAD:
        weight_sum = tl.load(alphas_ptr + image_index, mask=inside, other=0.0)
        covered = weight_sum > 0.0
        grad_depth = tl.load(grad_depths_ptr + image_index, mask=inside, other=0.0)
        grad_depth_sum = tl.where(covered, grad_depth / tl.where(covered, weight_sum, 1.0), 0.0)
        alpha_upstream -= grad_depth_sum * tl.load(depths_ptr + image_index, mask=inside, other=0.0)
    background_dot = zero      # g_C . bg over the Q channels
    background_dot_k = zero    # the same over the first DENSIFY_CHANNELS
    if HAS_BACKGROUND and GEOMETRY:
        for channel in tl.static_range(Q_CHANNELS):
            term = _background_dot(backgrounds_ptr, grad_colors_ptr, image_index, inside, camera, n_channels, channel,
                                   upstream_0, upstream_1, upstream_2, upstream_3, upstream_4, upstream_5,
                                   upstream_6, upstream_7)
            background_dot += term
            if channel < DENSIFY_CHANNELS:
                background_dot_k += term
    tail = final * (background_dot - alpha_upstream)     # T_final (g_C . bg - g_A')
    tail_k = final * background_dot_k

    transmittance = final                                 # T after the current entry
    behind = zero                                         # S = sum_{j later} w_j q_j
    behind_k = zero
    count = tl.zeros([PIXELS_PER_THREAD, WARPS, LANES], dtype=tl.int32)
    colors_offset = RECORD_GEOMETRY + channel_offset
    batch_end = tl.minimum(end, tl.max(tl.max(tl.max(last, axis=2), axis=1), axis=0) + 1)
    while batch_end > start:
        batch_start = batch_end - BATCH
        for step in tl.static_range(BATCH):
            entry = batch_end - 1 - step
            row, base = _record_base(record_ptr, ids_ptr, entry, start, end, sentinel_row, record_width,
                                     INT64_OFFSETS)
            valid = entry >= start
            conic_a, conic_b, conic_c, dx, dy, falloff, gaussian_alpha, alpha, visible = _pair_alpha(
                base, pixel_cx, pixel_cy, alpha_cap)
            use = visible & (entry <= last)
            inverse_keep = 1.0 / (1.0 - alpha)
            before = transmittance * inverse_keep             # T_i
            weight = tl.where(use, alpha * before, 0.0)
            transmittance = tl.where(use, before, transmittance)
            if COUNT_PAIRS:
                count += use.to(tl.int32)
            colors = base + colors_offset
            row_offset = entry * row_width
            color_offset = (row - camera * color_row_shift) * n_channels + channel_offset
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_0, lane, valid, rows_ptr,
                            row_offset + channel_offset, 0, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_1, lane, valid, rows_ptr,
                            row_offset + channel_offset, 1, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_2, lane, valid, rows_ptr,
                            row_offset + channel_offset, 2, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_3, lane, valid, rows_ptr,
                            row_offset + channel_offset, 3, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_4, lane, valid, rows_ptr,
                            row_offset + channel_offset, 4, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_5, lane, valid, rows_ptr,
                            row_offset + channel_offset, 5, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_6, lane, valid, rows_ptr,
                            row_offset + channel_offset, 6, CHANNELS, DETERMINISTIC)
            _color_gradient(out_grad_colors_ptr, color_offset, weight, upstream_7, lane, valid, rows_ptr,
                            row_offset + channel_offset, 7, CHANNELS, DETERMINISTIC)
            if GEOMETRY:
                q = zero
                q_k = zero
                for channel in tl.static_range(Q_CHANNELS):
                    q = tl.fma(_upstream(grad_colors_ptr, image_index, inside, n_channels, channel, upstream_0,
                                         upstream_1, upstream_2, upstream_3, upstream_4, upstream_5, upstream_6,
                                         upstream_7),
                               tl.load(colors + channel, mask=None, other=None), q)
                    if channel == DENSIFY_CHANNELS - 1:
                        q_k = q
                if DEPTH_GRAD:
                    depth = tl.load(base + 6, mask=None, other=None)
                    q = tl.fma(grad_depth_sum, depth, q)
                    _emit_gradient(out_grad_depths_ptr, row, _pixel_sum(weight * grad_depth_sum, DETERMINISTIC),
                                   lane, valid, rows_ptr, row_offset, ROW_DEPTH, DETERMINISTIC)
                grad_alpha = before * q - (behind + tail) * inverse_keep
                behind = tl.fma(weight, q, behind)
                below_cap = use & (gaussian_alpha < alpha_cap)
                # s = o G g_alpha = -g_sigma. Per pixel only s, s dx, s dy and their products with d are
                # formed; the conic coefficients and 1/o multiply the tile sums once per Gaussian:
                # g_mean = -(a S_dx + b S_dy, b S_dx + c S_dy), g_conic = -(S_dxdx / 2, S_dxdy, S_dydy / 2),
                # g_o = S / o (sums over the tile's pixels).
                strength = tl.where(below_cap, gaussian_alpha * grad_alpha, 0.0)
                strength_x = strength * dx
                strength_y = strength * dy
                sum_s = _pixel_sum(strength, DETERMINISTIC)
                sum_x = _pixel_sum(strength_x, DETERMINISTIC)
                sum_y = _pixel_sum(strength_y, DETERMINISTIC)
                sum_xx = _pixel_sum(strength_x * dx, DETERMINISTIC)
                sum_xy = _pixel_sum(strength_x * dy, DETERMINISTIC)
                sum_yy = _pixel_sum(strength_y * dy, DETERMINISTIC)
                opacity = tl.load(base + 5, mask=None, other=None)
                grad_opacity = tl.where(opacity > 0.0, sum_s / tl.where(opacity > 0.0, opacity, 1.0), 0.0)
                # A constexpr, not a row shift argument: the shift costs the classic D = 3 kernel 23 registers
                # (196 -> 219, 10 -> 9 CTAs/SM; sm_90, Triton 3.9).
                if PER_CAMERA_OPACITIES:
                    opacity_row = row
                else:
                    opacity_row = row - camera * n_gaussians
                _emit_gradient(out_grad_opacities_ptr, opacity_row, grad_opacity, lane, valid,
                               rows_ptr, row_offset, ROW_OPACITY, DETERMINISTIC)
                _emit_gradient(out_grad_means2d_ptr, row * 2, -tl.fma(conic_a, sum_x, conic_b * sum_y), lane, valid,
                               rows_ptr, row_offset, ROW_MEANS2D, DETERMINISTIC)
                _emit_gradient(out_grad_means2d_ptr, row * 2 + 1, -tl.fma(conic_b, sum_x, conic_c * sum_y), lane,
                               valid, rows_ptr, row_offset, ROW_MEANS2D + 1, DETERMINISTIC)
                _emit_gradient(out_grad_conics_ptr, row * 3, -0.5 * sum_xx, lane, valid, rows_ptr, row_offset,
                               ROW_CONICS, DETERMINISTIC)
                _emit_gradient(out_grad_conics_ptr, row * 3 + 1, -sum_xy, lane, valid, rows_ptr, row_offset,
                               ROW_CONICS + 1, DETERMINISTIC)
                _emit_gradient(out_grad_conics_ptr, row * 3 + 2, -0.5 * sum_yy, lane, valid, rows_ptr, row_offset,
                               ROW_CONICS + 2, DETERMINISTIC)
                if ABSGRAD:
                    pixel_grad_x = tl.abs(tl.fma(conic_a, strength_x, conic_b * strength_y))
                    pixel_grad_y = tl.abs(tl.fma(conic_b, strength_x, conic_c * strength_y))
                    _emit_gradient(out_grad_abs_ptr, row * 2, _pixel_sum(pixel_grad_x, DETERMINISTIC), lane, valid,
                                   rows_ptr, row_offset, ROW_ABSGRAD, DETERMINISTIC)
                    _emit_gradient(out_grad_abs_ptr, row * 2 + 1, _pixel_sum(pixel_grad_y, DETERMINISTIC), lane,
                                   valid, rows_ptr, row_offset, ROW_ABSGRAD + 1, DETERMINISTIC)
                if DENSIFY_CHANNELS > 0:
                    grad_alpha_k = before * q_k - (behind_k + tail_k) * inverse_keep
                    behind_k = tl.fma(weight, q_k, behind_k)
                    strength_k = tl.where(below_cap, gaussian_alpha * grad_alpha_k, 0.0)
                    sum_x_k = _pixel_sum(strength_k * dx, DETERMINISTIC)
                    sum_y_k = _pixel_sum(strength_k * dy, DETERMINISTIC)
                    _emit_gradient(out_grad_densify_ptr, row * 2, -tl.fma(conic_a, sum_x_k, conic_b * sum_y_k), lane,
                                   valid, rows_ptr, row_offset, ROW_DENSIFY, DETERMINISTIC)
                    _emit_gradient(out_grad_densify_ptr, row * 2 + 1, -tl.fma(conic_b, sum_x_k, conic_c * sum_y_k),
                                   lane, valid, rows_ptr, row_offset, ROW_DENSIFY + 1, DETERMINISTIC)
        batch_end = batch_start
    if COUNT_PAIRS:
        tl.store(out_count_ptr + image_index, count, mask=inside)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
class _Prepared:
    """Per-call inputs of both kernels: the packed records, padded ids, LPT order and size flags."""

    def __init__(self, means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings):
        n_cameras, n = means2d.shape[:2]
        self.n_cameras, self.n_gaussians, self.n_channels = n_cameras, n, colors.shape[-1]
        self.shared_colors = colors.dim() == 2
        self.shared_opacities = opacities.dim() == 1
        self.record_width = RECORD_GEOMETRY.value + self.n_channels
        self.sentinel_row = n_cameras * n
        device = means2d.device
        # One cat builds the record; the sentinel row (all zeros: opacity 0 is never blended) follows.
        record = _alloc.empty(n_cameras * n + 1, self.record_width, device=device, dtype=torch.float32)
        torch.cat([means2d, conics, opacities.expand(n_cameras, n)[..., None], depths[..., None],
                   colors.expand(n_cameras, n, self.n_channels)], dim=-1,
                  out=record[:-1].view(n_cameras, n, self.record_width))
        record[-1].zero_()
        self.record = record
        self.batch = max(FORWARD_BATCH, BACKWARD_BATCH)
        self.ids_padded = F.pad(sorted_ids, (self.batch, self.batch), value=self.sentinel_row)
        self.ids = self.ids_padded[self.batch:]
        self.ranges = tile_ranges
        lengths = tile_ranges[:, 1] - tile_ranges[:, 0]
        self.order = torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
        pixels = n_cameras * settings.height * settings.width
        self.int64_offsets = (record.numel() > INT32_LIMIT or pixels * max(self.n_channels, 1) > INT32_LIMIT
                              or sorted_ids.numel() * (ROW_COLORS.value + self.n_channels) > INT32_LIMIT)


def _check_contract(means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids,
                    settings: RenderSettings):
    """Shapes and dtypes of the compositor contract (cheap: metadata only, no device reads)."""
    if settings.tile_size not in (4, 8, 16, 32):
        raise ValueError(f"settings.tile_size: the triton compositor needs 4, 8, 16 or 32, got {settings.tile_size}")
    if means2d.dim() != 3 or means2d.shape[-1] != 2:
        raise ValueError(f"means2d: expected [C, N, 2], got {tuple(means2d.shape)}")
    n_cameras, n = means2d.shape[:2]
    if tuple(conics.shape) != (n_cameras, n, 3):
        raise ValueError(f"conics: expected {(n_cameras, n, 3)}, got {tuple(conics.shape)}")
    if tuple(opacities.shape) not in ((n,), (n_cameras, n)):
        raise ValueError(f"opacities: expected ({n},) or {(n_cameras, n)}, got {tuple(opacities.shape)}")
    if tuple(depths.shape) != (n_cameras, n):
        raise ValueError(f"depths: expected {(n_cameras, n)}, got {tuple(depths.shape)}")
    if colors.dim() not in (2, 3) or colors.shape[-2] != n or colors.shape[-1] < 1 or (
            colors.dim() == 3 and colors.shape[0] != n_cameras):
        raise ValueError(f"colors: expected [N, D] or [C, N, D] with N = {n}, C = {n_cameras}, D >= 1, "
                         f"got {tuple(colors.shape)}")
    if backgrounds is not None and tuple(backgrounds.shape) != (n_cameras, colors.shape[-1]):
        raise ValueError(f"backgrounds: expected {(n_cameras, colors.shape[-1])}, got {tuple(backgrounds.shape)}")
    if tile_ranges.dtype != torch.int32 or tuple(tile_ranges.shape) != (n_cameras * settings.n_tiles, 2):
        raise ValueError(f"tile_ranges: expected int32 {(n_cameras * settings.n_tiles, 2)}, got "
                         f"{tile_ranges.dtype} {tuple(tile_ranges.shape)}")
    if sorted_ids.dtype != torch.int32 or sorted_ids.dim() != 1:
        raise ValueError(f"sorted_ids: expected int32 [M], got {sorted_ids.dtype} {tuple(sorted_ids.shape)}")


def _channel_chunks(n_channels: int) -> list[tuple[int, int]]:
    """(offset, count) of each launch's colour channels: chunks of CHANNEL_CHUNK."""
    return [(offset, min(CHANNEL_CHUNK, n_channels - offset)) for offset in range(0, n_channels, CHANNEL_CHUNK)]


def composite_forward(prepared: _Prepared, backgrounds, settings: RenderSettings, outputs, count_pairs=False):
    """Launch the forward. Returns (colours [C,H,W,D] or None, weight sums A [C,H,W] or None, normalised
    depths [C,H,W] or None, medians [C,H,W] or None, CompositeState, pair counts [C,H,W] int32 or None)."""
    device = prepared.record.device
    c, h, w, d = prepared.n_cameras, settings.height, settings.width, prepared.n_channels
    plane = dict(device=device, dtype=torch.float32)
    want_alphas = "alphas" in outputs or "depths" in outputs    # the depth normalisation needs A
    out_colors = _alloc.empty(c, h, w, d, **plane) if "colors" in outputs else None
    weight_sums = _alloc.empty(c, h, w, **plane) if want_alphas else None
    depths = _alloc.empty(c, h, w, **plane) if "depths" in outputs else None
    medians = _alloc.empty(c, h, w, **plane) if "median_depths" in outputs else None
    final = _alloc.empty(c, h, w, **plane)
    last = _alloc.empty(c, h, w, device=device, dtype=torch.int32)
    counts = _alloc.empty(c, h, w, device=device, dtype=torch.int32) if count_pairs else None
    layout = pixel_layout(settings.tile_size, backward=False)
    chunks = _channel_chunks(d) if out_colors is not None else [(0, 0)]
    dummy = final
    for index, (offset, channels) in enumerate(chunks):
        first = index == 0
        _composite_forward_kernel[(c * settings.n_tiles,)](
            prepared.record, prepared.ids, prepared.ranges, prepared.order,
            backgrounds if backgrounds is not None else dummy,
            out_colors if out_colors is not None else dummy, weight_sums if weight_sums is not None else dummy,
            depths if depths is not None else dummy, medians if medians is not None else dummy, final, last,
            counts if counts is not None else last,
            prepared.record_width, d, offset, w, h, settings.tiles_x, settings.n_tiles, prepared.sentinel_row,
            settings.alpha_cap,
            TILE_SIZE=settings.tile_size, BATCH=FORWARD_BATCH, PIXELS_PER_THREAD=layout.pixels_per_thread,
            WARPS=layout.num_warps, LANES=layout.lanes, CHANNELS=channels,
            HAS_BACKGROUND=backgrounds is not None, ALPHAS=first and want_alphas,
            DEPTHS=first and depths is not None, MEDIAN=first and medians is not None, STATE=first,
            COUNT_PAIRS=first and count_pairs, INT64_OFFSETS=prepared.int64_offsets, num_warps=layout.num_warps)
    return out_colors, weight_sums, depths, medians, CompositeState(final, last), counts


def composite_backward(prepared: _Prepared, backgrounds, state: CompositeState, weight_sums, depths, grad_colors,
                       grad_alphas, grad_depths, settings: RenderSettings, *, absgrad: bool,
                       densify_channels: int | None, color_grad_channels: int | None, deterministic: bool,
                       count_pairs: bool = False):
    """Launch the backward. `grad_*` are upstream gradients or None (absent terms are compiled out).
    Returns gradients (means2d [C,N,2], conics [C,N,3], opacities like the input, colours like it, depths [C,N],
    absgrad [C,N,2] or None, densify [C,N,2] or None, pair counts [C,H,W] int32 or None)."""
    c, n, d = prepared.n_cameras, prepared.n_gaussians, prepared.n_channels
    device = prepared.record.device
    zeros = dict(device=device, dtype=torch.float32)
    grad_means2d = _alloc.zeros(c, n, 2, **zeros)
    grad_conics = _alloc.zeros(c, n, 3, **zeros)
    grad_opacities = _alloc.zeros(n if prepared.shared_opacities else (c, n), **zeros)
    grad_colors_in = _alloc.zeros((n, d) if prepared.shared_colors else (c, n, d), **zeros)
    grad_depths_in = _alloc.zeros(c, n, **zeros)
    grad_abs = _alloc.zeros(c, n, 2, **zeros) if absgrad else None
    grad_densify = _alloc.zeros(c, n, 2, **zeros) if densify_channels else None
    counts = _alloc.empty_like(state.last_index) if count_pairs else None
    row_width = ROW_COLORS.value + d
    n_entries = prepared.ids_padded.numel() - 2 * prepared.batch
    rows = _alloc.zeros(n_entries if deterministic else 0, row_width, **zeros)
    color_k = d if color_grad_channels is None else min(color_grad_channels, d)
    has_colors = grad_colors is not None
    densify_k = min(densify_channels or 0, d) if has_colors else 0
    if has_colors:
        grad_colors = grad_colors.contiguous()
    launches = [(0, min(CHANNEL_CHUNK, color_k) if has_colors else 0, True)]
    if has_colors:
        launches += [(offset, min(count, color_k - offset), False)
                     for offset, count in _channel_chunks(d)[1:] if offset < color_k]
    dummy = state.final_transmittance
    for offset, channels, geometry in launches:
        q_channels = d if (geometry and has_colors) else 0
        layout = pixel_layout(settings.tile_size, backward=True, wide_geometry=q_channels > CHANNEL_CHUNK)
        _composite_backward_kernel[(c * settings.n_tiles,)](
            prepared.record, prepared.ids, prepared.ranges, prepared.order,
            backgrounds if backgrounds is not None else dummy, state.final_transmittance, state.last_index,
            weight_sums if weight_sums is not None else dummy, depths if depths is not None else dummy,
            grad_colors if has_colors else dummy, grad_alphas if grad_alphas is not None else dummy,
            grad_depths if grad_depths is not None else dummy,
            grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths_in,
            grad_abs if grad_abs is not None else grad_means2d,
            grad_densify if grad_densify is not None else grad_means2d, rows,
            counts if counts is not None else state.last_index,
            prepared.record_width, n, d, offset, n if prepared.shared_colors else 0, settings.width,
            settings.height, settings.tiles_x, settings.n_tiles, prepared.sentinel_row, settings.alpha_cap,
            row_width,
            TILE_SIZE=settings.tile_size, BATCH=BACKWARD_BATCH, PIXELS_PER_THREAD=layout.pixels_per_thread,
            WARPS=layout.num_warps, LANES=layout.lanes, CHANNELS=channels, GEOMETRY=geometry,
            Q_CHANNELS=q_channels, UPSTREAM_CHANNELS=max(channels, min(q_channels, CHANNEL_CHUNK)),
            HAS_BACKGROUND=backgrounds is not None and has_colors, ALPHA_GRAD=geometry and grad_alphas is not None,
            DEPTH_GRAD=geometry and grad_depths is not None, DENSIFY_CHANNELS=densify_k if geometry else 0,
            ABSGRAD=geometry and absgrad, DETERMINISTIC=deterministic, COUNT_PAIRS=geometry and count_pairs,
            INT64_OFFSETS=prepared.int64_offsets, PER_CAMERA_OPACITIES=not prepared.shared_opacities,
            num_warps=layout.num_warps)
    if deterministic and n_entries:
        ids = prepared.ids[:n_entries].to(torch.int64)
        _reduce_rows(rows, ids, n, d, not prepared.shared_colors, not prepared.shared_opacities, grad_means2d,
                     grad_conics, grad_opacities,
                     grad_colors_in, grad_depths_in, grad_abs, grad_densify)
    return grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths_in, grad_abs, grad_densify, counts


def _reduce_rows(rows, gaussian_rows, n, n_channels, per_camera_colors, per_camera_opacities, grad_means2d,
                 grad_conics, grad_opacities, grad_colors, grad_depths, grad_abs, grad_densify):
    """Fixed-order reduction of per-intersection rows into per-Gaussian gradients (deterministic):
    a stable sort by Gaussian, float64 prefix sums, differences at segment ends. Costs one
    [M, 11 + D] float32 buffer and a sort of M int64 keys."""
    from ..reference.compositing import scatter_add

    def add(target, values, index):
        scatter_add(target, index, values, deterministic=True)

    def columns(first, count):
        return rows[:, first.value:first.value + count]

    add(grad_means2d.view(-1, 2), columns(ROW_MEANS2D, 2), gaussian_rows)
    add(grad_conics.view(-1, 3), columns(ROW_CONICS, 3), gaussian_rows)
    opacity_index = gaussian_rows if per_camera_opacities else gaussian_rows % n
    add(grad_opacities.view(-1), rows[:, ROW_OPACITY.value], opacity_index)
    add(grad_depths.view(-1), rows[:, ROW_DEPTH.value], gaussian_rows)
    color_index = gaussian_rows if per_camera_colors else gaussian_rows % n
    add(grad_colors.view(-1, n_channels), columns(ROW_COLORS, n_channels), color_index)
    if grad_abs is not None:
        add(grad_abs.view(-1, 2), columns(ROW_ABSGRAD, 2), gaussian_rows)
    if grad_densify is not None:
        add(grad_densify.view(-1, 2), columns(ROW_DENSIFY, 2), gaussian_rows)


@dataclass(frozen=True)
class CompositeOptions:
    """Non-tensor options of one `composite` call (held by its `CompositeCall`)."""

    settings: RenderSettings
    outputs: tuple[str, ...] = ALL_OUTPUTS
    absgrad: bool = False
    densify_channels: int | None = None
    color_grad_channels: int | None = None
    deterministic: bool = False


@dataclass(frozen=True, eq=False)
class CompositeCall:
    """Everything of one `composite` call that receives no gradient: the int32 tile lists, the tensors
    backward adds into (densify_grad [C, N, 2], the means2d whose .absgrad it sets) and the options.
    One autograd argument, so backward returns (*grads, None)."""

    tile_ranges: torch.Tensor
    sorted_ids: torch.Tensor
    densify_grad: torch.Tensor | None
    means2d_for_absgrad: torch.Tensor | None
    options: CompositeOptions


class CompositeFunction(torch.autograd.Function):
    """Autograd node of compositing; backward is `_composite_backward_kernel`."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, call: CompositeCall):
        options = call.options
        tile_ranges, sorted_ids, densify_grad, means2d_for_absgrad = (
            call.tile_ranges, call.sorted_ids, call.densify_grad, call.means2d_for_absgrad)
        settings = options.settings
        prepared = _Prepared(means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings)
        ctx.set_materialize_grads(False)
        out_colors, weight_sums, depths_out, medians, state, _ = composite_forward(
            prepared, backgrounds, settings, options.outputs)
        ctx.save_for_backward(backgrounds, state.final_transmittance, state.last_index, weight_sums, depths_out)
        ctx.prepared, ctx.options = prepared, options
        ctx.densify_grad, ctx.means2d_for_absgrad = densify_grad, means2d_for_absgrad
        alphas = weight_sums[..., None] if "alphas" in options.outputs else None
        if medians is not None:
            medians = medians[..., None]
            ctx.mark_non_differentiable(medians)
        return out_colors, alphas, None if depths_out is None else depths_out[..., None], medians

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depths, _grad_medians):
        with backward_stage("compositing_backward"):
            backgrounds, final, last, weight_sums, depths_out = ctx.saved_tensors
            options, prepared = ctx.options, ctx.prepared
            (grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths_in, grad_abs, grad_densify,
             _) = composite_backward(
                prepared, backgrounds, CompositeState(final, last), weight_sums, depths_out, grad_colors,
                None if grad_alphas is None else grad_alphas[..., 0].contiguous(),
                None if grad_depths is None else grad_depths[..., 0].contiguous(), options.settings,
                absgrad=options.absgrad, densify_channels=options.densify_channels,
                color_grad_channels=options.color_grad_channels, deterministic=options.deterministic)
            grad_backgrounds = None
            if backgrounds is not None and ctx.needs_input_grad[5] and grad_colors is not None:
                grad_backgrounds = (final[..., None] * grad_colors).reshape(prepared.n_cameras, -1,
                                                                            prepared.n_channels).sum(1)
            if grad_abs is not None and ctx.means2d_for_absgrad is not None:
                previous = getattr(ctx.means2d_for_absgrad, "absgrad", None)
                ctx.means2d_for_absgrad.absgrad = grad_abs if previous is None else previous + grad_abs
            if grad_densify is not None and ctx.densify_grad is not None:
                ctx.densify_grad.add_(grad_densify.to(ctx.densify_grad.dtype))
            return grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths_in, grad_backgrounds, None


def composite(means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
              depths: torch.Tensor, backgrounds: torch.Tensor | None, tile_ranges: torch.Tensor,
              sorted_ids: torch.Tensor, settings: RenderSettings, *, outputs=ALL_OUTPUTS, absgrad: bool = False,
              densify_channels: int | None = None, densify_grad: torch.Tensor | None = None,
              color_grad_channels: int | None = None, deterministic: bool = False,
              means2d_for_absgrad: torch.Tensor | None = None) -> CompositeOutput:
    """Triton compositor (float32) on binned and sorted tiles; the contract is in the module docstring.

    Args:
        means2d: [C, N, 2].  conics: [C, N, 3].  opacities: [N].  colors: [N, D] or [C, N, D].
        depths: [C, N].  backgrounds: [C, D] or None.  tile_ranges: [C * n_tiles, 2] int32.
        sorted_ids: [M] int32.
        outputs: which of "colors", "alphas", "depths", "median_depths" to compute (others are None).
        color_grad_channels: only colors[..., :k] receive gradients (None: all).
    Returns:
        CompositeOutput(colors [C,H,W,D], alphas [C,H,W,1], depths [C,H,W,1] normalised, median_depths
        [C,H,W,1] detached); a field not in `outputs` is None.
    """
    outputs = tuple(outputs)
    unknown = [name for name in outputs if name not in ALL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: expected names from {ALL_OUTPUTS}, got {unknown}")
    _check_contract(means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids, settings)
    if color_grad_channels is not None and color_grad_channels < 0:
        raise ValueError(f"color_grad_channels: expected None or >= 0, got {color_grad_channels}")
    options = CompositeOptions(settings, outputs, absgrad, densify_channels, color_grad_channels, deterministic)
    tensors = [means2d, conics, opacities, colors, depths, backgrounds]
    tensors = [None if t is None else t.float().contiguous() for t in tensors]
    call = CompositeCall(tile_ranges.contiguous(), sorted_ids.contiguous(), densify_grad, means2d_for_absgrad,
                         options)
    result = CompositeFunction.apply(*tensors, call)
    return CompositeOutput(*result)


# --------------------------------------------------------------------------------------------------
# Compiled variants (collected by `tritonsplat.aot`): what the launchers above can launch.
# --------------------------------------------------------------------------------------------------
_INT32_POINTERS = {"ids_ptr", "ranges_ptr", "order_ptr", "out_last_ptr", "last_ptr", "out_count_ptr"}
_FLOAT_SCALARS = {"alpha_cap"}


def _aot_signature(kernel) -> dict:
    """Triton argument types of `kernel` from its Python signature (pointers fp32 unless int32 above)."""
    import inspect

    function = getattr(kernel, "fn", kernel)
    signature = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.annotation is tl.constexpr or "constexpr" in str(parameter.annotation):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in _INT32_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return signature


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The compositing kernel configurations the launchers produce, with their loop metadata: every
    channel count D = 1..8 and the D > 8 chunk launches at 16-pixel tiles, the output / gradient
    options, and D = 3 at the other tile sizes; `exhaustive` adds, at every other tile size the pipeline
    accepts (4, 8, 32), the fewest and most channels per launch (D = 1, 8) and the D > 8 launches.

    Each entry: name, kernel (function name), signature, constexprs, num_warps, and for the per-pair
    figures batch (Gaussians per main-loop iteration), pixels_per_thread and tile_pixels."""
    variants = []

    def forward(name, tile_size, channels, *, alphas=True, depths=True, median=True, state=True, int64=False):
        layout = pixel_layout(tile_size, backward=False)
        variants.append(dict(
            name=name, kernel="_composite_forward_kernel", signature=_aot_signature(_composite_forward_kernel),
            constexprs=dict(TILE_SIZE=tile_size, BATCH=FORWARD_BATCH, PIXELS_PER_THREAD=layout.pixels_per_thread,
                            WARPS=layout.num_warps, LANES=layout.lanes, CHANNELS=channels, HAS_BACKGROUND=True,
                            ALPHAS=alphas, DEPTHS=depths, MEDIAN=median, STATE=state, COUNT_PAIRS=False,
                            INT64_OFFSETS=int64),
            num_warps=layout.num_warps, batch=FORWARD_BATCH, pixels_per_thread=layout.pixels_per_thread,
            tile_pixels=tile_size * tile_size))

    def backward(name, tile_size, channels, q_channels, *, geometry=True, alpha=True, depth=True, densify=0,
                 absgrad=False, deterministic=False, int64=False, per_camera_opacities=False):
        layout = pixel_layout(tile_size, backward=True, wide_geometry=q_channels > CHANNEL_CHUNK)
        variants.append(dict(
            name=name, kernel="_composite_backward_kernel", signature=_aot_signature(_composite_backward_kernel),
            constexprs=dict(TILE_SIZE=tile_size, BATCH=BACKWARD_BATCH, PIXELS_PER_THREAD=layout.pixels_per_thread,
                            WARPS=layout.num_warps, LANES=layout.lanes, CHANNELS=channels, GEOMETRY=geometry,
                            Q_CHANNELS=q_channels, UPSTREAM_CHANNELS=max(channels, min(q_channels, CHANNEL_CHUNK)),
                            HAS_BACKGROUND=True, ALPHA_GRAD=alpha, DEPTH_GRAD=depth, DENSIFY_CHANNELS=densify,
                            ABSGRAD=absgrad, DETERMINISTIC=deterministic, COUNT_PAIRS=False, INT64_OFFSETS=int64,
                            PER_CAMERA_OPACITIES=per_camera_opacities),
            num_warps=layout.num_warps, batch=BACKWARD_BATCH, pixels_per_thread=layout.pixels_per_thread,
            tile_pixels=tile_size * tile_size))

    for d in range(1, CHANNEL_CHUNK + 1):
        forward(f"composite_forward[D={d}]", 16, d)
        backward(f"composite_backward[D={d}]", 16, d, d)
    forward("composite_forward[D=3,colors]", 16, 3, alphas=False, depths=False, median=False)
    forward("composite_forward[D>8,chunk]", 16, CHANNEL_CHUNK, alphas=False, depths=False, median=False,
            state=False)
    backward("composite_backward[D=3,colors]", 16, 3, 3, alpha=False, depth=False)
    backward("composite_backward[D=6,color_grad_channels=3]", 16, 3, 6, alpha=False, depth=False)
    backward("composite_backward[D=3,absgrad+densify]", 16, 3, 3, densify=2, absgrad=True)
    backward("composite_backward[D=3,deterministic]", 16, 3, 3, deterministic=True)
    backward("composite_backward[D=3,antialiased]", 16, 3, 3, per_camera_opacities=True)
    backward("composite_backward[D=33,geometry]", 16, CHANNEL_CHUNK, 33, densify=3)
    backward("composite_backward[D>8,chunk]", 16, CHANNEL_CHUNK, 0, geometry=False, alpha=False, depth=False)
    forward("composite_forward[D=3,int64_offsets]", 16, 3, int64=True)
    backward("composite_backward[D=3,int64_offsets]", 16, 3, 3, int64=True)
    for tile_size in (4, 8, 32):
        forward(f"composite_forward[D=3,tile={tile_size}]", tile_size, 3)
        backward(f"composite_backward[D=3,tile={tile_size}]", tile_size, 3, 3)
    if exhaustive:
        # The tile size sets the pixel layout (pixels per thread, warps, lanes); the channel count only adds
        # unrolled per-channel accumulators to the same loop, so per tile size the fewest (D = 1) and most
        # (D = 8, and the D > 8 launches) channels bound every D in between, as D = 1..8 at 16 px shows.
        for tile_size in (32, 8, 4):   # 32 first: the most pixels per thread in the forward
            for d in (1, CHANNEL_CHUNK):
                forward(f"composite_forward[D={d},tile={tile_size}]", tile_size, d)
                backward(f"composite_backward[D={d},tile={tile_size}]", tile_size, d, d)
            forward(f"composite_forward[D>8,chunk,tile={tile_size}]", tile_size, CHANNEL_CHUNK, alphas=False,
                    depths=False, median=False, state=False)
            backward(f"composite_backward[D=33,geometry,tile={tile_size}]", tile_size, CHANNEL_CHUNK, 33, densify=3)
            backward(f"composite_backward[D>8,chunk,tile={tile_size}]", tile_size, CHANNEL_CHUNK, 0,
                     geometry=False, alpha=False, depth=False)
    return variants
