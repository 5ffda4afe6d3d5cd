"""The Triton backend's pipeline: project -> bin -> sort -> tile ranges -> composite.

Everything runs in float32 (fp16/bf16 inputs are upcast by validation; float64 inputs are computed in
float32 and the float outputs cast back to float64, so gradients flow back in the input dtype).
"""

from __future__ import annotations

import torch

from ..profiling import stage
from ..rendering import RasterizeOutput
from ..settings import RenderSettings
from . import binning, compositing, projection, sorting


def render_triton(inputs, settings: RenderSettings, clamp_limits: torch.Tensor, *, absgrad: bool,
                  densify_channels: int | None, deterministic: bool, covars: torch.Tensor | None = None,
                  means2d_hook=None) -> RasterizeOutput:
    """Render validated inputs (`validation.RasterizeInputs`) with the Triton kernels.

    `covars` ([N, 6]) replaces quats/scales and `means2d_hook(means2d) -> means2d` may re-route the
    screen-space means between projection and compositing (both used by tritonsplat.compat).
    """
    if settings.tile_size & (settings.tile_size - 1) or not 4 <= settings.tile_size <= 32:
        raise ValueError(f"tile_size: the triton backend needs a power of two in 4..32, got {settings.tile_size}")
    output_dtype = inputs.means.dtype

    def f32(tensor):
        return None if tensor is None else tensor.float()

    means, quats, scales, opacities = f32(inputs.means), f32(inputs.quats), f32(inputs.scales), f32(inputs.opacities)
    viewmats, Ks = f32(inputs.viewmats), f32(inputs.Ks)
    n_cameras = inputs.n_cameras
    sh_coeffs = f32(inputs.colors) if inputs.sh_degree is not None else None
    with stage("projection"):
        projected = projection.project_gaussians(
            means, quats, scales, opacities, viewmats, Ks, f32(clamp_limits), settings,
            covars=f32(covars), sh_coeffs=sh_coeffs, sh_degree=inputs.sh_degree)
    if inputs.sh_degree is not None:
        colors = projected.colors
    else:
        colors = f32(inputs.colors)
        if colors.stride(0) == 0:       # the same [N, D] colours for every camera
            colors = colors[0]
    means2d = projected.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    composite_means2d = means2d_hook(means2d) if means2d_hook is not None else means2d

    with stage("binning"):
        bins = binning.bin_tiles(means2d.detach(), projected.conics.detach(), opacities.detach(), projected.radii,
                                 projected.depths.detach(), settings)
    with stage("sorting"):
        sorted_keys, sorted_ids = sorting.sort_by_depth(bins.keys, bins.gaussian_ids)
    with stage("tile_ranges"):
        rank_bits = binning.rank_key_bits(n_cameras, inputs.n_gaussians, settings)
        shift = rank_bits if sorted_keys.dtype == torch.int32 else sorting.DEPTH_BITS
        ranges = sorting.tile_ranges(sorted_keys, n_cameras * settings.n_tiles, shift)

    densify_grad = None
    if densify_channels is not None:
        densify_grad = torch.zeros(n_cameras, inputs.n_gaussians, 2, device=means.device, dtype=torch.float32)
    with stage("compositing"):
        rendered = compositing.composite(
            composite_means2d, projected.conics, opacities, colors, projected.depths, f32(inputs.backgrounds),
            ranges.to(torch.int32), sorted_ids, settings, absgrad=absgrad, densify_channels=densify_channels,
            densify_grad=densify_grad, deterministic=deterministic,
            means2d_for_absgrad=means2d if absgrad else None)

    def out(tensor):
        return tensor if tensor is None or tensor.dtype == output_dtype else tensor.to(output_dtype)

    return RasterizeOutput(
        colors=out(rendered.colors), alphas=out(rendered.alphas), depths=out(rendered.depths),
        median_depths=out(rendered.median_depths), radii=projected.radii, means2d=means2d,
        n_intersections=int(sorted_keys.numel()), densify_grad=densify_grad, backend="triton")
