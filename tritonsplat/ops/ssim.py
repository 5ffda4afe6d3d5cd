"""Fused SSIM and L1 + D-SSIM image loss in Triton, with a hand-written backward.

Twin: `tritonsplat/reference/ssim.py` (same names and signatures; separable conv2d in PyTorch).
SSIM (Wang et al. 2004, Eq. 13) with 3DGS's convention: 11 x 11 Gaussian window (sigma 1.5) with
zero padding, C1 = 0.01^2, C2 = 0.03^2, mean over every pixel and channel.

The unfused loss costs ~35 launches forward and twice that backward (five blurred maps, their
products, the mean); here the forward is one kernel (all five window statistics, the SSIM map and
|a - b| per pixel, per-program partial sums) plus a sum of the partials, and the backward is one
kernel. The 2D window is applied directly (121 taps of w_y w_x) rather than separably: a pixel tile
then needs no intermediate buffer.

Forward, per plane (B x C planes) and pixel p, with a = render, b = target:
    mu_a = sum_q w(q - p) a(q), mu_b, e_aa = sum w a^2, e_bb = sum w b^2, e_ab = sum w a b
    A1 = 2 mu_a mu_b + C1, A2 = 2 (e_ab - mu_a mu_b) + C2
    B1 = mu_a^2 + mu_b^2 + C1, B2 = (e_aa - mu_a^2) + (e_bb - mu_b^2) + C2,  S = A1 A2 / (B1 B2)
    loss = (1 - s) mean |a - b| + s (1 - mean S)

The forward also saves, per pixel, the partial derivatives of S with respect to the statistics
that depend on a (b is a fixed target and gets no gradient):
    P_mu = dS/dmu_a = 2 mu_b (A2 - A1) / (B1 B2) + 2 mu_a S (1 / B2 - 1 / B1)
    P_aa = dS/de_aa = -S / B2
    P_ab = dS/de_ab = 2 A1 / (B1 B2)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference.ssim import SSIM_C1, SSIM_C2, SSIM_SIGMA, SSIM_WINDOW, gaussian_window_1d
from . import _alloc

BLOCK_H = 16  # pixel tile rows per program
BLOCK_W = 16  # pixel tile columns per program (256 pixels: 2 per thread at 4 warps)
NUM_WARPS = 4


@triton.jit
def _window_tap(window_ptr, ys, xs, base, H, W, dy, dx, WINDOW: tl.constexpr):
    """Tap (dy, dx) of the window centred on each pixel (ys [BLOCK_H, 1], xs [1, BLOCK_W]) of the plane
    at element `base`: its weight w_y w_x [1, 1], the tapped elements' offsets [BLOCK_H, BLOCK_W] and
    whether they lie inside the image (zero padding outside)."""
    wy = tl.load(window_ptr + dy + tl.zeros((1,), dtype=tl.int32), mask=tl.full((1,), True, tl.int1), other=0.0)
    wx = tl.load(window_ptr + dx + tl.zeros((1,), dtype=tl.int32), mask=tl.full((1,), True, tl.int1), other=0.0)
    qy = ys + (dy - WINDOW // 2)
    qx = xs + (dx - WINDOW // 2)
    inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    return wy[:, None] * wx[None, :], base + qy * W + qx, inside


@triton.jit
def _l1_dssim_forward_kernel(
    a_ptr,  # [P, H, W] float32 render planes
    b_ptr,  # [P, H, W] float32 target planes
    window_ptr,  # [WINDOW] float32 normalised 1D Gaussian
    partials_ptr,  # [3, P, H, W] float32 out: P_mu, P_aa, P_ab (written when SAVE_PARTIALS)
    sums_ptr,  # [n_programs, 2] float32 out: sum |a - b|, sum S over the program's pixels
    H, W, n_planes,
    C1: tl.constexpr, C2: tl.constexpr, WINDOW: tl.constexpr, SAVE_PARTIALS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)
    tile_y = tl.program_id(1)
    tile_x = tl.program_id(2)
    ys = tile_y * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    xs = tile_x * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]  # [1, BLOCK_W]
    inside = (ys < H) & (xs < W)  # [BLOCK_H, BLOCK_W]
    base = plane.to(tl.int64) * H * W
    mu_a = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    mu_b = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    e_aa = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    e_bb = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    e_ab = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for dy in tl.static_range(WINDOW):
        for dx in tl.static_range(WINDOW):
            w, offset, ok = _window_tap(window_ptr, ys, xs, base, H, W, dy, dx, WINDOW)
            va = tl.load(a_ptr + offset, mask=ok, other=0.0)
            vb = tl.load(b_ptr + offset, mask=ok, other=0.0)
            mu_a += w * va
            mu_b += w * vb
            e_aa += w * (va * va)
            e_bb += w * (vb * vb)
            e_ab += w * (va * vb)
    a1 = 2.0 * mu_a * mu_b + C1
    a2 = 2.0 * (e_ab - mu_a * mu_b) + C2
    b1 = mu_a * mu_a + mu_b * mu_b + C1
    b2 = (e_aa - mu_a * mu_a) + (e_bb - mu_b * mu_b) + C2
    den = b1 * b2
    s_map = (a1 * a2) / den
    centre = base + ys * W + xs
    a = tl.load(a_ptr + centre, mask=inside, other=0.0)
    b = tl.load(b_ptr + centre, mask=inside, other=0.0)
    l1_sum = tl.sum(tl.sum(tl.where(inside, tl.abs(a - b), 0.0), axis=1), axis=0)
    s_sum = tl.sum(tl.sum(tl.where(inside, s_map, 0.0), axis=1), axis=0)
    program = (plane * tl.num_programs(1) + tile_y) * tl.num_programs(2) + tile_x
    tl.store(sums_ptr + program * 2, l1_sum)
    tl.store(sums_ptr + program * 2 + 1, s_sum)
    if SAVE_PARTIALS:
        p_mu = 2.0 * mu_b * (a2 - a1) / den + 2.0 * mu_a * s_map * (1.0 / b2 - 1.0 / b1)
        p_aa = -s_map / b2
        p_ab = 2.0 * a1 / den
        plane_stride = n_planes.to(tl.int64) * H * W
        tl.store(partials_ptr + centre, p_mu, mask=inside)
        tl.store(partials_ptr + plane_stride + centre, p_aa, mask=inside)
        tl.store(partials_ptr + 2 * plane_stride + centre, p_ab, mask=inside)


# Backward. With g the upstream gradient of the scalar loss and n = P H W pixels,
# dloss/dS(p) = -s g / n for every p, and dloss/da(q) via |a - b| is (1 - s) g sign(a(q) - b(q)) / n.
# a(q) enters mu_a(p), e_aa(p), e_ab(p) of every p within the window with weights w(q - p), w(q - p) 2 a(q)
# and w(q - p) b(q). The window is symmetric and p runs over the image only (outside it there is no S),
# so the chain rule is a zero-padded blur of the saved partials:
#     grad_a(q) = -s g / n [blur(P_mu)(q) + 2 a(q) blur(P_aa)(q) + b(q) blur(P_ab)(q)]
#                 + (1 - s) g sign(a(q) - b(q)) / n
# Each program owns its pixels: no atomics, a fixed summation order (deterministic).
@triton.jit
def _l1_dssim_backward_kernel(
    a_ptr,  # [P, H, W] float32
    b_ptr,  # [P, H, W] float32
    window_ptr,  # [WINDOW] float32
    partials_ptr,  # [3, P, H, W] float32 from the forward
    grad_loss_ptr,  # [1] float32 upstream gradient (read on the device: no host sync)
    grad_a_ptr,  # [P, H, W] float32 out
    H, W, n_planes, inv_n, ssim_weight,
    WINDOW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)
    tile_y = tl.program_id(1)
    tile_x = tl.program_id(2)
    ys = tile_y * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    xs = tile_x * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (ys < H) & (xs < W)
    base = plane.to(tl.int64) * H * W
    plane_stride = n_planes.to(tl.int64) * H * W
    blur_mu = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    blur_aa = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    blur_ab = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for dy in range(WINDOW):   # a runtime loop over rows: unrolling all 121 taps spilled 728 B (sm_90, 255 regs)
        for dx in tl.static_range(WINDOW):
            w, offset, ok = _window_tap(window_ptr, ys, xs, base, H, W, dy, dx, WINDOW)
            blur_mu += w * tl.load(partials_ptr + offset, mask=ok, other=0.0)
            blur_aa += w * tl.load(partials_ptr + plane_stride + offset, mask=ok, other=0.0)
            blur_ab += w * tl.load(partials_ptr + 2 * plane_stride + offset, mask=ok, other=0.0)
    centre = base + ys * W + xs
    a = tl.load(a_ptr + centre, mask=inside, other=0.0)
    b = tl.load(b_ptr + centre, mask=inside, other=0.0)
    g = tl.load(grad_loss_ptr + tl.zeros((1,), dtype=tl.int32), mask=tl.full((1,), True, tl.int1), other=0.0)
    g = g[:, None]  # [1, 1]
    diff = a - b
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))  # torch's |x|' (0 at 0)
    grad = g * inv_n * ((1.0 - ssim_weight) * sign - ssim_weight * (blur_mu + 2.0 * a * blur_aa + b * blur_ab))
    tl.store(grad_a_ptr + centre, grad, mask=inside)


def _planes(render: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if render.dim() != 4 or render.shape != target.shape:
        raise ValueError(f"{name}: render and target must be [B, C, H, W] of one shape, got "
                         f"{tuple(render.shape)} and {tuple(target.shape)}")
    if render.dtype != torch.float32 or target.dtype != torch.float32:
        raise ValueError(f"{name}: render and target must be float32, got {render.dtype} and {target.dtype}")
    B, C, H, W = render.shape
    return render.detach().contiguous().view(B * C, H, W), target.detach().contiguous().view(B * C, H, W)


def _grid(n_planes: int, H: int, W: int) -> tuple[int, int, int]:
    return (n_planes, triton.cdiv(H, BLOCK_H), triton.cdiv(W, BLOCK_W))


@functools.lru_cache(maxsize=16)
def _loss_coefficients(ssim_weight: float, n: float, device: str) -> torch.Tensor:
    return torch.tensor([(1.0 - ssim_weight) / n, -ssim_weight / n], dtype=torch.float32, device=device)


def l1_dssim_forward(render: torch.Tensor, target: torch.Tensor, ssim_weight: float, save_partials: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss [], mean SSIM [], partials [3, P, H, W] or None) of images [B, C, H, W] float32."""
    a, b = _planes(render, target, "l1_dssim_loss")
    P, H, W = a.shape
    grid = _grid(P, H, W)
    window = gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA, torch.float32, str(a.device))
    partials = _alloc.empty((3, P, H, W), dtype=torch.float32, device=a.device) if save_partials else None
    sums = _alloc.empty((grid[0] * grid[1] * grid[2], 2), dtype=torch.float32, device=a.device)
    _l1_dssim_forward_kernel[grid](
        a, b, window, partials if save_partials else sums, sums, H, W, P,
        C1=SSIM_C1, C2=SSIM_C2, WINDOW=SSIM_WINDOW, SAVE_PARTIALS=save_partials, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        num_warps=NUM_WARPS)
    # s + [(1 - s) / n, -s / n] . (sum |a - b|, sum S): 4 launches where the term-by-term form took 6.
    totals = sums.sum(0)  # [sum |a - b|, sum S]
    n = float(P * H * W)
    coefficients = _loss_coefficients(float(ssim_weight), n, str(a.device))
    loss = (totals * coefficients).sum() + ssim_weight
    return loss, totals[1] / n, partials


def l1_dssim_backward(grad_loss: torch.Tensor, render: torch.Tensor, target: torch.Tensor, partials: torch.Tensor,
                      ssim_weight: float) -> torch.Tensor:
    """grad of the loss w.r.t. render [B, C, H, W] from the upstream grad_loss [] (see the derivation above)."""
    a, b = _planes(render, target, "l1_dssim_loss")
    P, H, W = a.shape
    window = gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA, torch.float32, str(a.device))
    grad_a = _alloc.empty_like(a)
    _l1_dssim_backward_kernel[_grid(P, H, W)](
        a, b, window, partials, grad_loss.reshape(1).to(torch.float32).contiguous(), grad_a, H, W, P,
        1.0 / float(P * H * W), float(ssim_weight), WINDOW=SSIM_WINDOW, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
        num_warps=NUM_WARPS)
    return grad_a.view(render.shape)


@dataclass(frozen=True, eq=False)
class L1DSSIMOptions:
    """What of one loss call receives no gradient: the target [B, C, H, W] float32 (data) and the D-SSIM
    weight. One autograd argument, so backward returns (grad, None)."""

    target: torch.Tensor
    ssim_weight: float


class L1DSSIMFunction(torch.autograd.Function):
    """Autograd wrapper: gradient w.r.t. the render only (the target is data)."""

    @staticmethod
    def forward(ctx, render, options: L1DSSIMOptions):  # render [B, C, H, W] float32
        # Contiguous once (a permuted render is copied here only), shared with backward.
        a, b = (plane.view(render.shape) for plane in _planes(render, options.target, "l1_dssim_loss"))
        loss, _, partials = l1_dssim_forward(a, b, options.ssim_weight, save_partials=render.requires_grad)
        ctx.save_for_backward(a, b, partials)
        ctx.ssim_weight = options.ssim_weight
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # grad_loss [] float32
        render, target, partials = ctx.saved_tensors
        return l1_dssim_backward(grad_loss, render, target, partials, ctx.ssim_weight), None


def l1_dssim_loss(render: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """(1 - s) mean |render - target| + s (1 - SSIM(render, target)), images [B, C, H, W] float32 (scalar).

    Differentiable in `render` (the target gets no gradient). Twin:
    `tritonsplat.reference.ssim.l1_dssim_loss`.
    """
    if target.requires_grad:
        raise ValueError("l1_dssim_loss: target must not require grad (only the render gets a gradient)")
    return L1DSSIMFunction.apply(render, L1DSSIMOptions(target, float(ssim_weight)))


def ssim(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images [B, C, H, W] float32 (scalar), differentiable in `render`.

    Twin: `tritonsplat.reference.ssim.ssim`.
    """
    return 1.0 - l1_dssim_loss(render, target, 1.0)


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The loss kernels' configurations (collected by `tritonsplat.aot`): the forward with and without
    the saved partials (loss with / without gradient), and the backward."""
    from ._launch import kernel_signature

    types = {"inv_n": "fp32", "ssim_weight": "fp32"}
    tile = dict(WINDOW=SSIM_WINDOW, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    variants = [dict(name=f"l1_dssim_forward[save_partials={save}]", kernel="_l1_dssim_forward_kernel",
                     signature=kernel_signature(_l1_dssim_forward_kernel, types),
                     constexprs=dict(C1=SSIM_C1, C2=SSIM_C2, SAVE_PARTIALS=save, **tile), num_warps=NUM_WARPS)
                for save in (True, False)]
    variants.append(dict(name="l1_dssim_backward", kernel="_l1_dssim_backward_kernel",
                         signature=kernel_signature(_l1_dssim_backward_kernel, types), constexprs=tile,
                         num_warps=NUM_WARPS))
    return variants
