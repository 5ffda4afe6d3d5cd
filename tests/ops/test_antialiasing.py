"""The 2D Mip filter's opacity factor: Triton (interpreter) vs its torch twin on the same float32 inputs.

The twin itself is checked against the determinant ratio in float64 (tests/test_rasterize.py,
test_antialiased_factor_is_the_determinant_ratio) and by gradcheck end to end.
s = det Sigma2D / det(Sigma2D + eps2d I) is formed as 1 - eps2d (a + c) + eps2d^2 (a c - b^2) from terms of
order 1, so in float32 it carries an absolute error of a few 2^-24: relative 1e-7 / s, large for splats much
thinner than the dilation (s down to 1e-9 here). Both backends share that; the tolerances separate it out.

Tolerances:
| quantity | rows | tolerance | why |
|---|---|---|---|
| opacities, kernel vs twin (float32) | all | abs 1e-6, rel 1e-5 | the same polynomial and sqrt in another order |
| gradients, kernel vs twin (float32) | s >= 1e-3 | abs 1e-5, rel 1e-4 | rounding of s amplified by <= 1e-4 |
| gradients, kernel vs float64 twin | s < 1e-3 | 8 2^-24 / s of the largest, + 1e-6 | the cancellation in s |
"""

from __future__ import annotations

import pytest
import torch

from tritonsplat.ops import antialiasing as kernel
from tritonsplat.reference import antialiasing as twin

pytestmark = pytest.mark.interpreter


def make_inputs(n_cameras: int, n: int, eps2d: float, seed: int = 0):
    """Conics of random covariances dilated by eps2d, some far thinner than it, one culled (conic 0) and one whose
    factor rounds below 0 (clamped); opacities in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n_cameras, n, 2, 2, generator=g, dtype=torch.float64)
    scale = torch.logspace(-3, 1, n, dtype=torch.float64)[None, :, None, None]
    covariances = factors @ factors.transpose(-1, -2) * scale + eps2d * torch.eye(2, dtype=torch.float64)
    inverse = torch.linalg.inv(covariances)
    conics = torch.stack([inverse[..., 0, 0], inverse[..., 0, 1], inverse[..., 1, 1]], -1)
    conics[0, 0] = 0.0                                                    # culled
    conics[-1, 1] = torch.tensor([1.0 / eps2d + 1.0, 0.0, 0.5 / eps2d])   # det(Sigma2D) < 0, as rounding can give
    opacities = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return opacities.float(), conics.float().contiguous()


@pytest.mark.parametrize("n_cameras,n,eps2d", [
    pytest.param(1, 300, 0.3, id="C1-N300"),       # N not a multiple of the 256-row block
    pytest.param(3, 97, 2.0, id="C3-N97-eps2"),    # camera rows cross block boundaries
])
def test_matches_torch_twin(n_cameras, n, eps2d):
    opacities, conics = make_inputs(n_cameras, n, eps2d, seed=n)
    upstream = torch.randn(n_cameras, n, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, module, dtype in (("kernel", kernel, torch.float32), ("twin", twin, torch.float32),
                                ("float64", twin, torch.float64)):
        o, q = (t.detach().to(dtype, copy=True).requires_grad_() for t in (opacities, conics))
        out = module.antialiased_opacities(o, q, eps2d)
        (out * upstream.to(dtype)).sum().backward()
        results[name] = dict(opacities=out.detach(), grad_opacities=o.grad, grad_conics=q.grad)
    ours, expected, exact = results["kernel"], results["twin"], results["float64"]
    assert expected["opacities"][0, 0] == opacities[0]                  # culled: factor 1
    assert expected["opacities"][-1, 1] == 0.0 and expected["grad_conics"][-1, 1].abs().max() == 0.0
    torch.testing.assert_close(ours["opacities"], expected["opacities"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours["grad_opacities"], expected["grad_opacities"], atol=1e-5, rtol=1e-4)
    a, b, c = conics.double().unbind(-1)
    squared = 1.0 - eps2d * (a + c) + eps2d * eps2d * (a * c - b * b)
    conditioned = squared >= 1e-3
    thin = ~conditioned & (squared > 0)
    assert conditioned.sum() >= 20 and thin.sum() >= 20   # both regimes are exercised
    torch.testing.assert_close(ours["grad_conics"][conditioned], expected["grad_conics"][conditioned], atol=1e-5,
                               rtol=1e-4)
    error = (ours["grad_conics"][thin].double() - exact["grad_conics"][thin]).abs().amax(-1)
    bound = 8 * 2.0 ** -24 / squared[thin] * exact["grad_conics"][thin].abs().amax(-1) + 1e-6
    assert (error <= bound).all(), (error / bound).max()


def test_bad_shapes_and_dtypes_are_clear_errors():
    opacities, conics = make_inputs(2, 5, 0.3)
    with pytest.raises(ValueError, match=r"expected \[C, N, 3\] and \[N\], got \(2, 5, 3\) and \(4,\)"):
        kernel.antialiased_opacities(opacities[:4], conics, 0.3)
    with pytest.raises(ValueError, match="expected float32, got torch.float64"):
        kernel.antialiased_opacities(opacities.double(), conics.double(), 0.3)


def test_no_gaussians():
    out = kernel.antialiased_opacities(torch.zeros(0), torch.zeros(2, 0, 3), 0.3)
    assert out.shape == (2, 0)
