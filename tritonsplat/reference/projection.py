"""Projection of 3D Gaussians to 2D (EWA splatting) and SH colours, in pure PyTorch.

Torch twin of `tritonsplat.ops.projection` (the Triton kernel fuses the same steps into one launch).
Differentiable by autograd with respect to means, quats, scales, covariances, SH coefficients and
view matrices. References: Zwicker et al. 2001 (EWA splatting), Kerbl et al. 2023 (3DGS, Eq. 5-6).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import constants
from ..settings import RenderSettings


class ProjectedGaussians(NamedTuple):
    means2d: torch.Tensor  # [C, N, 2] pixel coordinates (pixel (i, j) centred at (i + .5, j + .5))
    conics: torch.Tensor   # [C, N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths: torch.Tensor   # [C, N] camera z of the mean
    radii: torch.Tensor    # [C, N] int32, 0 when culled
    colors: torch.Tensor | None  # [C, N, 3] SH colours, or None without SH


def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of unnormalised (w, x, y, z) quaternions.

    Args:
        quats: [..., 4].
    Returns:
        [..., 3, 3].
    """
    entries = [entry for row in _rotation_rows(quats) for entry in row]
    return torch.stack(entries, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def _rotation_rows(quats: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The rotation matrix of unnormalised (w, x, y, z) quaternions [..., 4] as three rows of three [...]
    tensors."""
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    return ((1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
            (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
            (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T (3DGS Eq. 6).

    Args:
        quats: [N, 4] (w, x, y, z), any norm.  scales: [N, 3] standard deviations.
    Returns:
        [N, 3, 3].
    """
    rotation_scale = quaternion_to_rotation(quats) * scales[:, None, :]
    return rotation_scale @ rotation_scale.transpose(-1, -2)


def covariance_entries(quats: torch.Tensor | None, scales: torch.Tensor | None,
                       covars: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The upper triangle (xx, xy, xz, yy, yz, zz) of Sigma = R S S^T R^T (3DGS Eq. 6) as six [N] tensors,
    or the columns of `covars` [N, 6] when given.

    Scalar-per-Gaussian arithmetic instead of [N, 3, 3] tensors: on the CPU (AMD EPYC, torch 2.13,
    1 thread) broadcast products and batched matmuls over trailing 3x3 dimensions cost ~40 ns per
    element, and the projection of 33k Gaussians took 28 ms forward + backward that way.
    """
    if covars is not None:
        return tuple(covars.unbind(-1))
    sx, sy, sz = torch.unbind(scales, dim=-1)
    m = [(row[0] * sx, row[1] * sy, row[2] * sz) for row in _rotation_rows(quats)]   # rows of R S

    def dot(i, j):
        return m[i][0] * m[j][0] + m[i][1] * m[j][1] + m[i][2] * m[j][2]

    return dot(0, 0), dot(0, 1), dot(0, 2), dot(1, 1), dot(1, 2), dot(2, 2)


def covariance_from_upper(covars: torch.Tensor) -> torch.Tensor:
    """[N, 6] upper triangle (xx, xy, xz, yy, yz, zz), the original renderer's layout -> [N, 3, 3]."""
    xx, xy, xz, yy, yz, zz = torch.unbind(covars, dim=-1)
    return torch.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], dim=-1).reshape(-1, 3, 3)


def sh_basis(directions: torch.Tensor, degree: int) -> torch.Tensor:
    """Real spherical-harmonics basis of 3DGS/gsplat evaluated at unit directions.

    Args:
        directions: [..., 3] unit vectors (x, y, z).
        degree: 0..3.
    Returns:
        [..., (degree + 1)^2].
    """
    x, y, z = torch.unbind(directions, dim=-1)
    basis = [torch.full_like(x, constants.SH_C0)]
    if degree >= 1:
        c1 = constants.SH_C1
        basis += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        c2 = constants.SH_C2
        xx, yy, zz = x * x, y * y, z * z
        basis += [c2[0] * x * y, c2[1] * y * z, c2[2] * (2 * zz - xx - yy), c2[3] * x * z,
                  c2[4] * (xx - yy)]
    if degree >= 3:
        c3 = constants.SH_C3
        basis += [c3[0] * y * (3 * xx - yy), c3[1] * x * y * z, c3[2] * y * (4 * zz - xx - yy),
                  c3[3] * z * (2 * zz - 3 * xx - 3 * yy), c3[4] * x * (4 * zz - xx - yy),
                  c3[5] * z * (xx - yy), c3[6] * x * (xx - 3 * yy)]
    return torch.stack(basis, dim=-1)


def camera_centers(viewmats: torch.Tensor) -> torch.Tensor:
    """World-space camera centres -R^T t of world-to-camera matrices [C, 4, 4] -> [C, 3]."""
    rotation, translation = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -(rotation.transpose(-1, -2) @ translation[..., None])[..., 0]


def evaluate_sh_colors(sh_coeffs: torch.Tensor, means: torch.Tensor, centers: torch.Tensor,
                       degree: int) -> torch.Tensor:
    """View-dependent colour max(SH(d) + 0.5, 0), d = normalised (mean - camera centre).

    Args:
        sh_coeffs: [N, K, 3] with K >= (degree + 1)^2 (extra coefficients are ignored).
        means: [N, 3].  centers: [C, 3].
    Returns:
        [C, N, 3].
    """
    offsets = means[None] - centers[:, None]
    directions = offsets / offsets.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    basis = sh_basis(directions, degree)                                 # [C, N, B]
    coeffs = sh_coeffs[:, : (degree + 1) ** 2]                           # [N, B, 3]
    return torch.clamp_min(torch.einsum("cnb,nbd->cnd", basis, coeffs) + 0.5, 0.0)


@torch.no_grad()
def splat_radii(means2d: torch.Tensor, cov2d_a: torch.Tensor, cov2d_b: torch.Tensor,
                cov2d_c: torch.Tensor, det: torch.Tensor, opacities: torch.Tensor,
                in_depth_range: torch.Tensor, settings: RenderSettings) -> torch.Tensor:
    """Screen-space radius in whole pixels, 0 for culled Gaussians.

    Standard rule: r = ceil(k sqrt(lambda_max)), k = min(3.33, sqrt(2 ln(255 o))); culled when
    z is out of (near, far), o < 1/255, det <= 0 or the box [mean - r, mean + r] misses the image.
    Inria rule (compat): k = 3, lambda = mid + sqrt(max(0.1, mid^2 - det)), culled when z <= near,
    det == 0, or the original's tile rectangle is empty.

    Args:
        means2d: [C, N, 2].  cov2d_a/b/c, det: [C, N] entries and determinant of the dilated 2D
        covariance.  opacities: [N].  in_depth_range: [C, N] bool.
    Returns:
        [C, N] int32.
    """
    mid = 0.5 * (cov2d_a + cov2d_c)
    if settings.radius_rule == "inria":
        spread = torch.sqrt(torch.clamp_min(mid * mid - det, constants.INRIA_EIGEN_FLOOR))
        extent = torch.full_like(mid, constants.INRIA_RADIUS_SIGMAS)
        keep = in_depth_range & (det != 0)
    else:
        spread = torch.sqrt(torch.clamp_min(mid * mid - det, 0.0))
        log_term = torch.log(torch.clamp_min(opacities * 255.0, 1.0))     # ln(255 o) >= 0
        extent = torch.clamp_max(torch.sqrt(2.0 * log_term), constants.MAX_EXTENT_SIGMAS)
        extent = extent[None].expand_as(mid)
        keep = in_depth_range & (det > 0) & (opacities >= constants.MIN_ALPHA)[None]
    lambda_max = mid + spread
    radius = torch.ceil(extent * torch.sqrt(torch.clamp_min(lambda_max, 0.0)))
    keep = keep & torch.isfinite(radius) & (radius > 0)
    mx, my = means2d[..., 0], means2d[..., 1]
    if settings.radius_rule == "inria":
        from .binning import inria_tile_rectangles  # local: binning imports this module's types
        rect = inria_tile_rectangles(means2d, radius, settings)
        keep = keep & ((rect[..., 2] - rect[..., 0]) * (rect[..., 3] - rect[..., 1]) > 0)
    else:
        keep = keep & (mx + radius > 0) & (mx - radius < settings.width)
        keep = keep & (my + radius > 0) & (my - radius < settings.height)
    radius = torch.where(keep, radius, torch.zeros_like(radius))
    return radius.to(torch.int32)


def project_gaussians(means: torch.Tensor, quats: torch.Tensor | None, scales: torch.Tensor | None,
                      opacities: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      clamp_limits: torch.Tensor, settings: RenderSettings, *,
                      covars: torch.Tensor | None = None, sh_coeffs: torch.Tensor | None = None,
                      sh_degree: int | None = None) -> ProjectedGaussians:
    """Project N Gaussians into C cameras (EWA splatting with the Jacobian clamp and dilation).

    t = R mu + T; J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]] with tx = z clamp(x/z) (the
    clamp acts inside J only); Sigma2D = J R Sigma R^T J^T + eps2d I; mean2d = (fx x/z + cx,
    fy y/z + cy). Culled Gaussians (radius 0) still get finite outputs and zero gradients.

    Args:
        means: [N, 3].  quats: [N, 4] (w, x, y, z), any norm.  scales: [N, 3].
        opacities: [N] (only for the opacity-aware radius; not differentiated here).
        viewmats: [C, 4, 4] world-to-camera.  Ks: [C, 3, 3].
        clamp_limits: [C, 4] (x/z low, x/z high, y/z low, y/z high) of the Jacobian clamp.
        settings: resolved render settings.
        covars: optional [N, 6] upper-triangular 3D covariances replacing quats/scales.
        sh_coeffs: optional [N, K, 3] SH coefficients, evaluated at degree `sh_degree`.
    Returns:
        ProjectedGaussians(means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N] int32,
        colors [C,N,3] or None).
    """
    rotation, translation = viewmats[:, :3, :3], viewmats[:, :3, 3]
    cam_points = torch.einsum("cij,nj->cni", rotation, means) + translation[:, None]   # [C, N, 3]
    px, py, pz = torch.unbind(cam_points, dim=-1)
    in_depth_range = (pz > settings.near) & (pz < settings.far)
    # Culled entries compute on a safe depth so no inf/NaN can leak into gradients through where().
    z = torch.where(in_depth_range, pz, torch.ones_like(pz))

    xx, xy, xz, yy, yz, zz = covariance_entries(quats, scales, covars)
    sigma = ((xx, xy, xz), (xy, yy, yz), (xz, yz, zz))                                 # each [N]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    limits = clamp_limits[:, None, :]
    tx = z * torch.clamp(px / z, min=limits[..., 0], max=limits[..., 1])
    ty = z * torch.clamp(py / z, min=limits[..., 2], max=limits[..., 3])
    # Sigma_2D = T Sigma T^T + eps2d I with T = J W (3DGS Eq. 5); J has two zeros, so each row of T is two
    # scaled rows of W. Every quantity is a [C, N] tensor (see `covariance_entries`).
    jx, jxz = fx / z, -fx * tx / (z * z)
    jy, jyz = fy / z, -fy * ty / (z * z)
    w = rotation[:, None]                                                               # [C, 1, 3, 3]
    row_x = [jx * w[..., 0, k] + jxz * w[..., 2, k] for k in range(3)]
    row_y = [jy * w[..., 1, k] + jyz * w[..., 2, k] for k in range(3)]

    def sigma_times(row):
        return [sigma[k][0] * row[0] + sigma[k][1] * row[1] + sigma[k][2] * row[2] for k in range(3)]

    sigma_x, sigma_y = sigma_times(row_x), sigma_times(row_y)
    a = row_x[0] * sigma_x[0] + row_x[1] * sigma_x[1] + row_x[2] * sigma_x[2] + settings.eps2d
    b = row_y[0] * sigma_x[0] + row_y[1] * sigma_x[1] + row_y[2] * sigma_x[2]
    c = row_y[0] * sigma_y[0] + row_y[1] * sigma_y[1] + row_y[2] * sigma_y[2] + settings.eps2d
    det = a * c - b * b
    means2d = torch.stack([fx * px / z + cx, fy * py / z + cy], dim=-1)

    radii = splat_radii(means2d.detach(), a.detach(), b.detach(), c.detach(), det.detach(),
                        opacities.detach(), in_depth_range, settings)
    visible = radii > 0
    safe_det = torch.where(visible, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    conics = torch.where(visible[..., None], conics, torch.zeros_like(conics))

    colors = None
    if sh_coeffs is not None:
        colors = evaluate_sh_colors(sh_coeffs, means, camera_centers(viewmats), sh_degree)
    return ProjectedGaussians(means2d, conics, pz, radii, colors)


def compositor_colors_and_means2d(projected: ProjectedGaussians, colors: torch.Tensor, sh_degree: int | None,
                                  means2d_hook=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both pipelines hand the compositor after projection (`ops` and `reference` alike).

    Returns (colors, means2d, composite_means2d):
        colors: the SH evaluation [C, N, 3] when `sh_degree` is set, else the given colours, with a
            camera-broadcast [C, N, D] (stride 0 over cameras) reduced to its one [N, D];
        means2d: the projected screen-space means [C, N, 2], with .grad retained when they require
            grad (densification reads means2d.grad after backward);
        composite_means2d: means2d_hook(means2d) when a hook is given (tritonsplat.compat re-routes the
            means between projection and compositing), else means2d.
    """
    if sh_degree is not None:
        colors = projected.colors
    elif colors.dim() == 3 and colors.stride(0) == 0:
        colors = colors[0]
    means2d = projected.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    return colors, means2d, means2d_hook(means2d) if means2d_hook is not None else means2d
