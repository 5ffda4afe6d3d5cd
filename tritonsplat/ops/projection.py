"""Stage 1: projection of 3D Gaussians to 2D, with SH colours fused in (Triton).

One program projects a block of Gaussians into one camera; all C cameras run in one launch
(grid = (cdiv(N, BLOCK), C)). Torch twin: `tritonsplat.reference.projection` (same outputs, same
culling; it is the oracle of the tests).

Forward, per (camera, Gaussian), Kerbl et al. 2023 Eq. 5-6 and Zwicker et al. 2001:
    p = R mu + t,  z = p_z,  Sigma = M M^T with M = R_q diag(s)  (or a given covariance),
    J = [[fx/z, 0, -fx clamp(x/z)/z], [0, fy/z, -fy clamp(y/z)/z]],
    Sigma2D = (J R) Sigma (J R)^T + eps2d I = [[a, b], [b, c]],  conic = (c, -b, a) / (ac - b^2),
    mean2d = (fx x/z + cx, fy y/z + cy),  radius = ceil(k sqrt(lambda_max)),
    colour = max(sum_k Y_k(d) sh_k + 1/2, 0) with d the unit view direction (3DGS basis).
Writing w0 = J00 R_0 + J02 R_2 and w1 = J11 R_1 + J12 R_2 (R_i the rows of the camera rotation),
the 2D covariance entries are the bilinear forms a = w0.Sigma.w0, b = w0.Sigma.w1, c = w1.Sigma.w1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import constants
from ..profiling import backward_stage
from ..settings import RenderSettings
from . import _alloc
from ._launch import cdiv, contiguous_inputs, launch_settings

SH_C0 = tl.constexpr(constants.SH_C0)
SH_C1 = tl.constexpr(constants.SH_C1)
SH_C2_0 = tl.constexpr(constants.SH_C2[0])
SH_C2_1 = tl.constexpr(constants.SH_C2[1])
SH_C2_2 = tl.constexpr(constants.SH_C2[2])
SH_C2_3 = tl.constexpr(constants.SH_C2[3])
SH_C2_4 = tl.constexpr(constants.SH_C2[4])
SH_C3_0 = tl.constexpr(constants.SH_C3[0])
SH_C3_1 = tl.constexpr(constants.SH_C3[1])
SH_C3_2 = tl.constexpr(constants.SH_C3[2])
SH_C3_3 = tl.constexpr(constants.SH_C3[3])
SH_C3_4 = tl.constexpr(constants.SH_C3[4])
SH_C3_5 = tl.constexpr(constants.SH_C3[5])
SH_C3_6 = tl.constexpr(constants.SH_C3[6])
MIN_ALPHA = tl.constexpr(constants.MIN_ALPHA)
MAX_EXTENT_SIGMAS = tl.constexpr(constants.MAX_EXTENT_SIGMAS)
INRIA_EIGEN_FLOOR = tl.constexpr(constants.INRIA_EIGEN_FLOOR)
INRIA_RADIUS_SIGMAS = tl.constexpr(constants.INRIA_RADIUS_SIGMAS)

RADIUS_OPACITY_AWARE = 0
RADIUS_INRIA = 1


# --------------------------------------------------------------------------------------------------
# Shared device functions
# --------------------------------------------------------------------------------------------------

@triton.jit
def _load_camera(viewmats_ptr, intrinsics_ptr, camera, n_cameras):
    """The 12 entries of [R | t] and (fx, fy, cx, cy) = K[0, 0], K[1, 1], K[0, 2], K[1, 2] of one camera."""
    ok = camera < n_cameras
    base = viewmats_ptr + camera * 16
    r00 = tl.load(base + 0, mask=ok, other=0.0)
    r01 = tl.load(base + 1, mask=ok, other=0.0)
    r02 = tl.load(base + 2, mask=ok, other=0.0)
    t0 = tl.load(base + 3, mask=ok, other=0.0)
    r10 = tl.load(base + 4, mask=ok, other=0.0)
    r11 = tl.load(base + 5, mask=ok, other=0.0)
    r12 = tl.load(base + 6, mask=ok, other=0.0)
    t1 = tl.load(base + 7, mask=ok, other=0.0)
    r20 = tl.load(base + 8, mask=ok, other=0.0)
    r21 = tl.load(base + 9, mask=ok, other=0.0)
    r22 = tl.load(base + 10, mask=ok, other=0.0)
    t2 = tl.load(base + 11, mask=ok, other=0.0)
    fx = tl.load(intrinsics_ptr + camera * 9 + 0, mask=ok, other=1.0)
    fy = tl.load(intrinsics_ptr + camera * 9 + 4, mask=ok, other=1.0)
    cx = tl.load(intrinsics_ptr + camera * 9 + 2, mask=ok, other=0.0)
    cy = tl.load(intrinsics_ptr + camera * 9 + 5, mask=ok, other=0.0)
    return r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy


@triton.jit
def _load_clamp(clamp_ptr, camera, n_cameras, fx, fy, cx, cy, width, height, margin_x, margin_y,
                STANDARD_CLAMP: tl.constexpr):
    """Limits (x_low, x_high, y_low, y_high) of x/z and y/z inside the Jacobian for one camera.

    STANDARD_CLAMP: `settings.standard_clamp_limits` computed here from the intrinsics, in the same
    float32 operations and order (no launches on the host); else loaded from clamp_ptr [C, 4].
    """
    if STANDARD_CLAMP:
        x_low = -(cx + margin_x) / fx
        x_high = (width - cx + margin_x) / fx
        y_low = -(cy + margin_y) / fy
        y_high = (height - cy + margin_y) / fy
    else:
        ok = camera < n_cameras
        x_low = tl.load(clamp_ptr + camera * 4 + 0, mask=ok, other=0.0)
        x_high = tl.load(clamp_ptr + camera * 4 + 1, mask=ok, other=0.0)
        y_low = tl.load(clamp_ptr + camera * 4 + 2, mask=ok, other=0.0)
        y_high = tl.load(clamp_ptr + camera * 4 + 3, mask=ok, other=0.0)
    return x_low, x_high, y_low, y_high


@triton.jit
def _load_quaternion_scale(quats_ptr, scales_ptr, offsets, mask):
    """Quaternions (w, x, y, z) and scales of a block of Gaussians."""
    qw = tl.load(quats_ptr + offsets * 4 + 0, mask=mask, other=1.0)
    qx = tl.load(quats_ptr + offsets * 4 + 1, mask=mask, other=0.0)
    qy = tl.load(quats_ptr + offsets * 4 + 2, mask=mask, other=0.0)
    qz = tl.load(quats_ptr + offsets * 4 + 3, mask=mask, other=0.0)
    sx = tl.load(scales_ptr + offsets * 3 + 0, mask=mask, other=1.0)
    sy = tl.load(scales_ptr + offsets * 3 + 1, mask=mask, other=1.0)
    sz = tl.load(scales_ptr + offsets * 3 + 2, mask=mask, other=1.0)
    return qw, qx, qy, qz, sx, sy, sz


@triton.jit
def _quaternion_rotation(qw, qx, qy, qz):
    """Normalised quaternion, 1/|q| and the 9 entries of its rotation matrix."""
    inverse_norm = 1.0 / tl.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    w = qw * inverse_norm
    x = qx * inverse_norm
    y = qy * inverse_norm
    z = qz * inverse_norm
    r00 = 1.0 - 2.0 * (y * y + z * z)
    r01 = 2.0 * (x * y - w * z)
    r02 = 2.0 * (x * z + w * y)
    r10 = 2.0 * (x * y + w * z)
    r11 = 1.0 - 2.0 * (x * x + z * z)
    r12 = 2.0 * (y * z - w * x)
    r20 = 2.0 * (x * z - w * y)
    r21 = 2.0 * (y * z + w * x)
    r22 = 1.0 - 2.0 * (x * x + y * y)
    return w, x, y, z, inverse_norm, r00, r01, r02, r10, r11, r12, r20, r21, r22


@triton.jit
def _scale_columns(q00, q01, q02, q10, q11, q12, q20, q21, q22, sx, sy, sz):
    """M = R_q diag(s): column j of the rotation scaled by s_j (Sigma = M M^T)."""
    return (q00 * sx, q01 * sy, q02 * sz, q10 * sx, q11 * sy, q12 * sz, q20 * sx, q21 * sy, q22 * sz)


@triton.jit
def _bilinear(sxx, sxy, sxz, syy, syz, szz, u0, u1, u2, v0, v1, v2):
    """u^T Sigma v for a symmetric Sigma given by its 6 upper entries."""
    return (sxx * u0 * v0 + syy * u1 * v1 + szz * u2 * v2 + sxy * (u0 * v1 + u1 * v0)
            + sxz * (u0 * v2 + u2 * v0) + syz * (u1 * v2 + u2 * v1))


@triton.jit
def _sh_term(sh_ptr, base, k: tl.constexpr, mask, basis, red, green, blue):
    """Add basis value * coefficients of term k (3 channels) to the colour."""
    red += basis * tl.load(sh_ptr + base + 3 * k + 0, mask=mask, other=0.0)
    green += basis * tl.load(sh_ptr + base + 3 * k + 1, mask=mask, other=0.0)
    blue += basis * tl.load(sh_ptr + base + 3 * k + 2, mask=mask, other=0.0)
    return red, green, blue


@triton.jit
def _sh_colors(sh_ptr, base, mask, x, y, z, SH_DEGREE: tl.constexpr):
    """Raw SH colour sum_k Y_k(x, y, z) sh_k of unit directions (before +0.5 and the clamp).

    Constants multiply tensors from the right: the interpreter keeps constexpr-first products as
    constexprs, which breaks when they are passed on to another jit function.
    """
    zero = x * 0.0
    red, green, blue = _sh_term(sh_ptr, base, 0, mask, zero + SH_C0, zero, zero, zero)
    if SH_DEGREE >= 1:
        red, green, blue = _sh_term(sh_ptr, base, 1, mask, y * (-SH_C1), red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 2, mask, z * SH_C1, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 3, mask, x * (-SH_C1), red, green, blue)
    if SH_DEGREE >= 2:
        xx = x * x
        yy = y * y
        zz = z * z
        red, green, blue = _sh_term(sh_ptr, base, 4, mask, x * y * SH_C2_0, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 5, mask, y * z * SH_C2_1, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 6, mask, (2.0 * zz - xx - yy) * SH_C2_2, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 7, mask, x * z * SH_C2_3, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 8, mask, (xx - yy) * SH_C2_4, red, green, blue)
    if SH_DEGREE >= 3:
        xx = x * x
        yy = y * y
        zz = z * z
        red, green, blue = _sh_term(sh_ptr, base, 9, mask, y * (3.0 * xx - yy) * SH_C3_0, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 10, mask, x * y * z * SH_C3_1, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 11, mask, y * (4.0 * zz - xx - yy) * SH_C3_2, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 12, mask, z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * SH_C3_3,
                                    red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 13, mask, x * (4.0 * zz - xx - yy) * SH_C3_4, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 14, mask, z * (xx - yy) * SH_C3_5, red, green, blue)
        red, green, blue = _sh_term(sh_ptr, base, 15, mask, x * (xx - 3.0 * yy) * SH_C3_6, red, green, blue)
    return red, green, blue


@triton.jit
def _project_block(means_ptr, quats_ptr, scales_ptr, covars_ptr, offsets, mask,
                   r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy,
                   x_low, x_high, y_low, y_high, near, far, eps2d, COVARIANCE_INPUT: tl.constexpr):
    """Everything forward and backward share, for a block of Gaussians in one camera."""
    mean_x = tl.load(means_ptr + offsets * 3 + 0, mask=mask, other=0.0)
    mean_y = tl.load(means_ptr + offsets * 3 + 1, mask=mask, other=0.0)
    mean_z = tl.load(means_ptr + offsets * 3 + 2, mask=mask, other=1.0)
    px = r00 * mean_x + r01 * mean_y + r02 * mean_z + t0
    py = r10 * mean_x + r11 * mean_y + r12 * mean_z + t1
    pz = r20 * mean_x + r21 * mean_y + r22 * mean_z + t2
    in_depth_range = (pz > near) & (pz < far)
    z = tl.where(in_depth_range, pz, 1.0)  # culled lanes compute on a safe depth

    if COVARIANCE_INPUT:
        sxx = tl.load(covars_ptr + offsets * 6 + 0, mask=mask, other=1.0)
        sxy = tl.load(covars_ptr + offsets * 6 + 1, mask=mask, other=0.0)
        sxz = tl.load(covars_ptr + offsets * 6 + 2, mask=mask, other=0.0)
        syy = tl.load(covars_ptr + offsets * 6 + 3, mask=mask, other=1.0)
        syz = tl.load(covars_ptr + offsets * 6 + 4, mask=mask, other=0.0)
        szz = tl.load(covars_ptr + offsets * 6 + 5, mask=mask, other=1.0)
    else:
        qw, qx, qy, qz, sx, sy, sz = _load_quaternion_scale(quats_ptr, scales_ptr, offsets, mask)
        _w, _x, _y, _z, _inv, q00, q01, q02, q10, q11, q12, q20, q21, q22 = _quaternion_rotation(qw, qx, qy, qz)
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = _scale_columns(
            q00, q01, q02, q10, q11, q12, q20, q21, q22, sx, sy, sz)
        sxx = m00 * m00 + m01 * m01 + m02 * m02
        sxy = m00 * m10 + m01 * m11 + m02 * m12
        sxz = m00 * m20 + m01 * m21 + m02 * m22
        syy = m10 * m10 + m11 * m11 + m12 * m12
        syz = m10 * m20 + m11 * m21 + m12 * m22
        szz = m20 * m20 + m21 * m21 + m22 * m22

    x_over_z = px / z
    y_over_z = py / z
    clamped_x = tl.minimum(tl.maximum(x_over_z, x_low), x_high)
    clamped_y = tl.minimum(tl.maximum(y_over_z, y_low), y_high)
    j00 = fx / z
    j02 = -fx * clamped_x / z
    j11 = fy / z
    j12 = -fy * clamped_y / z
    w0x = j00 * r00 + j02 * r20
    w0y = j00 * r01 + j02 * r21
    w0z = j00 * r02 + j02 * r22
    w1x = j11 * r10 + j12 * r20
    w1y = j11 * r11 + j12 * r21
    w1z = j11 * r12 + j12 * r22
    a = _bilinear(sxx, sxy, sxz, syy, syz, szz, w0x, w0y, w0z, w0x, w0y, w0z) + eps2d
    b = _bilinear(sxx, sxy, sxz, syy, syz, szz, w0x, w0y, w0z, w1x, w1y, w1z)
    c = _bilinear(sxx, sxy, sxz, syy, syz, szz, w1x, w1y, w1z, w1x, w1y, w1z) + eps2d
    return (mean_x, mean_y, mean_z, px, py, pz, z, in_depth_range, sxx, sxy, sxz, syy, syz, szz,
            x_over_z, y_over_z, clamped_x, clamped_y, j00, j02, j11, j12, w0x, w0y, w0z, w1x, w1y, w1z, a, b, c)


# --------------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------------

@triton.jit
def _projection_forward_kernel(
    means_ptr,        # [N, 3] float32
    quats_ptr,        # [N, 4] float32 (w, x, y, z), any norm; unused with COVARIANCE_INPUT
    scales_ptr,       # [N, 3] float32; unused with COVARIANCE_INPUT
    covars_ptr,       # [N, 6] float32 upper triangle; used only with COVARIANCE_INPUT
    opacities_ptr,    # [N] float32
    sh_ptr,           # [N, K, 3] float32; used only with SH_DEGREE >= 0
    viewmats_ptr,     # [C, 4, 4] float32 world-to-camera
    intrinsics_ptr,   # [C, 3, 3] float32 pinhole intrinsics
    clamp_ptr,        # [C, 4] float32 limits of x/z and y/z inside the Jacobian (unless STANDARD_CLAMP)
    means2d_ptr,      # out [C, N, 2] float32
    conics_ptr,       # out [C, N, 3] float32
    depths_ptr,       # out [C, N] float32
    radii_ptr,        # out [C, N] int32
    colors_ptr,       # out [C, N, 3] float32; written only with SH_DEGREE >= 0
    n_gaussians, n_cameras, sh_stride, width, height, near, far, eps2d, margin_x, margin_y,
    BLOCK: tl.constexpr, COVARIANCE_INPUT: tl.constexpr, SH_DEGREE: tl.constexpr,
    RADIUS_RULE: tl.constexpr, TILE_SIZE: tl.constexpr, STANDARD_CLAMP: tl.constexpr,
):
    block = tl.program_id(0)
    camera = tl.program_id(1)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)         # [BLOCK] Gaussians, int64
    mask = offsets < n_gaussians
    r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy = _load_camera(
        viewmats_ptr, intrinsics_ptr, camera, n_cameras)
    x_low, x_high, y_low, y_high = _load_clamp(clamp_ptr, camera, n_cameras, fx, fy, cx, cy, width, height,
                                               margin_x, margin_y, STANDARD_CLAMP)
    (mean_x, mean_y, mean_z, px, py, pz, z, in_depth_range, sxx, sxy, sxz, syy, syz, szz,
     x_over_z, y_over_z, clamped_x, clamped_y, j00, j02, j11, j12, w0x, w0y, w0z, w1x, w1y, w1z,
     a, b, c) = _project_block(means_ptr, quats_ptr, scales_ptr, covars_ptr, offsets, mask,
                               r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy,
                               x_low, x_high, y_low, y_high, near, far, eps2d, COVARIANCE_INPUT)
    det = a * c - b * b
    mean2d_x = fx * px / z + cx
    mean2d_y = fy * py / z + cy
    opacity = tl.load(opacities_ptr + offsets, mask=mask, other=0.0)

    # Radius: ceil(k sqrt(lambda_max)) (see reference.projection.splat_radii for the rules).
    mid = 0.5 * (a + c)
    if RADIUS_RULE == 1:
        spread = tl.sqrt_rn(tl.maximum(mid * mid - det, INRIA_EIGEN_FLOOR))
        extent = mid * 0.0 + INRIA_RADIUS_SIGMAS
        keep = in_depth_range & (det != 0.0)
    else:
        spread = tl.sqrt_rn(tl.maximum(mid * mid - det, 0.0))
        log_term = tl.log(tl.maximum(opacity * 255.0, 1.0))
        extent = tl.minimum(tl.sqrt_rn(2.0 * log_term), MAX_EXTENT_SIGMAS)
        keep = in_depth_range & (det > 0.0) & (opacity >= MIN_ALPHA)
    radius = tl.ceil(extent * tl.sqrt_rn(tl.maximum(mid + spread, 0.0)))
    keep = keep & (radius > 0.0) & (radius < 1e9) & mask
    if RADIUS_RULE == 1:
        # The original's tile rectangle (getRect) around (mean - 0.5) must not be empty.
        tiles_x = (width + TILE_SIZE - 1) // TILE_SIZE
        tiles_y = (height + TILE_SIZE - 1) // TILE_SIZE
        corner_x = mean2d_x - 0.5
        corner_y = mean2d_y - 0.5
        low_x = tl.minimum(tl.maximum(((corner_x - radius) / TILE_SIZE).to(tl.int32), 0), tiles_x)
        low_y = tl.minimum(tl.maximum(((corner_y - radius) / TILE_SIZE).to(tl.int32), 0), tiles_y)
        high_x = tl.minimum(tl.maximum(((corner_x + radius + TILE_SIZE - 1) / TILE_SIZE).to(tl.int32), 0), tiles_x)
        high_y = tl.minimum(tl.maximum(((corner_y + radius + TILE_SIZE - 1) / TILE_SIZE).to(tl.int32), 0), tiles_y)
        keep = keep & ((high_x - low_x) * (high_y - low_y) > 0)
    else:
        keep = keep & (mean2d_x + radius > 0.0) & (mean2d_x - radius < width)
        keep = keep & (mean2d_y + radius > 0.0) & (mean2d_y - radius < height)
    radius = tl.where(keep, radius, 0.0)
    safe_det = tl.where(keep, det, 1.0)

    out = camera.to(tl.int64) * n_gaussians + offsets                  # [BLOCK] int64 rows of [C, N]
    tl.store(means2d_ptr + out * 2 + 0, mean2d_x, mask=mask)
    tl.store(means2d_ptr + out * 2 + 1, mean2d_y, mask=mask)
    tl.store(conics_ptr + out * 3 + 0, tl.where(keep, c / safe_det, 0.0), mask=mask)
    tl.store(conics_ptr + out * 3 + 1, tl.where(keep, -b / safe_det, 0.0), mask=mask)
    tl.store(conics_ptr + out * 3 + 2, tl.where(keep, a / safe_det, 0.0), mask=mask)
    tl.store(depths_ptr + out, pz, mask=mask)
    tl.store(radii_ptr + out, radius.to(tl.int32), mask=mask)

    if SH_DEGREE >= 0:
        # View direction from the camera centre -R^T t.
        center_x = -(r00 * t0 + r10 * t1 + r20 * t2)
        center_y = -(r01 * t0 + r11 * t1 + r21 * t2)
        center_z = -(r02 * t0 + r12 * t1 + r22 * t2)
        dir_x = mean_x - center_x
        dir_y = mean_y - center_y
        dir_z = mean_z - center_z
        inverse_length = 1.0 / tl.maximum(tl.sqrt(dir_x * dir_x + dir_y * dir_y + dir_z * dir_z), 1e-12)
        red, green, blue = _sh_colors(sh_ptr, offsets * sh_stride, mask, dir_x * inverse_length,
                                      dir_y * inverse_length, dir_z * inverse_length, SH_DEGREE)
        tl.store(colors_ptr + out * 3 + 0, tl.maximum(red + 0.5, 0.0), mask=mask)
        tl.store(colors_ptr + out * 3 + 1, tl.maximum(green + 0.5, 0.0), mask=mask)
        tl.store(colors_ptr + out * 3 + 2, tl.maximum(blue + 0.5, 0.0), mask=mask)


# --------------------------------------------------------------------------------------------------
# Backward kernel
# --------------------------------------------------------------------------------------------------

@triton.jit
def _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, k: tl.constexpr, mask, basis,
                      grad_red, grad_green, grad_blue):
    """d colour / d sh_k = Y_k: store the coefficient gradients; return sh_k . g_colour."""
    tl.store(grad_sh_ptr + grad_base + 3 * k + 0, basis * grad_red, mask=mask)
    tl.store(grad_sh_ptr + grad_base + 3 * k + 1, basis * grad_green, mask=mask)
    tl.store(grad_sh_ptr + grad_base + 3 * k + 2, basis * grad_blue, mask=mask)
    return (tl.load(sh_ptr + base + 3 * k + 0, mask=mask, other=0.0) * grad_red
            + tl.load(sh_ptr + base + 3 * k + 1, mask=mask, other=0.0) * grad_green
            + tl.load(sh_ptr + base + 3 * k + 2, mask=mask, other=0.0) * grad_blue)


@triton.jit
def _sh_backward(sh_ptr, grad_sh_ptr, base, grad_base, mask, x, y, z, grad_red, grad_green, grad_blue,
                 SH_DEGREE: tl.constexpr):
    """Coefficient gradients (stored) and the gradient of the colour w.r.t. the unit direction,
    sum_k grad Y_k (sh_k . g_colour), with the partial derivatives of each basis polynomial."""
    zero = x * 0.0
    s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 0, mask, zero + SH_C0,
                          grad_red, grad_green, grad_blue)
    grad_x = zero
    grad_y = zero
    grad_z = zero
    if SH_DEGREE >= 1:
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 1, mask, y * (-SH_C1),
                              grad_red, grad_green, grad_blue)
        grad_y += s * (-SH_C1)
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 2, mask, z * SH_C1,
                              grad_red, grad_green, grad_blue)
        grad_z += s * SH_C1
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 3, mask, x * (-SH_C1),
                              grad_red, grad_green, grad_blue)
        grad_x += s * (-SH_C1)
    if SH_DEGREE >= 2:
        xx = x * x
        yy = y * y
        zz = z * z
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 4, mask, x * y * SH_C2_0,
                              grad_red, grad_green, grad_blue)
        grad_x += y * s * SH_C2_0
        grad_y += x * s * SH_C2_0
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 5, mask, y * z * SH_C2_1,
                              grad_red, grad_green, grad_blue)
        grad_y += z * s * SH_C2_1
        grad_z += y * s * SH_C2_1
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 6, mask, (2.0 * zz - xx - yy) * SH_C2_2,
                              grad_red, grad_green, grad_blue)
        grad_x += x * s * (-2.0 * SH_C2_2)
        grad_y += y * s * (-2.0 * SH_C2_2)
        grad_z += z * s * (4.0 * SH_C2_2)
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 7, mask, x * z * SH_C2_3,
                              grad_red, grad_green, grad_blue)
        grad_x += z * s * SH_C2_3
        grad_z += x * s * SH_C2_3
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 8, mask, (xx - yy) * SH_C2_4,
                              grad_red, grad_green, grad_blue)
        grad_x += x * s * (2.0 * SH_C2_4)
        grad_y += y * s * (-2.0 * SH_C2_4)
    if SH_DEGREE >= 3:
        xx = x * x
        yy = y * y
        zz = z * z
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 9, mask, y * (3.0 * xx - yy) * SH_C3_0,
                              grad_red, grad_green, grad_blue)
        grad_x += x * y * s * (6.0 * SH_C3_0)
        grad_y += (3.0 * xx - 3.0 * yy) * s * SH_C3_0
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 10, mask, x * y * z * SH_C3_1,
                              grad_red, grad_green, grad_blue)
        grad_x += y * z * s * SH_C3_1
        grad_y += x * z * s * SH_C3_1
        grad_z += x * y * s * SH_C3_1
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 11, mask, y * (4.0 * zz - xx - yy) * SH_C3_2,
                              grad_red, grad_green, grad_blue)
        grad_x += x * y * s * (-2.0 * SH_C3_2)
        grad_y += (4.0 * zz - xx - 3.0 * yy) * s * SH_C3_2
        grad_z += y * z * s * (8.0 * SH_C3_2)
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 12, mask,
                              z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * SH_C3_3, grad_red, grad_green, grad_blue)
        grad_x += x * z * s * (-6.0 * SH_C3_3)
        grad_y += y * z * s * (-6.0 * SH_C3_3)
        grad_z += (6.0 * zz - 3.0 * xx - 3.0 * yy) * s * SH_C3_3
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 13, mask, x * (4.0 * zz - xx - yy) * SH_C3_4,
                              grad_red, grad_green, grad_blue)
        grad_x += (4.0 * zz - 3.0 * xx - yy) * s * SH_C3_4
        grad_y += x * y * s * (-2.0 * SH_C3_4)
        grad_z += x * z * s * (8.0 * SH_C3_4)
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 14, mask, z * (xx - yy) * SH_C3_5,
                              grad_red, grad_green, grad_blue)
        grad_x += x * z * s * (2.0 * SH_C3_5)
        grad_y += y * z * s * (-2.0 * SH_C3_5)
        grad_z += (xx - yy) * s * SH_C3_5
        s = _sh_term_backward(sh_ptr, grad_sh_ptr, base, grad_base, 15, mask, x * (xx - 3.0 * yy) * SH_C3_6,
                              grad_red, grad_green, grad_blue)
        grad_x += (3.0 * xx - 3.0 * yy) * s * SH_C3_6
        grad_y += x * y * s * (-6.0 * SH_C3_6)
    return grad_x, grad_y, grad_z


# Vector-Jacobian product of the projection, per (camera, Gaussian), recomputing the forward.
# Saved by forward: only the radii (culled lanes get zero gradients). Upstream: g_mean2d, g_conic
# (A, B, C) = (c, -b, a) / D with D = ac - b^2, g_depth, and g_colour with SH.
#  1. Conic -> 2D covariance (the dilation is additive, so it passes unchanged):
#       g_a = -g_A c^2/D^2 + g_B bc/D^2 + g_C (1/D - ac/D^2)
#       g_b =  g_A 2bc/D^2 - g_B (1/D + 2b^2/D^2) + g_C 2ab/D^2
#       g_c =  g_A (1/D - ac/D^2) + g_B ab/D^2 - g_C a^2/D^2
#  2. Bilinear forms a = w0.S.w0, b = w0.S.w1, c = w1.S.w1:
#       g_S_ij (upper entries) = g_a w0_i w0_j + g_b (w0_i w1_j + w0_j w1_i) / 2-sym + g_c w1_i w1_j
#       g_w0 = 2 g_a S w0 + g_b S w1,  g_w1 = g_b S w0 + 2 g_c S w1
#  3. w0 = J00 R0 + J02 R2, w1 = J11 R1 + J12 R2: g_J00 = g_w0.R0, g_J02 = g_w0.R2, ...; g_R rows.
#     J00 = fx/z, J02 = -fx clamp(x/z)/z: dJ02/dx = -fx/z^2 inside the clamp, 0 outside;
#     dJ02/dz = fx clamp(x/z)/z^2 + [inside] fx x/z^3 (t_x = z lim still depends on z when clamped).
#  4. mean2d = (fx x/z + cx, fy y/z + cy); depth = z; p = R mu + t: g_mu = R^T g_p, g_R += g_p mu^T,
#     g_t += g_p.
#  5. S = M M^T, M = R_q diag(s): g_M = 2 G M with G the symmetric gradient (off-diagonal halved),
#     g_s_j = sum_i R_q,ij g_M_ij, g_R_q = g_M diag(s), then the quaternion formula (d of Kerbl et al. 2023 Eq. 6 by q)
#     and the normalisation g_q = (g_qhat - (g_qhat . qhat) qhat) / |q|.
#  6. SH: g_sh_k = Y_k g_colour (where the +0.5 clamp is inactive); the direction d = v/|v|,
#     v = mu - centre: g_v = (g_d - (g_d.d) d)/|v| goes to mu and, through centre = -R^T t, to R and t.
# Reduction: per-(camera, Gaussian) gradients are written to [C, N, ...] buffers and summed over
# cameras in torch (deterministic); view-matrix gradients are summed per program with tl.sum and
# written to a [C, n_blocks, 12] buffer (also summed in torch).
@triton.jit
def _projection_backward_kernel(
    means_ptr, quats_ptr, scales_ptr, covars_ptr, sh_ptr,   # forward inputs, as in the forward kernel
    viewmats_ptr, intrinsics_ptr, clamp_ptr,
    radii_ptr,              # [C, N] int32 from forward
    grad_means2d_ptr,       # [C, N, 2]
    grad_conics_ptr,        # [C, N, 3]
    grad_depths_ptr,        # [C, N]
    grad_colors_ptr,        # [C, N, 3] (SH only)
    out_grad_means_ptr,     # out [C, N, 3]
    out_grad_quats_ptr,     # out [C, N, 4] (or [C, N, 6] covariance gradients with COVARIANCE_INPUT)
    out_grad_scales_ptr,    # out [C, N, 3]
    out_grad_sh_ptr,        # out [C, N, K, 3] (SH only)
    out_grad_viewmats_ptr,  # out [C, n_blocks, 12] (VIEWMAT_GRAD only)
    n_gaussians, n_cameras, sh_stride, width, height, near, far, eps2d, margin_x, margin_y,
    BLOCK: tl.constexpr, COVARIANCE_INPUT: tl.constexpr, SH_DEGREE: tl.constexpr,
    VIEWMAT_GRAD: tl.constexpr, STANDARD_CLAMP: tl.constexpr,
):
    block = tl.program_id(0)
    camera = tl.program_id(1)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)         # int64: offsets * sh_stride
    mask = offsets < n_gaussians
    r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy = _load_camera(
        viewmats_ptr, intrinsics_ptr, camera, n_cameras)
    x_low, x_high, y_low, y_high = _load_clamp(clamp_ptr, camera, n_cameras, fx, fy, cx, cy, width, height,
                                               margin_x, margin_y, STANDARD_CLAMP)
    (mean_x, mean_y, mean_z, px, py, pz, z, in_depth_range, sxx, sxy, sxz, syy, syz, szz,
     x_over_z, y_over_z, clamped_x, clamped_y, j00, j02, j11, j12, w0x, w0y, w0z, w1x, w1y, w1z,
     a, b, c) = _project_block(means_ptr, quats_ptr, scales_ptr, covars_ptr, offsets, mask,
                               r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2, fx, fy, cx, cy,
                               x_low, x_high, y_low, y_high, near, far, eps2d, COVARIANCE_INPUT)
    row = camera.to(tl.int64) * n_gaussians + offsets
    visible = mask & (tl.load(radii_ptr + row, mask=mask, other=0) > 0)
    det = tl.where(visible, a * c - b * b, 1.0)

    # 1. conic -> (a, b, c)
    grad_conic_a = tl.load(grad_conics_ptr + row * 3 + 0, mask=visible, other=0.0)
    grad_conic_b = tl.load(grad_conics_ptr + row * 3 + 1, mask=visible, other=0.0)
    grad_conic_c = tl.load(grad_conics_ptr + row * 3 + 2, mask=visible, other=0.0)
    inv_det = 1.0 / det
    inv_det2 = inv_det * inv_det
    grad_a = (-grad_conic_a * c * c * inv_det2 + grad_conic_b * b * c * inv_det2
              + grad_conic_c * (inv_det - a * c * inv_det2))
    grad_b = (2.0 * grad_conic_a * b * c * inv_det2 - grad_conic_b * (inv_det + 2.0 * b * b * inv_det2)
              + 2.0 * grad_conic_c * a * b * inv_det2)
    grad_c = (grad_conic_a * (inv_det - a * c * inv_det2) + grad_conic_b * a * b * inv_det2
              - grad_conic_c * a * a * inv_det2)

    # 2. bilinear forms -> covariance entries and w0, w1
    grad_sxx = grad_a * w0x * w0x + grad_b * w0x * w1x + grad_c * w1x * w1x
    grad_syy = grad_a * w0y * w0y + grad_b * w0y * w1y + grad_c * w1y * w1y
    grad_szz = grad_a * w0z * w0z + grad_b * w0z * w1z + grad_c * w1z * w1z
    grad_sxy = 2.0 * grad_a * w0x * w0y + grad_b * (w0x * w1y + w0y * w1x) + 2.0 * grad_c * w1x * w1y
    grad_sxz = 2.0 * grad_a * w0x * w0z + grad_b * (w0x * w1z + w0z * w1x) + 2.0 * grad_c * w1x * w1z
    grad_syz = 2.0 * grad_a * w0y * w0z + grad_b * (w0y * w1z + w0z * w1y) + 2.0 * grad_c * w1y * w1z
    s_w0x = sxx * w0x + sxy * w0y + sxz * w0z
    s_w0y = sxy * w0x + syy * w0y + syz * w0z
    s_w0z = sxz * w0x + syz * w0y + szz * w0z
    s_w1x = sxx * w1x + sxy * w1y + sxz * w1z
    s_w1y = sxy * w1x + syy * w1y + syz * w1z
    s_w1z = sxz * w1x + syz * w1y + szz * w1z
    grad_w0x = 2.0 * grad_a * s_w0x + grad_b * s_w1x
    grad_w0y = 2.0 * grad_a * s_w0y + grad_b * s_w1y
    grad_w0z = 2.0 * grad_a * s_w0z + grad_b * s_w1z
    grad_w1x = grad_b * s_w0x + 2.0 * grad_c * s_w1x
    grad_w1y = grad_b * s_w0y + 2.0 * grad_c * s_w1y
    grad_w1z = grad_b * s_w0z + 2.0 * grad_c * s_w1z

    # 3. w -> J entries (and the camera rotation rows)
    grad_j00 = grad_w0x * r00 + grad_w0y * r01 + grad_w0z * r02
    grad_j02 = grad_w0x * r20 + grad_w0y * r21 + grad_w0z * r22
    grad_j11 = grad_w1x * r10 + grad_w1y * r11 + grad_w1z * r12
    grad_j12 = grad_w1x * r20 + grad_w1y * r21 + grad_w1z * r22
    inside_x = (x_over_z >= x_low) & (x_over_z <= x_high)
    inside_y = (y_over_z >= y_low) & (y_over_z <= y_high)
    inv_z = 1.0 / z
    inv_z2 = inv_z * inv_z
    grad_px = tl.where(inside_x, -fx * inv_z2 * grad_j02, 0.0)
    grad_py = tl.where(inside_y, -fy * inv_z2 * grad_j12, 0.0)
    grad_pz = (-fx * inv_z2 * grad_j00 - fy * inv_z2 * grad_j11
               + grad_j02 * (fx * clamped_x * inv_z2 + tl.where(inside_x, fx * px * inv_z2 * inv_z, 0.0))
               + grad_j12 * (fy * clamped_y * inv_z2 + tl.where(inside_y, fy * py * inv_z2 * inv_z, 0.0)))

    # 4. mean2d and depth
    grad_mean2d_x = tl.load(grad_means2d_ptr + row * 2 + 0, mask=visible, other=0.0)
    grad_mean2d_y = tl.load(grad_means2d_ptr + row * 2 + 1, mask=visible, other=0.0)
    grad_px += grad_mean2d_x * fx * inv_z
    grad_py += grad_mean2d_y * fy * inv_z
    grad_pz += -(grad_mean2d_x * fx * px + grad_mean2d_y * fy * py) * inv_z2
    grad_pz += tl.load(grad_depths_ptr + row, mask=visible, other=0.0)
    grad_px = tl.where(visible, grad_px, 0.0)
    grad_py = tl.where(visible, grad_py, 0.0)
    grad_pz = tl.where(visible, grad_pz, 0.0)
    grad_mean_x = r00 * grad_px + r10 * grad_py + r20 * grad_pz
    grad_mean_y = r01 * grad_px + r11 * grad_py + r21 * grad_pz
    grad_mean_z = r02 * grad_px + r12 * grad_py + r22 * grad_pz

    # 6. SH colours (before the camera gradient so it can include the view direction's share)
    center_grad_x = mean_x * 0.0
    center_grad_y = mean_x * 0.0
    center_grad_z = mean_x * 0.0
    if SH_DEGREE >= 0:
        center_x = -(r00 * t0 + r10 * t1 + r20 * t2)
        center_y = -(r01 * t0 + r11 * t1 + r21 * t2)
        center_z = -(r02 * t0 + r12 * t1 + r22 * t2)
        dir_x = mean_x - center_x
        dir_y = mean_y - center_y
        dir_z = mean_z - center_z
        inverse_length = 1.0 / tl.maximum(tl.sqrt(dir_x * dir_x + dir_y * dir_y + dir_z * dir_z), 1e-12)
        unit_x = dir_x * inverse_length
        unit_y = dir_y * inverse_length
        unit_z = dir_z * inverse_length
        red, green, blue = _sh_colors(sh_ptr, offsets * sh_stride, mask, unit_x, unit_y, unit_z, SH_DEGREE)
        grad_red = tl.load(grad_colors_ptr + row * 3 + 0, mask=visible, other=0.0)
        grad_green = tl.load(grad_colors_ptr + row * 3 + 1, mask=visible, other=0.0)
        grad_blue = tl.load(grad_colors_ptr + row * 3 + 2, mask=visible, other=0.0)
        grad_red = tl.where(red + 0.5 >= 0.0, grad_red, 0.0)
        grad_green = tl.where(green + 0.5 >= 0.0, grad_green, 0.0)
        grad_blue = tl.where(blue + 0.5 >= 0.0, grad_blue, 0.0)
        grad_unit_x, grad_unit_y, grad_unit_z = _sh_backward(
            sh_ptr, out_grad_sh_ptr, offsets * sh_stride, row * sh_stride, mask, unit_x, unit_y, unit_z,
            grad_red, grad_green, grad_blue, SH_DEGREE)
        radial = grad_unit_x * unit_x + grad_unit_y * unit_y + grad_unit_z * unit_z
        grad_dir_x = (grad_unit_x - radial * unit_x) * inverse_length
        grad_dir_y = (grad_unit_y - radial * unit_y) * inverse_length
        grad_dir_z = (grad_unit_z - radial * unit_z) * inverse_length
        grad_mean_x += grad_dir_x
        grad_mean_y += grad_dir_y
        grad_mean_z += grad_dir_z
        center_grad_x = -grad_dir_x
        center_grad_y = -grad_dir_y
        center_grad_z = -grad_dir_z

    tl.store(out_grad_means_ptr + row * 3 + 0, grad_mean_x, mask=mask)
    tl.store(out_grad_means_ptr + row * 3 + 1, grad_mean_y, mask=mask)
    tl.store(out_grad_means_ptr + row * 3 + 2, grad_mean_z, mask=mask)

    # 5. covariance -> quaternion and scales (or the covariance itself)
    if COVARIANCE_INPUT:
        tl.store(out_grad_quats_ptr + row * 6 + 0, grad_sxx, mask=mask)
        tl.store(out_grad_quats_ptr + row * 6 + 1, grad_sxy, mask=mask)
        tl.store(out_grad_quats_ptr + row * 6 + 2, grad_sxz, mask=mask)
        tl.store(out_grad_quats_ptr + row * 6 + 3, grad_syy, mask=mask)
        tl.store(out_grad_quats_ptr + row * 6 + 4, grad_syz, mask=mask)
        tl.store(out_grad_quats_ptr + row * 6 + 5, grad_szz, mask=mask)
    else:
        qw, qx, qy, qz, sx, sy, sz = _load_quaternion_scale(quats_ptr, scales_ptr, offsets, mask)
        w, x, y, zq, inverse_norm, q00, q01, q02, q10, q11, q12, q20, q21, q22 = _quaternion_rotation(
            qw, qx, qy, qz)
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = _scale_columns(
            q00, q01, q02, q10, q11, q12, q20, q21, q22, sx, sy, sz)
        # g_M = 2 G M, G symmetric with off-diagonal entries g_S_ij / 2.
        gm00 = 2.0 * grad_sxx * m00 + grad_sxy * m10 + grad_sxz * m20
        gm01 = 2.0 * grad_sxx * m01 + grad_sxy * m11 + grad_sxz * m21
        gm02 = 2.0 * grad_sxx * m02 + grad_sxy * m12 + grad_sxz * m22
        gm10 = grad_sxy * m00 + 2.0 * grad_syy * m10 + grad_syz * m20
        gm11 = grad_sxy * m01 + 2.0 * grad_syy * m11 + grad_syz * m21
        gm12 = grad_sxy * m02 + 2.0 * grad_syy * m12 + grad_syz * m22
        gm20 = grad_sxz * m00 + grad_syz * m10 + 2.0 * grad_szz * m20
        gm21 = grad_sxz * m01 + grad_syz * m11 + 2.0 * grad_szz * m21
        gm22 = grad_sxz * m02 + grad_syz * m12 + 2.0 * grad_szz * m22
        tl.store(out_grad_scales_ptr + row * 3 + 0, q00 * gm00 + q10 * gm10 + q20 * gm20, mask=mask)
        tl.store(out_grad_scales_ptr + row * 3 + 1, q01 * gm01 + q11 * gm11 + q21 * gm21, mask=mask)
        tl.store(out_grad_scales_ptr + row * 3 + 2, q02 * gm02 + q12 * gm12 + q22 * gm22, mask=mask)
        g00 = gm00 * sx
        g01 = gm01 * sy
        g02 = gm02 * sz
        g10 = gm10 * sx
        g11 = gm11 * sy
        g12 = gm12 * sz
        g20 = gm20 * sx
        g21 = gm21 * sy
        g22 = gm22 * sz
        grad_w = 2.0 * (x * (g21 - g12) + y * (g02 - g20) + zq * (g10 - g01))
        grad_x = 2.0 * (-2.0 * x * (g11 + g22) + y * (g10 + g01) + zq * (g20 + g02) + w * (g21 - g12))
        grad_y = 2.0 * (x * (g10 + g01) - 2.0 * y * (g00 + g22) + zq * (g21 + g12) + w * (g02 - g20))
        grad_z = 2.0 * (x * (g20 + g02) + y * (g21 + g12) - 2.0 * zq * (g00 + g11) + w * (g10 - g01))
        radial = grad_w * w + grad_x * x + grad_y * y + grad_z * zq
        tl.store(out_grad_quats_ptr + row * 4 + 0, (grad_w - radial * w) * inverse_norm, mask=mask)
        tl.store(out_grad_quats_ptr + row * 4 + 1, (grad_x - radial * x) * inverse_norm, mask=mask)
        tl.store(out_grad_quats_ptr + row * 4 + 2, (grad_y - radial * y) * inverse_norm, mask=mask)
        tl.store(out_grad_quats_ptr + row * 4 + 3, (grad_z - radial * zq) * inverse_norm, mask=mask)

    if VIEWMAT_GRAD:
        # Rows of R from w0/w1 (covariance path) and from p = R mu + t; t from p; and the SH view
        # direction through the camera centre -R^T t: g_t += R g_v, g_R[j, i] += t_j g_v_i.
        view_x = -center_grad_x
        view_y = -center_grad_y
        view_z = -center_grad_z
        g_r00 = j00 * grad_w0x + grad_px * mean_x + t0 * view_x
        g_r01 = j00 * grad_w0y + grad_px * mean_y + t0 * view_y
        g_r02 = j00 * grad_w0z + grad_px * mean_z + t0 * view_z
        g_r10 = j11 * grad_w1x + grad_py * mean_x + t1 * view_x
        g_r11 = j11 * grad_w1y + grad_py * mean_y + t1 * view_y
        g_r12 = j11 * grad_w1z + grad_py * mean_z + t1 * view_z
        g_r20 = j02 * grad_w0x + j12 * grad_w1x + grad_pz * mean_x + t2 * view_x
        g_r21 = j02 * grad_w0y + j12 * grad_w1y + grad_pz * mean_y + t2 * view_y
        g_r22 = j02 * grad_w0z + j12 * grad_w1z + grad_pz * mean_z + t2 * view_z
        g_t0 = grad_px + r00 * view_x + r01 * view_y + r02 * view_z
        g_t1 = grad_py + r10 * view_x + r11 * view_y + r12 * view_z
        g_t2 = grad_pz + r20 * view_x + r21 * view_y + r22 * view_z
        base = out_grad_viewmats_ptr + (camera.to(tl.int64) * tl.num_programs(0) + block) * 12
        tl.store(base + 0, tl.sum(tl.where(visible, g_r00, 0.0), axis=0))
        tl.store(base + 1, tl.sum(tl.where(visible, g_r01, 0.0), axis=0))
        tl.store(base + 2, tl.sum(tl.where(visible, g_r02, 0.0), axis=0))
        tl.store(base + 3, tl.sum(tl.where(visible, g_t0, 0.0), axis=0))
        tl.store(base + 4, tl.sum(tl.where(visible, g_r10, 0.0), axis=0))
        tl.store(base + 5, tl.sum(tl.where(visible, g_r11, 0.0), axis=0))
        tl.store(base + 6, tl.sum(tl.where(visible, g_r12, 0.0), axis=0))
        tl.store(base + 7, tl.sum(tl.where(visible, g_t1, 0.0), axis=0))
        tl.store(base + 8, tl.sum(tl.where(visible, g_r20, 0.0), axis=0))
        tl.store(base + 9, tl.sum(tl.where(visible, g_r21, 0.0), axis=0))
        tl.store(base + 10, tl.sum(tl.where(visible, g_r22, 0.0), axis=0))
        tl.store(base + 11, tl.sum(tl.where(visible, g_t2, 0.0), axis=0))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _clamp_arguments(clamp_limits: torch.Tensor | None, settings: RenderSettings, fallback: torch.Tensor):
    """(clamp pointer, margin_x, margin_y, STANDARD_CLAMP): None means the standard limits, computed
    in the kernel with the margins of `settings.standard_clamp_limits`."""
    margin_x = constants.CLAMP_MARGIN * settings.width
    margin_y = constants.CLAMP_MARGIN * settings.height
    if clamp_limits is None:
        return fallback, margin_x, margin_y, True
    return clamp_limits, margin_x, margin_y, False


def _radius_rule(settings: RenderSettings) -> int:
    return RADIUS_INRIA if settings.radius_rule == "inria" else RADIUS_OPACITY_AWARE


@contiguous_inputs
def project_gaussians_forward(means: torch.Tensor,          # [N, 3] float32
                              quats: torch.Tensor,          # [N, 4] float32
                              scales: torch.Tensor,         # [N, 3] float32
                              covars: torch.Tensor | None,  # [N, 6] float32 or None
                              opacities: torch.Tensor,      # [N] float32
                              sh_coeffs: torch.Tensor | None,  # [N, K, 3] float32 or None
                              viewmats: torch.Tensor,       # [C, 4, 4] float32
                              Ks: torch.Tensor,             # [C, 3, 3] float32
                              clamp_limits: torch.Tensor | None,   # [C, 4] float32, None: standard
                              settings: RenderSettings, sh_degree: int | None):
    """Launch the projection; returns means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N] int32,
    colors [C,N,3] or None."""
    n, c = means.shape[0], viewmats.shape[0]
    device = means.device
    means2d = _alloc.empty(c, n, 2, device=device, dtype=torch.float32)
    conics = _alloc.empty(c, n, 3, device=device, dtype=torch.float32)
    depths = _alloc.empty(c, n, device=device, dtype=torch.float32)
    radii = _alloc.empty(c, n, device=device, dtype=torch.int32)
    colors = _alloc.empty(c, n, 3, device=device, dtype=torch.float32) if sh_degree is not None else None
    if n == 0:
        return means2d, conics, depths, radii, colors
    launch = launch_settings("projection")
    grid = (cdiv(n, launch.block), c)
    clamp, margin_x, margin_y, standard_clamp = _clamp_arguments(clamp_limits, settings, Ks)
    _projection_forward_kernel[grid](
        means, quats, scales, covars if covars is not None else means, opacities,
        sh_coeffs if sh_coeffs is not None else means, viewmats, Ks, clamp,
        means2d, conics, depths, radii, colors if colors is not None else means2d,
        n, c, sh_coeffs.shape[1] * 3 if sh_coeffs is not None else 0, settings.width, settings.height,
        settings.near, settings.far, settings.eps2d, margin_x, margin_y,
        BLOCK=launch.block, COVARIANCE_INPUT=covars is not None,
        SH_DEGREE=sh_degree if sh_degree is not None else -1, RADIUS_RULE=_radius_rule(settings),
        TILE_SIZE=settings.tile_size, STANDARD_CLAMP=standard_clamp, num_warps=launch.num_warps)
    return means2d, conics, depths, radii, colors


@contiguous_inputs
def project_gaussians_backward(means, quats, scales, covars, sh_coeffs, viewmats, Ks, clamp_limits, radii,
                               grad_means2d,   # [C, N, 2]
                               grad_conics,    # [C, N, 3]
                               grad_depths,    # [C, N]
                               grad_colors,    # [C, N, 3] or None
                               settings: RenderSettings, sh_degree: int | None, viewmat_grad: bool):
    """Launch the projection backward; returns per-input gradients summed over cameras:
    (means [N,3], quats [N,4] or covars [N,6], scales [N,3] or None, sh [N,K,3] or None,
    viewmats [C,4,4] or None)."""
    n, c = means.shape[0], viewmats.shape[0]
    device = means.device
    launch = launch_settings("projection")
    n_blocks = cdiv(n, launch.block)
    covariance_input = covars is not None
    grad_means = _alloc.empty(c, n, 3, device=device, dtype=torch.float32)
    grad_shape = _alloc.empty(c, n, 6 if covariance_input else 4, device=device, dtype=torch.float32)
    grad_scales = _alloc.empty(c, n, 3, device=device, dtype=torch.float32)
    grad_sh = (_alloc.zeros(c, *sh_coeffs.shape, device=device, dtype=torch.float32)
               if sh_degree is not None else None)
    grad_view = _alloc.empty(c, max(n_blocks, 1), 12, device=device, dtype=torch.float32) if viewmat_grad else None
    if n > 0:
        clamp, margin_x, margin_y, standard_clamp = _clamp_arguments(clamp_limits, settings, Ks)
        _projection_backward_kernel[(n_blocks, c)](
            means, quats, scales, covars if covariance_input else means,
            sh_coeffs if sh_coeffs is not None else means, viewmats, Ks, clamp, radii,
            grad_means2d, grad_conics, grad_depths, grad_colors if grad_colors is not None else grad_means2d,
            grad_means, grad_shape, grad_scales, grad_sh if grad_sh is not None else grad_means,
            grad_view if grad_view is not None else grad_means,
            n, c, sh_coeffs.shape[1] * 3 if sh_coeffs is not None else 0, settings.width, settings.height,
            settings.near, settings.far, settings.eps2d, margin_x, margin_y,
            BLOCK=launch.block, COVARIANCE_INPUT=covariance_input,
            SH_DEGREE=sh_degree if sh_degree is not None else -1, VIEWMAT_GRAD=viewmat_grad,
            STANDARD_CLAMP=standard_clamp, num_warps=launch.num_warps)
    elif grad_view is not None:
        grad_view.zero_()
    grad_viewmats = None
    if grad_view is not None:
        grad_viewmats = _alloc.zeros(c, 4, 4, device=device, dtype=torch.float32)
        grad_viewmats[:, :3, :] = grad_view.sum(1).reshape(c, 3, 4)

    def over_cameras(grad):     # one camera: a view, no reduction launch
        return grad[0] if c == 1 else grad.sum(0)

    return (over_cameras(grad_means), over_cameras(grad_shape), None if covariance_input else over_cameras(grad_scales),
            over_cameras(grad_sh) if grad_sh is not None else None, grad_viewmats)


@dataclass(frozen=True, eq=False)
class ProjectionOptions:
    """Everything of one projection call that receives no gradient: the settings and SH degree, and the
    tensors the kernels only read (opacities [N] for the radius rule, Ks [C, 3, 3], clamp limits [C, 4] or
    None). One autograd argument, so backward returns (*grads, None)."""

    opacities: torch.Tensor
    Ks: torch.Tensor
    clamp_limits: torch.Tensor | None
    settings: RenderSettings
    sh_degree: int | None


class ProjectionFunction(torch.autograd.Function):
    """Autograd node of the projection; backward is `_projection_backward_kernel`."""

    @staticmethod
    def forward(ctx, means, quats, scales, covars, sh_coeffs, viewmats, options: ProjectionOptions):
        means2d, conics, depths, radii, colors = project_gaussians_forward(
            means, quats, scales, covars, options.opacities, sh_coeffs, viewmats, options.Ks, options.clamp_limits,
            options.settings, options.sh_degree)
        ctx.save_for_backward(means, quats, scales, covars, sh_coeffs, viewmats, options.Ks, options.clamp_limits,
                              radii)
        ctx.settings, ctx.sh_degree = options.settings, options.sh_degree
        ctx.mark_non_differentiable(radii)
        if colors is None:
            return means2d, conics, depths, radii
        return means2d, conics, depths, radii, colors

    @staticmethod
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _grad_radii, grad_colors=None):
        with backward_stage("projection_backward"):
            means, quats, scales, covars, sh_coeffs, viewmats, Ks, clamp_limits, radii = ctx.saved_tensors

            def zeros_if_none(grad, *shape):   # allocates only when the gradient is absent
                return _alloc.zeros(*radii.shape, *shape, device=radii.device) if grad is None else grad

            grad_means2d = zeros_if_none(grad_means2d, 2)
            grad_conics = zeros_if_none(grad_conics, 3)
            grad_depths = zeros_if_none(grad_depths)
            if ctx.sh_degree is not None:
                grad_colors = zeros_if_none(grad_colors, 3)
            grads = project_gaussians_backward(
                means, quats, scales, covars, sh_coeffs, viewmats, Ks, clamp_limits, radii, grad_means2d,
                grad_conics, grad_depths, grad_colors, ctx.settings, ctx.sh_degree,
                viewmat_grad=bool(ctx.needs_input_grad[5]))
            grad_means, grad_shape, grad_scales, grad_sh, grad_viewmats = grads
            covariance_input = covars is not None
            return (grad_means, None if covariance_input else grad_shape, grad_scales,
                    grad_shape if covariance_input else None, grad_sh, grad_viewmats, None)


def project_gaussians(means: torch.Tensor, quats: torch.Tensor | None, scales: torch.Tensor | None,
                      opacities: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      clamp_limits: torch.Tensor | None, settings: RenderSettings, *,
                      covars: torch.Tensor | None = None, sh_coeffs: torch.Tensor | None = None,
                      sh_degree: int | None = None):
    """Triton twin of `tritonsplat.reference.projection.project_gaussians` (float32).

    `clamp_limits` [C, 4], or None for `settings.standard_clamp_limits`, which the kernels then compute
    from Ks themselves (no host-side launches).

    Returns:
        ProjectedGaussians(means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N] int32,
        colors [C,N,3] or None).
    """
    from ..reference.projection import ProjectedGaussians

    n = means.shape[0]
    if covars is not None:
        quats = means.new_zeros(n, 4)
        scales = means.new_zeros(n, 3)
    options = ProjectionOptions(opacities.detach(), Ks.detach(),
                                None if clamp_limits is None else clamp_limits.detach(), settings, sh_degree)
    outputs = ProjectionFunction.apply(means, quats, scales, covars, sh_coeffs, viewmats, options)
    colors = outputs[4] if sh_degree is not None else None
    return ProjectedGaussians(outputs[0], outputs[1], outputs[2], outputs[3], colors)


# --------------------------------------------------------------------------------------------------
# Compiled variants (collected by `tritonsplat.aot`): what the launchers above can launch.
# --------------------------------------------------------------------------------------------------

def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The projection kernels' configurations: SH degree -1 / 3 with the standard in-kernel clamp, and
    the compat path (covariance input, the original's radius rule, given clamp limits).

    `exhaustive` adds every other configuration the launchers can produce that changes the compiled
    code's structure: SH degrees 0-2, each tile size the pipeline accepts (4, 8, 16, 32) in the forward,
    the other radius rule and given clamp limits, and the backward without the view-matrix gradient."""
    from ._launch import kernel_signature

    launch = launch_settings("projection")
    types = {"radii_ptr": "*i32", "near": "fp32", "far": "fp32", "eps2d": "fp32", "margin_x": "fp32",
             "margin_y": "fp32"}
    forward_signature = kernel_signature(_projection_forward_kernel, types)
    backward_signature = kernel_signature(_projection_backward_kernel, types)
    variants = []

    def forward(name, covariance, sh_degree, radius_rule, standard_clamp, tile_size=16):
        variants.append(dict(
            name=f"projection_forward[{name}]", kernel="_projection_forward_kernel", signature=forward_signature,
            constexprs=dict(BLOCK=launch.block, COVARIANCE_INPUT=covariance, SH_DEGREE=sh_degree,
                            RADIUS_RULE=radius_rule, TILE_SIZE=tile_size, STANDARD_CLAMP=standard_clamp),
            num_warps=launch.num_warps))

    def backward(name, covariance, sh_degree, viewmat_grad, standard_clamp):
        variants.append(dict(
            name=f"projection_backward[{name}]", kernel="_projection_backward_kernel", signature=backward_signature,
            constexprs=dict(BLOCK=launch.block, COVARIANCE_INPUT=covariance, SH_DEGREE=sh_degree,
                            VIEWMAT_GRAD=viewmat_grad, STANDARD_CLAMP=standard_clamp),
            num_warps=launch.num_warps))

    for name, covariance, sh_degree, radius_rule, standard_clamp in (
            ("sh=-1", False, -1, RADIUS_OPACITY_AWARE, True), ("sh=3", False, 3, RADIUS_OPACITY_AWARE, True),
            ("compat", True, -1, RADIUS_INRIA, False)):
        forward(name, covariance, sh_degree, radius_rule, standard_clamp)
        backward(name, covariance, sh_degree, not covariance, standard_clamp)
    if exhaustive:
        for sh_degree in range(-1, constants.MAX_SH_DEGREE + 1):
            for tile_size in (4, 8, 16, 32):
                forward(f"sh={sh_degree},tile={tile_size}", False, sh_degree, RADIUS_OPACITY_AWARE, True, tile_size)
            forward(f"sh={sh_degree},inria,given_clamp", False, sh_degree, RADIUS_INRIA, False)
            for viewmat_grad in (True, False):
                backward(f"sh={sh_degree},viewmat_grad={viewmat_grad}", False, sh_degree, viewmat_grad, True)
            backward(f"sh={sh_degree},given_clamp", False, sh_degree, True, False)
    return variants
