"""Front-to-back alpha compositing in pure PyTorch, on Gaussian-pixel pairs.

Torch twin of `tritonsplat.ops.compositing`. Instead of 16x16 tiles it evaluates each Gaussian only
at the pixels of its box (`reference.binning.pixel_boxes`), keeps the pairs with alpha >= 1/255,
orders them by (pixel, depth) and composites every pixel's list with a segmented scan of
log(1 - alpha) in float64:

    T_i = prod_{j < i} (1 - alpha_j),  C = sum_i c_i alpha_i T_i + T_final * background
    (Kerbl et al. 2023, Eq. 3), stopping before the Gaussian that would make T (1 - alpha) < 1e-4.

Memory: the image is processed in bands of rows holding at most `chunk_pairs` candidate pairs; a band's
float temporaries are freed before the next, so peak extra memory is O(chunk_pairs) floats
(about 100 bytes per candidate pair) plus what backward needs: the int64 (Gaussian, pixel) index of
every blended pair (O(intersections), like any tile rasterizer) and the final transmittance per pixel.
Backward is written by hand (below) and recomputes alpha and T from those indices, so no autograd
graph over pairs is ever stored; it also yields `means2d.absgrad` and the `densify_grad` of the
first k channels, which plain autograd cannot.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings

# Candidate pairs per band: ~100 MB of temporaries at float32, measured fastest on 2 CPU cores
# among 2^18..2^22 for the bench `random` scene (50k Gaussians, 640x360).
DEFAULT_CHUNK_PAIRS = 1 << 20
LOG_TRANSMITTANCE_STOP = math.log(constants.TRANSMITTANCE_STOP)


class CompositeOutput(NamedTuple):
    colors: torch.Tensor         # [C, H, W, D]
    alphas: torch.Tensor         # [C, H, W, 1] = 1 - final transmittance
    depth_sums: torch.Tensor     # [C, H, W, 1] sum_i alpha_i T_i z_i (not normalised)
    median_depths: torch.Tensor  # [C, H, W, 1] detached; 0 where T never falls below 0.5


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


def _segment_bounds(pixel_ids: torch.Tensor):
    """For pairs sorted by pixel: first and last pair index of each pair's segment."""
    n = pixel_ids.numel()
    starts = torch.ones(n, dtype=torch.bool, device=pixel_ids.device)
    starts[1:] = pixel_ids[1:] != pixel_ids[:-1]
    segment = torch.cumsum(starts.to(torch.int64), 0) - 1
    first = torch.nonzero(starts).squeeze(1)
    last = torch.cat([first[1:] - 1, first.new_tensor([n - 1])]) if n else first
    return segment, first, last


def _exclusive_segment_cumsum(values: torch.Tensor, segment, first) -> torch.Tensor:
    """sum of values[j] for j before i in i's segment (values float64)."""
    inclusive = torch.cumsum(values, 0)
    exclusive = inclusive - values
    return exclusive - exclusive[first][segment]


class _PairGeometry(NamedTuple):
    dx: torch.Tensor
    dy: torch.Tensor
    gaussian_alpha: torch.Tensor  # o G before the cap
    falloff: torch.Tensor         # G = exp(-sigma)
    alpha: torch.Tensor
    sigma: torch.Tensor


def _pair_geometry(gaussian, pixel, means2d, conics, opacities, width, height, alpha_cap):
    """alpha of (flat Gaussian index, global pixel index) pairs; pixel = (c H + y) W + x."""
    x = (pixel % width).to(means2d.dtype) + 0.5
    y = (torch.div(pixel, width, rounding_mode="floor") % height).to(means2d.dtype) + 0.5
    mean = means2d[gaussian]
    conic = conics[gaussian]
    dx, dy = mean[:, 0] - x, mean[:, 1] - y
    sigma = 0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) + conic[:, 1] * dx * dy
    falloff = torch.exp(-sigma)
    gaussian_alpha = opacities[gaussian] * falloff
    return _PairGeometry(dx, dy, gaussian_alpha, falloff, torch.clamp_max(gaussian_alpha, alpha_cap),
                         sigma)


def _bands(row_starts, row_ends, widths, n_rows, chunk_pairs):
    """Split the global rows [0, n_rows) into bands of at most ~chunk_pairs candidate pairs."""
    device = widths.device
    per_row = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
    per_row.index_add_(0, row_starts, widths)
    per_row.index_add_(0, row_ends, -widths)
    per_row = torch.cumsum(per_row, 0)[:n_rows]
    cumulative = torch.cumsum(per_row, 0) - per_row
    band_of_row = torch.div(cumulative, chunk_pairs, rounding_mode="floor")
    changes = torch.nonzero(band_of_row[1:] != band_of_row[:-1]).squeeze(1) + 1
    edges = [0] + changes.tolist() + [n_rows]
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def _forward_pairs(means2d, conics, opacities, colors, depths, pixel_boxes, settings, chunk_pairs,
                   deterministic):
    """Composite all cameras; returns accumulators and the blended pairs sorted by (pixel, depth)."""
    n_cameras, n, n_channels = colors.shape
    width, height = settings.width, settings.height
    device, dtype = means2d.device, means2d.dtype
    n_pixels = n_cameras * height * width
    color_sum = torch.zeros(n_pixels, n_channels, dtype=dtype, device=device)
    log_transmittance = torch.zeros(n_pixels, dtype=torch.float64, device=device)
    depth_sum = torch.zeros(n_pixels, dtype=dtype, device=device)
    median = torch.zeros(n_pixels, dtype=dtype, device=device)
    kept_gaussians, kept_pixels = [], []

    boxes = pixel_boxes.to(torch.int64).reshape(-1, 4)
    flat_means, flat_conics = means2d.reshape(-1, 2), conics.reshape(-1, 3)
    flat_opacities, flat_colors = opacities.reshape(-1), colors.reshape(-1, n_channels)
    flat_depths = depths.reshape(-1)
    # Front-to-back order per camera, equal depths by index (stable sort).
    order = torch.sort(depths, dim=1, stable=True).indices
    order = (order + torch.arange(n_cameras, device=device)[:, None] * n).reshape(-1)
    order = order[(boxes[order, 2] > boxes[order, 0]) & (boxes[order, 3] > boxes[order, 1])]
    camera_rows = torch.div(order, n, rounding_mode="floor") * height
    row_starts = camera_rows + boxes[order, 1]
    row_ends = camera_rows + boxes[order, 3]
    widths = boxes[order, 2] - boxes[order, 0]

    for band_start, band_end in _bands(row_starts, row_ends, widths, n_cameras * height, chunk_pairs):
        overlap = (row_starts < band_end) & (row_ends > band_start)
        gaussians = order[overlap]
        first_row = torch.clamp_min(row_starts[overlap], band_start)
        last_row = torch.clamp_max(row_ends[overlap], band_end)
        band_widths = widths[overlap]
        counts = band_widths * (last_row - first_row)
        pair_gaussian_slot = torch.repeat_interleave(torch.arange(gaussians.numel(), device=device),
                                                     counts)
        if pair_gaussian_slot.numel() == 0:
            continue
        local = torch.arange(pair_gaussian_slot.numel(), device=device)
        local -= (torch.cumsum(counts, 0) - counts)[pair_gaussian_slot]
        slot_width = band_widths[pair_gaussian_slot]
        rows = first_row[pair_gaussian_slot] + torch.div(local, slot_width, rounding_mode="floor")
        columns = boxes[gaussians[pair_gaussian_slot], 0] + local % slot_width
        pair_gaussian = gaussians[pair_gaussian_slot]
        pair_pixel = rows * width + columns
        del local, slot_width, rows, columns, pair_gaussian_slot

        geometry = _pair_geometry(pair_gaussian, pair_pixel, flat_means, flat_conics, flat_opacities,
                                  width, height, settings.alpha_cap)
        keep = (geometry.sigma >= 0) & (geometry.alpha >= constants.MIN_ALPHA)
        pair_gaussian, pair_pixel = pair_gaussian[keep], pair_pixel[keep]
        alpha = geometry.alpha[keep]
        # Pairs were generated front to back, so a stable sort by pixel keeps depth order.
        pair_pixel, by_pixel = torch.sort(pair_pixel, stable=True)
        pair_gaussian, alpha = pair_gaussian[by_pixel], alpha[by_pixel]

        log_keep = torch.log1p(-alpha.to(torch.float64))
        segment, first, _ = _segment_bounds(pair_pixel)
        log_before = _exclusive_segment_cumsum(log_keep, segment, first)
        log_after = log_before + log_keep
        # T is non-increasing, so the pairs with T_after >= 1e-4 are a prefix of every pixel's list.
        blended = torch.exp(log_after) >= constants.TRANSMITTANCE_STOP
        pair_gaussian, pair_pixel = pair_gaussian[blended], pair_pixel[blended]
        alpha, log_keep = alpha[blended], log_keep[blended]
        log_before, log_after = log_before[blended], log_after[blended]

        weight = alpha * torch.exp(log_before).to(dtype)
        pair_depth = flat_depths[pair_gaussian]
        scatter_add(color_sum, pair_pixel, weight[:, None] * flat_colors[pair_gaussian], deterministic)
        scatter_add(depth_sum, pair_pixel, weight * pair_depth, deterministic)
        scatter_add(log_transmittance, pair_pixel, log_keep, deterministic)
        crossing = (log_before >= math.log(constants.MEDIAN_TRANSMITTANCE)) & (
            log_after < math.log(constants.MEDIAN_TRANSMITTANCE))
        median[pair_pixel[crossing]] = pair_depth[crossing]
        kept_gaussians.append(pair_gaussian)
        kept_pixels.append(pair_pixel)

    empty = torch.zeros(0, dtype=torch.int64, device=device)
    pairs_gaussian = torch.cat(kept_gaussians) if kept_gaussians else empty
    pairs_pixel = torch.cat(kept_pixels) if kept_pixels else empty
    return color_sum, log_transmittance, depth_sum, median, pairs_gaussian, pairs_pixel


class _BackwardScan(NamedTuple):
    """Per-pair quantities of one band of the backward pass (pairs sorted by pixel, then depth)."""

    weight: torch.Tensor           # w_i = alpha_i T_i
    before: torch.Tensor           # T_i
    final: torch.Tensor            # T_final of the pair's pixel
    one_minus_alpha: torch.Tensor  # 1 - alpha_i
    segment: torch.Tensor          # pixel segment of each pair
    last: torch.Tensor             # last pair index of each segment

    def alpha_gradient(self, color_dot, background_dot, alpha_term):
        """g_alpha_i = T_i q_i - (sum_{j>i} w_j q_j + T_final (background_dot - alpha_term)) / (1 - alpha_i),
        with q the upstream-projected colour (and depth) of each pair."""
        inclusive = torch.cumsum((self.weight * color_dot).to(torch.float64), 0)
        behind = (inclusive[self.last][self.segment] - inclusive).to(self.weight.dtype)
        return self.before * color_dot - (behind + self.final * (background_dot - alpha_term)) / self.one_minus_alpha


class _CompositeFunction(torch.autograd.Function):
    """Forward: `_forward_pairs`. Backward: the vector-Jacobian product derived below.

    Per pixel with blended list i = 1..n (front to back), w_i = alpha_i T_i and upstream gradients
    g_C [D], g_A (alpha image) and g_Z (depth sum):
        dC/dc_i = w_i                      dZ/dz_i = w_i
        dC/dalpha_i = c_i T_i - (S_i + T_final bg) / (1 - alpha_i),  S_i = sum_{j > i} w_j c_j
        dZ/dalpha_i = z_i T_i - S^z_i / (1 - alpha_i)
        dA/dalpha_i = T_final / (1 - alpha_i)
    Projecting on the upstream gradients only scalars are scanned: with v_j = w_j (g_C.c_j + g_Z z_j)
        g_alpha_i = T_i (g_C.c_i + g_Z z_i) - (sum_{j>i} v_j + T_final (g_C.bg - g_A)) / (1 - alpha_i).
    alpha = min(cap, o G), G = exp(-sigma): below the cap g_o = G g_alpha and g_sigma = -o G g_alpha
    (above it min() passes nothing); sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2 with d = mean - pixel:
        g_a = g_sigma dx^2 / 2, g_b = g_sigma dx dy, g_c = g_sigma dy^2 / 2,
        g_mean = g_sigma (a dx + b dy, b dx + c dy);  g_background = sum_pixels T_final g_C.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, pixel_boxes, settings,
                chunk_pairs, deterministic, absgrad, densify_channels, densify_grad):
        n_cameras, n, n_channels = colors.shape
        h, w = settings.height, settings.width
        opacities_per_camera = opacities[None].expand(n_cameras, n)
        color_sum, log_transmittance, depth_sum, median, pairs_gaussian, pairs_pixel = _forward_pairs(
            means2d, conics, opacities_per_camera, colors, depths, pixel_boxes, settings, chunk_pairs,
            deterministic)
        final_transmittance = torch.exp(log_transmittance).to(means2d.dtype)
        image = color_sum
        if backgrounds is not None:
            image = image + final_transmittance.reshape(n_cameras, h * w, 1) .mul(
                backgrounds[:, None, :]).reshape(-1, n_channels)
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds,
                              final_transmittance, pairs_gaussian, pairs_pixel)
        ctx.settings, ctx.chunk_pairs, ctx.deterministic = settings, chunk_pairs, deterministic
        ctx.absgrad, ctx.densify_channels, ctx.densify_grad = absgrad, densify_channels, densify_grad
        ctx.means2d_tensor = means2d if absgrad else None
        median = median.reshape(n_cameras, h, w, 1)
        ctx.mark_non_differentiable(median)
        return (image.reshape(n_cameras, h, w, n_channels),
                (1 - final_transmittance).reshape(n_cameras, h, w, 1),
                depth_sum.reshape(n_cameras, h, w, 1), median)

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depth_sums, _grad_median):
        with backward_stage("compositing_backward"):
            return _CompositeFunction._backward(ctx, grad_colors, grad_alphas, grad_depth_sums)

    @staticmethod
    def _backward(ctx, grad_colors, grad_alphas, grad_depth_sums):
        (means2d, conics, opacities, colors, depths, backgrounds, final_transmittance,
         pairs_gaussian, pairs_pixel) = ctx.saved_tensors
        settings = ctx.settings
        n_cameras, n, n_channels = colors.shape
        dtype, device = means2d.dtype, means2d.device
        flat_means, flat_conics = means2d.reshape(-1, 2), conics.reshape(-1, 3)
        flat_colors, flat_depths = colors.reshape(-1, n_channels), depths.reshape(-1)
        flat_opacities = opacities[None].expand(n_cameras, n).reshape(-1)

        def zeros_or(grad, shape):
            return torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad.reshape(shape)

        n_pixels = final_transmittance.numel()
        grad_colors = zeros_or(grad_colors, (n_pixels, n_channels))
        grad_alphas = zeros_or(grad_alphas, (n_pixels,))
        grad_depth_sums = zeros_or(grad_depth_sums, (n_pixels,))
        k = ctx.densify_channels

        # Per-pixel scalars of the background and alpha terms.
        pixel_background = torch.zeros(n_pixels, dtype=dtype, device=device)
        pixel_background_k = torch.zeros(n_pixels, dtype=dtype, device=device)
        if backgrounds is not None:
            per_camera = grad_colors.reshape(n_cameras, -1, n_channels)
            pixel_background = (per_camera * backgrounds[:, None]).sum(-1).reshape(-1)
            if k is not None:
                pixel_background_k = (per_camera[..., :k] * backgrounds[:, None, :k]).sum(-1).reshape(-1)

        grad_means = torch.zeros_like(flat_means)
        grad_abs = torch.zeros_like(flat_means) if ctx.absgrad else None
        grad_densify = torch.zeros_like(flat_means) if k is not None else None
        grad_conics = torch.zeros_like(flat_conics)
        grad_opacities = torch.zeros_like(flat_opacities)
        grad_colors_out = torch.zeros(n_cameras * n, n_channels, dtype=dtype, device=device)
        grad_depths = torch.zeros_like(flat_depths)

        # Bands of pairs never split a pixel's list (pairs are sorted by pixel).
        total = pairs_pixel.numel()
        start = 0
        while start < total:
            end = min(start + ctx.chunk_pairs, total)
            if end < total:
                end = int(torch.searchsorted(pairs_pixel, pairs_pixel[end - 1], right=True))
            gaussian, pixel = pairs_gaussian[start:end], pairs_pixel[start:end]
            start = end
            geometry = _pair_geometry(gaussian, pixel, flat_means, flat_conics, flat_opacities,
                                      settings.width, settings.height, settings.alpha_cap)
            alpha = geometry.alpha
            log_keep = torch.log1p(-alpha.to(torch.float64))
            segment, first, last = _segment_bounds(pixel)
            before = torch.exp(_exclusive_segment_cumsum(log_keep, segment, first)).to(dtype)
            weight = alpha * before
            pair_grad_color = grad_colors[pixel]
            pair_color = flat_colors[gaussian]
            pair_depth = flat_depths[gaussian]
            pair_grad_depth = grad_depth_sums[pixel]
            final = final_transmittance[pixel]
            one_minus_alpha = 1 - alpha

            scan = _BackwardScan(weight, before, final, one_minus_alpha, segment, last)
            color_dot = (pair_grad_color * pair_color).sum(-1)
            grad_alpha = scan.alpha_gradient(color_dot + pair_grad_depth * pair_depth,
                                             pixel_background[pixel], grad_alphas[pixel])
            below_cap = geometry.gaussian_alpha < settings.alpha_cap
            grad_sigma = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha,
                                     torch.zeros_like(grad_alpha))
            conic = flat_conics[gaussian]
            dx, dy = geometry.dx, geometry.dy
            mean_direction = torch.stack([conic[:, 0] * dx + conic[:, 1] * dy,
                                          conic[:, 1] * dx + conic[:, 2] * dy], dim=-1)
            pair_grad_mean = grad_sigma[:, None] * mean_direction
            det = ctx.deterministic
            scatter_add(grad_means, gaussian, pair_grad_mean, det)
            if grad_abs is not None:
                scatter_add(grad_abs, gaussian, pair_grad_mean.abs(), det)
            if grad_densify is not None:
                color_dot_k = (pair_grad_color[:, :k] * pair_color[:, :k]).sum(-1)
                grad_alpha_k = scan.alpha_gradient(color_dot_k, pixel_background_k[pixel],
                                                   torch.zeros_like(color_dot_k))
                grad_sigma_k = torch.where(below_cap, -geometry.gaussian_alpha * grad_alpha_k,
                                           torch.zeros_like(grad_alpha_k))
                scatter_add(grad_densify, gaussian, grad_sigma_k[:, None] * mean_direction, det)
            scatter_add(grad_conics, gaussian, torch.stack(
                [0.5 * grad_sigma * dx * dx, grad_sigma * dx * dy, 0.5 * grad_sigma * dy * dy], -1), det)
            scatter_add(grad_opacities, gaussian,
                        torch.where(below_cap, geometry.falloff * grad_alpha, torch.zeros_like(grad_alpha)),
                        det)
            scatter_add(grad_colors_out, gaussian, weight[:, None] * pair_grad_color, det)
            scatter_add(grad_depths, gaussian, weight * pair_grad_depth, det)

        grad_backgrounds = None
        if backgrounds is not None and ctx.needs_input_grad[5]:
            grad_backgrounds = (final_transmittance[:, None] * grad_colors).reshape(
                n_cameras, -1, n_channels).sum(1)
        if grad_abs is not None and ctx.means2d_tensor is not None:
            absgrad = grad_abs.reshape(n_cameras, n, 2)
            previous = getattr(ctx.means2d_tensor, "absgrad", None)
            ctx.means2d_tensor.absgrad = absgrad if previous is None else previous + absgrad
        if grad_densify is not None and ctx.densify_grad is not None:
            ctx.densify_grad.add_(grad_densify.reshape(n_cameras, n, 2).to(ctx.densify_grad.dtype))
        return (grad_means.reshape(n_cameras, n, 2), grad_conics.reshape(n_cameras, n, 3),
                grad_opacities.reshape(n_cameras, n).sum(0), grad_colors_out.reshape(n_cameras, n, n_channels),
                grad_depths.reshape(n_cameras, n), grad_backgrounds,
                None, None, None, None, None, None, None)


def composite(means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
              depths: torch.Tensor, backgrounds: torch.Tensor | None, pixel_boxes: torch.Tensor,
              settings: RenderSettings, *, absgrad: bool = False, densify_channels: int | None = None,
              densify_grad: torch.Tensor | None = None, deterministic: bool = False,
              chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> CompositeOutput:
    """Blend projected Gaussians front to back into C images (differentiable, hand-written backward).

    Args:
        means2d: [C, N, 2] pixel coordinates.  conics: [C, N, 3] inverse 2D covariances (a, b, c).
        opacities: [N].  colors: [C, N, D].  depths: [C, N] camera z.
        backgrounds: [C, D] or None (black).
        pixel_boxes: [C, N, 4] int32 (x0, y0, x1, y1) from `binning.pixel_boxes`; a Gaussian is
            evaluated only there, so culled Gaussians must have empty boxes.
        settings: render settings (size, alpha cap).
        absgrad: after backward, set `means2d.absgrad` [C, N, 2] = sum over pixels of |dL_pixel/dmean|.
        densify_channels, densify_grad: after backward, add to `densify_grad` [C, N, 2] the gradient
            of the means from the upstream gradient of colors[..., :k] alone.
        deterministic: fixed-order reductions on CUDA (CPU is always deterministic).
        chunk_pairs: candidate pairs per band (bounds the temporaries).
    Returns:
        CompositeOutput(colors [C,H,W,D], alphas [C,H,W,1], depth_sums [C,H,W,1],
        median_depths [C,H,W,1]).
    """
    outputs = _CompositeFunction.apply(means2d, conics, opacities, colors, depths, backgrounds,
                                       pixel_boxes, settings, chunk_pairs, deterministic, absgrad,
                                       densify_channels, densify_grad)
    return CompositeOutput(*outputs)
