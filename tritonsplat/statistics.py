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
