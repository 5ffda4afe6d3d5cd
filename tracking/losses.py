"""Losses of Dynamic 3D Gaussians (Luiten et al., 3DV 2024), in the forms the original code computes.

Total loss per step (original `train.py`, weights in `tracking.config.LossWeights`):

    L = L_im + 3 L_seg                                             (all t)
      + 4 L_rigid + 4 L_rot + 2 L_iso + 2 L_floor + 20 L_bg + 0.01 L_colour   (t > 0)

with L_im = 0.8 L1 + 0.2 (1 - SSIM). The rigidity family (paper Eq. 2-4) puts the neighbour weight
*inside* a square root as the code does: mean_ij sqrt(w_ij |x_ij - y_ij|^2 + 1e-20).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tritonsplat.compilation import compiled, wanted
from tritonsplat.reference.ssim import SSIM_C1, SSIM_C2, SSIM_SIGMA, SSIM_WINDOW, ssim_map  # noqa: F401
from tritonsplat.reference.ssim import gaussian_window_1d as _gaussian_window_1d  # noqa: F401
from tritonsplat.reference.ssim import l1_dssim_loss as _reference_l1_dssim_loss
from tritonsplat.reference.ssim import l1_dssim_losses as _reference_l1_dssim_losses

from .quaternions import quat_conjugate, quat_multiply, quat_to_rotmat

SQRT_EPS = 1e-20  # inside the square roots of the weighted losses, as in the original


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images [C, H, W] or [B, C, H, W] (scalar; 11x11 window, sigma 1.5, C1 = 0.01^2,
    C2 = 0.03^2), averaged over all pixels and channels as in the original."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[None], b[None]
    if a.dim() != 4:
        raise ValueError(f"ssim: expected [C, H, W] or [B, C, H, W], got {tuple(a.shape)}")
    return ssim_map(a, b).mean()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    return (a - b).abs().mean()


def image_loss(render: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.2,
               backend: str = "torch") -> torch.Tensor:
    """(1 - s) L1 + s (1 - SSIM) of images [C, H, W] or [B, C, H, W] (s = 0.2 in the original).

    backend "triton" (or "auto" on CUDA): the fused kernel `tritonsplat.ops.ssim.l1_dssim_loss` (one
    forward and one backward launch instead of ~35 each); "torch": its twin
    `tritonsplat.reference.ssim.l1_dssim_loss` (separable conv2d, the gradient written out).
    """
    if not ssim_weight:
        return l1(render, target)
    if render.shape != target.shape or render.dim() not in (3, 4):
        raise ValueError(f"image_loss: render and target must be [C, H, W] or [B, C, H, W] of one shape, got "
                         f"{tuple(render.shape)} and {tuple(target.shape)}")
    if render.dim() == 3:
        render, target = render[None], target[None]
    if backend == "triton" or (backend == "auto" and render.is_cuda):
        from tritonsplat.ops.ssim import l1_dssim_loss

        return l1_dssim_loss(render, target, ssim_weight)
    return _reference_l1_dssim_loss(render, target, ssim_weight)


def image_losses(pairs: list[tuple[torch.Tensor, torch.Tensor]], ssim_weight: float = 0.2,
                 backend: str = "torch") -> list[torch.Tensor]:
    """`image_loss` of each (render, target) pair (images [B, C, H, W] of one size: a step's colours and
    segmentation), the same values; "torch" computes them together
    (`tritonsplat.reference.ssim.l1_dssim_losses`: one blur for every pair)."""
    together = backend == "torch" or (backend == "auto" and not pairs[0][0].is_cuda)
    if ssim_weight and together and all(r.dim() == 4 and r.shape == t.shape for r, t in pairs):
        return _reference_l1_dssim_losses(pairs, ssim_weight)
    return [image_loss(render, target, ssim_weight, backend=backend) for render, target in pairs]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whole-image PSNR in dB for values in [0, 1]: -10 log10(mean over all channels and pixels of
    the squared error) (not the mean of per-channel PSNRs)."""
    mse = ((a - b) ** 2).mean()
    return -10.0 * torch.log10(mse.clamp_min(1e-20))


def weighted_l2(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean over [N, K] of sqrt(w |x - y|^2 + 1e-20); x, y [N, K, D], w [N, K] (the original's `_v2`)."""
    return torch.sqrt(((x - y) ** 2).sum(-1) * w + SQRT_EPS).mean()


def weighted_abs(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean over [N, K] of sqrt(w (x - y)^2 + 1e-20); x, y, w [N, K] (the original's `_v1`)."""
    return torch.sqrt((x - y) ** 2 * w + SQRT_EPS).mean()


@dataclass(frozen=True, eq=False)
class _GatherTable:
    """The gather's index and its CSR table (no gradient; one autograd argument)."""

    index: torch.Tensor    # [M] int64 rows of values
    order: torch.Tensor    # [M] int64 positions sorted by row
    counts: torch.Tensor   # [N] int64 in-degree of each row


class _GatherRows(torch.autograd.Function):
    """values[index] with a deterministic backward: a CSR segmented sum in a fixed order.

    The default backward of an index with repeated entries scatters with atomics (GPU) or unordered
    parallel accumulation (CPU, measured: differing last bits between processes), which would break
    bit-identical resumes. Here the incoming gradients are sorted by destination row once (stable
    argsort of the index, cached per index tensor) and each row sums its own contiguous segment in
    that order: grad_values[n] = sum_{j in segment n} grad_out[order[j]]. Memory is O(M D), whatever
    the largest in-degree (a padded [N, max in-degree, D] table costs hundreds of MB for one hub).
    """

    @staticmethod
    def forward(ctx, values, table: _GatherTable):  # values [N, D]
        ctx.save_for_backward(table.order, table.counts)
        return values.index_select(0, table.index)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [M, D]
        order, counts = ctx.saved_tensors
        grad = torch.segment_reduce(grad_out.index_select(0, order), "sum", lengths=counts, axis=0)
        return grad, None


_CACHE_PER_KIND = 2   # a fit's neighbour table and one or two frames' constants
_cache: dict[str, dict[tuple, tuple]] = {}


def _cached(kind: str, tensor: torch.Tensor, build: Callable[[], Any], *more: torch.Tensor):
    """build() for `tensor` (and `more`), kept per (storage, version, shape, strides) of each while the
    entry holds them (so their storage is not freed and reused by another tensor under the same key);
    at most _CACHE_PER_KIND entries per kind."""
    key = tuple((t.device, t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in (tensor, *more))
    return _cached_by_key((kind, key), build, (tensor, *more), kind)


def _cached_by_key(key: tuple, build: Callable[[], Any], keep: tuple = (), kind: str = "constants"):
    entries = _cache.setdefault(kind, {})
    entry = entries.get(key)
    if entry is not None:
        return entry[1]
    value = build()
    if len(entries) >= _CACHE_PER_KIND:
        entries.pop(next(iter(entries)))
    entries[key] = (keep, value)
    return value


def _csr_table(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M], counts [n]) int64: positions j of index sorted by index[j] (stable: increasing j
    within a row) and the in-degree of each row. Cached per index tensor."""
    def build():
        flat = index.reshape(-1)
        return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n)

    return _cached(f"csr{n}", index, build)


def neighbour_gather(values: torch.Tensor, neighbour_indices: torch.Tensor) -> torch.Tensor:
    """values[neighbour_indices] ([N, D] x [N, K] -> [N, K, D]) with a deterministic backward."""
    # index_select, not values[index]: the same rows, 3.7x faster on a 2-core AMD EPYC CPU (1 thread,
    # 84,420 rows of 4: 0.16 ms instead of 0.58 ms).
    n, k = neighbour_indices.shape
    flat = neighbour_indices.reshape(-1)
    if not values.requires_grad:
        return values.index_select(0, flat).reshape(n, k, values.shape[1])
    out = _GatherRows.apply(values, _GatherTable(flat, *_csr_table(neighbour_indices, values.shape[0])))
    return out.reshape(n, k, values.shape[1])


def rigidity_losses(
    means: torch.Tensor,
    quats: torch.Tensor,
    prev_means: torch.Tensor,
    prev_quats: torch.Tensor,
    neighbour_indices: torch.Tensor,
    neighbour_weights: torch.Tensor,
    initial_distances: torch.Tensor,
    prev_offsets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The local-rigidity family of Dynamic 3D Gaussians (paper Eq. 2-4, original code forms).

    For foreground Gaussian i with neighbours j (found at t = 0), q_rel,i = q_i,t (x) conj(q_i,t-1):

    - rigid = mean_ij sqrt(w_ij |R(q_rel,i)^T (mu_j,t - mu_i,t) - (mu_j,t-1 - mu_i,t-1)|^2 + 1e-20)
    - rot   = mean_ij sqrt(w_ij |q_rel,j - q_rel,i|^2 + 1e-20)
    - iso   = mean_ij sqrt(w_ij (|mu_j,t - mu_i,t| - d_ij,0)^2 + 1e-20), |v| = sqrt(|v|^2 + 1e-20)

    Args:
        means: [N, 3] current foreground positions.
        quats: [N, 4] current foreground rotations, normalised (w, x, y, z).
        prev_means: [N, 3] positions at t - 1 (detached).
        prev_quats: [N, 4] normalised rotations at t - 1 (detached).
        neighbour_indices: [N, K] int64 indices into the N foreground Gaussians (self excluded).
        neighbour_weights: [N, K] w_ij = exp(-lambda d_ij,0^2).
        initial_distances: [N, K] d_ij,0, neighbour distances at t = 0.
        prev_offsets: [N, K, 3] mu_j,t-1 - mu_i,t-1 (`previous_offsets`); constant within a frame, so
            a fit computes it once per frame. None: computed here.

    Returns:
        {"rigid", "rot", "iso"}: scalar tensors.
    """
    if prev_offsets is None:
        prev_offsets = previous_offsets(prev_means, neighbour_indices)
    if neighbour_indices.dim() != 2 or neighbour_weights.shape != neighbour_indices.shape:
        raise ValueError(f"neighbour_indices, neighbour_weights: expected [N, K] of one shape, got "
                         f"{tuple(neighbour_indices.shape)} and {tuple(neighbour_weights.shape)}")
    layout = _neighbour_layout(neighbour_indices, neighbour_weights, initial_distances, means.shape[0])
    values = _RigidityFamily.apply(means, quats, layout, _right_product_matrix(prev_quats),
                                   _minus_entries_first(prev_offsets))
    return dict(zip(("rigid", "rot", "iso"), values.unbind(0)))


def previous_offsets(prev_means: torch.Tensor, neighbour_indices: torch.Tensor) -> torch.Tensor:
    """[N, K, 3] mu_j,t-1 - mu_i,t-1 from prev_means [N, 3] (detached)."""
    with torch.no_grad():
        return prev_means[neighbour_indices] - prev_means[:, None]


def _relative_rotations(quats: torch.Tensor, prev_quats: torch.Tensor) -> torch.Tensor:
    """q_rel = q_t (x) conj(q_t-1), [N, 4]."""
    return quat_multiply(quats, quat_conjugate(prev_quats))


# ----------------------------------------------------------------------------- the components-first form
# Vectors are stored component first with the K neighbours before the N points: [C, K, N], C = 3 for
# offsets, 4 for quaternions (per-point values are [C, N] and broadcast as [C, 1, N]). Each step then
# takes one op per tensor rather than one per component, the sums over neighbours run over the outer
# dimension (vectorised adds of N-long rows), and nothing is interleaved: on a 2-core AMD EPYC CPU
# (1 thread, 4,221 x 20, torch.profiler) the per-component [N, K] form spent 5.0 of its 15.7 ms forward +
# backward in aten::cat, stacking components along the last dimension.

# R(n) entry by entry (row-major, R_ij = 3 i + j) as base + scale (n_a n_a' + sign n_b n_b'), with the
# products taken from the outer product n n^T flattened (index 4 p + q = n_p n_q): `quat_to_rotmat`'s
# formulas.
_R_FIRST = (10, 6, 7, 6, 5, 11, 7, 11, 5)     # yy, xy, xz, xy, xx, yz, xz, yz, xx
_R_SECOND = (15, 3, 2, 3, 15, 1, 2, 1, 10)    # zz, wz, wy, wz, zz, wx, wy, wx, yy
_R_SIGN = (1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0)
_R_BASE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_R_SCALE = (-2.0, 2.0, 2.0, 2.0, -2.0, 2.0, 2.0, 2.0, -2.0)
# Its backward: sum_ij G_ij R_ij(n) = const + n^T Q n with Q symmetric, entry 4 p + q of Q a sum of at most
# two entries of G (row 9: zero), so dL/dn = 2 Q n = (_Q_COEF_1 G[_Q_ROW_1] + _Q_COEF_2 G[_Q_ROW_2]) n.
_Q_ROW_1 = (9, 7, 2, 3, 7, 4, 1, 2, 2, 1, 0, 5, 3, 2, 5, 0)
_Q_COEF_1 = (0.0, 2.0, 2.0, 2.0, 2.0, -4.0, 2.0, 2.0, 2.0, 2.0, -4.0, 2.0, 2.0, 2.0, 2.0, -4.0)
_Q_ROW_2 = (9, 5, 6, 1, 5, 8, 3, 6, 6, 3, 8, 7, 1, 6, 7, 4)
_Q_COEF_2 = (0.0, -2.0, -2.0, -2.0, -2.0, -4.0, 2.0, 2.0, -2.0, 2.0, -4.0, 2.0, -2.0, 2.0, 2.0, -4.0)
NORMALIZE_EPS = 1e-12  # F.normalize's (quat_normalize)


def _rotation_constants(like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    def build():
        def rows(values):
            return torch.tensor(values, dtype=torch.int64, device=like.device)

        def column(values):
            return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]

        return (rows(_R_FIRST), rows(_R_SECOND), column(_R_SIGN), column(_R_BASE), column(_R_SCALE),
                rows(_Q_ROW_1), column(_Q_COEF_1), rows(_Q_ROW_2), column(_Q_COEF_2))

    return _cached_by_key(("rotation", like.dtype, like.device), build)


def _rotation_rows(rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R [9, N] with row 3 i + j = R_ij(n), n [4, N], |rel| [N]) for quaternions rel [4, N] (rows
    w, x, y, z), n = rel / max(|rel|, 1e-12) as `quat_to_rotmat` normalises."""
    first, second, sign, base, scale = _rotation_constants(rel)[:5]
    r2 = rel * rel
    # |rel| written out: torch.linalg.vector_norm over the 4 rows took 0.54 ms, this 0.025 ms (2-core AMD
    # EPYC CPU, 1 thread, 4,221 columns).
    norm = (r2[0] + r2[1] + r2[2] + r2[3]).sqrt_()
    n = rel / norm.clamp_min(NORMALIZE_EPS)
    products = (n[:, None] * n[None]).view(16, -1)
    R = torch.addcmul(products.index_select(0, first), sign, products.index_select(0, second))
    return torch.addcmul(base, scale, R), n, norm


def _rotation_rows_backward(n: torch.Tensor, norm: torch.Tensor, grad_R: torch.Tensor) -> torch.Tensor:
    """d/drel [4, N] of sum_ij G_ij R_ij(n) for G = grad_R [9, N] (n, norm from `_rotation_rows`): dL/dn =
    2 Q n (see _Q_ROW_1), then the normalisation's backward (dL/dn - n (n . dL/dn)) / |rel| (dL/dn / 1e-12
    where |rel| < 1e-12, as autograd through F.normalize)."""
    row1, coef1, row2, coef2 = _rotation_constants(n)[5:]
    G = torch.cat([grad_R, grad_R.new_zeros(1, grad_R.shape[1])])
    Q = torch.addcmul(coef1 * G.index_select(0, row1), coef2, G.index_select(0, row2)).view(4, 4, -1)
    grad_n = (Q * n[None]).sum(1)
    dot = (n * grad_n).sum(0) * (norm >= NORMALIZE_EPS)
    return (grad_n - n * dot) / norm.clamp_min(NORMALIZE_EPS)


class _RigidityCore:
    """The three terms and their written-out gradient in the components-first form.

    Inputs: R [9, N] (row 3 b + a = R_ba, `_rotation_rows`), D [7, K, N] = (o, d) with o_b = mu_j - mu_i
    (b < 3) and d_c = q_rel,j - q_rel,i (c < 4), minus_P [3, K, N] the previous offsets negated, w and
    d0 [K, N]. The three terms share one [3, K, N] tensor of u = sqrt(w s + 1e-20) (one product, sum,
    square root and mean for all three).

    With M = N K entries and u per entry, d mean(u) / d s = w / (2 M u), so for rigid (s = |e|^2,
    e_a = sum_b R_ba o_b - p_a): dL/de_a = g w e_a / (M u), dL/dR_ba = sum_k dL/de_a o_b and
    dL/do_b = sum_a R_ba dL/de_a; for rot (s = |d|^2): dL/dd = g w d / (M u); for iso (s = f^2,
    f = |o| - d0, |o| = sqrt(|o|^2 + 1e-20)): dL/do_b = g w f o_b / (M u |o|).
    """

    @staticmethod
    def forward(R, D, minus_P, weights, initial_distances):
        """((rigid, rot, iso) as a [3] tensor, saved for `backward`)."""
        o = D[:3]
        Rb = R.view(3, 3, 1, -1)  # [b, a, 1, N]
        # (R^T v)_a = sum_b R_ba v_b, written out rather than a batched matmul: BLAS results may depend on
        # memory alignment, which would break bit-identical resumes on CPU.
        e = torch.addcmul(minus_P, Rb[0], o[0])  # [3, K, N]
        e.addcmul_(Rb[1], o[1]).addcmul_(Rb[2], o[2])
        e2, D2 = e * e, D * D
        distances = torch.add(D2[0], D2[1]).add_(D2[2]).add_(SQRT_EPS).sqrt_()
        f = distances - initial_distances
        # s, then u, of the three terms (no out= writes: `_rigidity_terms` runs this through autograd)
        U = torch.stack([torch.add(e2[0], e2[1]).add_(e2[2]), torch.add(D2[3], D2[4]).add_(D2[5]).add_(D2[6]), f * f])
        U.mul_(weights).add_(SQRT_EPS).sqrt_()
        return U.view(3, -1).mean(1), (R, D, weights, e, U, distances, f)

    @staticmethod
    def backward(saved, grad_values, need_R=True):
        """(dL/dR [9, N] or None, dL/dD [7, K, N]) for the upstream gradient [3] of the three terms."""
        R, D, weights, e, U, distances, f = saved
        C = (grad_values * (1.0 / weights.numel()))[:, None, None] * weights / U  # g w / (M u), [3, K, N]
        c_iso = C[2].mul_(f).div_(distances)
        o = D[:3]
        grad_e = C[0] * e  # [3, K, N]
        Ra = R.view(3, 3, 1, -1)  # [b, a, 1, N]: Ra[:, a] is column a
        grad_D = torch.empty_like(D)
        grad_o = torch.mul(Ra[:, 0], grad_e[0], out=grad_D[:3])
        grad_o.addcmul_(Ra[:, 1], grad_e[1]).addcmul_(Ra[:, 2], grad_e[2]).addcmul_(c_iso, o)
        torch.mul(C[1], D[3:], out=grad_D[3:])
        grad_R = (o[:, None] * grad_e[None]).sum(2).view(9, -1) if need_R else None  # [b, a, N] -> [9, N]
        return grad_R, grad_D


def _rigidity_parts(rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights, initial_distances):
    """((rigid, rot, iso) [3], what their gradients need) from the rotations rel_R [N, 3, 3] and offsets
    mu_j - mu_i [N, K, 3] (the rest as in `_rigidity_terms`), through `_RigidityCore`."""
    n = rel_R.shape[0]
    R = rel_R.reshape(n, 9).t()
    D = torch.cat([offsets, neighbour_rel_rot - rel_rot[:, None]], -1).permute(2, 1, 0).contiguous()
    return _RigidityCore.forward(R, D, -prev_offsets.permute(2, 1, 0), weights.t().contiguous(),
                                 initial_distances.t().contiguous())


def _rigidity_terms(means, rel_rot, neighbour_means, neighbour_rel_rot, prev_offsets, weights, initial_distances):
    """The three terms from gathered neighbours (pure pointwise maths and reductions: compilable).

    means [N, 3], rel_rot [N, 4], neighbour_means [N, K, 3], neighbour_rel_rot [N, K, 4],
    prev_offsets [N, K, 3], weights and initial_distances [N, K].
    """
    values, _ = _rigidity_parts(quat_to_rotmat(rel_rot), neighbour_means - means[:, None], rel_rot,
                                neighbour_rel_rot, prev_offsets, weights, initial_distances)
    return values.unbind(0)


class _RigidityTerms(torch.autograd.Function):
    """`_rigidity_terms` from gathered neighbours with `_RigidityCore`'s written-out gradient."""

    @staticmethod
    def forward(ctx, rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights, initial_distances):
        values, ctx.saved = _rigidity_parts(rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights,
                                            initial_distances)
        return tuple(v.clone() for v in values.unbind(0))

    @staticmethod
    def backward(ctx, grad_rigid, grad_rot, grad_iso):
        grad_R, grad_D = _RigidityCore.backward(ctx.saved, torch.stack([grad_rigid, grad_rot, grad_iso]),
                                                ctx.needs_input_grad[0])
        n = grad_D.shape[2]
        grad_nr = grad_D[3:].permute(2, 1, 0)
        return (None if grad_R is None else grad_R.t().reshape(n, 3, 3), grad_D[:3].permute(2, 1, 0),
                -grad_D[3:].sum(1).t(), grad_nr, None, None, None)


def _rigidity_terms_eager(means, rel_rot, neighbour_means, neighbour_rel_rot, prev_offsets, weights,
                          initial_distances):
    """`_rigidity_terms` (the same values) with the written-out gradient of `_RigidityTerms`."""
    return _RigidityTerms.apply(quat_to_rotmat(rel_rot), neighbour_means - means[:, None], rel_rot, neighbour_rel_rot,
                                prev_offsets, weights, initial_distances)


@dataclass(frozen=True, eq=False)
class _NeighbourLayout:
    """The neighbour table in the components-first form (built once per fit: `_neighbour_layout`)."""

    index: torch.Tensor     # [K N] int64: entry k N + i is neighbour k of point i
    weights: torch.Tensor   # [K, N]
    initial_distances: torch.Tensor   # [K, N]
    table: _GatherTable | None   # CSR of `index` (the fixed-order backward off the CPU)


def _neighbour_layout(neighbour_indices, neighbour_weights, initial_distances, n: int) -> _NeighbourLayout:
    def build():
        index = neighbour_indices.t().reshape(-1)
        table = None if index.device.type == "cpu" else _GatherTable(index, *_csr_table(index, n))
        return _NeighbourLayout(index, neighbour_weights.t().contiguous(), initial_distances.t().contiguous(), table)

    return _cached("layout", neighbour_indices, build, neighbour_weights, initial_distances)


def _right_product_matrix(prev_quats: torch.Tensor) -> torch.Tensor:
    """[4, 4, N] A with (q (x) conj(p))_i = sum_j A_ij q_j for p = prev_quats [N, 4]: the products and signs of
    `quat_multiply(q, quat_conjugate(p))`, term j in its order. Once per frame (cached)."""
    def build():
        w, x, y, z = prev_quats.t()
        cw, cx, cy, cz = w, -x, -y, -z
        return torch.stack([torch.stack(row) for row in ((cw, -cx, -cy, -cz), (cx, cw, cz, -cy),
                                                         (cy, -cz, cw, cx), (cz, cy, -cx, cw))])

    return _cached("right product", prev_quats, build)


def _minus_entries_first(prev_offsets: torch.Tensor) -> torch.Tensor:
    """-prev_offsets [N, K, 3] as [3, K, N] contiguous; a per-frame constant, converted once (cached)."""
    return _cached("entries first", prev_offsets, lambda: (-prev_offsets).permute(2, 1, 0).contiguous())


class _RigidityFamily(torch.autograd.Function):
    """The rigidity family from the foreground means [N, 3] and normalised quaternions [N, 4] in one
    Function (the eager path of `rigidity_losses`): the relative rotations, the neighbour gather, the
    three terms (`_RigidityCore`) and all their gradients written out. The values are `_rigidity`'s with
    `_rigidity_terms` (autograd) up to float32 rounding: the same formulas, some products fused (addcmul)
    and the means summed in another order (tests/tracking/test_losses.py).

    The relative rotations are rel = A q with A [4, 4, N] the per-frame matrix of right multiplication by
    conj(q_t-1) (`_right_product_matrix`), so their gradient is A^T; the means and relative rotations
    travel as one [7, N] table, so the gather is one index_select and its backward one fixed-order sum
    (`_scatter_columns`).
    """

    @staticmethod
    def forward(ctx, means, quats, layout: _NeighbourLayout, A, minus_prev_offsets):
        qt = quats.t()
        rel = A[:, 0] * qt[0] + A[:, 1] * qt[1] + A[:, 2] * qt[2] + A[:, 3] * qt[3]  # [4, N]
        R, n, norm = _rotation_rows(rel)
        V = torch.cat([means.t(), rel])  # [7, N]
        k, m = layout.weights.shape
        D = V.index_select(1, layout.index).view(7, k, m).sub_(V[:, None])
        values, saved = _RigidityCore.forward(R, D, minus_prev_offsets, layout.weights, layout.initial_distances)
        ctx.saved = saved, n, norm, A, layout
        return values

    @staticmethod
    def backward(ctx, grad_values):
        saved, n, norm, A, layout = ctx.saved
        need_q = ctx.needs_input_grad[1]
        grad_R, grad_D = _RigidityCore.backward(saved, grad_values, need_q)
        # D = V[:, j] - V[:, i]: the gathered side summed per destination column, minus each column's own K.
        grad_V = _scatter_columns(grad_D.view(7, -1), layout, -grad_D.sum(1))
        grad_means = grad_V[:3].t() if ctx.needs_input_grad[0] else None
        grad_quats = None
        if need_q:
            g = grad_V[3:] + _rotation_rows_backward(n, norm, grad_R)  # d/drel, [4, N]
            grad_quats = (A[0] * g[0] + A[1] * g[1] + A[2] * g[2] + A[3] * g[3]).t()  # A^T g
        return grad_means, grad_quats, None, None, None


def _scatter_columns(grad: torch.Tensor, layout: _NeighbourLayout, out: torch.Tensor) -> torch.Tensor:
    """out[:, n] += sum over entries e with index[e] = n of grad[:, e], in increasing e (grad [C, M], out
    [C, N]; returns out).

    On the CPU `index_add_` adds in index order (deterministic there; PyTorch lists it as nondeterministic
    on CUDA only); 4,221 x 20 x 7 on a 2-core AMD EPYC CPU (1 thread): 0.65 ms where the CSR reorder +
    `segment_reduce` took 1.2 ms (after a transposition to [M, 7]). Elsewhere the CSR segmented sum of
    `_GatherRows`.
    """
    if layout.table is None:
        return out.index_add_(1, layout.index, grad)
    t = layout.table
    return out.add_(torch.segment_reduce(grad.t().index_select(0, t.order), "sum", lengths=t.counts, axis=0).t())


def _rigidity(means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights, initial_distances,
              relative_rotations, terms, prev_offsets=None) -> dict[str, torch.Tensor]:
    rel_rot = relative_rotations(quats, prev_quats)
    if prev_offsets is None:
        prev_offsets = previous_offsets(prev_means, neighbour_indices)  # [N, K, 3]
    rigid, rot, iso = terms(means, rel_rot, neighbour_gather(means, neighbour_indices),
                            neighbour_gather(rel_rot, neighbour_indices), prev_offsets, neighbour_weights,
                            initial_distances)
    return {"rigid": rigid, "rot": rot, "iso": iso}


_compiled_relative_rotations = compiled(_relative_rotations, "the rigidity losses' relative rotations",
                                        cuda_by_default=True)
_compiled_rigidity_terms = compiled(_rigidity_terms, "the rigidity losses", cuda_by_default=True)


def rigidity_losses_fast(means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights,
                         initial_distances, prev_offsets=None) -> dict[str, torch.Tensor]:
    """`rigidity_losses` with its pointwise parts through `torch.compile` where `tritonsplat.compilation.wanted`
    (CUDA; the CPU's t > 0 steps with TRITONSPLAT_COMPILE=1): a few fused kernels instead of ~200 small ones; the
    gathers stay eager and deterministic. `rigidity_losses` (the written-out gradient) otherwise and after a failed
    compile (warned once). Speed: `tritonsplat.compilation`."""
    args = (means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights, initial_distances)
    compiled_parts = (_compiled_relative_rotations, _compiled_rigidity_terms)
    if not wanted(means.device, cuda_by_default=True) or any(part.failed() for part in compiled_parts):
        return rigidity_losses(*args, prev_offsets)
    return _rigidity(*args, *compiled_parts, prev_offsets)


def floor_loss(fg_means: torch.Tensor, floor_y: float) -> torch.Tensor:
    """mean over foreground Gaussians of max(y - floor_y, 0): nothing below the floor (+y down)."""
    if fg_means.numel() == 0:
        return fg_means.sum()
    return torch.clamp(fg_means[:, 1] - floor_y, min=0).mean()


def l1_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over rows of sum over columns |x - y| (the original's `l1_loss_v2`); 0 for no rows."""
    if x.numel() == 0:
        return x.sum()
    return (x - y).abs().sum(-1).mean()


def background_loss(bg_means, bg_quats, init_bg_means, init_bg_quats) -> torch.Tensor:
    """Background Gaussians stay at their t = 0 pose: L1 of positions plus L1 of normalised quats."""
    return l1_rows(bg_means, init_bg_means) + l1_rows(bg_quats, init_bg_quats)


def neighbour_weights(initial_sq_distances: torch.Tensor, lam: float) -> torch.Tensor:
    """exp(-lambda d^2) from squared distances [N, K]; lambda in inverse squared data units."""
    return torch.exp(-lam * initial_sq_distances)


def lambda_in_data_units(lambda_per_m2: float, metres_per_unit: float) -> float:
    """lambda per square data unit = lambda per square metre x (metres per unit)^2."""
    return float(lambda_per_m2 * metres_per_unit**2)


def binary_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean of -p log p - (1 - p) log(1 - p) over p in (0, 1) (clamped to [eps, 1 - eps])."""
    p = p.clamp(eps, 1 - eps)
    return -(p * torch.log(p) + (1 - p) * torch.log1p(-p)).mean()


def flatness(scales: torch.Tensor) -> torch.Tensor:
    """Mean over Gaussians of min_i s_i / max_i s_i, scales [N, 3] positive (LossWeights.flatten): 1 for
    spheres, -> 0 for flat discs. The largest scale is a detached reference: the gradient shrinks the smallest
    scale only (d / d log s_min = the ratio), it never inflates the largest."""
    return (scales.amin(1) / scales.amax(1).detach()).mean()


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


# ----------------------------------------------------------------------------- the loss-term table
FIRST, NEXT = "first", "next"  # the two stages: t = 0 and every t > 0


@dataclass(frozen=True)
class Term:
    """One term of the total loss.

    name: its key in the curves and stats, and the `LossWeights` field that weighs it.
    stages: the stages where it is active (FIRST: t = 0, NEXT: t > 0).
    compute: value from a step context (`tracking.stages.StepContext`), or None where it does not
        apply this step (no masks, no floor, no neighbours).
    prior: an ablation may switch it off through `TrackingConfig.priors`.
    optional: a term that none of the presets of the original uses; it has a curve only in the runs where
        it is active (`term_names` with a config), so that the curves of every other run stay as they were.
    """

    name: str
    stages: tuple[str, ...]
    compute: Callable[[Any], torch.Tensor | None]
    prior: bool = False
    optional: bool = False

    def weight(self, config) -> float:
        return float(getattr(config.weights, self.name))

    def active(self, config, stage: str) -> bool:
        """In this stage, with a non-zero weight, and not switched off as a prior."""
        return stage in self.stages and self.weight(config) != 0 and (not self.prior or self.name in config.priors)


TERMS: tuple[Term, ...] = (
    Term("im", (FIRST, NEXT), lambda ctx: ctx.photometric()["im"]),
    Term("seg", (FIRST, NEXT), lambda ctx: ctx.photometric().get("seg")),
    Term("rigid", (NEXT,), lambda ctx: ctx.rigidity().get("rigid"), prior=True),
    Term("rot", (NEXT,), lambda ctx: ctx.rigidity().get("rot"), prior=True),
    Term("iso", (NEXT,), lambda ctx: ctx.rigidity().get("iso"), prior=True),
    Term("floor", (NEXT,), lambda ctx: ctx.floor()),
    Term("bg", (NEXT,), lambda ctx: ctx.background(), prior=True),
    Term("colour", (NEXT,), lambda ctx: ctx.colour()),
    Term("opacity_entropy", (FIRST,), lambda ctx: ctx.opacity_entropy(), optional=True),
    Term("flatten", (FIRST,), lambda ctx: ctx.flatten(), optional=True),
)


def term_names(stage: str | None = None, config=None) -> tuple[str, ...]:
    """Names of the terms of a stage (every term when stage is None), in TERMS order; optional terms only
    where they are active under `config` (never without one)."""
    return tuple(t.name for t in TERMS if (stage is None or stage in t.stages)
                 and (not t.optional or (config is not None and stage is not None and t.active(config, stage))))


def total_loss(terms: dict[str, torch.Tensor], config) -> torch.Tensor:
    """sum over computed terms of weight x value, in TERMS order."""
    w = config.weights
    return sum(getattr(w, k) * v for k, v in terms.items())


def stacked_total_loss(terms: dict[str, torch.Tensor], config, cache: dict) -> torch.Tensor:
    """`total_loss` as one stacked product and sum (3 launches forward, 1 backward, instead of two per
    term each way); `cache` keeps the weight vector per set of terms (one host-to-device copy each)."""
    names = tuple(terms)
    weights = cache.get(names)
    values = torch.stack(list(terms.values()))
    if weights is None:
        w = config.weights
        weights = cache[names] = torch.tensor([float(getattr(w, k)) for k in names], dtype=values.dtype,
                                              device=values.device)
    return (values * weights).sum()


__all__ = [
    "TERMS",
    "Term",
    "previous_offsets",
    "term_names",
    "total_loss",
    "stacked_total_loss",
    "background_loss",
    "flatness",
    "floor_loss",
    "image_loss",
    "image_losses",
    "l1",
    "l1_rows",
    "lambda_in_data_units",
    "neighbour_weights",
    "psnr",
    "rigidity_losses",
    "rigidity_losses_fast",
    "ssim",
    "ssim_map",
    "weighted_abs",
    "weighted_l2",
]
