"""The torch backend's pipeline: project -> bin -> sort (+ tile ranges) -> composite, in pure PyTorch.

Twin of `tritonsplat.ops.pipeline.render_triton` (same signature and stages: the tile lists are
built by `reference.binning.bin_tiles` with the exact ellipse-tile test and sorted by
`reference.sorting.sort_intersections`, and `reference.compositing.composite` walks them with early
termination). Computes in the inputs' dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import torch

from ..compilation import compiled
from ..profiling import stage
from ..settings import RenderSettings, standard_clamp_limits
from ..types import RenderOptions
from . import antialiasing, binning, compositing, projection, sorting

# ~100 elementwise ops on per-Gaussian scalars: where `tritonsplat.compilation.wanted`, torch.compile fuses them
# and their autograd backward (2.8 against 9.3 ms forward + backward with autograd, 32,744 Gaussians, 2-core Intel
# Xeon); elsewhere the projection's hand-written backward runs.
_project_gaussians = compiled(functools.partial(projection.project_gaussians, hand_backward=False),
                              "the torch backend's projection", eager=projection.project_gaussians)


def render_torch(inputs, settings: RenderSettings, options: RenderOptions, *,
                 clamp_limits: torch.Tensor | None = None, covars: torch.Tensor | None = None,
                 means2d_hook=None):
    """Render validated inputs (`RasterizeInputs`) with the torch stages.

    Args:
        inputs: validated inputs (`validation.validate_rasterize_inputs`).
        settings: per-call render settings.
        options: outputs, absgrad, densify_channels, color_grad_channels, deterministic,
            max_intersections (capacity mode: fixed-size intersection arrays; n_intersections is
            then a 0-d int64 tensor and the output's overflow a 0-d bool tensor).
        clamp_limits: [C, 4] limits of x/z, y/z inside the EWA Jacobian, or None for
            `settings.standard_clamp_limits`.
        covars: [N, 6] covariances replacing quats/scales; means2d_hook(means2d) -> means2d may re-route
            the screen-space means between projection and compositing (both used by tritonsplat.compat).
    Returns:
        RasterizeOutput (backend "torch"); n_intersections counts the tile intersections of binning.
    """
    from ..types import RasterizeOutput

    if clamp_limits is None:
        clamp_limits = standard_clamp_limits(inputs.Ks, settings.width, settings.height)
    with stage("projection"):
        projected = _project_gaussians(
            inputs.means, inputs.quats, inputs.scales, inputs.opacities, inputs.viewmats, inputs.Ks,
            clamp_limits, settings, covars=covars,
            sh_coeffs=inputs.colors if inputs.sh_degree is not None else None, sh_degree=inputs.sh_degree)
    colors, means2d, composite_means2d = projection.compositor_colors_and_means2d(
        projected, inputs.colors, inputs.sh_degree, means2d_hook)
    # Binning keeps the plain opacities: their alpha >= 1/255 extent contains the compensated one's.
    blend_opacities = (antialiasing.antialiased_opacities(inputs.opacities, projected.conics, settings.eps2d)
                       if settings.antialiased else inputs.opacities)
    with stage("binning"):
        bins = binning.bin_tiles(means2d.detach(), projected.conics.detach(), inputs.opacities.detach(),
                                 projected.radii, projected.depths.detach(), settings,
                                 max_intersections=options.max_intersections)
    with stage("sorting"):
        tiles = sorting.sort_intersections(bins, inputs.n_cameras, inputs.n_gaussians, settings)
    densify_grad = None
    if options.densify_channels is not None:
        densify_grad = torch.zeros_like(means2d, requires_grad=False)
    with stage("compositing"):
        rendered = compositing.composite(
            composite_means2d, projected.conics, blend_opacities, colors, projected.depths, inputs.backgrounds,
            tiles.tile_ranges, tiles.gaussian_ids, settings, outputs=options.outputs, absgrad=options.absgrad,
            densify_channels=options.densify_channels, densify_grad=densify_grad,
            color_grad_channels=options.color_grad_channels, deterministic=options.deterministic,
            means2d_for_absgrad=means2d if options.absgrad else None)
    fields = {}
    if bins.overflow is not None:
        fields["overflow"] = bins.overflow
    return RasterizeOutput(
        colors=rendered.colors, alphas=rendered.alphas, depths=rendered.depths,
        median_depths=rendered.median_depths, radii=projected.radii, means2d=means2d,
        n_intersections=bins.n_intersections, densify_grad=densify_grad, backend="torch", **fields)
