"""Front-to-back alpha compositing per tile in pure PyTorch, and its back-to-front backward.

Torch twin of `tritonsplat.ops.compositing` with the same contract (`tritonsplat.types`): the same
tile ranges and depth-sorted ids, the same blending rule, the same saved state (final
transmittance and the index of the last blended entry per pixel).

Layout: tiles of P = tile_size^2 pixels. A batch of tiles is walked in chunks of K sorted entries at
once, as [active tiles, K, P] tensors. Within a chunk, with keep_i = 1 - alpha_i where the entry
is used (alpha >= 1/255) and 1 elsewhere,

    T_after_i = T * prod_{j <= i} keep_j,   blended_i = used_i and T_after_i >= 1e-4

which is the sequential rule of Kerbl et al. 2023 (Eq. 3 with the original's stop): T is
non-increasing, so the entries that pass are a prefix of the used ones, and the first that fails
stops the pixel (its T is then carried as 0, so no later entry can blend). Each pixel's T is carried
from chunk to chunk; a tile leaves the active set once all of its pixels have stopped or its list
ends, so the work is proportional to the entries actually walked, as on the GPU.

Backward walks each tile's chunks back to front from the saved state: T_i = T_after_chunk / R_i
with R_i the reverse inclusive product of keep over the chunk, alpha recomputed from the inputs.

Memory: tiles are processed in batches (`tile_batch`), so the temporaries are O(tile_batch x K x P)
whatever the image size; the outputs and saved state are O(pixels), nothing is O(pixels x Gaussians).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import constants, types
from ..profiling import backward_stage
from ..settings import RenderSettings
from ..types import ALL_OUTPUTS, CompositeState

# Entries per chunk (K), sub-tiles per batch and sub-tile side (S), float32 compute for float32 inputs.
# Measured on a 2-core CPU (AMD EPYC, torch 2.13, 1 thread), forward + backward of the basketball
# early-fit scene (8,441 Gaussians, 160x90, D = 6; 30,893 sub-tile entries, 96 % walked): idle machine,
# S = 8, K = 32, batch 128: 0.28 s; batch 512: 0.37 s (the [A, K, P] temporaries leave the L2 cache);
# K = 64, batch 512: 0.35 s; K = 16, batch 512: 0.32 s; S = 4, batch 512: 0.35 s. At load average 10-12:
# S = 8, K = 32, batch 128: 1.20 s; S = 4: 1.35-1.49 s; K = 16: 1.96 s; K = 64: 2.0 s; S = 16: 2.33 s.
DEFAULT_CHUNK_ENTRIES = 32
DEFAULT_TILE_BATCH = 128
DEFAULT_SUB_TILE = 8

LOG_TRANSMITTANCE_STOP = math.log(constants.TRANSMITTANCE_STOP)


def scatter_add(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
                deterministic: bool) -> None:
    """target[index] += values along dim 0; with `deterministic` on CUDA, a fixed-order reduction."""
    if not (deterministic and target.is_cuda):
        target.index_add_(0, index, values.to(target.dtype))
        return
    order = torch.argsort(index, stable=True)
    index, values = index[order], values[order].to(torch.float64)
    unique, counts = torch.unique_consecutive(index, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    prefix = torch.cumsum(values, 0)
    sums = prefix[ends]
    sums[1:] -= prefix[ends[:-1]]
    target.index_add_(0, unique, sums.to(target.dtype))  # unique indices: no race


class _TileGrid(NamedTuple):
    """Pixel geometry shared by every tile: local pixel centres and the tile origins."""

    local_x: torch.Tensor   # [P] pixel centre x relative to the tile origin (i + 0.5)
    local_y: torch.Tensor   # [P]
    basis: torch.Tensor     # [P, 6] float64 (1, u, v, u^2, u v, v^2) of the centres (for reductions)


def _tile_grid(tile_size: int, device, dtype) -> _TileGrid:
    p = torch.arange(tile_size * tile_size, device=device)
    u = (p % tile_size).to(torch.float64) + 0.5
    v = torch.div(p, tile_size, rounding_mode="floor").to(torch.float64) + 0.5
    basis = torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v], dim=-1)
    return _TileGrid(u.to(dtype), v.to(dtype), basis)


class _Entries(NamedTuple):
    """Per-entry data of one chunk, [A, K] (padding: the sentinel record)."""

    index: torch.Tensor      # [A, K] int64 position in sorted_ids (increasing along K; -1 padding)
    mean_x: torch.Tensor     # [A, K] relative to the tile origin
    mean_y: torch.Tensor
    half_a: torch.Tensor     # a / 2
    conic_b: torch.Tensor
    half_c: torch.Tensor     # c / 2
    opacity: torch.Tensor    # 0 for padding, so the entry is never used


class _Inputs(NamedTuple):
    """Flat views of the compositor inputs."""

    means: torch.Tensor       # [C * N, 2]
    conics: torch.Tensor      # [C * N, 3]
    opacities: torch.Tensor   # [N]
    colors: torch.Tensor      # [N, D] or [C * N, D]
    depths: torch.Tensor      # [C * N]
    n_gaussians: int
    shared_colors: bool       # colours [N, D] shared by every camera


def _flat_inputs(means2d, conics, opacities, colors, depths) -> _Inputs:
    n = means2d.shape[1]
    shared = colors.dim() == 2
    return _Inputs(means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1),
                   colors if shared else colors.reshape(-1, colors.shape[-1]), depths.reshape(-1), n, shared)


class _Records(NamedTuple):
    """Every sub-tile list entry's data in list order, gathered once per render, plus a sentinel
    (row E: opacity 0, so padding never blends and needs no mask)."""

    values: torch.Tensor   # [E + 1, 6 + D + 2] mean_x, mean_y (relative to the sub-tile origin), a/2, b, c/2,
                           # opacity, colour [D], depth, 1
    index: torch.Tensor    # [E + 1] int64 position in sorted_ids (-1: sentinel)
    row: torch.Tensor      # [E + 1] int64 flat row c * N + g (0: sentinel)


RECORD_COLORS = 6   # first colour column of _Records.values


@torch.no_grad()
def _records(flat: _Inputs, sorted_ids, layout) -> _Records:
    device, dtype = flat.means.device, flat.means.dtype
    sizes = layout.end - layout.start
    bin_of_entry = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)
    row = sorted_ids[layout.entry_index].to(torch.int64)
    means, conics = flat.means[row], flat.conics[row]
    colors = _entry_colors(flat, row)
    columns = [means[:, 0] - layout.origin_x[bin_of_entry], means[:, 1] - layout.origin_y[bin_of_entry],
               0.5 * conics[:, 0], conics[:, 1], 0.5 * conics[:, 2], flat.opacities[row % flat.n_gaussians]]
    values = torch.cat([torch.stack(columns, dim=1), colors, flat.depths[row][:, None],
                        torch.ones_like(row, dtype=dtype)[:, None]], dim=1)
    sentinel = torch.zeros(1, values.shape[1], device=device, dtype=dtype)
    return _Records(torch.cat([values, sentinel]),
                    torch.cat([layout.entry_index, layout.entry_index.new_full((1,), -1)]),
                    torch.cat([row, row.new_zeros(1)]))


def _chunk_positions(start, end, chunk, k_entries: int, sentinel: int) -> torch.Tensor:
    """Positions [A, K] in the records of entries [start + chunk K, ... + K) of each active list (sentinel past end)."""
    local = (start + chunk * k_entries)[:, None] + torch.arange(k_entries, device=start.device)[None, :]
    return torch.where(local < end[:, None], local, sentinel)


def _entries(records: _Records, positions) -> tuple[_Entries, torch.Tensor]:
    """The chunk's entries and their record values [A, K, 6 + D + 2]."""
    values = records.values[positions]
    fields = values[..., :RECORD_COLORS].unbind(-1)
    return _Entries(records.index[positions], *fields), values


class _ChunkAlpha(NamedTuple):
    dx: torch.Tensor              # [A, K, P] mean - pixel centre
    dy: torch.Tensor
    gaussian_alpha: torch.Tensor  # o G before the cap
    alpha: torch.Tensor           # min(cap, o G), 0 where the entry is not used (alpha < 1/255, sigma < 0)


def _chunk_alpha(entries: _Entries, grid: _TileGrid, alpha_cap: float) -> _ChunkAlpha:
    """alpha of every (entry, pixel) of the chunk: [A, K, P]."""
    dx = entries.mean_x[..., None] - grid.local_x
    dy = entries.mean_y[..., None] - grid.local_y
    sigma = entries.half_a[..., None] * dx * dx
    sigma.addcmul_(entries.half_c[..., None] * dy, dy)
    sigma.addcmul_(entries.conic_b[..., None] * dx, dy)
    gaussian_alpha = torch.exp(-sigma).mul_(entries.opacity[..., None])
    alpha = torch.clamp_max(gaussian_alpha, alpha_cap)
    used = (alpha >= constants.MIN_ALPHA) & (sigma >= 0)
    return _ChunkAlpha(dx, dy, gaussian_alpha, alpha.mul_(used))


class _ForwardChunk(NamedTuple):
    sums: torch.Tensor          # [A, P, D + 2] sum over the chunk of w_i (colour, depth, 1)
    t_out: torch.Tensor         # [A, P] T after the chunk's last blended entry
    stopped: torch.Tensor       # [A, P] bool, a used entry failed the transmittance stop
    last_index: torch.Tensor    # [A, P] int64 sorted position of the last blended entry, -1 none
    crossed: torch.Tensor | None       # [A, P] bool, T crossed 1/2 within the chunk
    median_depth: torch.Tensor | None  # [A, P] depth of the crossing entry


# Inductor (`torch.compile(dynamic=True)`, gcc 12) on these two chunk functions measured 0.54 -> 0.43 s
# of CPU per forward + backward of the basketball early-fit scene (2-core CPU, load average 9) after a
# 256 s first compile, so the compositor stays eager.
def _forward_chunk(mean_x, mean_y, half_a, conic_b, half_c, opacity,   # [A, K] (see _Entries)
                   entry_index,    # [A, K] int64
                   values,         # [A, K, D + 2] colour, depth, 1
                   t_in,           # [A, P] carried T (0: stopped or outside the image)
                   local_x, local_y,  # [P]
                   alpha_cap: float, want_median: bool) -> _ForwardChunk:
    """One chunk of K entries for A sub-tiles: alpha, the within-chunk transmittance prefix, the sums."""
    geometry = _chunk_alpha(_Entries(entry_index, mean_x, mean_y, half_a, conic_b, half_c, opacity),
                            _TileGrid(local_x, local_y, None), alpha_cap)
    alpha = geometry.alpha
    after = torch.cumprod(1 - alpha, dim=1).mul_(t_in[:, None, :])      # [A, K, P]
    passing = after >= constants.TRANSMITTANCE_STOP
    blended = passing & (alpha > 0)
    before = torch.cat([t_in[:, None, :], after[:, :-1]], dim=1)
    weight = alpha.mul_(before).mul_(blended)                           # alpha is not used below
    sums = torch.bmm(weight.transpose(1, 2), values)
    t_out = torch.where(blended, after, t_in[:, None, :]).amin(dim=1)
    stopped = (~passing).any(dim=1) & (t_in > 0)
    offsets = torch.arange(entry_index.shape[1], device=entry_index.device)
    last_in_chunk = torch.where(blended, offsets[None, :, None], -1).amax(dim=1)
    last_index = torch.where(last_in_chunk >= 0, torch.gather(entry_index, 1, last_in_chunk.clamp_min(0)), -1)
    crossed = median_depth = None
    if want_median:
        crossed = (t_in >= constants.MEDIAN_TRANSMITTANCE) & (t_out < constants.MEDIAN_TRANSMITTANCE)
        # T is non-increasing, so the crossing entry is the first whose T_after < 1/2.
        position = (after >= constants.MEDIAN_TRANSMITTANCE).sum(dim=1).clamp_max(entry_index.shape[1] - 1)
        median_depth = torch.gather(values[..., -2], 1, position)
    return _ForwardChunk(sums, t_out, stopped, last_index, crossed, median_depth)


class _Grid(NamedTuple):
    """The compositor's own grid of S x S sub-tiles over the padded image (S divides the tile size)."""

    size: int       # S
    tiles_x: int    # sub-tiles per row, tiles_x * tile_size / S
    tiles_y: int
    per_tile: int   # sub-tiles per side of one binning tile

    @property
    def n_tiles(self) -> int:
        return self.tiles_x * self.tiles_y


def _grid(settings: RenderSettings, sub_tile: int) -> _Grid:
    size = sub_tile if settings.tile_size % sub_tile == 0 else settings.tile_size
    per_tile = settings.tile_size // size
    return _Grid(size, settings.tiles_x * per_tile, settings.tiles_y * per_tile, per_tile)


class _Layout(NamedTuple):
    """Sub-tile lists: each binning tile's sorted list filtered, per S x S sub-tile, by the exact
    ellipse test of binning (the alpha >= 1/255 level set, with binning's margin, against the
    sub-tile's pixel-centre rectangle). An entry dropped for a sub-tile has alpha < 1/255 at all its
    pixels, so the images are unchanged; the walk per pixel shrinks to the entries near it."""

    bins: torch.Tensor         # [B] int64 non-empty sub-bins c * n_sub + sub-tile
    start: torch.Tensor        # [B] int64 into entry_index
    end: torch.Tensor          # [B] int64
    entry_index: torch.Tensor  # [E] int64 position in sorted_ids, increasing within each sub-bin
    origin_x: torch.Tensor     # [B] float sub-tile origin in pixels
    origin_y: torch.Tensor
    inside: torch.Tensor       # [B, P] bool pixel inside the image


# Entries filtered per sub-tile in one piece (bounds the [entries, sub-tiles] temporaries).
FILTER_PIECE = 1 << 18


@torch.no_grad()
def _layout(tile_ranges, sorted_ids, flat: _Inputs, settings: RenderSettings, grid: _Grid) -> _Layout:
    from .binning import ellipse_levels, min_quadratic_on_rectangles

    device, dtype = flat.means.device, flat.means.dtype
    ranges = tile_ranges.to(torch.int64)
    counts = (ranges[:, 1] - ranges[:, 0]).clamp_min(0)
    bin_of_entry = torch.repeat_interleave(torch.arange(ranges.shape[0], device=device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(bin_of_entry.numel(), device=device) - offsets[bin_of_entry] + ranges[bin_of_entry, 0]
    ts, s, per = settings.tile_size, grid.size, grid.per_tile
    local = torch.arange(per * per, device=device)
    local_x, local_y = (local % per) * s, torch.div(local, per, rounding_mode="floor") * s   # [S2] offsets
    kept_entry, kept_bin = [], []
    for first in range(0, position.numel(), FILTER_PIECE):
        piece = slice(first, first + FILTER_PIECE)
        tile_bin, pos = bin_of_entry[piece], position[piece]
        row = sorted_ids[pos].to(torch.int64)
        camera = torch.div(tile_bin, settings.n_tiles, rounding_mode="floor")
        tile = tile_bin % settings.n_tiles
        x0 = (tile % settings.tiles_x * ts)[:, None] + local_x                        # [e, S2] int
        y0 = (torch.div(tile, settings.tiles_x, rounding_mode="floor") * ts)[:, None] + local_y
        x_range = ((x0 + 0.5).to(dtype), (torch.clamp_max(x0 + s, settings.width) - 0.5).to(dtype))
        y_range = ((y0 + 0.5).to(dtype), (torch.clamp_max(y0 + s, settings.height) - 0.5).to(dtype))
        q_min = min_quadratic_on_rectangles(flat.conics[row][:, None, :], flat.means[row][:, None, :],
                                            x_range, y_range)
        hit = (q_min <= ellipse_levels(flat.opacities[row % flat.n_gaussians])[:, None])
        hit &= (x0 < settings.width) & (y0 < settings.height)
        entry, sub = torch.nonzero(hit, as_tuple=True)
        sub_x = torch.div(x0[entry, sub], s, rounding_mode="floor")
        sub_y = torch.div(y0[entry, sub], s, rounding_mode="floor")
        kept_bin.append(camera[entry] * grid.n_tiles + sub_y * grid.tiles_x + sub_x)
        kept_entry.append(pos[entry])
    sub_bin = torch.cat(kept_bin) if kept_bin else torch.zeros(0, dtype=torch.int64, device=device)
    entry_index = torch.cat(kept_entry) if kept_entry else sub_bin
    # Group by sub-bin; within one, positions stay increasing (the pieces and nonzero keep entry order).
    sub_bin, order = torch.sort(sub_bin, stable=True)
    entry_index = entry_index[order]
    bins, sizes = torch.unique_consecutive(sub_bin, return_counts=True)
    end = torch.cumsum(sizes, 0)
    start = end - sizes
    sub_tile = bins % grid.n_tiles
    gx, gy = sub_tile % grid.tiles_x, torch.div(sub_tile, grid.tiles_x, rounding_mode="floor")
    p = torch.arange(s * s, device=device)
    px = gx[:, None] * s + (p % s)[None, :]
    py = gy[:, None] * s + torch.div(p, s, rounding_mode="floor")[None, :]
    inside = (px < settings.width) & (py < settings.height)
    return _Layout(bins, start, end, entry_index, (gx * s).to(dtype), (gy * s).to(dtype), inside)


def _to_tiles(image: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """[C, H, W, X] -> [C * n_sub, P, X] (zero padding beyond the image)."""
    c, h, w, x = image.shape
    s = grid.size
    padded = torch.nn.functional.pad(image, (0, 0, 0, grid.tiles_x * s - w, 0, grid.tiles_y * s - h))
    return padded.reshape(c, grid.tiles_y, s, grid.tiles_x, s, x).permute(0, 1, 3, 2, 4, 5).reshape(
        c * grid.n_tiles, s * s, x)


def _to_image(tiles: torch.Tensor, n_cameras: int, grid: _Grid, settings: RenderSettings) -> torch.Tensor:
    """[C * n_sub, P, X] -> [C, H, W, X]."""
    s = grid.size
    x = tiles.shape[-1]
    image = tiles.reshape(n_cameras, grid.tiles_y, grid.tiles_x, s, s, x).permute(0, 1, 3, 2, 4, 5).reshape(
        n_cameras, grid.tiles_y * s, grid.tiles_x * s, x)
    return image[:, :settings.height, :settings.width]


def _entry_colors(flat: _Inputs, row: torch.Tensor) -> torch.Tensor:
    return flat.colors[row % flat.n_gaussians] if flat.shared_colors else flat.colors[row]


class _ForwardResult(NamedTuple):
    sums: torch.Tensor          # [B_all, P, D + 2]: colour sums, depth sum, weight sum (alpha)
    final: torch.Tensor         # [B_all, P] final transmittance (1 outside any bin)
    last: torch.Tensor          # [B_all, P] int32 last blended index, -1 none
    median: torch.Tensor | None  # [B_all, P]


@torch.no_grad()
def _forward_tiles(records: _Records, layout: _Layout, n_bins: int, settings: RenderSettings, grid: _Grid,
                   want_median: bool, chunk_entries: int, tile_batch: int) -> _ForwardResult:
    device, dtype = records.values.device, records.values.dtype
    n_channels = records.values.shape[1] - RECORD_COLORS - 2
    sentinel = records.values.shape[0] - 1
    p = grid.size ** 2
    pixels = _tile_grid(grid.size, device, dtype)
    sums = torch.zeros(n_bins, p, n_channels + 2, device=device, dtype=dtype)
    final = torch.ones(n_bins, p, device=device, dtype=dtype)
    last = torch.full((n_bins, p), -1, device=device, dtype=torch.int32)
    median = torch.zeros(n_bins, p, device=device, dtype=dtype) if want_median else None
    for first in range(0, layout.bins.numel(), tile_batch):
        batch = slice(first, first + tile_batch)
        bins, start, end = layout.bins[batch], layout.start[batch], layout.end[batch]
        n = bins.numel()
        # Carried T: 0 once a pixel has stopped (or lies outside the image), so nothing blends there.
        carried = layout.inside[batch].to(dtype)
        stored = carried.clone()                          # the T that is reported (kept when stopping)
        batch_sums = torch.zeros(n, p, n_channels + 2, device=device, dtype=dtype)
        batch_last = torch.full((n, p), -1, device=device, dtype=torch.int64)
        batch_median = torch.zeros(n, p, device=device, dtype=dtype) if want_median else None
        active = torch.arange(n, device=device)
        chunk = 0
        while active.numel():
            entries, values = _entries(records, _chunk_positions(start[active], end[active], chunk, chunk_entries,
                                                                 sentinel))
            t_in = carried[active]                                            # [A, P]
            step = _forward_chunk(
                entries.mean_x, entries.mean_y, entries.half_a, entries.conic_b, entries.half_c, entries.opacity,
                entries.index, values[..., RECORD_COLORS:], t_in, pixels.local_x, pixels.local_y,
                settings.alpha_cap, want_median)
            batch_sums.index_add_(0, active, step.sums)
            t_out = step.t_out
            batch_last.index_copy_(0, active, torch.where(step.last_index >= 0, step.last_index, batch_last[active]))
            if want_median:
                batch_median.index_copy_(0, active, torch.where(step.crossed, step.median_depth, batch_median[active]))
            stored.index_copy_(0, active, torch.where(t_in > 0, t_out, stored[active]))
            carried.index_copy_(0, active, torch.where(step.stopped, 0, t_out))
            more = (start[active] + (chunk + 1) * chunk_entries < end[active]) & (carried[active] > 0).any(dim=1)
            active = active[more]
            chunk += 1
        sums[bins] = batch_sums
        final[bins] = stored
        last[bins] = batch_last.to(torch.int32)
        if want_median:
            median[bins] = batch_median
    return _ForwardResult(sums, final, last, median)


class _Options(NamedTuple):
    settings: RenderSettings
    outputs: tuple
    absgrad: bool
    densify_channels: int | None
    color_grad_channels: int | None
    deterministic: bool
    chunk_entries: int
    tile_batch: int
    sub_tile: int


@dataclass(frozen=True, eq=False)
class _Call:
    """What of one `composite` call receives no gradient: the tile lists, the options and the tensors
    backward adds into. One autograd argument, so backward returns (*grads, None)."""

    tile_ranges: torch.Tensor                  # [C * n_tiles, 2] int32
    sorted_ids: torch.Tensor                   # [M] int32
    options: _Options
    densify_grad: torch.Tensor | None          # [C, N, 2]
    means2d_for_absgrad: torch.Tensor | None   # [C, N, 2]


class _CompositeFunction(torch.autograd.Function):
    """Forward: `_forward_tiles`. Backward: the vector-Jacobian product below, chunk by chunk.

    Per pixel, blended list i = 1..n (front to back), w_i = alpha_i T_i, upstream g_C [D], g_A (alpha
    image), g_S (depth sum S = sum_i w_i z_i); the depth output is Z = S / A (A = 1 - T_final), so
    g_S = g_Z / A and g_A gains -g_Z Z / A. With q_i = g_C . c_i + g_S z_i:
        g_c_i = w_i g_C,  g_z_i = w_i g_S,
        g_alpha_i = T_i q_i - (sum_{j > i} w_j q_j + T_final (g_C . bg - g_A)) / (1 - alpha_i).
    alpha = min(cap, o G), G = exp(-sigma): below the cap g_o = G g_alpha and g_sigma = -o G g_alpha
    (above it min() passes nothing); sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = mean - pixel centre:
        g_conic = sum_pixels g_sigma (dx^2 / 2, dx dy, dy^2 / 2),
        g_mean = sum_pixels g_sigma (a dx + b dy, b dx + c dy),  g_background = sum_pixels T_final g_C.
    The pixel sums of g_sigma (1, dx, dy, dx^2, dx dy, dy^2) come from one float64 matrix product of
    g_sigma with the tile's pixel basis (1, u, v, u^2, u v, v^2), expanded around the mean.
    densify_grad repeats g_alpha with q restricted to the first k colour channels (no depth or alpha
    term, background restricted likewise).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, call: _Call):
        options, tile_ranges, sorted_ids = call.options, call.tile_ranges, call.sorted_ids
        settings = options.settings
        n_cameras = means2d.shape[0]
        flat = _flat_inputs(means2d, conics, opacities, colors, depths)
        grid = _grid(settings, options.sub_tile)
        layout = _layout(tile_ranges, sorted_ids, flat, settings, grid)
        records = _records(flat, sorted_ids, layout)
        result = _forward_tiles(records, layout, n_cameras * grid.n_tiles, settings, grid,
                                "median_depths" in options.outputs, options.chunk_entries, options.tile_batch)
        n_channels = flat.colors.shape[-1]
        image = _to_image(result.sums, n_cameras, grid, settings)                  # [C, H, W, D + 2]
        final = _to_image(result.final[..., None], n_cameras, grid, settings)      # [C, H, W, 1]
        colors_out = image[..., :n_channels]
        if backgrounds is not None:
            colors_out = colors_out + final * backgrounds[:, None, None, :]
        alphas = image[..., n_channels + 1:].contiguous()
        depth_sums = image[..., n_channels:n_channels + 1]
        covered = alphas > 0
        depths_out = torch.where(covered, depth_sums / torch.where(covered, alphas, 1), 0)
        median = None
        if result.median is not None:
            median = _to_image(result.median[..., None], n_cameras, grid, settings).contiguous()
            ctx.mark_non_differentiable(median)
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds, result.final, result.last,
                              alphas, depths_out)
        ctx.options, ctx.densify_grad, ctx.means2d_for_absgrad = options, call.densify_grad, call.means2d_for_absgrad
        ctx.grid, ctx.layout, ctx.records = grid, layout, records
        return colors_out.contiguous(), alphas, depths_out.contiguous(), median

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depths, _grad_median):
        with backward_stage("compositing_backward"):
            return _backward(ctx, grad_colors, grad_alphas, grad_depths)


def _backward(ctx, grad_colors, grad_alphas, grad_depths):
    means2d, conics, opacities, colors, depths, backgrounds, final_tiles, last_tiles, alphas, depths_out = (
        ctx.saved_tensors)
    options = ctx.options
    settings = options.settings
    n_cameras, n = means2d.shape[:2]
    dtype, device = means2d.dtype, means2d.device
    flat = _flat_inputs(means2d, conics, opacities, colors, depths)
    n_channels = flat.colors.shape[-1]
    image_shape = (n_cameras, settings.height, settings.width)

    def upstream(grad, width):
        return torch.zeros(*image_shape, width, dtype=dtype, device=device) if grad is None else grad

    grad_colors = upstream(grad_colors, n_channels)
    grad_alphas = upstream(grad_alphas, 1)
    grad_depths = upstream(grad_depths, 1)
    # Z = S / A: back to the depth sum and the alpha image (0 where nothing was blended).
    covered = alphas > 0
    safe_alphas = torch.where(covered, alphas, 1)
    grad_depth_sums = torch.where(covered, grad_depths / safe_alphas, 0)
    grad_alphas = grad_alphas - torch.where(covered, grad_depths * depths_out / safe_alphas, 0)
    k = options.densify_channels
    if backgrounds is not None:
        background_dot = (grad_colors * backgrounds[:, None, None, :]).sum(-1, keepdim=True)
        background_dot_k = ((grad_colors[..., :k] * backgrounds[:, None, None, :k]).sum(-1, keepdim=True)
                            if k is not None else None)
    else:
        background_dot = torch.zeros_like(grad_alphas)
        background_dot_k = torch.zeros_like(grad_alphas) if k is not None else None
    # Per-pixel upstream in tile layout: [g_C (D), g_S, T_final (g_C . bg - g_A), (T_final g_C_k . bg_k)].
    grid, layout = ctx.grid, ctx.layout
    final_image = _to_image(final_tiles[..., None], n_cameras, grid, settings)
    pixel_terms = [grad_colors, grad_depth_sums, final_image * (background_dot - grad_alphas)]
    if k is not None:
        pixel_terms.append(final_image * background_dot_k)
    pixel = _to_tiles(torch.cat(pixel_terms, dim=-1), grid)           # [B_all, P, D + 2 (+ 1)]

    # Per-entry gradients, written once per entry (each list entry lies in exactly one chunk), then summed
    # into the Gaussians' rows by one reduction: [E + 1, 2 mean + 3 conic + 1 opacity + D colour + 1 depth
    # (+ 2 absgrad) (+ 2 densify)] float64.
    records = ctx.records
    sentinel = records.values.shape[0] - 1
    want_abs = options.absgrad
    width = 6 + n_channels + 1 + (2 if want_abs else 0) + (2 if k is not None else 0)
    entry_grads = torch.zeros(sentinel + 1, width, dtype=torch.float64, device=device)

    pixels = _tile_grid(grid.size, device, dtype)
    k_entries = options.chunk_entries
    # Entries of each sub-list up to the sub-tile's last blended one (positions increase along a list).
    n_sub_bins = layout.bins.numel()
    bin_of_entry = torch.repeat_interleave(torch.arange(n_sub_bins, device=device), layout.end - layout.start)
    max_last = last_tiles[layout.bins].amax(dim=1).to(torch.int64) if n_sub_bins else layout.start
    walked_all = torch.bincount(bin_of_entry[layout.entry_index <= max_last[bin_of_entry]], minlength=n_sub_bins)
    for first in range(0, n_sub_bins, options.tile_batch):
        batch = slice(first, first + options.tile_batch)
        bins, start, end = layout.bins[batch], layout.start[batch], layout.end[batch]
        last = last_tiles[bins].to(torch.int64)                               # [T, P]
        walked = walked_all[batch]
        n_chunks = torch.where(walked > 0, torch.div(walked + k_entries - 1, k_entries, rounding_mode="floor"), 0)
        tile_pixel = pixel[bins]
        current = final_tiles[bins].clone()                                   # T after the chunk
        behind = torch.zeros_like(current)                                    # sum_{j later} w_j q_j
        behind_k = torch.zeros_like(current) if k is not None else None
        for step in range(int(n_chunks.max()) if n_chunks.numel() else 0):
            active = torch.nonzero(n_chunks > step).squeeze(1)
            chunk = n_chunks[active] - 1 - step
            positions = _chunk_positions(start[active], end[active], chunk, k_entries, sentinel)
            entries, values = _entries(records, positions)
            result = _backward_chunk(
                entries.mean_x, entries.mean_y, entries.half_a, entries.conic_b, entries.half_c, entries.opacity,
                entries.index, values[..., RECORD_COLORS:RECORD_COLORS + n_channels + 1], last[active],
                current[active], behind[active], None if k is None else behind_k[active], tile_pixel[active],
                pixels.local_x, pixels.local_y, pixels.basis, settings.alpha_cap, k, want_abs)
            behind.index_copy_(0, active, behind[active] + result.behind_add)
            current.index_copy_(0, active, result.t_first)
            if k is not None:
                behind_k.index_copy_(0, active, behind_k[active] + result.behind_k_add)
            parts = [result.grad_mean, result.grad_conic, result.grad_opacity[..., None], result.color_depth]
            parts += [result.grad_abs] if want_abs else []
            parts += [result.grad_mean_k] if k is not None else []
            entry_grads[positions] = torch.cat([part.to(torch.float64) for part in parts], dim=-1)
    entry_grads[sentinel] = 0    # padding positions were written with zeros, possibly several times
    rows = n_cameras * n
    row_grads = torch.zeros(rows, width, dtype=torch.float64, device=device)
    scatter_add(row_grads, records.row[:sentinel], entry_grads[:sentinel], options.deterministic)
    grad_means = row_grads[:, 0:2]
    grad_conics = row_grads[:, 2:5]
    grad_opacity_rows = row_grads[:, 5].to(dtype)
    grad_color_rows = row_grads[:, 6:6 + n_channels]
    if flat.shared_colors:
        grad_color_rows = grad_color_rows.reshape(n_cameras, n, n_channels).sum(0)
    grad_color_rows = grad_color_rows.to(dtype)
    grad_depths_flat = row_grads[:, 6 + n_channels].to(dtype)
    column = 7 + n_channels
    grad_abs = None
    if want_abs:
        grad_abs, column = row_grads[:, column:column + 2].to(dtype), column + 2
    grad_densify = row_grads[:, column:column + 2] if k is not None else None

    kc = options.color_grad_channels
    if kc is not None:
        grad_color_rows[:, kc:] = 0
    grad_backgrounds = None
    if backgrounds is not None and ctx.needs_input_grad[5]:
        grad_backgrounds = (final_image * grad_colors).sum(dim=(1, 2))
    if grad_abs is not None:
        target = ctx.means2d_for_absgrad
        if target is not None:
            absgrad = grad_abs.reshape(n_cameras, n, 2).to(target.dtype)
            previous = getattr(target, "absgrad", None)
            target.absgrad = absgrad if previous is None else previous + absgrad
    if grad_densify is not None and ctx.densify_grad is not None:
        ctx.densify_grad.add_(grad_densify.reshape(n_cameras, n, 2).to(ctx.densify_grad.dtype))
    grad_opacities = grad_opacity_rows.reshape(n_cameras, n).sum(0)
    grad_colors_in = grad_color_rows.reshape(colors.shape)
    return (grad_means.to(dtype).reshape(n_cameras, n, 2), grad_conics.to(dtype).reshape(n_cameras, n, 3),
            grad_opacities, grad_colors_in, grad_depths_flat.reshape(n_cameras, n), grad_backgrounds, None)


class _BackwardChunk(NamedTuple):
    grad_mean: torch.Tensor       # [A, K, 2] float64
    grad_conic: torch.Tensor      # [A, K, 3] float64
    grad_opacity: torch.Tensor    # [A, K]
    color_depth: torch.Tensor     # [A, K, D + 1] sum_pixels w (g_C, g_S)
    t_first: torch.Tensor         # [A, P] T before the chunk's first entry
    behind_add: torch.Tensor      # [A, P] sum over the chunk of w q
    grad_abs: torch.Tensor | None       # [A, K, 2]
    grad_mean_k: torch.Tensor | None    # [A, K, 2] float64, densify gradient (first k channels)
    behind_k_add: torch.Tensor | None   # [A, P]


def _backward_chunk(mean_x, mean_y, half_a, conic_b, half_c, opacity,   # [A, K] (see _Entries)
                    entry_index,   # [A, K] int64
                    values,        # [A, K, D + 1] colour, depth
                    last,          # [A, P] int64 last blended sorted position
                    t_after,       # [A, P] T after the chunk
                    behind,        # [A, P] sum_{j after the chunk} w_j q_j
                    behind_k,      # [A, P] or None, the same over the first k channels
                    terms,         # [A, P, D + 2 (+ 1)] per-pixel upstream (see _backward)
                    local_x, local_y,  # [P]
                    basis,         # [P, 6] float64
                    alpha_cap: float, k: int | None, want_abs: bool) -> _BackwardChunk:
    """The vector-Jacobian product of one chunk, back to front (formulas: `_CompositeFunction`)."""
    n_channels = values.shape[-1] - 1
    entries = _Entries(entry_index, mean_x, mean_y, half_a, conic_b, half_c, opacity)
    geometry = _chunk_alpha(entries, _TileGrid(local_x, local_y, None), alpha_cap)
    blended = entry_index[..., None] <= last[:, None, :]
    alpha = geometry.alpha.mul_(blended)                              # [A, K, P]
    one_minus_alpha = 1 - alpha
    reverse = torch.cumprod(one_minus_alpha.flip(1), dim=1).flip(1)  # R_i
    before = t_after[:, None, :] / reverse                            # T_i
    weight = alpha * before
    projected = torch.bmm(values, terms[..., :n_channels + 1].transpose(1, 2))   # q: [A, K, P]
    contribution = weight * projected
    later = behind[:, None, :] + contribution.flip(1).cumsum(1).flip(1) - contribution
    grad_alpha = before * projected - (later + terms[..., n_channels + 1][:, None, :]) / one_minus_alpha
    below_cap = (geometry.gaussian_alpha < alpha_cap) & (alpha > 0)
    grad_sigma = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha, 0)
    moments = _pixel_moments(grad_sigma, basis)                      # [A, K, 6] float64
    grad_mean, grad_conic = _mean_and_conic_gradients(moments, entries)
    # g_o = sum G g_alpha = -sum g_sigma / o (o > 0 wherever g_sigma != 0).
    safe_opacity = torch.where(opacity > 0, opacity, 1)
    grad_opacity = -moments[..., 0] / safe_opacity
    color_depth = torch.bmm(weight, terms[..., :n_channels + 1])     # [A, K, D + 1]
    grad_abs = None
    if want_abs:
        pixel_x = grad_sigma * (half_a[..., None] * 2 * geometry.dx + conic_b[..., None] * geometry.dy)
        pixel_y = grad_sigma * (conic_b[..., None] * geometry.dx + half_c[..., None] * 2 * geometry.dy)
        grad_abs = torch.stack([pixel_x.abs().sum(-1), pixel_y.abs().sum(-1)], -1)
    grad_mean_k = behind_k_add = None
    if k is not None:
        projected_k = torch.bmm(values[..., :k], terms[..., :k].transpose(1, 2))
        contribution_k = weight * projected_k
        later_k = behind_k[:, None, :] + contribution_k.flip(1).cumsum(1).flip(1) - contribution_k
        grad_alpha_k = before * projected_k - (later_k + terms[..., n_channels + 2][:, None, :]) / one_minus_alpha
        grad_sigma_k = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha_k, 0)
        grad_mean_k = _mean_and_conic_gradients(_pixel_moments(grad_sigma_k, basis), entries)[0]
        behind_k_add = contribution_k.sum(1)
    return _BackwardChunk(grad_mean, grad_conic, grad_opacity, color_depth, before[:, 0], contribution.sum(1),
                          grad_abs, grad_mean_k, behind_k_add)


def _pixel_moments(grad_sigma: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """sum over the tile's pixels of g_sigma (1, u, v, u^2, u v, v^2): [A, K, 6] float64."""
    return torch.matmul(grad_sigma.to(torch.float64), basis)


def _mean_and_conic_gradients(moments: torch.Tensor, entries: _Entries):
    """g_mean [A, K, 2] and g_conic [A, K, 3] (float64) from the pixel moments, with dx = m_x - u."""
    s0, su, sv, suu, suv, svv = moments.unbind(-1)
    mx, my = entries.mean_x.to(torch.float64), entries.mean_y.to(torch.float64)
    sdx = mx * s0 - su
    sdy = my * s0 - sv
    sdxdx = mx * mx * s0 - 2 * mx * su + suu
    sdydy = my * my * s0 - 2 * my * sv + svv
    sdxdy = mx * my * s0 - mx * sv - my * su + suv
    a, b, c = (2 * entries.half_a).to(torch.float64), entries.conic_b.to(torch.float64), (
        2 * entries.half_c).to(torch.float64)
    grad_mean = torch.stack([a * sdx + b * sdy, b * sdx + c * sdy], dim=-1)
    grad_conic = torch.stack([0.5 * sdxdx, sdxdy, 0.5 * sdydy], dim=-1)
    return grad_mean, grad_conic


def composite(means2d: torch.Tensor,                 # [C, N, 2]
              conics: torch.Tensor,                  # [C, N, 3]
              opacities: torch.Tensor,               # [N]
              colors: torch.Tensor,                  # [N, D] or [C, N, D]
              depths: torch.Tensor,                  # [C, N]
              backgrounds: torch.Tensor | None,      # [C, D]
              tile_ranges: torch.Tensor,             # [C * n_tiles, 2] int32
              sorted_ids: torch.Tensor,              # [M] int32
              settings: RenderSettings, *, outputs=ALL_OUTPUTS, absgrad: bool = False,
              densify_channels: int | None = None, densify_grad: torch.Tensor | None = None,
              color_grad_channels: int | None = None, deterministic: bool = False,
              means2d_for_absgrad: torch.Tensor | None = None,
              chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
              tile_batch: int = DEFAULT_TILE_BATCH, sub_tile: int = DEFAULT_SUB_TILE) -> types.CompositeOutput:
    """Blend the depth-sorted tile lists front to back into C images (differentiable, hand-written backward).

    Torch twin of `tritonsplat.ops.compositing.composite`; the contract (inputs, blending rule, saved
    state, outputs) is written down in `tritonsplat.types`. Computes in the dtype of means2d.

    Args:
        means2d, conics, opacities, colors, depths, backgrounds: the projected Gaussians (see types).
        tile_ranges: [C * n_tiles, 2] int32 [start, end) of each bin in sorted_ids ((0, 0): empty).
        sorted_ids: [M] int32 flat rows c * N + g, front to back within each bin.
        settings: size, tile size, alpha cap.
        outputs: which of "colors", "alphas", "depths", "median_depths" to return (others None).
        absgrad: after backward, add to `means2d_for_absgrad.absgrad` (default: means2d) [C, N, 2] the
            sum over pixels of |dL_pixel / dmean2d|.
        densify_channels, densify_grad: after backward, add to `densify_grad` [C, N, 2] the gradient of
            the means from the upstream gradient of colors[..., :k] alone.
        color_grad_channels: k, only colors[..., :k] receive gradients (the others get zeros).
        deterministic: fixed-order reductions on CUDA (CPU index_add is always deterministic).
        chunk_entries, tile_batch: K entries per chunk and tiles per batch (speed and memory only).
    Returns:
        CompositeOutput(colors [C,H,W,D], alphas [C,H,W,1], depths [C,H,W,1] expected (normalised),
        median_depths [C,H,W,1] detached); fields not in `outputs` are None.
    """
    if absgrad and means2d_for_absgrad is None:
        means2d_for_absgrad = means2d
    options = _Options(settings, tuple(outputs), absgrad, densify_channels, color_grad_channels, deterministic,
                       chunk_entries, tile_batch, sub_tile)
    colors_out, alphas, depths_out, median = _CompositeFunction.apply(
        means2d, conics, opacities, colors, depths, backgrounds,
        _Call(tile_ranges, sorted_ids, options, densify_grad, means2d_for_absgrad if absgrad else None))
    images = {"colors": colors_out, "alphas": alphas, "depths": depths_out, "median_depths": median}
    return types.CompositeOutput(*(images[name] if name in options.outputs else None
                                   for name in types.CompositeOutput._fields))


@torch.no_grad()
def composite_state(means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings: RenderSettings,
                    *, chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
                    tile_batch: int = DEFAULT_TILE_BATCH, sub_tile: int = DEFAULT_SUB_TILE) -> CompositeState:
    """The state the forward saves for backward, in image layout (final T [C,H,W], last index [C,H,W] int32)."""
    flat = _flat_inputs(means2d, conics, opacities, colors, depths)
    n_cameras = means2d.shape[0]
    grid = _grid(settings, sub_tile)
    layout = _layout(tile_ranges, sorted_ids, flat, settings, grid)
    result = _forward_tiles(_records(flat, sorted_ids, layout), layout,
                            n_cameras * grid.n_tiles, settings, grid, False, chunk_entries, tile_batch)
    return CompositeState(_to_image(result.final[..., None], n_cameras, grid, settings)[..., 0].contiguous(),
                          _to_image(result.last[..., None], n_cameras, grid, settings)[..., 0].contiguous())
