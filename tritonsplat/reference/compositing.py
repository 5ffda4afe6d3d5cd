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

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings
from ..types import ALL_OUTPUTS, CompositeOutput, CompositeState

# Entries per chunk and tiles per batch. Measured on a 2-core CPU (AMD EPYC, torch 2.13, float32),
# forward + backward of the bench `random` 50k scene at 640x360 and the basketball early-fit scene
# (8.4k Gaussians, 160x90, D = 6): see DEFAULT_CHUNK_ENTRIES_NOTE below for the numbers.
DEFAULT_CHUNK_ENTRIES = 32
DEFAULT_TILE_BATCH = 128

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

    index: torch.Tensor      # [A, K] int64 position in sorted_ids
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


def _gather_entries(flat: _Inputs, sorted_ids, start, end, chunk, k_entries, origin_x, origin_y) -> _Entries:
    """Entries [start + chunk K, ... + K) of each active tile (start, end, chunk, origins: [A])."""
    offsets = torch.arange(k_entries, device=start.device)
    index = (start + chunk * k_entries)[:, None] + offsets[None, :]
    valid = index < end[:, None]
    row = torch.where(valid, sorted_ids[torch.where(valid, index, 0)].to(torch.int64), 0)
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


class _Layout(NamedTuple):
    """Bins (camera, tile) with at least one entry, and their geometry."""

    bins: torch.Tensor      # [B] int64 bin index c * n_tiles + tile
    start: torch.Tensor     # [B] int64
    end: torch.Tensor       # [B] int64
    origin_x: torch.Tensor  # [B] float tile origin in pixels
    origin_y: torch.Tensor
    inside: torch.Tensor    # [B, P] bool pixel inside the image


def _layout(tile_ranges, settings: RenderSettings, dtype) -> _Layout:
    ranges = tile_ranges.to(torch.int64)
    bins = torch.nonzero(ranges[:, 1] > ranges[:, 0]).squeeze(1)
    start, end = ranges[bins, 0], ranges[bins, 1]
    ts = settings.tile_size
    tile = bins % settings.n_tiles
    tx, ty = tile % settings.tiles_x, torch.div(tile, settings.tiles_x, rounding_mode="floor")
    p = torch.arange(ts * ts, device=bins.device)
    px = tx[:, None] * ts + (p % ts)[None, :]
    py = ty[:, None] * ts + torch.div(p, ts, rounding_mode="floor")[None, :]
    inside = (px < settings.width) & (py < settings.height)
    return _Layout(bins, start, end, (tx * ts).to(dtype), (ty * ts).to(dtype), inside)


def _to_tiles(image: torch.Tensor, settings: RenderSettings) -> torch.Tensor:
    """[C, H, W, X] -> [C * n_tiles, P, X] (zero padding beyond the image)."""
    c, h, w, x = image.shape
    ts, tiles_x, tiles_y = settings.tile_size, settings.tiles_x, settings.tiles_y
    padded = torch.nn.functional.pad(image, (0, 0, 0, tiles_x * ts - w, 0, tiles_y * ts - h))
    return padded.reshape(c, tiles_y, ts, tiles_x, ts, x).permute(0, 1, 3, 2, 4, 5).reshape(
        c * tiles_y * tiles_x, ts * ts, x)


def _to_image(tiles: torch.Tensor, n_cameras: int, settings: RenderSettings) -> torch.Tensor:
    """[C * n_tiles, P, X] -> [C, H, W, X]."""
    ts, tiles_x, tiles_y = settings.tile_size, settings.tiles_x, settings.tiles_y
    x = tiles.shape[-1]
    image = tiles.reshape(n_cameras, tiles_y, tiles_x, ts, ts, x).permute(0, 1, 3, 2, 4, 5).reshape(
        n_cameras, tiles_y * ts, tiles_x * ts, x)
    return image[:, :settings.height, :settings.width]


def _entry_colors(flat: _Inputs, row: torch.Tensor) -> torch.Tensor:
    return flat.colors[row % flat.n_gaussians] if flat.shared_colors else flat.colors[row]


class _ForwardResult(NamedTuple):
    sums: torch.Tensor          # [B_all, P, D + 2]: colour sums, depth sum, weight sum (alpha)
    final: torch.Tensor         # [B_all, P] final transmittance (1 outside any bin)
    last: torch.Tensor          # [B_all, P] int32 last blended index, -1 none
    median: torch.Tensor | None  # [B_all, P]


@torch.no_grad()
def _forward_tiles(flat: _Inputs, sorted_ids, layout: _Layout, n_bins: int, settings: RenderSettings,
                   want_median: bool, chunk_entries: int, tile_batch: int) -> _ForwardResult:
    device, dtype = flat.means.device, flat.means.dtype
    n_channels = flat.colors.shape[-1]
    p = settings.tile_size ** 2
    grid = _tile_grid(settings.tile_size, device, dtype)
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
            entries = _gather_entries(flat, sorted_ids, start[active], end[active], chunk, chunk_entries,
                                      origin_x[active], origin_y[active])
            geometry = _chunk_alpha(entries, grid, settings.alpha_cap)
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
                last_in_chunk >= 0, entries.index[:, :1] + last_in_chunk, batch_last[active]))
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
        layout = _layout(tile_ranges, settings, means2d.dtype)
        n_bins = n_cameras * settings.n_tiles
        result = _forward_tiles(flat, sorted_ids, layout, n_bins, settings, "median_depths" in options.outputs,
                                options.chunk_entries, options.tile_batch)
        n_channels = flat.colors.shape[-1]
        image = _to_image(result.sums, n_cameras, settings)                  # [C, H, W, D + 2]
        final = _to_image(result.final[..., None], n_cameras, settings)      # [C, H, W, 1]
        colors_out = image[..., :n_channels]
        if backgrounds is not None:
            colors_out = colors_out + final * backgrounds[:, None, None, :]
        alphas = image[..., n_channels + 1:].contiguous()
        depth_sums = image[..., n_channels:n_channels + 1]
        covered = alphas > 0
        depths_out = torch.where(covered, depth_sums / torch.where(covered, alphas, 1), 0)
        median = None
        if result.median is not None:
            median = _to_image(result.median[..., None], n_cameras, settings).contiguous()
            ctx.mark_non_differentiable(median)
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids,
                              result.final, result.last, alphas, depths_out)
        ctx.options, ctx.densify_grad, ctx.means2d_for_absgrad = options, densify_grad, means2d_for_absgrad
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
    final_image = _to_image(final_tiles[..., None], n_cameras, settings)
    pixel_terms = [grad_colors, grad_depth_sums, final_image * (background_dot - grad_alphas)]
    if k is not None:
        pixel_terms.append(final_image * background_dot_k)
    pixel = _to_tiles(torch.cat(pixel_terms, dim=-1), settings)           # [B_all, P, D + 2 (+ 1)]

    rows = n_cameras * n
    grad_means = torch.zeros(rows, 2, dtype=torch.float64, device=device)
    grad_conics = torch.zeros(rows, 3, dtype=torch.float64, device=device)
    grad_opacity_rows = torch.zeros(rows, dtype=dtype, device=device)
    grad_color_rows = torch.zeros(flat.colors.shape[0], n_channels, dtype=dtype, device=device)
    grad_depths_flat = torch.zeros(rows, dtype=dtype, device=device)
    grad_abs = torch.zeros(rows, 2, dtype=dtype, device=device) if options.absgrad else None
    grad_densify = torch.zeros(rows, 2, dtype=torch.float64, device=device) if k is not None else None

    layout = _layout(tile_ranges, settings, dtype)
    grid = _tile_grid(settings.tile_size, device, dtype)
    k_entries = options.chunk_entries
    det = options.deterministic
    for first in range(0, layout.bins.numel(), options.tile_batch):
        batch = slice(first, first + options.tile_batch)
        bins, start, end = layout.bins[batch], layout.start[batch], layout.end[batch]
        origin_x, origin_y = layout.origin_x[batch], layout.origin_y[batch]
        last = last_tiles[bins].to(torch.int64)                               # [T, P]
        walked = last.amax(dim=1) + 1 - start                                 # entries up to the last blended
        n_chunks = torch.where(walked > 0, torch.div(walked + k_entries - 1, k_entries, rounding_mode="floor"), 0)
        tile_pixel = pixel[bins]
        current = final_tiles[bins].clone()                                   # T after the chunk
        behind = torch.zeros_like(current)                                    # sum_{j later} w_j q_j
        behind_k = torch.zeros_like(current) if k is not None else None
        for step in range(int(n_chunks.max()) if n_chunks.numel() else 0):
            active = torch.nonzero(n_chunks > step).squeeze(1)
            chunk = n_chunks[active] - 1 - step
            entries = _gather_entries(flat, sorted_ids, start[active], end[active], chunk, k_entries,
                                      origin_x[active], origin_y[active])
            geometry = _chunk_alpha(entries, grid, settings.alpha_cap)
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
            moments = _pixel_moments(grad_sigma, grid)                        # [A, K, 6] float64
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
                moments_k = _pixel_moments(grad_sigma_k, grid)
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
              chunk_entries: int = DEFAULT_CHUNK_ENTRIES, tile_batch: int = DEFAULT_TILE_BATCH) -> CompositeOutput:
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
                       chunk_entries, tile_batch)
    colors_out, alphas, depths_out, median = _CompositeFunction.apply(
        means2d, conics, opacities, colors, depths, backgrounds, tile_ranges, sorted_ids, options, densify_grad,
        means2d_for_absgrad if absgrad else None)
    images = {"colors": colors_out, "alphas": alphas, "depths": depths_out, "median_depths": median}
    return CompositeOutput(*(images[name] if name in options.outputs else None for name in CompositeOutput._fields))


@torch.no_grad()
def composite_state(means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings: RenderSettings,
                    *, chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
                    tile_batch: int = DEFAULT_TILE_BATCH) -> CompositeState:
    """The state the forward saves for backward, in image layout (final T [C,H,W], last index [C,H,W] int32)."""
    flat = _flat_inputs(means2d, conics, opacities, colors, depths)
    n_cameras = means2d.shape[0]
    result = _forward_tiles(flat, sorted_ids, _layout(tile_ranges, settings, means2d.dtype),
                            n_cameras * settings.n_tiles, settings, False, chunk_entries, tile_batch)
    return CompositeState(_to_image(result.final[..., None], n_cameras, settings)[..., 0].contiguous(),
                          _to_image(result.last[..., None], n_cameras, settings)[..., 0].contiguous())
