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
from typing import NamedTuple

import torch

from .. import constants, types
from ..profiling import backward_stage
from ..settings import RenderSettings
from ..types import ALL_OUTPUTS, CompositeState

# Entries per chunk (K), sub-tiles per batch and sub-tile side (S), float32 compute for float32 inputs.
# Measured on a 2-core CPU (AMD EPYC, torch 2.13, 1 thread, machine load average 10-12, so absolute
# times are ~8x an idle core's), forward + backward of the basketball early-fit scene (8,441
# Gaussians, 160x90, D = 6): S = 8, K = 32, batch 128: 1.20 s; S = 4: 1.35-1.49 s; K = 16: 1.96 s;
# K = 64: 2.0 s; S = 16 (whole tiles): 2.33 s. The noise at that load is about 30 %.
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
    """Per-entry data of one chunk, [A, K] (colours [A, K, D])."""

    index: torch.Tensor      # [A, K] int64 position in sorted_ids (increasing along K)
    valid: torch.Tensor      # [A, K] bool, index < end
    row: torch.Tensor        # [A, K] int64 c * N + g (0 where invalid)
    mean_x: torch.Tensor     # [A, K] relative to the tile origin
    mean_y: torch.Tensor
    half_a: torch.Tensor     # a / 2
    conic_b: torch.Tensor
    half_c: torch.Tensor     # c / 2
    opacity: torch.Tensor    # 0 where invalid, so the entry is never used


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


def _gather_entries(flat: _Inputs, sorted_ids, entry_index, start, end, chunk, k_entries, origin_x,
                    origin_y) -> _Entries:
    """Entries [start + chunk K, ... + K) of each active sub-tile's list (start, end, chunk, origins: [A])."""
    offsets = torch.arange(k_entries, device=start.device)
    local = (start + chunk * k_entries)[:, None] + offsets[None, :]
    valid = local < end[:, None]
    index = entry_index[torch.where(valid, local, 0)] if entry_index.numel() else local
    row = torch.where(valid, sorted_ids[index].to(torch.int64), 0) if sorted_ids.numel() else local
    means = flat.means[row]
    conics = flat.conics[row]
    opacity = torch.where(valid, flat.opacities[row % flat.n_gaussians], 0)
    return _Entries(index, valid, row, means[..., 0] - origin_x[:, None], means[..., 1] - origin_y[:, None],
                    0.5 * conics[..., 0], conics[..., 1], 0.5 * conics[..., 2], opacity)


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
def _forward_tiles(flat: _Inputs, sorted_ids, layout: _Layout, n_bins: int, settings: RenderSettings, grid: _Grid,
                   want_median: bool, chunk_entries: int, tile_batch: int) -> _ForwardResult:
    device, dtype = flat.means.device, flat.means.dtype
    n_channels = flat.colors.shape[-1]
    p = grid.size ** 2
    pixels = _tile_grid(grid.size, device, dtype)
    sums = torch.zeros(n_bins, p, n_channels + 2, device=device, dtype=dtype)
    final = torch.ones(n_bins, p, device=device, dtype=dtype)
    last = torch.full((n_bins, p), -1, device=device, dtype=torch.int32)
    median = torch.zeros(n_bins, p, device=device, dtype=dtype) if want_median else None
    chunk_offsets = torch.arange(chunk_entries, device=device)
    for first in range(0, layout.bins.numel(), tile_batch):
        batch = slice(first, first + tile_batch)
        bins, start, end = layout.bins[batch], layout.start[batch], layout.end[batch]
        origin_x, origin_y = layout.origin_x[batch], layout.origin_y[batch]
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
            entries = _gather_entries(flat, sorted_ids, layout.entry_index, start[active], end[active], chunk,
                                      chunk_entries, origin_x[active], origin_y[active])
            geometry = _chunk_alpha(entries, pixels, settings.alpha_cap)
            alpha = geometry.alpha
            t_in = carried[active]                                            # [A, P]
            after = torch.cumprod(1 - alpha, dim=1).mul_(t_in[:, None, :])    # [A, K, P]
            passing = after >= constants.TRANSMITTANCE_STOP
            blended = passing & (alpha > 0)
            before = torch.cat([t_in[:, None, :], after[:, :-1]], dim=1)
            weight = alpha.mul_(before).mul_(blended)                         # alpha is not used below
            values = torch.cat([_entry_colors(flat, entries.row), flat.depths[entries.row][..., None],
                                torch.ones_like(entries.opacity)[..., None]], dim=-1)  # [A, K, D + 2]
            batch_sums.index_add_(0, active, torch.bmm(weight.transpose(1, 2), values))
            t_out = torch.where(blended, after, t_in[:, None, :]).amin(dim=1)
            stopped = (~passing).any(dim=1) & (t_in > 0)                      # some used entry failed the stop
            last_in_chunk = torch.where(blended, chunk_offsets[None, :, None], -1).amax(dim=1)
            batch_last.index_copy_(0, active, torch.where(
                last_in_chunk >= 0, torch.gather(entries.index, 1, last_in_chunk.clamp_min(0)), batch_last[active]))
            if want_median:
                crossed = (t_in >= constants.MEDIAN_TRANSMITTANCE) & (t_out < constants.MEDIAN_TRANSMITTANCE)
                if bool(crossed.any()):
                    # T is non-increasing, so the crossing entry is the first whose T_after < 0.5.
                    position = (after >= constants.MEDIAN_TRANSMITTANCE).sum(dim=1).clamp_max(chunk_entries - 1)
                    depth = torch.gather(flat.depths[entries.row], 1, position)
                    batch_median.index_copy_(0, active, torch.where(crossed, depth, batch_median[active]))
            stored.index_copy_(0, active, torch.where(t_in > 0, t_out, stored[active]))
            carried.index_copy_(0, active, torch.where(stopped, 0, t_out))
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
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids, options,
                densify_grad, means2d_for_absgrad):
        settings = options.settings
        n_cameras = means2d.shape[0]
        flat = _flat_inputs(means2d, conics, opacities, colors, depths)
        grid = _grid(settings, options.sub_tile)
        layout = _layout(tile_ranges, sorted_ids, flat, settings, grid)
        result = _forward_tiles(flat, sorted_ids, layout, n_cameras * grid.n_tiles, settings, grid,
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
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids,
                              result.final, result.last, alphas, depths_out)
        ctx.options, ctx.densify_grad, ctx.means2d_for_absgrad = options, densify_grad, means2d_for_absgrad
        ctx.grid, ctx.layout = grid, layout
        return colors_out.contiguous(), alphas, depths_out.contiguous(), median

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depths, _grad_median):
        with backward_stage("compositing_backward"):
            return _backward(ctx, grad_colors, grad_alphas, grad_depths)


def _backward(ctx, grad_colors, grad_alphas, grad_depths):
    (means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids, final_tiles, last_tiles,
     alphas, depths_out) = ctx.saved_tensors
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

    rows = n_cameras * n
    grad_means = torch.zeros(rows, 2, dtype=torch.float64, device=device)
    grad_conics = torch.zeros(rows, 3, dtype=torch.float64, device=device)
    grad_opacity_rows = torch.zeros(rows, dtype=dtype, device=device)
    grad_color_rows = torch.zeros(flat.colors.shape[0], n_channels, dtype=dtype, device=device)
    grad_depths_flat = torch.zeros(rows, dtype=dtype, device=device)
    grad_abs = torch.zeros(rows, 2, dtype=dtype, device=device) if options.absgrad else None
    grad_densify = torch.zeros(rows, 2, dtype=torch.float64, device=device) if k is not None else None

    pixels = _tile_grid(grid.size, device, dtype)
    k_entries = options.chunk_entries
    det = options.deterministic
    # Entries of each sub-list up to the sub-tile's last blended one (positions increase along a list).
    n_sub_bins = layout.bins.numel()
    bin_of_entry = torch.repeat_interleave(torch.arange(n_sub_bins, device=device), layout.end - layout.start)
    max_last = last_tiles[layout.bins].amax(dim=1).to(torch.int64) if n_sub_bins else layout.start
    walked_all = torch.bincount(bin_of_entry[layout.entry_index <= max_last[bin_of_entry]], minlength=n_sub_bins)
    for first in range(0, n_sub_bins, options.tile_batch):
        batch = slice(first, first + options.tile_batch)
        bins, start, end = layout.bins[batch], layout.start[batch], layout.end[batch]
        origin_x, origin_y = layout.origin_x[batch], layout.origin_y[batch]
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
            entries = _gather_entries(flat, sorted_ids, layout.entry_index, start[active], end[active], chunk,
                                      k_entries, origin_x[active], origin_y[active])
            geometry = _chunk_alpha(entries, pixels, settings.alpha_cap)
            blended = entries.index[..., None] <= last[active][:, None, :]
            alpha = geometry.alpha.mul_(blended)                              # [A, K, P]
            one_minus_alpha = 1 - alpha
            reverse = torch.cumprod(one_minus_alpha.flip(1), dim=1).flip(1)  # R_i
            t_after = current[active]
            before = t_after[:, None, :] / reverse                            # T_i
            weight = alpha * before
            terms = tile_pixel[active]                                        # [A, P, D + 2 (+1)]
            entry_colors = _entry_colors(flat, entries.row)
            entry_depths = flat.depths[entries.row]
            values = torch.cat([entry_colors, entry_depths[..., None]], dim=-1)  # [A, K, D + 1]
            projected = torch.bmm(values, terms[..., :n_channels + 1].transpose(1, 2))   # q: [A, K, P]
            contribution = weight * projected
            later = behind[active][:, None, :] + contribution.flip(1).cumsum(1).flip(1) - contribution
            grad_alpha = before * projected - (later + terms[..., n_channels + 1][:, None, :]) / one_minus_alpha
            below_cap = (geometry.gaussian_alpha < settings.alpha_cap) & (alpha > 0)
            grad_sigma = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha, 0)
            behind.index_copy_(0, active, behind[active] + contribution.sum(1))
            current.index_copy_(0, active, before[:, 0])

            row = entries.row.reshape(-1)
            moments = _pixel_moments(grad_sigma, pixels)                        # [A, K, 6] float64
            grad_mean, grad_conic = _mean_and_conic_gradients(moments, entries)
            scatter_add(grad_means, row, grad_mean.reshape(-1, 2), det)
            scatter_add(grad_conics, row, grad_conic.reshape(-1, 3), det)
            # g_o = sum G g_alpha = -sum g_sigma / o (o > 0 wherever g_sigma != 0).
            safe_opacity = torch.where(entries.opacity > 0, entries.opacity, 1)
            scatter_add(grad_opacity_rows, row, (-moments[..., 0] / safe_opacity).reshape(-1), det)
            color_depth = torch.bmm(weight, terms[..., :n_channels + 1])     # [A, K, D + 1]
            color_row = row % n if flat.shared_colors else row
            scatter_add(grad_color_rows, color_row, color_depth[..., :n_channels].reshape(-1, n_channels), det)
            scatter_add(grad_depths_flat, row, color_depth[..., n_channels].reshape(-1), det)
            if grad_abs is not None:
                pixel_x = grad_sigma * (entries.half_a[..., None] * 2 * geometry.dx
                                        + entries.conic_b[..., None] * geometry.dy)
                pixel_y = grad_sigma * (entries.conic_b[..., None] * geometry.dx
                                        + entries.half_c[..., None] * 2 * geometry.dy)
                scatter_add(grad_abs, row, torch.stack([pixel_x.abs().sum(-1), pixel_y.abs().sum(-1)], -1)
                            .reshape(-1, 2), det)
            if k is not None:
                projected_k = torch.bmm(entry_colors[..., :k], terms[..., :k].transpose(1, 2))
                contribution_k = weight * projected_k
                later_k = behind_k[active][:, None, :] + contribution_k.flip(1).cumsum(1).flip(1) - contribution_k
                grad_alpha_k = before * projected_k - (later_k + terms[..., n_channels + 2][:, None, :]
                                                       ) / one_minus_alpha
                grad_sigma_k = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha_k, 0)
                behind_k.index_copy_(0, active, behind_k[active] + contribution_k.sum(1))
                moments_k = _pixel_moments(grad_sigma_k, pixels)
                scatter_add(grad_densify, row, _mean_and_conic_gradients(moments_k, entries)[0].reshape(-1, 2), det)

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
            grad_opacities, grad_colors_in, grad_depths_flat.reshape(n_cameras, n), grad_backgrounds,
            None, None, None, None, None)


def _pixel_moments(grad_sigma: torch.Tensor, grid: _TileGrid) -> torch.Tensor:
    """sum over the tile's pixels of g_sigma (1, u, v, u^2, u v, v^2): [A, K, 6] float64."""
    return torch.matmul(grad_sigma.to(torch.float64), grid.basis)


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
        means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids, options, densify_grad,
        means2d_for_absgrad if absgrad else None)
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
    result = _forward_tiles(flat, sorted_ids, _layout(tile_ranges, sorted_ids, flat, settings, grid),
                            n_cameras * grid.n_tiles, settings, grid, False, chunk_entries, tile_batch)
    return CompositeState(_to_image(result.final[..., None], n_cameras, grid, settings)[..., 0].contiguous(),
                          _to_image(result.last[..., None], n_cameras, grid, settings)[..., 0].contiguous())
