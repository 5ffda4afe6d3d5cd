"""Fused SSIM / L1 + D-SSIM: Triton (interpreter) vs its torch twin, the twin vs a float64 brute force.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| twin vs brute force (float64) | abs 1e-12 | separable vs direct 2D window: same sums in another order |
| twin gradcheck (float64) | torch defaults (eps 1e-6, atol 1e-5) | finite differences of a smooth map |
| Triton vs twin, loss and SSIM (float32) | abs 2e-6 | 121-tap direct window vs two 11-tap passes in float32 |
| Triton vs twin, gradient (float32) | abs 1e-7 + rel 1e-4 of the largest entry | same, through the blurred partials |
"""

from __future__ import annotations

import pytest
import torch

from tritonsplat.reference import ssim as ref

pytestmark = pytest.mark.interpreter

CASES = [
    pytest.param((1, 1, 9, 13), 0.2, id="1x1x9x13-s0.2"),
    pytest.param((1, 2, 19, 5), 1.0, id="1x2x19x5-ssim-only"),
]


def brute_force_ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct 2D-window SSIM in float64 with explicit zero padding, loop over the 121 taps."""
    a, b = a.double(), b.double()
    B, C, H, W = a.shape
    g = ref.gaussian_window_1d(ref.SSIM_WINDOW, ref.SSIM_SIGMA, torch.float64, "cpu")
    half = ref.SSIM_WINDOW // 2
    pa = torch.nn.functional.pad(a, (half, half, half, half))
    pb = torch.nn.functional.pad(b, (half, half, half, half))
    stats = [torch.zeros_like(a) for _ in range(5)]
    for dy in range(ref.SSIM_WINDOW):
        for dx in range(ref.SSIM_WINDOW):
            w = g[dy] * g[dx]
            va, vb = pa[..., dy:dy + H, dx:dx + W], pb[..., dy:dy + H, dx:dx + W]
            for s, v in zip(stats, (va, vb, va * va, vb * vb, va * vb)):
                s += w * v
    mu_a, mu_b, e_aa, e_bb, e_ab = stats
    num = (2 * mu_a * mu_b + ref.SSIM_C1) * (2 * (e_ab - mu_a * mu_b) + ref.SSIM_C2)
    den = (mu_a**2 + mu_b**2 + ref.SSIM_C1) * (e_aa - mu_a**2 + e_bb - mu_b**2 + ref.SSIM_C2)
    return num / den


def _images(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=gen)
    b = (a + 0.3 * torch.randn(shape, generator=gen)).clamp(0, 1)  # correlated, like a render and its target
    return a, b


def test_twin_matches_brute_force_and_gradcheck():
    a, b = _images((2, 3, 12, 14))
    torch.testing.assert_close(ref.ssim_map(a.double(), b.double()), brute_force_ssim_map(a, b), atol=1e-12, rtol=0)
    x = a[:1, :1, :6, :7].double().requires_grad_(True)
    y = b[:1, :1, :6, :7].double()
    assert torch.autograd.gradcheck(lambda v: ref.l1_dssim_loss(v, y, 0.2), (x,))


@pytest.mark.parametrize("shape,weight", CASES)
def test_triton_matches_twin(shape, weight):
    from tritonsplat.ops import ssim as ops

    a, b = _images(shape, seed=1)
    x_t = a.clone().requires_grad_(True)
    x_r = a.clone().requires_grad_(True)
    loss_t = ops.l1_dssim_loss(x_t, b, weight)
    loss_r = ref.l1_dssim_loss(x_r, b, weight)
    torch.testing.assert_close(loss_t, loss_r, atol=2e-6, rtol=0)
    (loss_t * 1.7).backward()  # a non-unit upstream gradient, read by the kernel on the device
    (loss_r * 1.7).backward()
    err = (x_t.grad - x_r.grad).abs()
    scale = x_r.grad.abs().max()
    assert float(err.max()) <= 1e-7 + 1e-4 * float(scale), (
        f"max abs err {float(err.max()):.3e} at {tuple(int(i) for i in torch.nonzero(err == err.max())[0])}, "
        f"largest gradient {float(scale):.3e}")
    with torch.no_grad():
        torch.testing.assert_close(ops.ssim(a, b), ref.ssim(a, b), atol=2e-6, rtol=0)


def test_bad_input_is_named():
    from tritonsplat.ops import ssim as ops

    a = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="one shape"):
        ops.l1_dssim_loss(a, torch.rand(1, 1, 4, 5), 0.2)
    with pytest.raises(ValueError, match="float32"):
        ops.l1_dssim_loss(a.double(), a.double(), 0.2)
    with pytest.raises(ValueError, match="one shape"):
        ref.l1_dssim_loss(a[0], a[0], 0.2)
