"""Projection of 3D Gaussians to 2D (EWA splatting) and SH colours, in pure PyTorch.

Torch twin of `tritonsplat.ops.projection` (the Triton kernel fuses the same steps into one launch).
Differentiable with respect to means, quats, scales, covariances, SH coefficients and view matrices: by
a hand-written backward (the Triton kernel's chain rule) for the Gaussian parameters, by autograd where a
camera needs its gradient. References: Zwicker et al. 2001 (EWA splatting), Kerbl et al. 2023 (3DGS,
Eq. 5-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings
from .binning import component_rows, inria_tile_rectangles


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
    return _rotation_rows_of_unit(*torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T (3DGS Eq. 6).

    Args:
        quats: [N, 4] (w, x, y, z), any norm.  scales: [N, 3] standard deviations.
    Returns:
        [N, 3, 3].
    """
    rotation_scale = quaternion_to_rotation(quats) * scales[:, None, :]
    return rotation_scale @ rotation_scale.transpose(-1, -2)


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
        rect = inria_tile_rectangles(means2d, radius, settings)
        keep = keep & ((rect[..., 2] - rect[..., 0]) * (rect[..., 3] - rect[..., 1]) > 0)
    else:
        keep = keep & (mx + radius > 0) & (mx - radius < settings.width)
        keep = keep & (my + radius > 0) & (my - radius < settings.height)
    radius = torch.where(keep, radius, torch.zeros_like(radius))
    return radius.to(torch.int32)


class _ProjectionTerms(NamedTuple):
    """Everything the forward computes that its hand-written backward reuses; each [C, N] unless noted."""

    px: torch.Tensor
    py: torch.Tensor
    pz: torch.Tensor                 # camera-space mean
    z: torch.Tensor                  # pz inside (near, far), else 1 (a safe divisor)
    in_depth_range: torch.Tensor     # bool
    x_over_z: torch.Tensor
    y_over_z: torch.Tensor           # the Jacobian clamp's arguments
    clamped_x: torch.Tensor
    clamped_y: torch.Tensor          # clamp(x / z), clamp(y / z)
    sigma: tuple                     # six [N] entries (xx, xy, xz, yy, yz, zz) of the 3D covariance
    row_x: tuple
    row_y: tuple                     # three [C, N] entries each: the rows w0, w1 of T = J W
    sigma_x: tuple
    sigma_y: tuple                   # Sigma w0, Sigma w1
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor                  # dilated 2D covariance [[a, b], [b, c]]
    det: torch.Tensor
    rotation_scale: tuple | None     # (normalised q (w, x, y, z), 1 / |q|, rows of R_q, (sx, sy, sz)), all [N]


def _projection_terms(means, quats, scales, covars, viewmats, Ks, clamp_limits,
                      settings: RenderSettings) -> _ProjectionTerms:
    """The forward maths of `project_gaussians` (differentiable by autograd where its inputs require grad).

    Every per-Gaussian quantity is a [C, N] (or [N]) tensor with unit stride along N: the same ops on
    the stride-3 / stride-4 columns of [N, 3] / [N, 4] inputs ran ~10x slower (AMD EPYC, AVX-512, torch
    2.13), and the projection of 33,075 Gaussians took 8.3 ms forward + backward that way.
    """
    rotation, translation = viewmats[:, :3, :3], viewmats[:, :3, 3]
    cam_points = torch.matmul(rotation, component_rows(means)) + translation[:, :, None]   # [C, 3, N]
    px, py, pz = torch.unbind(cam_points, dim=1)
    in_depth_range = (pz > settings.near) & (pz < settings.far)
    # Culled entries compute on a safe depth so no inf/NaN can leak into gradients through where().
    z = torch.where(in_depth_range, pz, 1.0)

    rotation_scale = None
    if covars is not None:
        sigma = tuple(component_rows(covars).unbind(0))
    else:
        qw, qx, qy, qz = component_rows(quats).unbind(0)
        inverse_norm = torch.rsqrt(qw * qw + qx * qx + qy * qy + qz * qz)
        unit = (qw * inverse_norm, qx * inverse_norm, qy * inverse_norm, qz * inverse_norm)
        rows = _rotation_rows_of_unit(*unit)
        scale = tuple(component_rows(scales).unbind(0))
        m = [(row[0] * scale[0], row[1] * scale[1], row[2] * scale[2]) for row in rows]     # rows of R S

        def dot(i, j):
            return m[i][0] * m[j][0] + m[i][1] * m[j][1] + m[i][2] * m[j][2]

        sigma = (dot(0, 0), dot(0, 1), dot(0, 2), dot(1, 1), dot(1, 2), dot(2, 2))
        rotation_scale = (unit, inverse_norm, rows, scale)
    xx, xy, xz, yy, yz, zz = sigma

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    limits = clamp_limits[:, :, None]
    x_over_z, y_over_z = px / z, py / z
    clamped_x = torch.clamp(x_over_z, min=limits[:, 0], max=limits[:, 1])
    clamped_y = torch.clamp(y_over_z, min=limits[:, 2], max=limits[:, 3])
    # Sigma_2D = T Sigma T^T + eps2d I with T = J W (3DGS Eq. 5); J has two zeros, so each row of T is two
    # scaled rows of W: w0 = fx/z (W_0 - clamp(x/z) W_2), w1 = fy/z (W_1 - clamp(y/z) W_2).
    jx, jy = fx / z, fy / z
    jxz, jyz = -jx * clamped_x, -jy * clamped_y
    w = rotation[:, :, :, None]                                                        # [C, 3, 3, 1]
    row_x = tuple(jx * w[:, 0, k] + jxz * w[:, 2, k] for k in range(3))
    row_y = tuple(jy * w[:, 1, k] + jyz * w[:, 2, k] for k in range(3))

    def sigma_times(row):
        return (xx * row[0] + xy * row[1] + xz * row[2], xy * row[0] + yy * row[1] + yz * row[2],
                xz * row[0] + yz * row[1] + zz * row[2])

    sigma_x, sigma_y = sigma_times(row_x), sigma_times(row_y)
    a = row_x[0] * sigma_x[0] + row_x[1] * sigma_x[1] + row_x[2] * sigma_x[2] + settings.eps2d
    b = row_y[0] * sigma_x[0] + row_y[1] * sigma_x[1] + row_y[2] * sigma_x[2]
    c = row_y[0] * sigma_y[0] + row_y[1] * sigma_y[1] + row_y[2] * sigma_y[2] + settings.eps2d
    det = a * c - b * b
    return _ProjectionTerms(px, py, pz, z, in_depth_range, x_over_z, y_over_z, clamped_x, clamped_y, sigma,
                            row_x, row_y, sigma_x, sigma_y, a, b, c, det, rotation_scale)


def _columns(rows: torch.Tensor) -> torch.Tensor:
    """[K, N] -> [N, K] contiguous (the inverse of `binning.component_rows`, by the same fast 3-D copy)."""
    return rows[:, None].permute(2, 1, 0).contiguous().view(rows.shape[1], rows.shape[0])


def _rotation_rows_of_unit(w, x, y, z):
    """The rotation matrix of a unit (w, x, y, z) quaternion as three rows of three tensors."""
    return ((1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
            (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
            (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)))


def _projection_outputs(terms: _ProjectionTerms, opacities, Ks, settings: RenderSettings):
    """means2d [C, N, 2], conics [C, N, 3], radii [C, N] int32 and visible [C, N] of the terms."""
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    means2d = torch.stack([fx * terms.x_over_z + cx, fy * terms.y_over_z + cy], dim=-1)
    radii = splat_radii(means2d.detach(), terms.a.detach(), terms.b.detach(), terms.c.detach(),
                        terms.det.detach(), opacities.detach(), terms.in_depth_range, settings)
    visible = radii > 0
    inverse_det = torch.where(visible, 1 / torch.where(visible, terms.det, 1.0), 0.0)
    conics = torch.stack([terms.c * inverse_det, -terms.b * inverse_det, terms.a * inverse_det], dim=-1)
    return means2d, conics, radii, visible


def _projection_backward(terms: _ProjectionTerms, visible, viewmats, Ks, grad_means2d, grad_conics,
                         grad_depths, want_covars: bool, need_means: bool = True, need_shape: bool = True):
    """Vector-Jacobian product of `_projection_terms` + `_projection_outputs` by hand (the same chain rule
    as the Triton kernel's backward, written over [C, N] tensors). A None upstream gradient is zero.

    Returns (grad_means [N, 3] | None, grad_quats [N, 4] | None, grad_scales [N, 3] | None, grad_covars
    [N, 6] | None): None where not needed (`need_means`, `need_shape`) or where no upstream reaches it.
    Unlike the Triton kernel it keeps the exact derivative of every output, culled Gaussians' means2d and
    depths included (a culled conic is the constant 0).
    """
    t = terms
    rotation = viewmats[:, :3, :3]
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    zero = torch.zeros_like(t.z)
    grad_sigma = None
    grad_u = grad_v = grad_z = zero
    inverse_z = 1 / t.z
    # conic = (c, -b, a) / det on visible entries: g_det = -(g0 c - g1 b + g2 a) / det^2.
    if grad_conics is not None and (need_means or need_shape):
        g0, g1, g2 = torch.where(visible, grad_conics.permute(2, 0, 1).contiguous(), 0.0).unbind(0)
        inverse_det = 1 / torch.where(visible, t.det, 1.0)
        scaled = (g0 * t.c - g1 * t.b + g2 * t.a) * inverse_det * inverse_det
        grad_a = g2 * inverse_det - scaled * t.c
        grad_b = 2 * scaled * t.b - g1 * inverse_det
        grad_c = g0 * inverse_det - scaled * t.a
        two_a, two_c = 2 * grad_a, 2 * grad_c
        # g_S = g_a w0 w0^T + g_b (w0 w1^T + w1 w0^T) / 2 + g_c w1 w1^T; an upper off-diagonal entry stands
        # for two symmetric ones (2x), and every camera adds to the one covariance.
        (x0, x1, x2), (y0, y1, y2) = t.row_x, t.row_y

        def diagonal(u, v):
            return (grad_a * u * u + grad_b * u * v + grad_c * v * v).sum(0)

        def off_diagonal(ui, uj, vi, vj):
            return (two_a * ui * uj + grad_b * (ui * vj + uj * vi) + two_c * vi * vj).sum(0)

        if need_shape:
            grad_sigma = (diagonal(x0, y0), off_diagonal(x0, x1, y0, y1), off_diagonal(x0, x2, y0, y2),
                          diagonal(x1, y1), off_diagonal(x1, x2, y1, y2), diagonal(x2, y2))
    if grad_conics is not None and need_means:
        # a = w0.S.w0, b = w0.S.w1, c = w1.S.w1: g_w0 = 2 g_a S w0 + g_b S w1, g_w1 = g_b S w0 + 2 g_c S w1.
        grad_row_x = [two_a * sx + grad_b * sy for sx, sy in zip(t.sigma_x, t.sigma_y)]
        grad_row_y = [grad_b * sx + two_c * sy for sx, sy in zip(t.sigma_x, t.sigma_y)]
        # w0_k = jx W_0k + jxz W_2k (jx = fx / z, jxz = -jx clamp(x/z)); likewise w1 with W_1k, fy, y.
        w = rotation[:, :, :, None]
        grad_jx = grad_row_x[0] * w[:, 0, 0] + grad_row_x[1] * w[:, 0, 1] + grad_row_x[2] * w[:, 0, 2]
        grad_jxz = grad_row_x[0] * w[:, 2, 0] + grad_row_x[1] * w[:, 2, 1] + grad_row_x[2] * w[:, 2, 2]
        grad_jy = grad_row_y[0] * w[:, 1, 0] + grad_row_y[1] * w[:, 1, 1] + grad_row_y[2] * w[:, 1, 2]
        grad_jyz = grad_row_y[0] * w[:, 2, 0] + grad_row_y[1] * w[:, 2, 1] + grad_row_y[2] * w[:, 2, 2]
        # jxz = -(fx / z) u_c: g_(fx/z) += -u_c g_jxz, g_u_c = -(fx / z) g_jxz; fx / z: g_z = -(fx / z) / z.
        grad_x_scale = grad_jx - t.clamped_x * grad_jxz
        grad_y_scale = grad_jy - t.clamped_y * grad_jyz
        grad_z = -(grad_x_scale * fx + grad_y_scale * fy) * inverse_z * inverse_z
        # u_c = clamp(u, low, high) passes the gradient where low <= u <= high; u = p / z.
        grad_u = torch.where(t.x_over_z == t.clamped_x, -fx * inverse_z * grad_jxz, 0.0)
        grad_v = torch.where(t.y_over_z == t.clamped_y, -fy * inverse_z * grad_jyz, 0.0)
    grad_means = None
    if need_means and (grad_conics is not None or grad_means2d is not None or grad_depths is not None):
        grad_means = _means_gradient(t, rotation, fx, fy, inverse_z, grad_u, grad_v, grad_z, grad_means2d,
                                     grad_depths)
    return (grad_means, *_shape_gradients(t, grad_sigma, want_covars))


def _means_gradient(t: _ProjectionTerms, rotation, fx, fy, inverse_z, grad_u, grad_v, grad_z, grad_means2d,
                    grad_depths):
    """grad_means [N, 3] from the gradients of u = x/z, v = y/z and z reached through the conics, plus the
    means2d and depth upstreams."""
    if grad_means2d is not None:   # mean2d = (fx u + cx, fy v + cy)
        grad_mean_x, grad_mean_y = grad_means2d.permute(2, 0, 1).contiguous().unbind(0)
        grad_u = grad_u + fx * grad_mean_x
        grad_v = grad_v + fy * grad_mean_y
    grad_px = grad_u * inverse_z
    grad_py = grad_v * inverse_z
    grad_z = grad_z - (grad_px * t.x_over_z + grad_py * t.y_over_z)
    grad_pz = torch.where(t.in_depth_range, grad_z, 0.0)
    if grad_depths is not None:
        grad_pz = grad_pz + grad_depths
    # p = R mu + t: g_mu = sum over cameras of R^T g_p.
    grad_points = torch.stack([grad_px, grad_py, grad_pz], dim=1)                       # [C, 3, N]
    return _columns(torch.matmul(rotation.transpose(1, 2), grad_points).sum(0))         # [N, 3]


def _shape_gradients(t: _ProjectionTerms, grad_sigma, want_covars: bool):
    """(grad_quats [N, 4], grad_scales [N, 3], grad_covars [N, 6]) from the covariance entries' gradients,
    None where not computed."""
    grad_quats = grad_scales = grad_covars = None
    if grad_sigma is not None and want_covars:
        grad_covars = torch.stack(grad_sigma, dim=1)
    elif grad_sigma is not None:
        (qw, qx, qy, qz), inverse_norm, rows, scale = t.rotation_scale
        g_xx, g_xy, g_xz, g_yy, g_yz, g_zz = grad_sigma
        m = [(row[0] * scale[0], row[1] * scale[1], row[2] * scale[2]) for row in rows]
        # S = M M^T with M = R_q diag(s): g_M_i = 2 g_ii M_i + sum_{j != i} g_ij M_j (upper entries g_ij).
        weights = ((2 * g_xx, g_xy, g_xz), (g_xy, 2 * g_yy, g_yz), (g_xz, g_yz, 2 * g_zz))
        grad_m = [[weights[i][0] * m[0][k] + weights[i][1] * m[1][k] + weights[i][2] * m[2][k] for k in range(3)]
                  for i in range(3)]
        grad_scales = torch.stack([rows[0][k] * grad_m[0][k] + rows[1][k] * grad_m[1][k] + rows[2][k] * grad_m[2][k]
                                   for k in range(3)], dim=1)
        g = [[grad_m[i][k] * scale[k] for k in range(3)] for i in range(3)]                # g_R
        grad_w = 2 * (qx * (g[2][1] - g[1][2]) + qy * (g[0][2] - g[2][0]) + qz * (g[1][0] - g[0][1]))
        grad_x = 2 * (-2 * qx * (g[1][1] + g[2][2]) + qy * (g[1][0] + g[0][1]) + qz * (g[2][0] + g[0][2])
                      + qw * (g[2][1] - g[1][2]))
        grad_y = 2 * (qx * (g[1][0] + g[0][1]) - 2 * qy * (g[0][0] + g[2][2]) + qz * (g[2][1] + g[1][2])
                      + qw * (g[0][2] - g[2][0]))
        grad_z = 2 * (qx * (g[2][0] + g[0][2]) + qy * (g[2][1] + g[1][2]) - 2 * qz * (g[0][0] + g[1][1])
                      + qw * (g[1][0] - g[0][1]))
        # q_hat = q / |q|: g_q = (g_hat - q_hat (q_hat . g_hat)) / |q|.
        radial = grad_w * qw + grad_x * qx + grad_y * qy + grad_z * qz
        grad_quats = torch.stack([(grad - radial * unit) * inverse_norm for grad, unit in
                                  ((grad_w, qw), (grad_x, qx), (grad_y, qy), (grad_z, qz))], dim=1)
    return grad_quats, grad_scales, grad_covars


def _flatten(value, tensors: list) -> object:
    """The structure of nested tuples / NamedTuples of tensors (and None), appending the tensors to `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return "tensor"
    if value is None:
        return None
    return type(value), tuple(_flatten(item, tensors) for item in value)


def _unflatten(structure, tensors):
    """Inverse of `_flatten`, taking the tensors from the iterator `tensors`."""
    if structure == "tensor":
        return next(tensors)
    if structure is None:
        return None
    kind, items = structure
    values = [_unflatten(item, tensors) for item in items]
    return kind(*values) if hasattr(kind, "_fields") else kind(values)


@dataclass(frozen=True)
class _ProjectionCall:
    """What `_ProjectionFunction` takes that gets no gradient on this route."""

    opacities: torch.Tensor     # [N]
    viewmats: torch.Tensor      # [C, 4, 4]
    Ks: torch.Tensor            # [C, 3, 3]
    clamp_limits: torch.Tensor  # [C, 4]
    settings: RenderSettings


class _ProjectionFunction(torch.autograd.Function):
    """`project_gaussians` with the hand-written backward (gradients for means, quats/scales or covars).

    First derivatives only: the backward reuses the forward's values as constants, so it is
    `once_differentiable` (a double backward raises; `hand_backward=False` differentiates twice). Everything
    the backward reads goes through `save_for_backward` (freed after backward, checked against in-place
    changes), and an output no loss reaches arrives as None (no zero gradients for unused inputs).
    """

    @staticmethod
    def forward(ctx, means, quats, scales, covars, call: _ProjectionCall):
        terms = _projection_terms(means, quats, scales, covars, call.viewmats, call.Ks, call.clamp_limits,
                                  call.settings)
        means2d, conics, radii, visible = _projection_outputs(terms, call.opacities, call.Ks, call.settings)
        saved = [call.viewmats, call.Ks, visible]
        ctx.structure = _flatten(terms, saved)
        ctx.save_for_backward(*saved)
        ctx.want_covars = covars is not None
        ctx.mark_non_differentiable(radii)
        ctx.set_materialize_grads(False)
        return means2d, conics, terms.pz, radii

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _grad_radii):
        viewmats, Ks, visible, *saved = ctx.saved_tensors
        terms = _unflatten(ctx.structure, iter(saved))
        need = ctx.needs_input_grad
        with backward_stage("projection_backward"):
            grad_means, grad_quats, grad_scales, grad_covars = _projection_backward(
                terms, visible, viewmats, Ks, grad_means2d, grad_conics, grad_depths, ctx.want_covars,
                need_means=need[0], need_shape=need[1] or need[2] or need[3])
        return (grad_means, grad_quats if need[1] else None, grad_scales if need[2] else None,
                grad_covars if need[3] else None, None)


def project_gaussians(means: torch.Tensor, quats: torch.Tensor | None, scales: torch.Tensor | None,
                      opacities: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      clamp_limits: torch.Tensor, settings: RenderSettings, *,
                      covars: torch.Tensor | None = None, sh_coeffs: torch.Tensor | None = None,
                      sh_degree: int | None = None, hand_backward: bool | None = None) -> ProjectedGaussians:
    """Project N Gaussians into C cameras (EWA splatting with the Jacobian clamp and dilation).

    t = R mu + T; J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]] with tx = z clamp(x/z) (the
    clamp acts inside J only); Sigma2D = J R Sigma R^T J^T + eps2d I; mean2d = (fx x/z + cx,
    fy y/z + cy). Culled Gaussians (radius 0) get finite outputs, a zero conic and no conic gradient.

    Gradients: by a hand-written backward (the Triton kernel's chain rule over [C, N] tensors) for means,
    quats, scales and covars, first derivatives only (a double backward raises); when a view matrix,
    intrinsics or clamp limit requires grad, or with `hand_backward=False`, by autograd through the same
    forward (which also gives higher derivatives).
    The two agree to rounding (tests/reference/test_projection.py). SH colours are always autograd.
    Forward + backward of 33,075 Gaussians into one 160x90 camera, interleaved medians (AMD EPYC, AVX-512,
    torch 2.13, 2 threads): 4.8 ms by hand, 5.4 ms by autograd, 6.6 ms by autograd over the columns of
    the [N, 3] / [N, 4] inputs as this function computed before (see `_projection_terms`).

    Args:
        means: [N, 3].  quats: [N, 4] (w, x, y, z), any norm.  scales: [N, 3].
        opacities: [N] (only for the opacity-aware radius; not differentiated here).
        viewmats: [C, 4, 4] world-to-camera.  Ks: [C, 3, 3].
        clamp_limits: [C, 4] (x/z low, x/z high, y/z low, y/z high) of the Jacobian clamp.
        settings: resolved render settings.
        covars: optional [N, 6] upper-triangular 3D covariances replacing quats/scales.
        sh_coeffs: optional [N, K, 3] SH coefficients, evaluated at degree `sh_degree`.
        hand_backward: None (default: where it applies, as above), True or False.
    Returns:
        ProjectedGaussians(means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N] int32,
        colors [C,N,3] or None).
    """
    camera_grad = viewmats.requires_grad or Ks.requires_grad or clamp_limits.requires_grad
    if hand_backward is None:
        hand_backward = not camera_grad
    elif hand_backward and camera_grad:
        raise ValueError("hand_backward=True: the hand-written backward has no gradient for viewmats, Ks or "
                         "clamp_limits; pass tensors that do not require grad, or hand_backward=None")
    if hand_backward and torch.is_grad_enabled():
        means2d, conics, depths, radii = _ProjectionFunction.apply(
            means, quats if covars is None else None, scales if covars is None else None, covars,
            _ProjectionCall(opacities, viewmats, Ks, clamp_limits, settings))
    else:
        terms = _projection_terms(means, None if covars is not None else quats,
                                  None if covars is not None else scales, covars, viewmats, Ks, clamp_limits,
                                  settings)
        means2d, conics, radii, _ = _projection_outputs(terms, opacities, Ks, settings)
        depths = terms.pz

    colors = None
    if sh_coeffs is not None:
        colors = evaluate_sh_colors(sh_coeffs, means, camera_centers(viewmats), sh_degree)
    return ProjectedGaussians(means2d, conics, depths, radii, colors)


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
