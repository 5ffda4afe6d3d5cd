"""The public renderer: `rasterize()` and its output `RasterizeOutput`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import constants
from .backends import resolve_backend
from .settings import RenderSettings, standard_clamp_limits
from .validation import validate_rasterize_inputs


@dataclass(frozen=True)
class RasterizeOutput:
    """What `rasterize()` returns. C cameras, N Gaussians, D channels, images H x W.

    Attributes:
        colors: [C, H, W, D] composited colours (background included).
        alphas: [C, H, W, 1] 1 - final transmittance.
        depths: [C, H, W, 1] expected camera z, sum_i(w_i z_i) / alpha, 0 where alpha = 0;
            differentiable (to the means, and to everything alpha depends on).
        median_depths: [C, H, W, 1] detached camera z of the Gaussian at which transmittance
            first falls below 0.5; 0 where it never does.
        radii: [C, N] int32 screen-space radius in pixels, 0 for culled Gaussians.
        means2d: [C, N, 2] pixel coordinates of the projected means. After backward, `.grad` holds
            the screen-space gradient used for densification (pixel units; the original's NDC
            threshold 2e-4 corresponds to this times (W/2, H/2)); with absgrad=True also `.absgrad`.
        n_intersections: tile-Gaussian pairs produced by the backend's binning (both backends bin with
            the same exact ellipse-tile test, so the counts agree up to float rounding at the level set).
        densify_grad: with densify_channels=k, [C, N, 2] filled by backward with the screen-space
            gradient from the upstream gradient of colors[..., :k] alone; else None.
        backend: the backend that ran ("torch" or "triton").
    """

    colors: torch.Tensor
    alphas: torch.Tensor
    depths: torch.Tensor
    median_depths: torch.Tensor
    radii: torch.Tensor
    means2d: torch.Tensor
    n_intersections: int
    densify_grad: torch.Tensor | None = None
    backend: str = "torch"

    @property
    def visible(self) -> torch.Tensor:
        """[C, N] bool, radii > 0."""
        return self.radii > 0


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

    Returns:
        RasterizeOutput with colors [C,H,W,D], alphas [C,H,W,1], depths [C,H,W,1],
        median_depths [C,H,W,1], radii [C,N] int32, means2d [C,N,2], n_intersections (int),
        densify_grad [C,N,2] or None, backend; and the property visible = radii > 0.
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
        tile_size=tile_size, densify_channels=densify_channels)
    chosen = resolve_backend(backend, inputs.means.device)
    settings = RenderSettings(width=width, height=height, tile_size=tile_size, near=float(near),
                              far=float(far), eps2d=float(eps2d), alpha_cap=float(alpha_cap))
    clamp_limits = standard_clamp_limits(inputs.Ks, width, height)
    if chosen == "triton":
        from .ops.pipeline import render_triton
        return render_triton(inputs, settings, clamp_limits, absgrad=absgrad,
                             densify_channels=densify_channels, deterministic=deterministic)
    return render_torch(inputs, settings, clamp_limits, absgrad=absgrad,
                        densify_channels=densify_channels, deterministic=deterministic)


def render_torch(inputs, settings: RenderSettings, clamp_limits: torch.Tensor | None, *, absgrad: bool,
                 densify_channels: int | None, deterministic: bool, covars: torch.Tensor | None = None,
                 means2d_hook=None) -> RasterizeOutput:
    """Compatibility forwarder to `reference.pipeline.render_torch(inputs, settings, options, ...)`."""
    from .reference.pipeline import render_torch as pipeline
    from .types import RenderOptions

    options = RenderOptions(absgrad=absgrad, densify_channels=densify_channels, deterministic=deterministic)
    return pipeline(inputs, settings, options, clamp_limits=clamp_limits, covars=covars, means2d_hook=means2d_hook)


def expected_depth(depth_sums: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """sum_i w_i z_i / alpha where alpha > 0, else 0 (differentiable in both).

    alpha is either 0 or >= 1/255 (every blended Gaussian has alpha >= 1/255), so the division is
    well conditioned wherever it is taken.
    """
    covered = alphas > 0
    return torch.where(covered, depth_sums / torch.where(covered, alphas, torch.ones_like(alphas)),
                       torch.zeros_like(depth_sums))
