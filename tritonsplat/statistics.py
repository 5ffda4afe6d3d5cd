"""Intersection statistics of a scene under three tile rules (torch, any device), used by `bench`."""

from __future__ import annotations

import torch

from .settings import RenderSettings


@torch.no_grad()
def intersection_report(means, quats, scales, opacities, viewmats, Ks, width, height, *,
                        tile_size: int = 16) -> dict:
    """Tile intersections of one scene under three rules (torch, any device; chunked).

    - "ellipse": tritonsplat's binning (ellipse at the alpha >= 1/255 level set vs tile pixel centres);
    - "exact_minimum": tiles holding at least one pixel where the Gaussian's alpha reaches 1/255;
    - "original_rule": the original renderer's tile rectangle of r = ceil(3 sqrt(lambda_max)).

    Returns:
        dict with n_gaussians, n_visible, the three counts, per-Gaussian averages and the ratios
        ellipse / exact_minimum and exact_minimum / original_rule, ellipse / original_rule.
    """
    from .reference.binning import bin_tiles, exact_tile_intersections
    from .reference.projection import project_gaussians
    from .settings import standard_clamp_limits

    settings = RenderSettings(width=width, height=height, tile_size=tile_size)
    limits = standard_clamp_limits(Ks, width, height)
    projected = project_gaussians(means, quats, scales, opacities, viewmats, Ks, limits, settings)
    ellipse = int(bin_tiles(projected.means2d, projected.conics, opacities, projected.radii,
                            projected.depths, settings).keys.numel())
    exact = exact_tile_intersections(projected.means2d, projected.conics, opacities, projected.radii, settings)
    original = original_rule_tile_count(means, quats, scales, viewmats, Ks, settings)
    n = int(means.shape[0]) * int(viewmats.shape[0])
    return {
        "n_gaussians": int(means.shape[0]),
        "n_visible": int((projected.radii > 0).sum()),
        "ellipse": ellipse,
        "exact_minimum": exact,
        "original_rule": original,
        "ellipse_per_gaussian": ellipse / max(n, 1),
        "exact_per_gaussian": exact / max(n, 1),
        "original_per_gaussian": original / max(n, 1),
        "ellipse_over_exact": ellipse / max(exact, 1),
        "exact_over_original": exact / max(original, 1),
        "ellipse_over_original": ellipse / max(original, 1),
    }


@torch.no_grad()
def original_rule_tile_count(means, quats, scales, viewmats, Ks, settings: RenderSettings) -> int:
    """Tile intersections of the original renderer's rule: the tile rectangle (getRect) of
    r = ceil(3 sqrt(lambda_max)), lambda_max = mid + sqrt(max(0.1, mid^2 - det)), no opacity cull."""
    from dataclasses import replace

    from .reference.binning import inria_tile_rectangles
    from .reference.projection import project_gaussians
    from .settings import standard_clamp_limits

    inria = replace(settings, radius_rule="inria", tile_rule="rectangle")
    opacities = torch.ones(means.shape[0], dtype=means.dtype, device=means.device)
    projected = project_gaussians(means, quats, scales, opacities, viewmats, Ks,
                                  standard_clamp_limits(Ks, settings.width, settings.height), inria)
    rect = inria_tile_rectangles(projected.means2d, projected.radii, inria).to(torch.int64)
    count = (rect[..., 2] - rect[..., 0]) * (rect[..., 3] - rect[..., 1])
    return int(torch.where(projected.radii > 0, count, torch.zeros_like(count)).sum())


SATURATED_TRANSMITTANCE = 1e-3


@torch.no_grad()
def walked_intersections(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                         tile_size: int = 16) -> dict:
    """Tile intersections, and how many of them a front-to-back walk reaches before each tile saturates.

    A pixel counts as saturated once its transmittance is below SATURATED_TRANSMITTANCE (later
    entries change its colour by less than 0.1 %): it walks up to its last blended entry; any other
    pixel walks its tile's whole list. A tile walks as far as its slowest pixel. The gap between the
    two counts is the work early termination saves (the
    measure of wasted intersections in Speedy-Splat, Hanson et al. 2025). torch twins, any device.

    Returns:
        dict with intersections, walked and walked_fraction = walked / intersections.
    """
    from .reference.binning import bin_tiles
    from .reference.compositing import composite_state
    from .reference.projection import project_gaussians
    from .reference.sorting import sort_intersections
    from .settings import standard_clamp_limits

    settings = RenderSettings(width=width, height=height, tile_size=tile_size)
    n_cameras, n = viewmats.shape[0], means.shape[0]
    projected = project_gaussians(means, quats, scales, opacities, viewmats, Ks,
                                  standard_clamp_limits(Ks, width, height), settings)
    bins = bin_tiles(projected.means2d, projected.conics, opacities, projected.radii, projected.depths, settings)
    tiles = sort_intersections(bins, n_cameras, n, settings)
    colors = colors if colors.dim() == 2 else colors[0]
    state = composite_state(projected.means2d, projected.conics, opacities, colors.float(), projected.depths,
                            tiles.tile_ranges, tiles.gaussian_ids, settings)
    ranges = tiles.tile_ranges.long().view(n_cameras, settings.tiles_y, settings.tiles_x, 2)
    pad_h, pad_w = settings.tiles_y * tile_size - height, settings.tiles_x * tile_size - width
    last = torch.nn.functional.pad(state.last_index.long(), (0, pad_w, 0, pad_h), value=-1)
    final = torch.nn.functional.pad(state.final_transmittance, (0, pad_w, 0, pad_h), value=0.0)
    last = last.view(n_cameras, settings.tiles_y, tile_size, settings.tiles_x, tile_size).permute(0, 1, 3, 2, 4)
    final = final.view(n_cameras, settings.tiles_y, tile_size, settings.tiles_x, tile_size).permute(0, 1, 3, 2, 4)
    start, end = ranges[..., 0, None, None], ranges[..., 1, None, None]
    saturated = final < SATURATED_TRANSMITTANCE
    per_pixel = torch.where(saturated & (last >= 0), last + 1 - start, end - start)
    walked = int(per_pixel.flatten(3).amax(3).clamp_min(0).sum())
    total = int(tiles.gaussian_ids.numel())
    return {"intersections": total, "walked": walked, "walked_fraction": walked / total if total else 0.0}
