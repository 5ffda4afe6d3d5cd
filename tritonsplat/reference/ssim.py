"""SSIM and the L1 + D-SSIM image loss in pure PyTorch: the twin of `tritonsplat/ops/ssim.py`.

SSIM (Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE
TIP 2004, Eq. 13) with the 3D Gaussian Splatting convention (Kerbl et al. 2023, `utils/loss_utils.py`):
an 11 x 11 Gaussian window with sigma 1.5 applied with zero padding, C1 = 0.01^2, C2 = 0.03^2, the
map averaged over every pixel and channel. The window is separable, so it is applied as two 1D
convolutions (the 2D window is the outer product of the 1D one).

The image loss of 3DGS and Dynamic 3D Gaussians is (1 - s) L1 + s (1 - SSIM), s = 0.2.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # pixels (3DGS's)
SSIM_SIGMA = 1.5  # pixels
SSIM_C1 = 0.01**2  # (K1 L)^2 with dynamic range L = 1
SSIM_C2 = 0.03**2  # (K2 L)^2


@functools.lru_cache(maxsize=8)
def gaussian_window_1d(size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[size] normalised Gaussian weights, computed in float64 then cast."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _depthwise_windows(planes: int, size: int, sigma: float, dtype: torch.dtype, device: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1D window as depthwise conv2d weights, ([planes, 1, 1, size], [planes, 1, size, 1])."""
    g = gaussian_window_1d(size, sigma, dtype, device)
    return (g.view(1, 1, 1, -1).expand(planes, 1, 1, size).contiguous(),
            g.view(1, 1, -1, 1).expand(planes, 1, size, 1).contiguous())


def _blur(planes: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The Gaussian window applied to every plane of [B, P, H, W] with zero padding (same shape)."""
    P = planes.shape[1]
    pad = window // 2
    horizontal, vertical = _depthwise_windows(P, window, float(sigma), planes.dtype, str(planes.device))
    # The planes as channels of a depthwise (groups = P) convolution in channels-last layout rather than
    # a batch of one-channel images: the same sums up to float32 rounding (tests/reference/test_ssim.py). On one
    # 2-core AMD EPYC CPU (1 thread, 15 planes of 160 x 90): 0.9 ms forward + backward instead of 44 ms (2.9 ms
    # depthwise in the default layout); without autograd 0.89 ms against 0.58 ms in the default layout. On
    # another, AVX2-only (Zen 3, 1 thread; interleaved runs, best of 30), a step's colour and segmentation
    # L1 + D-SSIM (`l1_dssim_losses`, 2 pairs of 3 x 160 x 90, forward + backward) took 4.9-7.6 ms in the default
    # layout and 5.1-7.5 ms channels-last on the idle machine, but 14-21 ms against 7.5-9.8 ms while another
    # process ran on the second core (bit-identical results). So channels-last with or without autograd: at
    # most ~0.3 ms lost per blur, and no collapse when the cores are shared.
    blurred = F.conv2d(planes.contiguous(memory_format=torch.channels_last), horizontal, padding=(0, pad), groups=P)
    return F.conv2d(blurred, vertical, padding=(pad, 0), groups=P).contiguous()


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                stack: torch.Tensor | None = None):
    """(mu_a, mu_b, A1, A2, B1, B2) of images [B, C, H, W]: S = A1 A2 / (B1 B2) per pixel. `stack`: the
    [B, 5C, H, W] planes (a, b, a^2, b^2, ab) when the caller has them."""
    B, C, H, W = a.shape
    if stack is None:
        stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    mu_a, mu_b, e_aa, e_bb, e_ab = _blur(stack, window, sigma).reshape(B, 5, C, H, W).unbind(1)
    aa, bb, ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = e_aa - aa
    var_b = e_bb - bb
    cov = e_ab - ab
    return mu_a, mu_b, 2 * ab + SSIM_C1, 2 * cov + SSIM_C2, aa + bb + SSIM_C1, var_a + var_b + SSIM_C2


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-pixel SSIM of images a, b [B, C, H, W] -> [B, C, H, W]."""
    _, _, A1, A2, B1, B2 = _ssim_terms(a, b, window, sigma)
    return (A1 * A2) / (B1 * B2)


class _L1DSSIM(torch.autograd.Function):
    """(1 - s) mean |a - b| + s (1 - mean S) of G (render, target) pairs [B, C_g, H, W] at once (one loss
    each, [G]), with the gradient in each render written out (the targets are data), as the Triton
    kernel's (`tritonsplat/ops/ssim.py`): with g the upstream gradient of a pair's loss and n its pixels,
        P_mu = dS/dmu_a = 2 (mu_b (A2 - A1) - mu_a S (B2 - B1)) / (B1 B2),
        P_aa = dS/de_aa = -S / B2,  P_ab = dS/de_ab = 2 A1 / (B1 B2),
        grad_a = -s g / n [blur(P_mu) + 2 a blur(P_aa) + b blur(P_ab)] + (1 - s) g sign(a - b) / n
    (the window is symmetric and zero-padded, so the adjoint of the blur is the blur). Each loss has the
    operations of `ssim_map` (the same value); the planes of every pair are written into one stack and
    blurred by one pair of convolutions (SSIM is per channel): on a 2-core AMD EPYC CPU (1 thread) the
    forward blurs of two pairs of 3 x 160 x 90 (30 planes) took 1.15 ms together, 1.34 ms apart.
    """

    @staticmethod
    def forward(ctx, ssim_weight: float, *images):
        renders, targets = images[:len(images) // 2], images[len(images) // 2:]
        B, _, H, W = renders[0].shape
        bounds = [0]
        for r in renders:
            bounds.append(bounds[-1] + r.shape[1])
        C = bounds[-1]
        stack = renders[0].new_empty((B, 5 * C, H, W))
        a, b = stack[:, :C], stack[:, C:2 * C]
        for r, t, lo, hi in zip(renders, targets, bounds, bounds[1:]):
            a[:, lo:hi].copy_(r)
            b[:, lo:hi].copy_(t)
        torch.mul(a, a, out=stack[:, 2 * C:3 * C])
        torch.mul(b, b, out=stack[:, 3 * C:4 * C])
        torch.mul(a, b, out=stack[:, 4 * C:])
        mu_a, mu_b, A1, A2, B1, B2 = _ssim_terms(a, b, stack=stack)
        S = (A1 * A2) / (B1 * B2)
        diff = a - b
        l1 = diff.abs()
        losses = torch.stack([(1.0 - ssim_weight) * l1[:, lo:hi].mean() + ssim_weight * (1.0 - S[:, lo:hi].mean())
                              for lo, hi in zip(bounds, bounds[1:])])
        ctx.save_for_backward(a, b, diff, mu_a, mu_b, A1, A2, B1, B2, S)
        ctx.ssim_weight, ctx.bounds = ssim_weight, bounds
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        a, b, diff, mu_a, mu_b, A1, A2, B1, B2, S = ctx.saved_tensors
        s, bounds = ctx.ssim_weight, ctx.bounds
        B, C, H, W = a.shape
        # dloss/dS and dloss/d|a - b| of each channel: its pair's g / n, n = B C_g H W.
        per_channel = torch.cat([(grad_losses[i] / (B * (hi - lo) * H * W)).expand(hi - lo)
                                 for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]).view(1, C, 1, 1)
        g_ssim = per_channel * -s
        t = (B1 * B2).reciprocal_().mul_(g_ssim * 2)  # 2 dloss/dS / (B1 B2)
        partials = a.new_empty((B, 3 * C, H, W))  # P_mu, P_aa, P_ab times dloss/dS
        p_mu = torch.mul(mu_b, A2 - A1, out=partials[:, :C])
        p_mu.sub_(mu_a * S * (B2 - B1)).mul_(t)
        torch.div(S, B2, out=partials[:, C:2 * C]).mul_(-g_ssim)
        torch.mul(t, A1, out=partials[:, 2 * C:])
        blur_mu, blur_aa, blur_ab = _blur(partials).reshape(B, 3, C, H, W).unbind(1)
        grad = torch.addcmul(blur_mu, a, blur_aa, value=2).addcmul_(b, blur_ab)
        grad.addcmul_(torch.sign(diff), per_channel * (1.0 - s))
        return (None, *[grad[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])], *[None] * (len(bounds) - 1))


def _check(name: str, render: torch.Tensor, target: torch.Tensor) -> None:
    if render.dim() != 4 or render.shape != target.shape:
        raise ValueError(f"{name}: render and target must be [B, C, H, W] of one shape, got "
                         f"{tuple(render.shape)} and {tuple(target.shape)}")


def ssim(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images [B, C, H, W] (scalar). Triton twin: `tritonsplat.ops.ssim.ssim`."""
    _check("ssim", render, target)
    return ssim_map(render, target).mean()


def l1_dssim_loss(render: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """(1 - s) mean |render - target| + s (1 - SSIM(render, target)), images [B, C, H, W] (scalar).

    Triton twin: `tritonsplat.ops.ssim.l1_dssim_loss`. With a target that requires grad (or s = 0):
    through autograd; else `_L1DSSIM`'s written-out gradient (the render's only).
    """
    _check("l1_dssim_loss", render, target)
    if ssim_weight and not target.requires_grad:
        return _L1DSSIM.apply(float(ssim_weight), render, target)[0]
    loss = (1.0 - ssim_weight) * (render - target).abs().mean()
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim_map(render, target).mean())
    return loss


def l1_dssim_losses(pairs: list[tuple[torch.Tensor, torch.Tensor]], ssim_weight: float) -> list[torch.Tensor]:
    """`l1_dssim_loss` of each (render, target) pair, images [B, C_g, H, W] of one B, H and W, computed
    together (one blur for all pairs; no Triton twin: the fused kernel takes one pair per launch)."""
    for render, target in pairs:
        _check("l1_dssim_losses", render, target)
    if (not ssim_weight or any(t.requires_grad for _, t in pairs) or len({(r.shape[0], *r.shape[2:]) for r, _ in pairs})
            != 1):
        return [l1_dssim_loss(render, target, ssim_weight) for render, target in pairs]
    return list(_L1DSSIM.apply(float(ssim_weight), *[r for r, _ in pairs], *[t for _, t in pairs]).unbind(0))
