"""Drop-in replacement for `diff_gaussian_rasterization` (the `-w-depth` fork that Dynamic 3D
Gaussians, SplaTAM and others pin at cb65e4b): change only the import.

    from tritonsplat.compat import GaussianRasterizationSettings, GaussianRasterizer

Written against the published Python API; none of the original (non-commercial licence) is copied.
It reproduces the original's numbers by running tritonsplat's stages with its conventions:
- pixel x = fx X/Z + cx - 0.5 at integer pixel centres, which is tritonsplat's +0.5 convention with
  the same K (recovered from `projmatrix`, built by callers as (P w2c)^T);
- Jacobian clamp of x/z and y/z at +-1.3 tan(fov); near cull z <= 0.2; alpha cap 0.99; no opacity cull;
- radius ceil(3 sqrt(lambda_max)), lambda = mid + sqrt(max(0.1, mid^2 - det)), and blending only in
  the 16x16 tiles of its tile rectangle (this truncation is part of its images);
- `depth` is the median depth (camera z where transmittance first falls below 0.5, 15.0 where it
  never does), without gradient, as the original.
Gradients are exact derivatives of that forward. Where the CUDA original approximates: it ignores
the alpha cap in the opacity gradient, zeroes the Jacobian-clamp terms instead of moving them to z,
and returns no depth or camera gradients; tritonsplat differentiates all of these exactly. The
gradient written to `means2D` is the screen-space gradient in NDC units (pixel gradient x (W/2, H/2)),
the quantity the original's densification thresholds at 0.0002.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import constants
from .backends import resolve_backend
from .settings import RenderSettings
from .validation import RasterizeInputs, check_values, finite_check, require_tensor


class GaussianRasterizationSettings(NamedTuple):
    """Settings of one camera, with the original's exact fields.

    viewmatrix is w2c^T and projmatrix is (P w2c)^T (both [4, 4], row-vector convention), as
    3DGS / Dynamic 3D Gaussians build them; campos is the camera centre [3].
    """

    image_height: int
    image_width: int
    tanfovx: float
    tanfovy: float
    bg: torch.Tensor
    scale_modifier: float
    viewmatrix: torch.Tensor
    projmatrix: torch.Tensor
    sh_degree: int
    campos: torch.Tensor
    prefiltered: bool
    debug: bool = False


def intrinsics_from_matrices(settings: GaussianRasterizationSettings) -> torch.Tensor:
    """K [3, 3] such that tritonsplat's +0.5 pixel convention reproduces the original's pixels.

    The original maps ndc to pixels with ((ndc + 1) S - 1) / 2; with P = projmatrix^T w2c^-1
    (P[3] = [0, 0, 1, 0]) that is fx X/Z + cx - 0.5 with fx = P00 W/2, cx = W (1 + P02) / 2.
    """
    w2c = settings.viewmatrix.detach().to(torch.float64).T
    full = settings.projmatrix.detach().to(torch.float64).T
    projection = full @ torch.linalg.inv(w2c)
    width, height = settings.image_width, settings.image_height
    fx = projection[0, 0] * width / 2
    fy = projection[1, 1] * height / 2
    cx = width * (1 + projection[0, 2]) / 2
    cy = height * (1 + projection[1, 2]) / 2
    focal_from_fov = width / (2 * settings.tanfovx)
    if abs(float(fx) - focal_from_fov) > 1e-3 * focal_from_fov:
        warnings.warn(f"projmatrix focal {float(fx):.3f} differs from image_width / (2 tanfovx) = "
                      f"{focal_from_fov:.3f}; tritonsplat uses the projmatrix one for both the mean "
                      f"and the Jacobian", stacklevel=3)
    K = torch.zeros(3, 3, dtype=torch.float64)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[2, 2] = fx, fy, cx, cy, 1.0
    return K


def _inria_settings(settings: GaussianRasterizationSettings) -> RenderSettings:
    return RenderSettings(width=int(settings.image_width), height=int(settings.image_height),
                          tile_size=constants.TILE_SIZE, near=constants.INRIA_NEAR_PLANE,
                          far=constants.FAR_PLANE, eps2d=constants.EPS2D, alpha_cap=constants.ALPHA_CAP,
                          radius_rule="inria", tile_rule="rectangle")


class GaussianRasterizer(torch.nn.Module):
    """`GaussianRasterizer(raster_settings=...)(means3D, means2D, opacities, ...)` as the original.

    Runs on the backend chosen by `backend` ("auto": Triton on CUDA, torch elsewhere).
    """

    def __init__(self, raster_settings: GaussianRasterizationSettings, backend: str = "auto"):
        super().__init__()
        self.raster_settings = raster_settings
        self.backend = backend

    def markVisible(self, positions: torch.Tensor) -> torch.Tensor:  # noqa: N802 - original's name
        """[N] bool: camera z > 0.2 (the original's frustum test)."""
        with torch.no_grad():
            w2c = self.raster_settings.viewmatrix.T.to(positions.dtype)
            z = positions @ w2c[2, :3] + w2c[2, 3]
            return z > constants.INRIA_NEAR_PLANE

    def forward(self, means3D, means2D, opacities, shs=None, colors_precomp=None, scales=None,  # noqa: N803
                rotations=None, cov3D_precomp=None):
        """Render one camera.

        Args:
            means3D: [N, 3].  means2D: [N, 2] or [N, 3] tensor with requires_grad, receiving the
                screen-space gradient in NDC units.  opacities: [N, 1] or [N] in [0, 1].
            shs: [N, K, 3] SH coefficients (degree raster_settings.sh_degree) or None.
            colors_precomp: [N, D] colours or None (exactly one of shs / colors_precomp).
            scales: [N, 3], rotations: [N, 4] (w, x, y, z), or cov3D_precomp: [N, 6] upper triangle
                (xx, xy, xz, yy, yz, zz) (exactly one of the two forms).
        Returns:
            (color [D, H, W], radii [N] int32, depth [1, H, W]).
        """
        s = self.raster_settings
        if (shs is None) == (colors_precomp is None):
            raise ValueError("shs, colors_precomp: please provide exactly one of either SHs or "
                             "precomputed colors")
        if ((scales is None or rotations is None) and cov3D_precomp is None) or (
                (scales is not None or rotations is not None) and cov3D_precomp is not None):
            raise ValueError("scales/rotations, cov3D_precomp: please provide exactly one of either "
                             "scale/rotation pair or precomputed 3D covariance")
        means3D = require_tensor("means3D", means3D, "[N, 3]")
        if means3D.dim() != 2 or means3D.shape[1] != 3:
            raise ValueError(f"means3D: expected [N, 3], got shape {tuple(means3D.shape)}")
        n = means3D.shape[0]
        opacities = require_tensor("opacities", opacities, f"[N={n}, 1]")
        if opacities.shape not in ((n, 1), (n,)):
            raise ValueError(f"opacities: expected [N={n}, 1] or [N={n}], got shape {tuple(opacities.shape)}")
        opacities = opacities.reshape(n)
        if means2D is not None and (means2D.dim() != 2 or means2D.shape[0] != n or means2D.shape[1] < 2):
            raise ValueError(f"means2D: expected [N={n}, 2] or [N={n}, 3], got shape {tuple(means2D.shape)}")
        if cov3D_precomp is not None:
            require_tensor("cov3D_precomp", cov3D_precomp, f"[N={n}, 6]")
            if cov3D_precomp.shape != (n, 6):
                raise ValueError(f"cov3D_precomp: expected [N={n}, 6], got {tuple(cov3D_precomp.shape)}")
        else:
            require_tensor("scales", scales, f"[N={n}, 3]")
            require_tensor("rotations", rotations, f"[N={n}, 4]")
            if scales.shape != (n, 3) or rotations.shape != (n, 4):
                raise ValueError(f"scales, rotations: expected [N={n}, 3] and [N={n}, 4], got "
                                 f"{tuple(scales.shape)} and {tuple(rotations.shape)}")

        device = means3D.device
        dtype = torch.float64 if means3D.dtype == torch.float64 else torch.float32
        width, height = int(s.image_width), int(s.image_height)
        settings = _inria_settings(s)
        K = intrinsics_from_matrices(s).to(device=device, dtype=dtype)[None]
        viewmat = s.viewmatrix.T.to(device=device, dtype=dtype)[None]
        limits = torch.tensor([-constants.INRIA_CLAMP_TANFOV * s.tanfovx, constants.INRIA_CLAMP_TANFOV * s.tanfovx,
                               -constants.INRIA_CLAMP_TANFOV * s.tanfovy, constants.INRIA_CLAMP_TANFOV * s.tanfovy],
                              device=device, dtype=dtype)[None]
        means = means3D.to(dtype)
        if shs is not None:
            from .reference.projection import evaluate_sh_colors
            require_tensor("shs", shs, f"[N={n}, K, 3]")
            degree = int(s.sh_degree)
            if shs.dim() != 3 or shs.shape[0] != n or shs.shape[2] != 3 or shs.shape[1] < (degree + 1) ** 2:
                raise ValueError(f"shs: expected [N={n}, K>={(degree + 1) ** 2}, 3] for sh_degree={degree}, "
                                 f"got shape {tuple(shs.shape)}")
            colors = evaluate_sh_colors(shs.to(dtype), means, s.campos.to(device=device, dtype=dtype)
                                        .reshape(1, 3), degree)
        else:
            colors = require_tensor("colors_precomp", colors_precomp, f"[N={n}, D]")
            if colors.dim() != 2 or colors.shape[0] != n:
                raise ValueError(f"colors_precomp: expected [N={n}, D], got shape {tuple(colors.shape)}")
            colors = colors.to(dtype)[None]
        n_channels = colors.shape[-1]
        bg = s.bg.to(device=device, dtype=dtype).reshape(-1)
        if bg.numel() != n_channels:
            raise ValueError(f"bg: expected {n_channels} values (one per colour channel), got {bg.numel()}")
        if cov3D_precomp is not None:
            covars = cov3D_precomp.to(dtype)  # the original applies no scale_modifier here
            quats = torch.ones(n, 4, device=device, dtype=dtype)
            scales_used = torch.ones(n, 3, device=device, dtype=dtype)
        else:
            covars = None
            quats = rotations.to(dtype)
            scales_used = scales.to(dtype) * s.scale_modifier
        check_values([finite_check("means3D", means), finite_check("opacities", opacities),
                      finite_check("colors", colors)])
        inputs = RasterizeInputs(means=means, quats=quats, scales=scales_used, opacities=opacities.to(dtype),
                                 colors=colors.expand(1, n, n_channels), viewmats=viewmat, Ks=K,
                                 backgrounds=bg[None], n_cameras=1, n_gaussians=n, n_channels=n_channels,
                                 sh_degree=None)

        def route_ndc_gradient(means2d):
            # Forward value unchanged; the gradient reaching means2D is the pixel one x (W/2, H/2).
            if means2D is None or not means2D.requires_grad:
                return means2d
            handle = means2D[:, :2].to(dtype)
            ndc_scale = torch.tensor([width / 2, height / 2], device=device, dtype=dtype)
            return means2d + ((handle - handle.detach()) * ndc_scale)[None]

        backend = resolve_backend(self.backend, device)
        if backend == "triton":
            from .ops.pipeline import render_triton
            out = render_triton(inputs, settings, limits, absgrad=False, densify_channels=None,
                                deterministic=False, covars=covars, means2d_hook=route_ndc_gradient)
        else:
            from .rendering import render_torch
            out = render_torch(inputs, settings, limits, absgrad=False, densify_channels=None,
                               deterministic=False, covars=covars, means2d_hook=route_ndc_gradient)
        color = out.colors[0].permute(2, 0, 1)
        median = out.median_depths[0].permute(2, 0, 1)
        depth = torch.where(median > 0, median, torch.full_like(median, constants.INRIA_EMPTY_DEPTH))
        return color, out.radii[0], depth.detach()
