"""The torch SSIM (`tritonsplat.reference.ssim`): its depthwise separable blur against the batch of
one-channel convolutions it replaced.

Tolerances: the two float32 formulations sum the same 11 products per pass in different orders (oneDNN's
depthwise kernel vs the one-channel kernel), so both are compared with the float64 result: the new one must be
as accurate as the old (map: max error <= old's + 1.2e-7, one float32 ulp at 1; gradient: relative RMS error
<= 1.1 x old's; measured: equal maps, gradients 2.29e-7 vs 2.29e-7 at 160 x 90). gradcheck in float64.
The written-out L1 + D-SSIM gradient against autograd's: the loss is the same expression (exact); gradients
abs 1e-5 x the largest entry in float32 (measured 4e-7), 1e-12 in float64 (the same sums, reordered).
Several pairs in one call against one call per pair: rel 1e-6 (float32; measured equal: SSIM is per channel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tritonsplat.reference.ssim import SSIM_C1, SSIM_C2, gaussian_window_1d, l1_dssim_loss, l1_dssim_losses, ssim_map


def _one_channel_ssim_map(a, b, window=11, sigma=1.5):
    """The former formulation: the 5C planes as a batch of one-channel images."""
    B, C, H, W = a.shape
    g = gaussian_window_1d(window, sigma, a.dtype, str(a.device))
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1).reshape(B * 5 * C, 1, H, W)
    blurred = F.conv2d(stack, g.view(1, 1, 1, -1), padding=(0, window // 2))
    blurred = F.conv2d(blurred, g.view(1, 1, -1, 1), padding=(window // 2, 0))
    mu_a, mu_b, e_aa, e_bb, e_ab = blurred.reshape(B, 5, C, H, W).unbind(1)
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * (e_ab - mu_a * mu_b) + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (e_aa - mu_a * mu_a + e_bb - mu_b * mu_b + SSIM_C2)
    return num / den


@pytest.mark.parametrize("shape", [pytest.param((1, 3, 90, 160), id="1x3x90x160"),
                                   pytest.param((2, 3, 13, 29), id="2x3x13x29"),
                                   pytest.param((1, 1, 7, 5), id="1x1x7x5-smaller-than-window")])
def test_depthwise_blur_is_as_accurate_as_the_one_channel_batch(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a, b, weights = (torch.rand(shape, generator=g) for _ in range(3))

    def map_and_grad(function, dtype):
        x = a.to(dtype).requires_grad_()
        values = function(x, b.to(dtype))
        (grad,) = torch.autograd.grad((values * weights.to(dtype)).sum(), x)
        return values.detach().double(), grad.double()

    exact_map, exact_grad = map_and_grad(ssim_map, torch.float64)
    errors = {}
    for name, function in (("depthwise", ssim_map), ("one-channel", _one_channel_ssim_map)):
        values, grad = map_and_grad(function, torch.float32)
        errors[name] = (float((values - exact_map).abs().max()),
                        float((grad - exact_grad).norm() / exact_grad.norm()))
    new, old = errors["depthwise"], errors["one-channel"]
    assert new[0] <= old[0] + 1.2e-7, errors
    assert new[1] <= 1.1 * old[1], errors


def test_ssim_map_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 9, 12, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.rand(1, 2, 9, 12, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ssim_map(x, b), (a,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight", [0.2, 1.0])
def test_written_out_l1_dssim_gradient_matches_autograd(dtype, weight):
    """`l1_dssim_loss` (`_L1DSSIM`, its gradient a blur of the SSIM partials) against the autograd
    expression, on a channels-last render (as tracking passes the rasterizer's [B, H, W, C] colours)."""
    g = torch.Generator().manual_seed(7)
    a = torch.rand(2, 3, 17, 23, generator=g, dtype=dtype)
    b = (a + 0.3 * torch.randn(a.shape, generator=g, dtype=dtype)).clamp(0, 1)
    x = a.permute(0, 2, 3, 1).contiguous().requires_grad_()
    written = l1_dssim_loss(x.permute(0, 3, 1, 2), b, weight)
    y = a.clone().requires_grad_()
    reference = (1 - weight) * (y - b).abs().mean() + weight * (1 - ssim_map(y, b).mean())
    (g_written,), (g_reference,) = torch.autograd.grad(written, x), torch.autograd.grad(reference, y)
    torch.testing.assert_close(written, reference, rtol=1e-15 if dtype == torch.float64 else 1e-6, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g_written.permute(0, 3, 1, 2), g_reference, rtol=0,
                               atol=tol * float(g_reference.abs().max()))


def test_written_out_l1_dssim_gradcheck():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(2, 2, 7, 9, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.rand(2, 2, 7, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: l1_dssim_loss(v, b, 0.3), (a,))
    b.requires_grad_()   # a target that needs a gradient: the autograd expression, both gradients
    assert torch.autograd.gradcheck(lambda v, w: l1_dssim_loss(v, w, 0.3), (a, b))


@pytest.mark.parametrize("batch", [1, 2])
def test_pairs_together_match_one_call_per_pair(batch):
    """`l1_dssim_losses` (a step's colour and segmentation losses, blurred together) against
    `l1_dssim_loss` per pair: values and the gradient in the [B, H, W, 6] render both come from."""
    g = torch.Generator().manual_seed(batch)
    colors = torch.rand(batch, 21, 26, 6, generator=g).requires_grad_()
    targets = torch.rand(batch, 3, 21, 26, generator=g), torch.rand(batch, 3, 21, 26, generator=g)
    pairs = [(colors[..., :3].permute(0, 3, 1, 2), targets[0]), (colors[..., 3:].permute(0, 3, 1, 2), targets[1])]
    together = l1_dssim_losses(pairs, 0.2)
    apart = [l1_dssim_loss(render, target, 0.2) for render, target in pairs]
    (g_together,) = torch.autograd.grad(together[0] + 3 * together[1], colors)
    (g_apart,) = torch.autograd.grad(apart[0] + 3 * apart[1], colors)
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_together, g_apart, rtol=0, atol=1e-6 * float(g_apart.abs().max()))
