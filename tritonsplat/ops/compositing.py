"""Stage 5: front-to-back alpha compositing per 16x16 tile, and its back-to-front backward (Triton).

One program per (tile, camera); its pixels are a [TILE_SIZE^2] vector and the tile's depth-sorted
Gaussians are loaded in batches of BATCH as [BATCH] vectors, so every step works on [BATCH, pixels]
tensors. Within a batch, transmittance is a cumulative product over the batch axis:
    T_after_i = T * prod_{j <= i} (1 - alpha_j),   blended_i = alpha_i >= 1/255 and T_after_i >= 1e-4,
which is exactly the sequential rule of the original (the first Gaussian that would take T below
1e-4 stops the pixel, and every later one has a smaller product, so blended Gaussians are a prefix).
The program exits once every pixel of its tile has stopped. Up to 8 colour channels accumulate in a
[pixels, 8] register tile; wider D accumulates one channel at a time into the output (each pixel
belongs to one program), so any channel count D runs through the same kernel without register
growth. Forward saves the final transmittance and the index of the
last blended intersection per pixel for backward. Torch twin: `tritonsplat.reference.compositing`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings
from ._launch import contiguous_inputs, launch_settings

MIN_ALPHA = tl.constexpr(constants.MIN_ALPHA)
TRANSMITTANCE_STOP = tl.constexpr(constants.TRANSMITTANCE_STOP)
MEDIAN_TRANSMITTANCE = tl.constexpr(constants.MEDIAN_TRANSMITTANCE)


@triton.jit
def _tile_pixels(tile, camera, width, height, tiles_x, TILE_SIZE: tl.constexpr):
    pixel = tl.arange(0, TILE_SIZE * TILE_SIZE)                        # [P] pixels of the tile
    pixel_x = (tile % tiles_x) * TILE_SIZE + pixel % TILE_SIZE
    pixel_y = (tile // tiles_x) * TILE_SIZE + pixel // TILE_SIZE
    inside = (pixel_x < width) & (pixel_y < height)
    image_index = (camera.to(tl.int64) * height + pixel_y) * width + pixel_x  # [P] int64 into [C, H, W]
    return pixel_x, pixel_y, inside, image_index


@triton.jit
def _tile_setup(tile, camera, ranges_ptr, width, height, tiles_x, n_tiles, TILE_SIZE: tl.constexpr):
    """The tile's pixels and the [start, end) range of its sorted intersections."""
    pixel_x, pixel_y, inside, image_index = _tile_pixels(tile, camera, width, height, tiles_x, TILE_SIZE)
    tile_bin = camera.to(tl.int64) * n_tiles + tile
    start = tl.load(ranges_ptr + tile_bin * 2, mask=tile < n_tiles, other=0)
    end = tl.load(ranges_ptr + tile_bin * 2 + 1, mask=tile < n_tiles, other=0)
    return pixel_x, pixel_y, inside, image_index, start, end


@triton.jit
def _load_batch(ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr, index, valid, camera, n_gaussians):
    """Gaussian data of a batch of intersections [BATCH]."""
    row = tl.load(ids_ptr + index, mask=valid, other=0).to(tl.int64)    # c * N + g (int64 for row * 3)
    gaussian = row - camera.to(tl.int64) * n_gaussians
    mean_x = tl.load(means2d_ptr + row * 2 + 0, mask=valid, other=0.0)
    mean_y = tl.load(means2d_ptr + row * 2 + 1, mask=valid, other=0.0)
    conic_a = tl.load(conics_ptr + row * 3 + 0, mask=valid, other=0.0)
    conic_b = tl.load(conics_ptr + row * 3 + 1, mask=valid, other=0.0)
    conic_c = tl.load(conics_ptr + row * 3 + 2, mask=valid, other=0.0)
    opacity = tl.load(opacities_ptr + gaussian, mask=valid, other=0.0)
    depth = tl.load(depths_ptr + row, mask=valid, other=0.0)
    return row, gaussian, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, depth


@triton.jit
def _batch_alpha(mean_x, mean_y, conic_a, conic_b, conic_c, opacity, pixel_x, pixel_y, alpha_cap):
    """[BATCH, P] offsets d = mean - pixel centre, sigma = d^T conic d / 2, o G and alpha."""
    dx = mean_x[:, None] - (pixel_x.to(tl.float32) + 0.5)[None, :]
    dy = mean_y[:, None] - (pixel_y.to(tl.float32) + 0.5)[None, :]
    sigma = 0.5 * (conic_a[:, None] * dx * dx + conic_c[:, None] * dy * dy) + conic_b[:, None] * dx * dy
    falloff = tl.exp(-sigma)
    gaussian_alpha = opacity[:, None] * falloff
    alpha = tl.minimum(gaussian_alpha, alpha_cap)
    return dx, dy, sigma, falloff, gaussian_alpha, alpha


@triton.jit
def _composite_forward_kernel(
    means2d_ptr,        # [C, N, 2] float32
    conics_ptr,         # [C, N, 3] float32
    opacities_ptr,      # [N] float32
    colors_ptr,         # colours, element (c, g, d) at c * stride_camera + g * n_channels + d
    depths_ptr,         # [C, N] float32
    backgrounds_ptr,    # [C, D] float32 (HAS_BACKGROUND only)
    ranges_ptr,         # [C * n_tiles, 2] int64 [start, end) of each tile's sorted intersections
    ids_ptr,            # [M] int32 sorted Gaussian rows c * N + g
    out_colors_ptr,     # out [C, H, W, D] float32, zero-initialised
    out_alphas_ptr,     # out [C, H, W] float32
    out_depths_ptr,     # out [C, H, W] float32 sum of w z
    out_median_ptr,     # out [C, H, W] float32
    out_final_ptr,      # out [C, H, W] float32 final transmittance
    out_last_ptr,       # out [C, H, W] int32 index of the last blended intersection (-1: none)
    n_gaussians, n_channels, color_stride_camera, width, height, tiles_x, n_tiles, alpha_cap,
    TILE_SIZE: tl.constexpr, BATCH: tl.constexpr, HAS_BACKGROUND: tl.constexpr, REGISTER_CHANNELS: tl.constexpr,
):
    tile = tl.program_id(0)
    camera = tl.program_id(1)
    pixel_x, pixel_y, inside, image_index, start, end = _tile_setup(
        tile, camera, ranges_ptr, width, height, tiles_x, n_tiles, TILE_SIZE)
    if REGISTER_CHANNELS > 0:
        # D <= 8: a [P, REGISTER_CHANNELS] accumulator in registers, stored once at the end.
        channel = tl.arange(0, REGISTER_CHANNELS)
        color_sum = tl.zeros([TILE_SIZE * TILE_SIZE, REGISTER_CHANNELS], dtype=tl.float32)

    transmittance = tl.where(inside, 1.0, 0.0)                             # [P]
    done = (~inside).to(tl.int32)                                          # [P] 1 once stopped
    depth_sum = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    # alpha = 1 - T_final = sum_i w_i; summing the weights keeps float32 precision where alpha is small.
    alpha_sum = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    median = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    last = tl.full([TILE_SIZE * TILE_SIZE], -1, dtype=tl.int32)
    color_base = camera.to(tl.int64) * color_stride_camera
    batch_start = start
    n_active = tl.sum(1 - done, axis=0)
    while (batch_start < end) & (n_active > 0):
        index = batch_start + tl.arange(0, BATCH)                          # [B] int64
        valid = index < end
        row, gaussian, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, depth = _load_batch(
            ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr, index, valid, camera, n_gaussians)
        dx, dy, sigma, falloff, gaussian_alpha, alpha = _batch_alpha(
            mean_x, mean_y, conic_a, conic_b, conic_c, opacity, pixel_x, pixel_y, alpha_cap)
        use = valid[:, None] & (sigma >= 0.0) & (alpha >= MIN_ALPHA) & (done == 0)[None, :]
        keep = tl.where(use, 1.0 - alpha, 1.0)
        after = transmittance[None, :] * tl.cumprod(keep, axis=0)          # [B, P] T after each
        blended = use & (after >= TRANSMITTANCE_STOP)
        stopped = use & (after < TRANSMITTANCE_STOP)
        before = after / keep
        weight = tl.where(blended, alpha * before, 0.0)
        depth_sum += tl.sum(weight * depth[:, None], axis=0)
        alpha_sum += tl.sum(weight, axis=0)
        crossing = blended & (before >= MEDIAN_TRANSMITTANCE) & (after < MEDIAN_TRANSMITTANCE)
        median += tl.sum(tl.where(crossing, depth[:, None], 0.0), axis=0)
        last = tl.maximum(last, tl.max(tl.where(blended, index[:, None].to(tl.int32), -1), axis=0))
        transmittance = tl.min(tl.where(blended, after, transmittance[None, :]), axis=0)
        done = tl.maximum(done, tl.max(stopped.to(tl.int32), axis=0))
        if REGISTER_CHANNELS > 0:
            # Unrolled over channels: a [B, P, RC] broadcast would go through shared memory.
            for channel_index in tl.static_range(REGISTER_CHANNELS):
                color = tl.load(colors_ptr + color_base + gaussian * n_channels + channel_index,
                                mask=valid & (gaussian * 0 + channel_index < n_channels), other=0.0)
                contribution = tl.sum(weight * color[:, None], axis=0)                   # [P]
                color_sum += tl.where(channel[None, :] == channel_index, contribution[:, None], 0.0)
        else:
            # Any D: one channel at a time, accumulated in the output (each pixel has one program).
            channel_index = 0
            while channel_index < n_channels:  # not range(): Triton 3.6's interpreter rejects it
                color = tl.load(colors_ptr + color_base + gaussian * n_channels + channel_index,
                                mask=valid, other=0.0)
                address = out_colors_ptr + image_index * n_channels + channel_index
                accumulated = tl.load(address, mask=inside, other=0.0)
                tl.store(address, accumulated + tl.sum(weight * color[:, None], axis=0), mask=inside)
                channel_index += 1
        n_active = tl.sum(1 - done, axis=0)
        batch_start += BATCH

    if REGISTER_CHANNELS > 0:
        if HAS_BACKGROUND:
            background = tl.load(backgrounds_ptr + camera * n_channels + channel, mask=channel < n_channels,
                                 other=0.0)
            color_sum += transmittance[:, None] * background[None, :]
        tl.store(out_colors_ptr + image_index[:, None] * n_channels + channel[None, :], color_sum,
                 mask=inside[:, None] & (channel < n_channels)[None, :])
    elif HAS_BACKGROUND:
        channel_index = 0
        while channel_index < n_channels:  # not range(): Triton 3.6's interpreter rejects it
            background = tl.load(backgrounds_ptr + camera * n_channels + channel_index, mask=camera >= 0,
                                 other=0.0)
            address = out_colors_ptr + image_index * n_channels + channel_index
            accumulated = tl.load(address, mask=inside, other=0.0)
            tl.store(address, accumulated + transmittance * background, mask=inside)
            channel_index += 1
    tl.store(out_alphas_ptr + image_index, alpha_sum, mask=inside)
    tl.store(out_depths_ptr + image_index, depth_sum, mask=inside)
    tl.store(out_median_ptr + image_index, median, mask=inside)
    tl.store(out_final_ptr + image_index, transmittance, mask=inside)
    tl.store(out_last_ptr + image_index, last, mask=inside)


# Vector-Jacobian product of compositing (Kerbl et al. 2023 Eq. 3, with gsplat's depth channel).
# Per pixel, blended list i = 1..n, w_i = alpha_i T_i, upstream g_C [D], g_A (alpha image), g_Z (sum of
# w z), background bg; with q_i = g_C . c_i + g_Z z_i:
#     g_c_i = w_i g_C,  g_z_i = w_i g_Z,
#     g_alpha_i = T_i q_i - (sum_{j > i} w_j q_j + T_final (g_C . bg - g_A)) / (1 - alpha_i).
# alpha = min(cap, o G), G = exp(-sigma): below the cap g_o = G g_alpha, g_sigma = -o G g_alpha;
# sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = mean - pixel centre:
#     g_conic = g_sigma (dx^2 / 2, dx dy, dy^2 / 2),  g_mean = g_sigma (a dx + b dy, b dx + c dy).
# Saved by forward: T_final and the last blended index per pixel. The walk goes back to front in
# batches: with R_i = prod_{j >= i in batch} (1 - alpha_j) (a reverse cumulative product),
# T_i = T_cur / R_i, and sum_{j > i} w_j q_j = carry + reverse exclusive cumsum. densify_grad repeats
# g_alpha with q restricted to the first k channels (no depth, alpha or background beyond k).
# Reduction: per-Gaussian sums over the tile's pixels (tl.sum), then one atomic add per Gaussian per
# tile batch; with DETERMINISTIC, the sums are written to one row per intersection instead (each
# intersection belongs to exactly one tile) and reduced in a fixed order afterwards.
@triton.jit
def _composite_backward_kernel(
    means2d_ptr, conics_ptr, opacities_ptr, colors_ptr, depths_ptr, backgrounds_ptr, ranges_ptr, ids_ptr,
    final_ptr,               # [C, H, W] float32 final transmittance
    last_ptr,                # [C, H, W] int32 last blended intersection
    grad_colors_ptr,         # [C, H, W, D] float32 upstream
    grad_alphas_ptr,         # [C, H, W] float32 upstream
    grad_depths_ptr,         # [C, H, W] float32 upstream (depth sums)
    out_grad_means2d_ptr,    # [C, N, 2] float32 (atomics) | per-intersection rows (DETERMINISTIC)
    out_grad_conics_ptr,     # [C, N, 3]
    out_grad_opacities_ptr,  # [N]
    out_grad_colors_ptr,     # like colours ([N, D] or [C, N, D])
    out_grad_depths_ptr,     # [C, N]
    out_grad_abs_ptr,        # [C, N, 2] (ABSGRAD)
    out_grad_densify_ptr,    # [C, N, 2] (densify_channels > 0)
    rows_ptr,                # [M, ROW_WIDTH] float32 per-intersection sums (DETERMINISTIC)
    n_gaussians, n_channels, densify_channels, color_stride_camera, width, height, tiles_x, n_tiles,
    alpha_cap, row_width,
    TILE_SIZE: tl.constexpr, BATCH: tl.constexpr, HAS_BACKGROUND: tl.constexpr, ABSGRAD: tl.constexpr,
    DENSIFY: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    tile = tl.program_id(0)
    camera = tl.program_id(1)
    pixel_x, pixel_y, inside, image_index, start, end = _tile_setup(
        tile, camera, ranges_ptr, width, height, tiles_x, n_tiles, TILE_SIZE)
    final = tl.load(final_ptr + image_index, mask=inside, other=1.0)
    last = tl.load(last_ptr + image_index, mask=inside, other=-1)
    grad_alpha_image = tl.load(grad_alphas_ptr + image_index, mask=inside, other=0.0)
    grad_depth_image = tl.load(grad_depths_ptr + image_index, mask=inside, other=0.0)
    background_dot = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    background_dot_k = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    if HAS_BACKGROUND:
        channel = 0
        while channel < n_channels:  # not range(): Triton 3.6's interpreter rejects it
            background = tl.load(backgrounds_ptr + camera * n_channels + channel, mask=camera >= 0, other=0.0)
            upstream = tl.load(grad_colors_ptr + image_index * n_channels + channel, mask=inside, other=0.0)
            background_dot += background * upstream
            if channel < densify_channels:
                background_dot_k += background * upstream
            channel += 1

    color_base = camera.to(tl.int64) * color_stride_camera
    current = final                                                        # T after the batch
    behind = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)           # sum_{j later} w_j q_j
    behind_k = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.float32)
    batch_end = tl.minimum(end, tl.max(last, axis=0).to(tl.int64) + 1)
    while batch_end > start:
        batch_start = tl.maximum(start, batch_end - BATCH)
        index = batch_start + tl.arange(0, BATCH)                          # [B] int64
        valid = index < batch_end
        row, gaussian, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, depth = _load_batch(
            ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr, index, valid, camera, n_gaussians)
        dx, dy, sigma, falloff, gaussian_alpha, alpha = _batch_alpha(
            mean_x, mean_y, conic_a, conic_b, conic_c, opacity, pixel_x, pixel_y, alpha_cap)
        use = (valid[:, None] & inside[None, :] & (sigma >= 0.0) & (alpha >= MIN_ALPHA)
               & (index[:, None].to(tl.int32) <= last[None, :]))
        keep = tl.where(use, 1.0 - alpha, 1.0)
        before = current[None, :] / tl.cumprod(keep, axis=0, reverse=True)     # T_i
        weight = tl.where(use, alpha * before, 0.0)
        projected = grad_depth_image[None, :] * depth[:, None]             # q_i
        projected_k = tl.zeros([BATCH, TILE_SIZE * TILE_SIZE], dtype=tl.float32)
        channel = 0
        while channel < n_channels:  # not range(): Triton 3.6's interpreter rejects it
            color = tl.load(colors_ptr + color_base + gaussian * n_channels + channel,
                            mask=valid, other=0.0)
            upstream = tl.load(grad_colors_ptr + image_index * n_channels + channel, mask=inside, other=0.0)
            contribution = color[:, None] * upstream[None, :]
            projected += contribution
            if channel < densify_channels:
                projected_k += contribution
            grad_color = tl.sum(weight * upstream[None, :], axis=1)       # [B]
            color_address = gaussian * n_channels + channel
            if DETERMINISTIC:
                tl.store(rows_ptr + index * row_width + 7 + channel, grad_color, mask=valid)
            else:
                tl.atomic_add(out_grad_colors_ptr + color_base + color_address, grad_color, mask=valid)
            channel += 1
        contribution = weight * projected
        behind_i = behind[None, :] + tl.cumsum(contribution, axis=0, reverse=True) - contribution
        grad_alpha = before * projected - (behind_i + final[None, :] * (background_dot - grad_alpha_image)[None, :]
                                           ) / (1.0 - alpha)
        below_cap = use & (gaussian_alpha < alpha_cap)
        grad_sigma = tl.where(below_cap, -gaussian_alpha * grad_alpha, 0.0)
        grad_opacity = tl.sum(tl.where(below_cap, falloff * grad_alpha, 0.0), axis=1)
        pixel_grad_x = grad_sigma * (conic_a[:, None] * dx + conic_b[:, None] * dy)
        pixel_grad_y = grad_sigma * (conic_b[:, None] * dx + conic_c[:, None] * dy)
        grad_mean_x = tl.sum(pixel_grad_x, axis=1)
        grad_mean_y = tl.sum(pixel_grad_y, axis=1)
        grad_conic_a = tl.sum(0.5 * grad_sigma * dx * dx, axis=1)
        grad_conic_b = tl.sum(grad_sigma * dx * dy, axis=1)
        grad_conic_c = tl.sum(0.5 * grad_sigma * dy * dy, axis=1)
        grad_depth = tl.sum(weight * grad_depth_image[None, :], axis=1)
        if DETERMINISTIC:
            base = rows_ptr + index * row_width
            tl.store(base + 0, grad_mean_x, mask=valid)
            tl.store(base + 1, grad_mean_y, mask=valid)
            tl.store(base + 2, grad_conic_a, mask=valid)
            tl.store(base + 3, grad_conic_b, mask=valid)
            tl.store(base + 4, grad_conic_c, mask=valid)
            tl.store(base + 5, grad_opacity, mask=valid)
            tl.store(base + 6, grad_depth, mask=valid)
        else:
            tl.atomic_add(out_grad_means2d_ptr + row * 2 + 0, grad_mean_x, mask=valid)
            tl.atomic_add(out_grad_means2d_ptr + row * 2 + 1, grad_mean_y, mask=valid)
            tl.atomic_add(out_grad_conics_ptr + row * 3 + 0, grad_conic_a, mask=valid)
            tl.atomic_add(out_grad_conics_ptr + row * 3 + 1, grad_conic_b, mask=valid)
            tl.atomic_add(out_grad_conics_ptr + row * 3 + 2, grad_conic_c, mask=valid)
            tl.atomic_add(out_grad_opacities_ptr + gaussian, grad_opacity, mask=valid)
            tl.atomic_add(out_grad_depths_ptr + row, grad_depth, mask=valid)
        if ABSGRAD:
            abs_x = tl.sum(tl.abs(pixel_grad_x), axis=1)
            abs_y = tl.sum(tl.abs(pixel_grad_y), axis=1)
            if DETERMINISTIC:
                tl.store(rows_ptr + index * row_width + 7 + n_channels, abs_x, mask=valid)
                tl.store(rows_ptr + index * row_width + 8 + n_channels, abs_y, mask=valid)
            else:
                tl.atomic_add(out_grad_abs_ptr + row * 2 + 0, abs_x, mask=valid)
                tl.atomic_add(out_grad_abs_ptr + row * 2 + 1, abs_y, mask=valid)
        if DENSIFY:
            contribution_k = weight * projected_k
            behind_k_i = behind_k[None, :] + tl.cumsum(contribution_k, axis=0, reverse=True) - contribution_k
            grad_alpha_k = before * projected_k - (behind_k_i + final[None, :] * background_dot_k[None, :]) / (
                1.0 - alpha)
            grad_sigma_k = tl.where(below_cap, -gaussian_alpha * grad_alpha_k, 0.0)
            densify_x = tl.sum(grad_sigma_k * (conic_a[:, None] * dx + conic_b[:, None] * dy), axis=1)
            densify_y = tl.sum(grad_sigma_k * (conic_b[:, None] * dx + conic_c[:, None] * dy), axis=1)
            if DETERMINISTIC:
                tl.store(rows_ptr + index * row_width + 9 + n_channels, densify_x, mask=valid)
                tl.store(rows_ptr + index * row_width + 10 + n_channels, densify_y, mask=valid)
            else:
                tl.atomic_add(out_grad_densify_ptr + row * 2 + 0, densify_x, mask=valid)
                tl.atomic_add(out_grad_densify_ptr + row * 2 + 1, densify_y, mask=valid)
            behind_k += tl.sum(contribution_k, axis=0)
        behind += tl.sum(contribution, axis=0)
        current = tl.max(tl.where(use, before, current[None, :]), axis=0)
        batch_end = batch_start


# Widest colour accumulator kept in registers by the forward kernel; wider D accumulates in memory.
MAX_REGISTER_CHANNELS = 8


def register_channels(n_channels: int) -> int:
    """Power-of-two width of the forward's register accumulator, or 0 for the any-D path."""
    if n_channels > MAX_REGISTER_CHANNELS:
        return 0
    return 1 << max(n_channels - 1, 0).bit_length()


def _color_layout(colors: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Colours as a contiguous [N, D] (shared, camera stride 0) or [C, N, D] tensor and the camera stride."""
    if colors.dim() == 2:
        return colors.contiguous(), 0
    return colors.contiguous(), colors.shape[1] * colors.shape[2]


@contiguous_inputs
def composite_forward(means2d, conics, opacities, colors, depths, backgrounds, ranges, ids,
                      settings: RenderSettings, n_cameras: int):
    """Launch the forward; returns colours [C,H,W,D], alphas, depth sums, medians [C,H,W] and the
    saved final transmittance [C,H,W] and last index [C,H,W] int32."""
    n = means2d.shape[1]
    n_channels = colors.shape[-1]
    colors, stride_camera = _color_layout(colors)
    device = means2d.device
    h, w = settings.height, settings.width
    out_colors = torch.zeros(n_cameras, h, w, n_channels, device=device, dtype=torch.float32)
    out = [torch.empty(n_cameras, h, w, device=device, dtype=torch.float32) for _ in range(4)]
    last = torch.empty(n_cameras, h, w, device=device, dtype=torch.int32)
    launch = launch_settings("compositing_forward")
    _composite_forward_kernel[(settings.n_tiles, n_cameras)](
        means2d, conics, opacities, colors, depths, backgrounds if backgrounds is not None else out_colors,
        ranges, ids, out_colors, *out, last,
        n, n_channels, stride_camera, w, h, settings.tiles_x, settings.n_tiles, settings.alpha_cap,
        TILE_SIZE=settings.tile_size, BATCH=launch.block, HAS_BACKGROUND=backgrounds is not None,
        REGISTER_CHANNELS=register_channels(n_channels), num_warps=launch.num_warps)
    alphas, depth_sums, medians, final = out
    return out_colors, alphas, depth_sums, medians, final, last


@contiguous_inputs
def composite_backward(means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, final, last,
                       grad_colors, grad_alphas, grad_depth_sums, settings: RenderSettings, n_cameras: int,
                       absgrad: bool, densify_channels: int | None, deterministic: bool):
    """Launch the backward; returns gradients (means2d [C,N,2], conics [C,N,3], opacities [N], colours
    like `colors`, depths [C,N], absgrad [C,N,2] or None, densify [C,N,2] or None)."""
    n = means2d.shape[1]
    n_channels = colors.shape[-1]
    colors, stride_camera = _color_layout(colors)
    device = means2d.device
    zeros = dict(device=device, dtype=torch.float32)
    grad_means2d = torch.zeros(n_cameras, n, 2, **zeros)
    grad_conics = torch.zeros(n_cameras, n, 3, **zeros)
    grad_opacities = torch.zeros(n, **zeros)
    grad_colors_out = torch.zeros_like(colors, dtype=torch.float32)
    grad_depths = torch.zeros(n_cameras, n, **zeros)
    grad_abs = torch.zeros(n_cameras, n, 2, **zeros) if absgrad else None
    grad_densify = torch.zeros(n_cameras, n, 2, **zeros) if densify_channels else None
    row_width = 11 + n_channels
    rows = torch.zeros(ids.numel() if deterministic else 0, row_width, **zeros)
    launch = launch_settings("compositing_backward")
    _composite_backward_kernel[(settings.n_tiles, n_cameras)](
        means2d, conics, opacities, colors, depths, backgrounds if backgrounds is not None else final,
        ranges, ids, final, last, grad_colors, grad_alphas, grad_depth_sums,
        grad_means2d, grad_conics, grad_opacities, grad_colors_out, grad_depths,
        grad_abs if grad_abs is not None else grad_means2d,
        grad_densify if grad_densify is not None else grad_means2d, rows,
        n, n_channels, densify_channels or 0, stride_camera, settings.width, settings.height,
        settings.tiles_x, settings.n_tiles, settings.alpha_cap, row_width,
        TILE_SIZE=settings.tile_size, BATCH=launch.block, HAS_BACKGROUND=backgrounds is not None,
        ABSGRAD=absgrad, DENSIFY=bool(densify_channels), DETERMINISTIC=deterministic,
        num_warps=launch.num_warps)
    if deterministic and ids.numel():
        _reduce_rows(rows, ids.to(torch.int64), n, n_channels, stride_camera, grad_means2d, grad_conics,
                     grad_opacities, grad_colors_out, grad_depths, grad_abs, grad_densify)
    return grad_means2d, grad_conics, grad_opacities, grad_colors_out, grad_depths, grad_abs, grad_densify


def _reduce_rows(rows, gaussian_rows, n, n_channels, stride_camera, grad_means2d, grad_conics, grad_opacities,
                 grad_colors, grad_depths, grad_abs, grad_densify):
    """Fixed-order reduction of per-intersection rows into per-Gaussian gradients (deterministic):
    a stable sort by Gaussian, float64 prefix sums, differences at segment ends. Costs one
    [M, 11 + D] float32 buffer and a sort of M int64 keys."""
    from ..reference.compositing import scatter_add

    def add(target, values, index):
        scatter_add(target, index, values, deterministic=True)

    add(grad_means2d.view(-1, 2), rows[:, 0:2], gaussian_rows)
    add(grad_conics.view(-1, 3), rows[:, 2:5], gaussian_rows)
    add(grad_opacities, rows[:, 5], gaussian_rows % n)
    add(grad_depths.view(-1), rows[:, 6], gaussian_rows)
    color_index = gaussian_rows if stride_camera else gaussian_rows % n
    add(grad_colors.view(-1, n_channels), rows[:, 7:7 + n_channels], color_index)
    if grad_abs is not None:
        add(grad_abs.view(-1, 2), rows[:, 7 + n_channels:9 + n_channels], gaussian_rows)
    if grad_densify is not None:
        add(grad_densify.view(-1, 2), rows[:, 9 + n_channels:11 + n_channels], gaussian_rows)


class CompositeFunction(torch.autograd.Function):
    """Autograd node of compositing; backward is `_composite_backward_kernel`."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, settings, n_cameras,
                absgrad, densify_channels, densify_grad, deterministic, means2d_for_absgrad):
        out_colors, alphas, depth_sums, medians, final, last = composite_forward(
            means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, settings, n_cameras)
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, final, last)
        ctx.settings, ctx.n_cameras, ctx.absgrad = settings, n_cameras, absgrad
        ctx.densify_channels, ctx.densify_grad, ctx.deterministic = densify_channels, densify_grad, deterministic
        ctx.means2d_for_absgrad = means2d_for_absgrad
        ctx.mark_non_differentiable(medians)
        return out_colors, alphas[..., None], depth_sums[..., None], medians[..., None]

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depth_sums, _grad_medians):
        with backward_stage("compositing_backward"):
            means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, final, last = ctx.saved_tensors

            def zeros_if_none(grad, shape):
                return torch.zeros(shape, device=final.device, dtype=torch.float32) if grad is None else grad

            grad_colors = zeros_if_none(grad_colors, (*final.shape, colors.shape[-1]))
            grad_alphas = zeros_if_none(grad_alphas, (*final.shape, 1))[..., 0]
            grad_depth_sums = zeros_if_none(grad_depth_sums, (*final.shape, 1))[..., 0]
            (grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths, grad_abs,
             grad_densify) = composite_backward(
                means2d, conics, opacities, colors, depths, backgrounds, ranges, ids, final, last, grad_colors,
                grad_alphas, grad_depth_sums, ctx.settings, ctx.n_cameras, ctx.absgrad, ctx.densify_channels,
                ctx.deterministic)
            grad_backgrounds = None
            if backgrounds is not None and ctx.needs_input_grad[5]:
                grad_backgrounds = (final[..., None] * grad_colors).reshape(ctx.n_cameras, -1, colors.shape[-1]).sum(1)
            if grad_abs is not None and ctx.means2d_for_absgrad is not None:
                previous = getattr(ctx.means2d_for_absgrad, "absgrad", None)
                ctx.means2d_for_absgrad.absgrad = grad_abs if previous is None else previous + grad_abs
            if grad_densify is not None and ctx.densify_grad is not None:
                ctx.densify_grad.add_(grad_densify.to(ctx.densify_grad.dtype))
            return (grad_means2d, grad_conics, grad_opacities, grad_colors_in, grad_depths, grad_backgrounds,
                    None, None, None, None, None, None, None, None, None)


def composite(means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
              depths: torch.Tensor, backgrounds: torch.Tensor | None, ranges: torch.Tensor, ids: torch.Tensor,
              settings: RenderSettings, *, absgrad: bool = False, densify_channels: int | None = None,
              densify_grad: torch.Tensor | None = None, deterministic: bool = False,
              means2d_for_absgrad: torch.Tensor | None = None):
    """Triton twin of `reference.compositing.composite` (float32), on binned and sorted tiles.

    Args:
        means2d: [C, N, 2].  conics: [C, N, 3].  opacities: [N].  colors: [N, D] or [C, N, D].
        depths: [C, N].  backgrounds: [C, D] or None.  ranges: [C * n_tiles, 2] int64.  ids: [M] int32.
    Returns:
        CompositeOutput(colors [C,H,W,D], alphas [C,H,W,1], depth_sums [C,H,W,1], median_depths [C,H,W,1]).
    """
    from ..reference.compositing import CompositeOutput

    n_cameras = means2d.shape[0]
    outputs = CompositeFunction.apply(means2d, conics, opacities, colors, depths, backgrounds, ranges, ids,
                                      settings, n_cameras, absgrad, densify_channels, densify_grad,
                                      deterministic, means2d_for_absgrad)
    return CompositeOutput(*outputs)
