"""Mip-Splatting's 2D Mip filter as an opacity factor, in pure PyTorch: the twin of
`tritonsplat/ops/antialiasing.py`.

3DGS dilates every projected covariance by eps2d I (the low-pass of EWA splatting), which makes a splat
much smaller than a pixel wider and, at the same opacity, brighter. Mip-Splatting (Yu et al., CVPR 2024,
Sec. 5.2) scales the opacity by sqrt(det Sigma2D / det(Sigma2D + eps2d I)) so that the dilated splat keeps
the integral of the undilated one; gsplat calls this rasterize_mode="antialiased".
"""

from __future__ import annotations

import torch


def antialiased_opacities(opacities: torch.Tensor,  # [N]
                          conics: torch.Tensor,     # [C, N, 3]
                          eps2d: float) -> torch.Tensor:
    """Opacities [N] -> [C, N] scaled by the 2D Mip filter's factor sqrt(det Sigma2D / det(Sigma2D + eps2d I)).

    `conics` [C, N, 3] are (a, b, c) of (Sigma2D + eps2d I)^-1, the projection's output. Since
    det(M - e I) = det M - e tr M + e^2 for a 2x2 M, with M = Sigma2D + eps2d I the factor squared is
    1 - eps2d (a + c) + eps2d^2 (a c - b^2): a polynomial in the conic, no inversion. It lies in [0, 1]
    (Sigma2D is positive semi-definite) and is clamped at 0 against rounding; it is near 0 for a splat much
    thinner than the dilation. Culled Gaussians (conic 0) keep factor 1. Its terms are of order 1, so in float32
    s carries an absolute error of a few 2^-24: the factor of a splat with s << 1e-3 and, through 1 / sqrt(s),
    its gradient are accurate only to ~1e-7 / s relative (tests/ops/test_antialiasing.py bounds it).
    Differentiable (autograd through the conic, then the projection's backward).
    """
    a, b, c = conics.unbind(-1)
    squared = 1.0 - eps2d * (a + c) + (eps2d * eps2d) * (a * c - b * b)
    positive = squared > 0
    factor = torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)
    return opacities[None] * factor
