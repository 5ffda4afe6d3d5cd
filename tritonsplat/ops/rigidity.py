"""The local-rigidity losses of Dynamic 3D Gaussians (rigid, rot, iso) fused in Triton, hand-written backward.

Twin: `tritonsplat/reference/rigidity.py` (same names and signatures; the definitions are in its docstring).
Eager PyTorch spends ~345 launches per step on these three terms (gathers, quaternion products, norms
and their autograd backward; counted on the 2-core CPU); here the forward is one kernel plus a sum of
per-program partials, and the backward two kernels.

Forward, one lane per foreground row i, a static loop over its K neighbours j (e = i K + k):
    r_i = q_i (x) conj(p_i), u_i = r_i / max(|r_i|, 1e-12), o = mu_j - mu_i, v = R(u_i)^T o,
    s_rigid = sqrt(w |v - o_prev|^2 + eps), s_rot = sqrt(w |r_j - r_i|^2 + eps),
    s_iso = sqrt(w (sqrt(|o|^2 + eps) - d0)^2 + eps).

Backward, with c = 1 / (F K) and the upstream gradients g_rigid, g_rot, g_iso:
    dv = g_rigid c w (v - o_prev) / s_rigid,  do = R dv + g_iso c w (|o| - d0) / s_iso * o / |o|,
    dR = o dv^T (summed over k, then through R(u) and the normalisation once per row),
    dr_j = g_rot c w (r_j - r_i) / s_rot = -dr_i (per entry),
    dq = dr (x) p (r = q (x) conj(p) is linear in q, with transpose "(x) p"),
    dmu_j = do, dmu_i = -sum_k do.
Kernel 1 writes each entry's contribution to its neighbour j ([F K, 7]: dmu_j, dq_j) and each row's own
sum ([F, 7]); kernel 2 gives every foreground row its own sum plus its incoming entries in the fixed order
of `NeighbourCSR` (no atomics: the result does not depend on scheduling, so resumes stay bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference.rigidity import NORMALIZE_EPS, SQRT_EPS, NeighbourCSR, check_rigidity_inputs
from . import _alloc

BLOCK = 64  # foreground rows per program, one per lane (2 warps)
NUM_WARPS = 2


@triton.jit
def _load_quat(ptr, row, mask):
    base = ptr + row * 4
    return (tl.load(base, mask=mask, other=1.0), tl.load(base + 1, mask=mask, other=0.0),
            tl.load(base + 2, mask=mask, other=0.0), tl.load(base + 3, mask=mask, other=0.0))


@triton.jit
def _load_vec3(ptr, row, mask):
    base = ptr + row * 3
    return (tl.load(base, mask=mask, other=0.0), tl.load(base + 1, mask=mask, other=0.0),
            tl.load(base + 2, mask=mask, other=0.0))


@triton.jit
def _relative(qw, qx, qy, qz, pw, px, py, pz):
    """q (x) conj(p), conj(p) = (pw, -px, -py, -pz)."""
    return (qw * pw + qx * px + qy * py + qz * pz,
            -qw * px + qx * pw - qy * pz + qz * py,
            -qw * py + qx * pz + qy * pw - qz * px,
            -qw * pz - qx * py + qy * px + qz * pw)


@triton.jit
def _times(gw, gx, gy, gz, pw, px, py, pz):
    """g (x) p: the transpose of q -> q (x) conj(p) applied to g."""
    return (gw * pw - gx * px - gy * py - gz * pz,
            gw * px + gx * pw + gy * pz - gz * py,
            gw * py - gx * pz + gy * pw + gz * px,
            gw * pz + gx * py - gy * px + gz * pw)


@triton.jit
def _rows(rw, rx, ry, rz, EPS: tl.constexpr):
    """Normalised u = r / max(|r|, eps) and R(u), row-major R00..R22."""
    norm = tl.maximum(tl.sqrt(rw * rw + rx * rx + ry * ry + rz * rz), EPS)
    w, x, y, z = rw / norm, rx / norm, ry / norm, rz / norm
    return (w, x, y, z, norm,
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y))


@triton.jit
def _store_gradient_row(ptr, mask, mx, my, mz, qw, qx, qy, qz):
    """One [7] gradient row (d mu [3], d q [4]) of the backward's entries / own tables."""
    tl.store(ptr, mx, mask=mask)
    tl.store(ptr + 1, my, mask=mask)
    tl.store(ptr + 2, mz, mask=mask)
    tl.store(ptr + 3, qw, mask=mask)
    tl.store(ptr + 4, qx, mask=mask)
    tl.store(ptr + 5, qy, mask=mask)
    tl.store(ptr + 6, qz, mask=mask)


@triton.jit
def _load_gradient_row(ptr, mask):
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + 1, mask=mask, other=0.0),
            tl.load(ptr + 2, mask=mask, other=0.0), tl.load(ptr + 3, mask=mask, other=0.0),
            tl.load(ptr + 4, mask=mask, other=0.0), tl.load(ptr + 5, mask=mask, other=0.0),
            tl.load(ptr + 6, mask=mask, other=0.0))


@triton.jit
def _rigidity_forward_kernel(
    means_ptr,      # [N, 3] float32
    quats_ptr,      # [N, 4] float32 normalised
    prev_ptr,       # [F, 4] float32 normalised rotations at t - 1
    fg_ptr,         # [F] int64 rows of the foreground in means / quats
    nb_ptr,         # [F, K] int64 neighbours as foreground rows
    weights_ptr,    # [F, K] float32
    dist0_ptr,      # [F, K] float32
    prev_off_ptr,   # [F, K, 3] float32
    partials_ptr,   # [n_programs, 3] float32 out: sums of s_rigid, s_rot, s_iso
    n_fg,
    K: tl.constexpr, BLOCK: tl.constexpr, SQRT_EPS: tl.constexpr, NORM_EPS: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < n_fg
    g = tl.load(fg_ptr + i, mask=ok, other=0)
    mx, my, mz = _load_vec3(means_ptr, g, ok)
    qw, qx, qy, qz = _load_quat(quats_ptr, g, ok)
    pw, px, py, pz = _load_quat(prev_ptr, i, ok)
    rw, rx, ry, rz = _relative(qw, qx, qy, qz, pw, px, py, pz)
    _w, _x, _y, _z, _n, r00, r01, r02, r10, r11, r12, r20, r21, r22 = _rows(rw, rx, ry, rz, NORM_EPS)
    sum_rigid = tl.zeros([BLOCK], dtype=tl.float32)
    sum_rot = tl.zeros([BLOCK], dtype=tl.float32)
    sum_iso = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        e = i * K + k
        j = tl.load(nb_ptr + e, mask=ok, other=0)
        gj = tl.load(fg_ptr + j, mask=ok, other=0)
        w = tl.load(weights_ptr + e, mask=ok, other=0.0)
        d0 = tl.load(dist0_ptr + e, mask=ok, other=0.0)
        ax, ay, az = _load_vec3(prev_off_ptr, e, ok)
        jx, jy, jz = _load_vec3(means_ptr, gj, ok)
        ox, oy, oz = jx - mx, jy - my, jz - mz
        vx = r00 * ox + r10 * oy + r20 * oz  # R^T o
        vy = r01 * ox + r11 * oy + r21 * oz
        vz = r02 * ox + r12 * oy + r22 * oz
        ex, ey, ez = vx - ax, vy - ay, vz - az
        s_rigid = tl.sqrt((ex * ex + ey * ey + ez * ez) * w + SQRT_EPS)
        jqw, jqx, jqy, jqz = _load_quat(quats_ptr, gj, ok)
        jpw, jpx, jpy, jpz = _load_quat(prev_ptr, j, ok)
        sw, sx, sy, sz = _relative(jqw, jqx, jqy, jqz, jpw, jpx, jpy, jpz)
        dw, dx, dy, dz = sw - rw, sx - rx, sy - ry, sz - rz
        s_rot = tl.sqrt((dw * dw + dx * dx + dy * dy + dz * dz) * w + SQRT_EPS)
        distance = tl.sqrt(ox * ox + oy * oy + oz * oz + SQRT_EPS)
        a = distance - d0
        s_iso = tl.sqrt(a * a * w + SQRT_EPS)
        sum_rigid += tl.where(ok, s_rigid, 0.0)
        sum_rot += tl.where(ok, s_rot, 0.0)
        sum_iso += tl.where(ok, s_iso, 0.0)
    program = tl.program_id(0)
    tl.store(partials_ptr + program * 3, tl.sum(sum_rigid, 0))
    tl.store(partials_ptr + program * 3 + 1, tl.sum(sum_rot, 0))
    tl.store(partials_ptr + program * 3 + 2, tl.sum(sum_iso, 0))


@triton.jit
def _rigidity_backward_entries_kernel(
    means_ptr, quats_ptr, prev_ptr, fg_ptr, nb_ptr, weights_ptr, dist0_ptr, prev_off_ptr,  # as forward
    grad_ptr,       # [3] float32 upstream: d/d rigid, rot, iso (already divided by F K)
    entries_ptr,    # [F K, 7] float32 out: (dmu_j, dq_j) of each entry, for its neighbour j
    own_ptr,        # [F, 7] float32 out: (dmu_i, dq_i) summed over the row's entries
    n_fg,
    K: tl.constexpr, BLOCK: tl.constexpr, SQRT_EPS: tl.constexpr, NORM_EPS: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_fg
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    all_lanes = zero == 0
    g_rigid = tl.load(grad_ptr + zero, mask=all_lanes, other=0.0)
    g_rot = tl.load(grad_ptr + 1 + zero, mask=all_lanes, other=0.0)
    g_iso = tl.load(grad_ptr + 2 + zero, mask=all_lanes, other=0.0)
    g = tl.load(fg_ptr + i, mask=ok, other=0)
    mx, my, mz = _load_vec3(means_ptr, g, ok)
    qw, qx, qy, qz = _load_quat(quats_ptr, g, ok)
    pw, px, py, pz = _load_quat(prev_ptr, i, ok)
    rw, rx, ry, rz = _relative(qw, qx, qy, qz, pw, px, py, pz)
    uw, ux, uy, uz, norm, r00, r01, r02, r10, r11, r12, r20, r21, r22 = _rows(rw, rx, ry, rz, NORM_EPS)
    fzero = tl.zeros([BLOCK], dtype=tl.float32)
    gmx, gmy, gmz = fzero, fzero, fzero  # d/d mu_i
    grw, grx, gry, grz = fzero, fzero, fzero, fzero  # d/d r_i from the rot term
    g00, g01, g02, g10, g11, g12, g20, g21, g22 = fzero, fzero, fzero, fzero, fzero, fzero, fzero, fzero, fzero
    for k in range(K):  # a runtime loop: unrolled K = 20 spilled 304 B at 255 registers (sm_90)
        e = i * K + k
        j = tl.load(nb_ptr + e, mask=ok, other=0)
        gj = tl.load(fg_ptr + j, mask=ok, other=0)
        w = tl.load(weights_ptr + e, mask=ok, other=0.0)
        d0 = tl.load(dist0_ptr + e, mask=ok, other=0.0)
        ax, ay, az = _load_vec3(prev_off_ptr, e, ok)
        jx, jy, jz = _load_vec3(means_ptr, gj, ok)
        ox, oy, oz = jx - mx, jy - my, jz - mz
        vx = r00 * ox + r10 * oy + r20 * oz
        vy = r01 * ox + r11 * oy + r21 * oz
        vz = r02 * ox + r12 * oy + r22 * oz
        ex, ey, ez = vx - ax, vy - ay, vz - az
        s_rigid = tl.sqrt((ex * ex + ey * ey + ez * ez) * w + SQRT_EPS)
        c_rigid = g_rigid * w / s_rigid
        dvx, dvy, dvz = c_rigid * ex, c_rigid * ey, c_rigid * ez
        # v_a = sum_b R_ba o_b: do_b = sum_a R_ba dv_a, dR_ba = o_b dv_a
        dox = r00 * dvx + r01 * dvy + r02 * dvz
        doy = r10 * dvx + r11 * dvy + r12 * dvz
        doz = r20 * dvx + r21 * dvy + r22 * dvz
        g00 += ox * dvx
        g01 += ox * dvy
        g02 += ox * dvz
        g10 += oy * dvx
        g11 += oy * dvy
        g12 += oy * dvz
        g20 += oz * dvx
        g21 += oz * dvy
        g22 += oz * dvz
        distance = tl.sqrt(ox * ox + oy * oy + oz * oz + SQRT_EPS)
        a = distance - d0
        s_iso = tl.sqrt(a * a * w + SQRT_EPS)
        c_iso = g_iso * w * a / (s_iso * distance)
        dox += c_iso * ox
        doy += c_iso * oy
        doz += c_iso * oz
        jqw, jqx, jqy, jqz = _load_quat(quats_ptr, gj, ok)
        jpw, jpx, jpy, jpz = _load_quat(prev_ptr, j, ok)
        sw, sx, sy, sz = _relative(jqw, jqx, jqy, jqz, jpw, jpx, jpy, jpz)
        dw, dx, dy, dz = sw - rw, sx - rx, sy - ry, sz - rz
        s_rot = tl.sqrt((dw * dw + dx * dx + dy * dy + dz * dz) * w + SQRT_EPS)
        c_rot = g_rot * w / s_rot
        dsw, dsx, dsy, dsz = c_rot * dw, c_rot * dx, c_rot * dy, c_rot * dz
        grw -= dsw
        grx -= dsx
        gry -= dsy
        grz -= dsz
        gmx -= dox
        gmy -= doy
        gmz -= doz
        tqw, tqx, tqy, tqz = _times(dsw, dsx, dsy, dsz, jpw, jpx, jpy, jpz)
        _store_gradient_row(entries_ptr + e * 7, ok, dox, doy, doz, tqw, tqx, tqy, tqz)
    # dR -> du (R(u) of the unit u), then through u = r / max(|r|, eps)
    duw = 2 * (-uz * g01 + uy * g02 + uz * g10 - ux * g12 - uy * g20 + ux * g21)
    dux = 2 * (uy * g01 + uz * g02 + uy * g10 - 2 * ux * g11 - uw * g12 + uz * g20 + uw * g21 - 2 * ux * g22)
    duy = 2 * (-2 * uy * g00 + ux * g01 + uw * g02 + ux * g10 + uz * g12 - uw * g20 + uz * g21 - 2 * uy * g22)
    duz = 2 * (-2 * uz * g00 - uw * g01 + ux * g02 + uw * g10 - 2 * uz * g11 + uy * g12 + ux * g20 + uy * g21)
    dot = tl.where(norm > NORM_EPS, uw * duw + ux * dux + uy * duy + uz * duz, 0.0)
    grw += (duw - uw * dot) / norm
    grx += (dux - ux * dot) / norm
    gry += (duy - uy * dot) / norm
    grz += (duz - uz * dot) / norm
    tqw, tqx, tqy, tqz = _times(grw, grx, gry, grz, pw, px, py, pz)
    _store_gradient_row(own_ptr + i * 7, ok, gmx, gmy, gmz, tqw, tqx, tqy, tqz)


@triton.jit
def _rigidity_backward_rows_kernel(
    entries_ptr,    # [F K, 7] float32
    own_ptr,        # [F, 7] float32
    order_ptr,      # [F K] int32 entries sorted by neighbour row
    offsets_ptr,    # [F + 1] int32
    fg_ptr,         # [F] int64
    grad_means_ptr,  # [N, 3] float32 out (zero outside the foreground)
    grad_quats_ptr,  # [N, 4] float32 out
    n_fg,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = n < n_fg
    start = tl.load(offsets_ptr + n, mask=ok, other=0)
    end = tl.load(offsets_ptr + n + 1, mask=ok, other=0)
    a0, a1, a2, a3, a4, a5, a6 = _load_gradient_row(own_ptr + n * 7, ok)
    longest = tl.max(end - start, 0)
    step = 0
    while step < longest:
        live = ok & (start + step < end)
        e = tl.load(order_ptr + start + step, mask=live, other=0).to(tl.int64)
        b0, b1, b2, b3, b4, b5, b6 = _load_gradient_row(entries_ptr + e * 7, live)
        a0 += b0
        a1 += b1
        a2 += b2
        a3 += b3
        a4 += b4
        a5 += b5
        a6 += b6
        step += 1
    g = tl.load(fg_ptr + n, mask=ok, other=0)
    tl.store(grad_means_ptr + g * 3, a0, mask=ok)
    tl.store(grad_means_ptr + g * 3 + 1, a1, mask=ok)
    tl.store(grad_means_ptr + g * 3 + 2, a2, mask=ok)
    tl.store(grad_quats_ptr + g * 4, a3, mask=ok)
    tl.store(grad_quats_ptr + g * 4 + 1, a4, mask=ok)
    tl.store(grad_quats_ptr + g * 4 + 2, a5, mask=ok)
    tl.store(grad_quats_ptr + g * 4 + 3, a6, mask=ok)


def _constants(n_fg: int, k: int) -> dict:
    return {"K": k, "BLOCK": BLOCK, "SQRT_EPS": SQRT_EPS, "NORM_EPS": NORMALIZE_EPS}


@dataclass(frozen=True, eq=False)
class RigidityData:
    """What of one call receives no gradient (the previous frame's state and the neighbour graph).
    One autograd argument, so backward returns (grad_means, grad_quats, None)."""

    prev_quats: torch.Tensor          # [F, 4] float32
    fg_index: torch.Tensor            # [F] int64
    neighbour_indices: torch.Tensor   # [F, K] int64
    neighbour_weights: torch.Tensor   # [F, K] float32
    initial_distances: torch.Tensor   # [F, K] float32
    prev_offsets: torch.Tensor        # [F, K, 3] float32
    order: torch.Tensor               # [F K] int32 (NeighbourCSR)
    offsets: torch.Tensor             # [F + 1] int32


class RigidityFunction(torch.autograd.Function):
    """Autograd wrapper: gradients for means and quats (the other inputs are data)."""

    @staticmethod
    def forward(ctx, means, quats, data: RigidityData):
        n_fg, k = data.neighbour_indices.shape
        grid = (triton.cdiv(n_fg, BLOCK),)
        partials = _alloc.empty((grid[0], 3), dtype=torch.float32, device=means.device)
        inputs = (means.detach(), quats.detach(), data.prev_quats, data.fg_index, data.neighbour_indices,
                  data.neighbour_weights, data.initial_distances, data.prev_offsets)
        _rigidity_forward_kernel[grid](*inputs, partials, n_fg, **_constants(n_fg, k), num_warps=NUM_WARPS)
        ctx.save_for_backward(*inputs, data.order, data.offsets)
        return partials.sum(0) * (1.0 / (n_fg * k))

    @staticmethod
    def backward(ctx, grad):  # grad [3]
        means, quats, prev_quats, fg_index, nb, weights, dist0, prev_offsets, order, offsets = ctx.saved_tensors
        n_fg, k = nb.shape
        grid = (triton.cdiv(n_fg, BLOCK),)
        upstream = (grad * (1.0 / (n_fg * k))).to(torch.float32).contiguous()
        entries = _alloc.empty((n_fg * k, 7), dtype=torch.float32, device=means.device)
        own = _alloc.empty((n_fg, 7), dtype=torch.float32, device=means.device)
        _rigidity_backward_entries_kernel[grid](means, quats, prev_quats, fg_index, nb, weights, dist0, prev_offsets,
                                                upstream, entries, own, n_fg, **_constants(n_fg, k),
                                                num_warps=NUM_WARPS)
        grad_means = _alloc.zeros(means.shape, dtype=means.dtype, device=means.device)
        grad_quats = _alloc.zeros(quats.shape, dtype=quats.dtype, device=quats.device)
        _rigidity_backward_rows_kernel[grid](entries, own, order, offsets, fg_index, grad_means, grad_quats, n_fg,
                                             BLOCK=BLOCK, num_warps=NUM_WARPS)
        return grad_means, grad_quats, None


# Neighbours per foreground Gaussian compiled ahead of time: the original's 20 (Luiten et al. 2024).
AOT_NEIGHBOURS = (20,)


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The rigidity kernels' configurations (collected by `tritonsplat.aot`), one per neighbour count."""
    from ._launch import kernel_signature

    index_types = {"fg_ptr": "*i64", "nb_ptr": "*i64", "order_ptr": "*i32", "offsets_ptr": "*i32"}
    variants = []
    for k in AOT_NEIGHBOURS:
        for kernel in (_rigidity_forward_kernel, _rigidity_backward_entries_kernel):
            variants.append(dict(name=f"{kernel.fn.__name__.strip('_').removesuffix('_kernel')}[K={k}]",
                                 kernel=kernel.fn.__name__, signature=kernel_signature(kernel, index_types),
                                 constexprs=_constants(1, k), num_warps=NUM_WARPS))
    variants.append(dict(name="rigidity_backward_rows", kernel="_rigidity_backward_rows_kernel",
                         signature=kernel_signature(_rigidity_backward_rows_kernel, index_types),
                         constexprs=dict(BLOCK=BLOCK), num_warps=NUM_WARPS))
    return variants


def rigidity_losses(means: torch.Tensor, quats: torch.Tensor, prev_quats: torch.Tensor, fg_index: torch.Tensor,
                    neighbour_indices: torch.Tensor, neighbour_weights: torch.Tensor,
                    initial_distances: torch.Tensor, prev_offsets: torch.Tensor,
                    csr: NeighbourCSR | None = None) -> torch.Tensor:
    """(rigid, rot, iso) as one tensor [3], differentiable in `means` [N, 3] and `quats` [N, 4] float32.

    Arguments as the twin `tritonsplat.reference.rigidity.rigidity_losses`; every tensor contiguous
    float32 (indices int64) on one device. `csr`: `NeighbourCSR.build(neighbour_indices)`, computed
    once per fit (built here when None, which costs a sort per call).
    """
    check_rigidity_inputs(means, quats, prev_quats, fg_index, neighbour_indices, neighbour_weights,
                          initial_distances, prev_offsets)
    if means.dtype != torch.float32 or quats.dtype != torch.float32:
        raise ValueError(f"means, quats: expected float32, got {means.dtype} and {quats.dtype}")
    if csr is None:
        csr = NeighbourCSR.build(neighbour_indices)
    return RigidityFunction.apply(means, quats, RigidityData(
        prev_quats.contiguous(), fg_index.contiguous(), neighbour_indices.contiguous(),
        neighbour_weights.contiguous(), initial_distances.contiguous(), prev_offsets.contiguous(), csr.order,
        csr.offsets))
