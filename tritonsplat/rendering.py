"""The public renderer: `rasterize()` and its output `RasterizeOutput` (defined in `types`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from . import constants
from .backends import render, resolve_backend
from .settings import RenderSettings
from .types import ALL_OUTPUTS, OutputName, RasterizeOutput, RenderOptions
from .validation import check_values, validate_rasterize_inputs, validate_render_options, value_checks

__all__ = ["rasterize", "RasterizeOutput", "render_torch"]


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    near: float = constants.NEAR_PLANE,
    far: float = constants.FAR_PLANE,
    backgrounds: torch.Tensor | None = None,
    alpha_cap: float = constants.ALPHA_CAP,
    eps2d: float = constants.EPS2D,
    tile_size: int = constants.TILE_SIZE,
    absgrad: bool = False,
    densify_channels: int | None = None,
    deterministic: bool = False,
    backend: Literal["auto", "torch", "triton"] = "auto",
    outputs: tuple[OutputName, ...] = ALL_OUTPUTS,
    color_grad_channels: int | None = None,
    max_intersections: int | None = None,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
) -> RasterizeOutput:
    """Render 3D Gaussians into C pinhole cameras, differentiably.

    Implements the 3D Gaussian Splatting image model (Kerbl et al., SIGGRAPH 2023) as used by
    Dynamic 3D Gaussians (Luiten et al., 3DV 2024): each Gaussian is projected with EWA splatting
    (Zwicker et al. 2001), binned into tiles, depth sorted and alpha composited front to back.

    Projection: t = R mu + T (camera z forward, x right, y down). With J = [[fx/z, 0, -fx x/z^2],
    [0, fy/z, -fy y/z^2]], where inside J only x/z is clamped to [-(cx + 0.15 W)/fx,
    (W - cx + 0.15 W)/fx] and y/z likewise, Sigma2D = J R Sigma R^T J^T + eps2d I and
    mean2d = (fx x/z + cx, fy y/z + cy). Pixel (i, j) is sampled at (i + 0.5, j + 0.5).
    Compositing: alpha = min(alpha_cap, o exp(-d^T Sigma2D^-1 d / 2)); contributions with
    alpha < 1/255 are skipped; a pixel stops before the Gaussian that would make
    T (1 - alpha) < 1e-4; colour = sum_i c_i alpha_i T_i + T_final background. Equal depths are
    ordered by Gaussian index. Every Gaussian contributes at every pixel where its alpha reaches
    1/255: the result equals a dense render, tiles are only an acceleration.
    With rasterize_mode="antialiased", o in the compositing rule is o sqrt(det(Sigma2D - eps2d I) /
    det Sigma2D) per camera (Mip-Splatting's 2D Mip filter, Yu et al., CVPR 2024; gsplat's mode of the same
    name): the dilation then blurs a splat without adding to its integral.
    A Gaussian is culled (radius 0) when z <= near or z >= far, o < 1/255, det(Sigma2D) <= 0 or its
    box [mean2d - r, mean2d + r] misses the image, with r = ceil(k sqrt(lambda_max(Sigma2D))) and
    k = min(3.33, sqrt(2 ln(255 o))).

    Gradients are exact derivatives of this forward for means, quats (unnormalised), scales,
    opacities, colors / SH coefficients, backgrounds and, when they require grad, viewmats
    (camera refinement). Above the alpha cap, min() passes no gradient. Ks get no gradient.

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] rotations as (w, x, y, z) quaternions of any non-zero norm.
        scales: [N, 3] activated (positive) standard deviations along the rotated axes.
        opacities: [N] activated opacities in [0, 1].
        colors: [N, D] or per camera [C, N, D], any D >= 1 (e.g. RGB plus segmentation channels
            rendered in one pass); or SH coefficients [N, K, 3] with K >= (sh_degree + 1)^2 when
            `sh_degree` is given (colour = max(SH(view direction) + 0.5, 0), 3DGS basis).
        viewmats: [C, 4, 4] world-to-camera matrices, OpenCV convention.
        Ks: [C, 3, 3] pinhole intrinsics in pixels.
        width, height: image size in pixels.
        sh_degree: None for plain colours, else 0..3.
        near, far: culling planes in camera z (defaults 0.01, 1e10).
        backgrounds: [C, D] background colours (default black).
        alpha_cap: maximum alpha of one Gaussian (default 0.99, the original's).
        eps2d: dilation added to the 2D covariance diagonal in px^2 (default 0.3).
        tile_size: tile side in pixels (default 16; a power of two for the Triton backend).
        absgrad: also accumulate `means2d.absgrad` (sum over pixels of |dL/dmean2d|, AbsGS).
        densify_channels: k, to fill `densify_grad` with the screen-space gradient of the first k
            channels only (densify on RGB while rendering RGB + segmentation in one pass).
        deterministic: bit-identical gradients run to run (fixed-order reductions instead of
            float atomics; slower backward on CUDA).
        backend: "auto" (Triton on CUDA tensors, else torch; overridable by the environment
            variable TRITONSPLAT_BACKEND), "torch" (pure PyTorch, any device) or "triton".
        outputs: which images to compute, a tuple from "colors", "alphas", "depths",
            "median_depths" (default all four); the fields not asked for are None in the result
            (and the Triton compositor skips their work).
        color_grad_channels: k, so that only colors[..., :k] receive colour gradients (the others
            get zeros; e.g. segmentation colours that never learn); every other gradient still sees
            all D channels and stays exact. Default None: all channels.
        max_intersections: capacity mode (Triton backend): intersection buffers of this many
            entries and no host read at all (a render can be captured in a CUDA graph);
            `n_intersections` is then a 0-d int64 tensor on the device and `overflow` a 0-d bool
            tensor, True when more intersections existed (those past the capacity are dropped:
            render again with a larger capacity). The value checks (NaN/Inf, ranges), which need a
            host read, are skipped in this mode; shapes, dtypes and devices are still checked.
        rasterize_mode: "classic" (3DGS, the default) or "antialiased" (the 2D Mip filter's opacity
            factor above; opacities get gradients through it, and so do means, quats and scales).

    Returns:
        RasterizeOutput with colors [C,H,W,D], alphas [C,H,W,1], depths [C,H,W,1],
        median_depths [C,H,W,1] (None where not in `outputs`), radii [C,N] int32, means2d [C,N,2],
        n_intersections (int, or a 0-d device tensor with max_intersections), densify_grad [C,N,2]
        or None, backend, overflow (None, or a 0-d bool device tensor with max_intersections); and
        the property visible = radii > 0.
        fp16/bf16 inputs are computed in float32; float64 inputs in float64 (torch backend) or in
        float32 and returned as float64 (triton backend).

    Raises:
        ValueError: naming the argument, the expectation and what was received, for wrong shapes,
            dtypes, devices or camera counts, NaN/Inf values, out-of-range opacities, negative
            scales, zero quaternions, non-positive focal lengths or image sizes, or an unavailable
            backend.

    Example:
        >>> out = rasterize(means, quats, scales, opacities, rgb, viewmats, Ks, 640, 360)
        >>> loss = (out.colors - target).abs().mean()
        >>> loss.backward()
        >>> screen_grad = out.means2d.grad          # [C, N, 2]
    """
    inputs = validate_rasterize_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
        near=near, far=far, backgrounds=backgrounds, alpha_cap=alpha_cap, eps2d=eps2d,
        tile_size=tile_size, densify_channels=densify_channels, check_values_now=False)
    options = validate_render_options(outputs=outputs, absgrad=absgrad, densify_channels=densify_channels,
                                      color_grad_channels=color_grad_channels, deterministic=deterministic,
                                      max_intersections=max_intersections, n_channels=inputs.n_channels)
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode: expected 'classic' or 'antialiased', got {rasterize_mode!r}")
    chosen = resolve_backend(backend, inputs.means.device)
    settings = RenderSettings(width=width, height=height, tile_size=tile_size, near=float(near),
                              far=float(far), eps2d=float(eps2d), alpha_cap=float(alpha_cap),
                              antialiased=rasterize_mode == "antialiased")
    if chosen == "triton":
        if max_intersections is None:   # checked on the device, read with the intersection count
            from .ops.checks import pending_value_checks

            inputs = replace(inputs, pending_checks=pending_value_checks(inputs))
    else:
        check_values(value_checks(inputs))
    return render(chosen, inputs, settings, options)


def render_torch(inputs, settings: RenderSettings, clamp_limits: torch.Tensor | None, *, absgrad: bool,
                 densify_channels: int | None, deterministic: bool, covars: torch.Tensor | None = None,
                 means2d_hook=None) -> RasterizeOutput:
    """Transitional forwarder for callers of the former torch pipeline (tritonsplat.compat): use
    `backends.render("torch", inputs, settings, RenderOptions(...), clamp_limits=..., ...)`."""
    options = RenderOptions(absgrad=absgrad, densify_channels=densify_channels, deterministic=deterministic)
    return render("torch", inputs, settings, options, clamp_limits=clamp_limits, covars=covars,
                  means2d_hook=means2d_hook)
