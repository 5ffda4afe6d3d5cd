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

from tritonsplat.reference.ssim import SSIM_C1, SSIM_C2, SSIM_SIGMA, SSIM_WINDOW, ssim_map  # noqa: F401
from tritonsplat.reference.ssim import gaussian_window_1d as _gaussian_window_1d  # noqa: F401

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
    forward and one backward launch instead of ~35 each); "torch": separable conv2d (`ssim`).
    """
    if ssim_weight and (backend == "triton" or (backend == "auto" and render.is_cuda)):
        from tritonsplat.ops.ssim import l1_dssim_loss

        return l1_dssim_loss(render if render.dim() == 4 else render[None],
                             target if target.dim() == 4 else target[None], ssim_weight)
    loss = (1.0 - ssim_weight) * l1(render, target)
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim(render, target))
    return loss


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


_csr_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _csr_table(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M], counts [n]) int64: positions j of index sorted by index[j] (stable: increasing j
    within a row) and the in-degree of each row. Cached per index tensor (storage, version, shape, n)."""
    key = (index.device, index.data_ptr(), index._version, tuple(index.shape), n)
    table = _csr_cache.get(key)
    if table is not None:
        return table
    flat = index.reshape(-1)
    table = (torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n))
    if len(_csr_cache) > 8:
        _csr_cache.clear()
    _csr_cache[key] = table
    return table


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
    return _rigidity(means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights, initial_distances,
                     _relative_rotations, _rigidity_terms_eager, prev_offsets)


def previous_offsets(prev_means: torch.Tensor, neighbour_indices: torch.Tensor) -> torch.Tensor:
    """[N, K, 3] mu_j,t-1 - mu_i,t-1 from prev_means [N, 3] (detached)."""
    with torch.no_grad():
        return prev_means[neighbour_indices] - prev_means[:, None]


def _relative_rotations(quats: torch.Tensor, prev_quats: torch.Tensor) -> torch.Tensor:
    """q_rel = q_t (x) conj(q_t-1), [N, 4]."""
    return quat_multiply(quats, quat_conjugate(prev_quats))


def _sum_of_squares(components) -> torch.Tensor:
    """c_0^2 + c_1^2 + ... of equally shaped tensors, left to right (as `(x ** 2).sum(-1)` adds them)."""
    components = iter(components)
    total = next(components) ** 2
    for c in components:
        total = total + c**2
    return total


def _rigidity_parts(rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights, initial_distances):
    """(rigid, rot, iso, what their gradients need) from the rotations rel_R [N, 3, 3] and offsets
    mu_j - mu_i [N, K, 3] (the rest as in `_rigidity_terms`).

    Vectors are handled as their [N, K] components: on a 2-core AMD EPYC CPU (1 thread, 4,221 x 20)
    the forward + backward took 38.7 ms as [N, K, 3, 3] broadcast products and sums over the last
    dimension, 8.8 ms per component (the same forward values).
    """
    o = offsets.unbind(-1)  # 3 x [N, K]
    # (R^T v)_a = sum_b R_ba v_b, written out rather than a batched matmul: BLAS results may depend on
    # memory alignment, which would break bit-identical resumes on CPU.
    rotated = [rel_R[:, None, 0, a] * o[0] + rel_R[:, None, 1, a] * o[1] + rel_R[:, None, 2, a] * o[2]
               for a in range(3)]
    e = [r - p for r, p in zip(rotated, prev_offsets.unbind(-1))]
    u_rigid = torch.sqrt(_sum_of_squares(e) * weights + SQRT_EPS)
    d = [qj - qi[:, None] for qj, qi in zip(neighbour_rel_rot.unbind(-1), rel_rot.unbind(-1))]
    u_rot = torch.sqrt(_sum_of_squares(d) * weights + SQRT_EPS)
    distances = torch.sqrt(_sum_of_squares(o) + SQRT_EPS)
    f = distances - initial_distances
    u_iso = torch.sqrt(f**2 * weights + SQRT_EPS)   # weighted_abs(distances, initial_distances, weights)
    saved = (o, e, u_rigid, d, u_rot, distances, f, u_iso)
    return u_rigid.mean(), u_rot.mean(), u_iso.mean(), saved


def _rigidity_terms(means, rel_rot, neighbour_means, neighbour_rel_rot, prev_offsets, weights, initial_distances):
    """The three terms from gathered neighbours (pure pointwise maths and reductions: compilable).

    means [N, 3], rel_rot [N, 4], neighbour_means [N, K, 3], neighbour_rel_rot [N, K, 4],
    prev_offsets [N, K, 3], weights and initial_distances [N, K].
    """
    rigid, rot, iso, _ = _rigidity_parts(quat_to_rotmat(rel_rot), neighbour_means - means[:, None], rel_rot,
                                         neighbour_rel_rot, prev_offsets, weights, initial_distances)
    return rigid, rot, iso


class _RigidityTerms(torch.autograd.Function):
    """`_rigidity_parts` with its gradient written out (autograd's took 6 ms of the 8.8 ms above).

    With M = N K entries and u = sqrt(w s + 1e-20) per entry, d mean(u) / d s = w / (2 M u), so for
    rigid (s = |e|^2, e_a = sum_b R_ba o_b - p_a): dL/de_a = g w e_a / (M u),
    dL/dR_ba = sum_k dL/de_a o_b and dL/do_b = sum_a R_ba dL/de_a; for rot (s = |q_j - q_i|^2):
    dL/dq_j = g w (q_j - q_i) / (M u) and dL/dq_i = -sum_k of it; for iso (s = f^2, f = |o| - d0,
    |o| = sqrt(|o|^2 + 1e-20)): dL/do_b = g w f o_b / (M u |o|).
    """

    @staticmethod
    def forward(ctx, rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights, initial_distances):
        rigid, rot, iso, saved = _rigidity_parts(rel_R, offsets, rel_rot, neighbour_rel_rot, prev_offsets, weights,
                                                 initial_distances)
        o, e, u_rigid, d, u_rot, distances, f, u_iso = saved
        ctx.save_for_backward(rel_R, weights, u_rigid, u_rot, distances, f, u_iso, *o, *e, *d)
        return rigid, rot, iso

    @staticmethod
    def backward(ctx, grad_rigid, grad_rot, grad_iso):
        rel_R, weights, u_rigid, u_rot, distances, f, u_iso, *rest = ctx.saved_tensors
        o, e, d = rest[:3], rest[3:6], rest[6:]
        inv_m = 1.0 / weights.numel()
        grad_R = grad_offsets = grad_rel_rot = grad_neighbour_rel_rot = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            c_rigid = (grad_rigid * inv_m) * weights / u_rigid
            grad_e = [c_rigid * e_a for e_a in e]
            if ctx.needs_input_grad[0]:
                grad_R = torch.stack([(grad_e[a] * o[b]).sum(1) for b in range(3) for a in range(3)], -1
                                     ).reshape(rel_R.shape)
            if ctx.needs_input_grad[1]:
                c_iso = (grad_iso * inv_m) * weights * f / (u_iso * distances)
                grad_offsets = torch.stack([rel_R[:, None, b, 0] * grad_e[0] + rel_R[:, None, b, 1] * grad_e[1]
                                            + rel_R[:, None, b, 2] * grad_e[2] + c_iso * o[b] for b in range(3)], -1)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            c_rot = (grad_rot * inv_m) * weights / u_rot
            grad_d = [c_rot * d_c for d_c in d]
            if ctx.needs_input_grad[3]:
                grad_neighbour_rel_rot = torch.stack(grad_d, -1)
            if ctx.needs_input_grad[2]:
                grad_rel_rot = -torch.stack([g.sum(1) for g in grad_d], -1)
        return grad_R, grad_offsets, grad_rel_rot, grad_neighbour_rel_rot, None, None, None


def _rigidity_terms_eager(means, rel_rot, neighbour_means, neighbour_rel_rot, prev_offsets, weights,
                          initial_distances):
    """`_rigidity_terms` (the same values) with the written-out gradient of `_RigidityTerms`."""
    return _RigidityTerms.apply(quat_to_rotmat(rel_rot), neighbour_means - means[:, None], rel_rot, neighbour_rel_rot,
                                prev_offsets, weights, initial_distances)


def _rigidity(means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights, initial_distances,
              relative_rotations, terms, prev_offsets=None) -> dict[str, torch.Tensor]:
    rel_rot = relative_rotations(quats, prev_quats)
    if prev_offsets is None:
        prev_offsets = previous_offsets(prev_means, neighbour_indices)  # [N, K, 3]
    rigid, rot, iso = terms(means, rel_rot, neighbour_gather(means, neighbour_indices),
                            neighbour_gather(rel_rot, neighbour_indices), prev_offsets, neighbour_weights,
                            initial_distances)
    return {"rigid": rigid, "rot": rot, "iso": iso}


_compiled: dict[str, object] = {}


def rigidity_losses_fast(means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights,
                         initial_distances, prev_offsets=None) -> dict[str, torch.Tensor]:
    """`rigidity_losses` with its pointwise parts through `torch.compile` on CUDA (a few fused kernels
    instead of ~200 small ones; the gathers stay eager and deterministic). Eager on CPU, when
    TRITONSPLAT_COMPILE=0, or after a compilation failure (warned once)."""
    import os
    import warnings

    args = (means, quats, prev_means, prev_quats, neighbour_indices, neighbour_weights, initial_distances)
    if not means.is_cuda or os.environ.get("TRITONSPLAT_COMPILE", "1") == "0" or _compiled.get("failed"):
        return rigidity_losses(*args, prev_offsets)
    try:
        if "terms" not in _compiled:
            _compiled["rel"] = torch.compile(_relative_rotations, dynamic=True)
            _compiled["terms"] = torch.compile(_rigidity_terms, dynamic=True)
        return _rigidity(*args, _compiled["rel"], _compiled["terms"], prev_offsets)
    except Exception as exc:  # pragma: no cover - depends on the GPU toolchain
        _compiled["failed"] = True
        warnings.warn(f"torch.compile of the rigidity losses failed ({type(exc).__name__}: {str(exc)[:160]}); "
                      "using eager PyTorch", stacklevel=2)
        return rigidity_losses(*args, prev_offsets)


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
    "floor_loss",
    "image_loss",
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
