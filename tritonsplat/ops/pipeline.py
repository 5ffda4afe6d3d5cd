"""The Triton backend's pipeline: project -> bin -> sort (+ tile ranges) -> composite.

Torch twin: `tritonsplat.reference.pipeline.render_torch` (same signature); both are run through
`tritonsplat.backends.render`. Everything runs in float32 (fp16/bf16 inputs are upcast by validation;
float64 inputs are computed in float32 and the float outputs cast back to float64, so gradients flow
back in the input dtype).

Host work of a warm forward: one host read (the intersection count, which also brings back the
pending value checks of validation), none with `max_intersections`; the launch counts are asserted
by tests/test_host_budget.py.
"""

from __future__ import annotations

import torch

from ..profiling import stage
from ..reference.projection import compositor_colors_and_means2d
from ..settings import RenderSettings
from ..types import RasterizeInputs, RasterizeOutput, RenderOptions
from ..validation import raise_failed_checks, resolve_pending_checks
from . import _alloc, antialiasing, binning, compositing, projection, sorting


def render_triton(inputs: RasterizeInputs, settings: RenderSettings, options: RenderOptions, *,
                  clamp_limits: torch.Tensor | None = None, covars: torch.Tensor | None = None,
                  means2d_hook=None) -> RasterizeOutput:
    """Render validated inputs with the Triton kernels.

    Args:
        inputs: validated inputs; their `pending_checks` (device flags) are read with the intersection
            count and raise the same ValueErrors as the torch backend's checks.
        options: outputs, absgrad, densify_channels, color_grad_channels, deterministic,
            max_intersections (capacity mode: no host read; n_intersections and overflow on the device).
        clamp_limits: [C, 4] limits of x/z, y/z inside the EWA Jacobian, or None for the standard
            ones (`settings.standard_clamp_limits`, computed inside the projection kernel).
        covars: [N, 6] replaces quats/scales; means2d_hook(means2d) -> means2d may re-route the
            screen-space means between projection and compositing (both used by tritonsplat.compat).
    """
    if settings.tile_size & (settings.tile_size - 1) or not 4 <= settings.tile_size <= 32:
        raise ValueError(f"tile_size: the triton backend needs a power of two in 4..32, got {settings.tile_size}")
    output_dtype = inputs.means.dtype
    capacity_mode = options.max_intersections is not None
    if capacity_mode:
        inputs = resolve_pending_checks(inputs)     # only when a caller built them: capacity mode reads nothing

    def f32(tensor):
        return None if tensor is None else tensor.float()

    means, quats, scales, opacities = f32(inputs.means), f32(inputs.quats), f32(inputs.scales), f32(inputs.opacities)
    viewmats, Ks = f32(inputs.viewmats), f32(inputs.Ks)
    n_cameras, n_gaussians = inputs.n_cameras, inputs.n_gaussians
    sh_coeffs = f32(inputs.colors) if inputs.sh_degree is not None else None
    with stage("projection"):
        projected = projection.project_gaussians(
            means, quats, scales, opacities, viewmats, Ks, f32(clamp_limits), settings,
            covars=f32(covars), sh_coeffs=sh_coeffs, sh_degree=inputs.sh_degree)
    colors, means2d, composite_means2d = compositor_colors_and_means2d(
        projected, f32(inputs.colors), inputs.sh_degree, means2d_hook)
    # Binning keeps the plain opacities: their alpha >= 1/255 extent contains the compensated one's.
    blend_opacities = (antialiasing.antialiased_opacities(opacities, projected.conics, settings.eps2d)
                       if settings.antialiased else opacities)

    with stage("binning"):
        pending = inputs.pending_checks
        bins, flags = binning.bin_tiles_with_checks(
            means2d.detach(), projected.conics.detach(), opacities.detach(), projected.radii,
            projected.depths.detach(), settings, max_intersections=options.max_intersections,
            checks=pending.flags if pending is not None else None)
        if pending is not None:
            raise_failed_checks(pending.messages, flags)
    with stage("sorting"):
        tiles = sorting.sort_intersections(bins, n_cameras, n_gaussians, settings)

    densify_grad = None
    if options.densify_channels is not None:
        densify_grad = _alloc.zeros(n_cameras, n_gaussians, 2, device=means.device, dtype=torch.float32)
    with stage("compositing"):
        rendered = compositing.composite(
            composite_means2d, projected.conics, blend_opacities, colors, projected.depths, f32(inputs.backgrounds),
            tiles.tile_ranges, tiles.gaussian_ids, settings, outputs=options.outputs, absgrad=options.absgrad,
            densify_channels=options.densify_channels, densify_grad=densify_grad,
            color_grad_channels=options.color_grad_channels, deterministic=options.deterministic,
            means2d_for_absgrad=means2d if options.absgrad else None)

    def out(tensor):
        return tensor if tensor is None or tensor.dtype == output_dtype else tensor.to(output_dtype)

    return RasterizeOutput(
        colors=out(rendered.colors), alphas=out(rendered.alphas), depths=out(rendered.depths),
        median_depths=out(rendered.median_depths), radii=projected.radii, means2d=means2d,
        n_intersections=bins.n_intersections, densify_grad=densify_grad, backend="triton", overflow=bins.overflow)
