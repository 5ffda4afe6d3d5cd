"""Mip-Splatting's 2D Mip filter as an opacity factor in Triton, with a hand-written backward.

Twin: `tritonsplat/reference/antialiasing.py` (same names and signature; elementwise PyTorch with autograd).
Mip-Splatting (Yu et al., CVPR 2024, Sec. 5.2) scales each opacity by sqrt(det Sigma2D / det(Sigma2D + eps2d I))
so that the rasterizer's dilation eps2d I keeps a splat's integral. With M = Sigma2D + eps2d I and the
projection's conic (a, b, c) = M^-1, det(M - e I) / det M = 1 - e (a + c) + e^2 (a c - b^2) =: s, so

    o' = o sqrt(s)  (0 where s <= 0, against rounding)
    do'/do = sqrt(s),  do'/da = o (e^2 c - e) / (2 sqrt(s)),  do'/db = -o e^2 b / sqrt(s),
    do'/dc = o (e^2 a - e) / (2 sqrt(s))

Written as autograd over the conic, the factor cost 15 launches forward and 21 backward (counted on the
80-Gaussian, one-camera host-budget scene, 2026-12-06); here it is one kernel each way, plus a sum over the
cameras of the opacity gradient when C > 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _alloc
from ._launch import cdiv, launch_settings


@triton.jit
def _factor_squared(conics_ptr, rows, valid, eps2d):
    a = tl.load(conics_ptr + rows * 3, mask=valid, other=0.0)
    b = tl.load(conics_ptr + rows * 3 + 1, mask=valid, other=0.0)
    c = tl.load(conics_ptr + rows * 3 + 2, mask=valid, other=0.0)
    return a, b, c, 1.0 - eps2d * (a + c) + (eps2d * eps2d) * (a * c - b * b)


@triton.jit
def _antialiased_opacities_forward_kernel(
    conics_ptr,     # [C, N, 3] float32
    opacities_ptr,  # [N] float32
    out_ptr,        # [C, N] float32
    n_rows,         # C * N
    n_gaussians,    # N
    eps2d,          # px^2
    BLOCK: tl.constexpr,
):
    # int64 rows: 3 * C * N passes 2^31 at ~716M camera-Gaussian rows, and the cost here is one multiply.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_rows
    _, _, _, squared = _factor_squared(conics_ptr, rows, valid, eps2d)
    opacity = tl.load(opacities_ptr + rows % n_gaussians, mask=valid, other=0.0)
    factor = tl.where(squared > 0.0, tl.sqrt_rn(tl.maximum(squared, 0.0)), 0.0)
    tl.store(out_ptr + rows, opacity * factor, mask=valid)


@triton.jit
def _antialiased_opacities_backward_kernel(
    conics_ptr,             # [C, N, 3] float32
    opacities_ptr,          # [N] float32
    grad_out_ptr,           # [C, N] float32 upstream
    out_grad_conics_ptr,    # [C, N, 3] float32
    out_grad_opacity_ptr,   # [C, N] float32, per camera (summed over cameras by the launcher)
    n_rows,                 # C * N
    n_gaussians,            # N
    eps2d,                  # px^2
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n_rows
    a, b, c, squared = _factor_squared(conics_ptr, rows, valid, eps2d)
    opacity = tl.load(opacities_ptr + rows % n_gaussians, mask=valid, other=0.0)
    grad = tl.load(grad_out_ptr + rows, mask=valid, other=0.0)
    positive = squared > 0.0
    factor = tl.where(positive, tl.sqrt_rn(tl.maximum(squared, 0.0)), 0.0)
    # d sqrt(s) / ds = 1 / (2 sqrt(s)) where s > 0; nothing flows where the factor was clamped to 0.
    grad_squared = tl.where(positive, grad * opacity * 0.5 / tl.where(positive, factor, 1.0), 0.0)
    eps_squared = eps2d * eps2d
    tl.store(out_grad_conics_ptr + rows * 3, grad_squared * (eps_squared * c - eps2d), mask=valid)
    tl.store(out_grad_conics_ptr + rows * 3 + 1, grad_squared * (-2.0 * eps_squared * b), mask=valid)
    tl.store(out_grad_conics_ptr + rows * 3 + 2, grad_squared * (eps_squared * a - eps2d), mask=valid)
    tl.store(out_grad_opacity_ptr + rows, grad * factor, mask=valid)


class _AntialiasedOpacities(torch.autograd.Function):
    @staticmethod
    def forward(ctx, opacities, conics, eps2d: float):  # opacities [N], conics [C, N, 3] float32
        n_cameras, n = conics.shape[:2]
        out = _alloc.empty(n_cameras, n, dtype=torch.float32, device=conics.device)
        block = launch_settings("antialiasing")
        if out.numel():
            _antialiased_opacities_forward_kernel[(cdiv(out.numel(), block.block),)](
                conics, opacities, out, out.numel(), n, float(eps2d), BLOCK=block.block, num_warps=block.num_warps)
        ctx.save_for_backward(opacities, conics)
        ctx.eps2d = float(eps2d)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # grad_out [C, N]
        opacities, conics = ctx.saved_tensors
        n_cameras, n = conics.shape[:2]
        grad_out = grad_out.contiguous()
        grad_conics = _alloc.empty(n_cameras, n, 3, dtype=torch.float32, device=conics.device)
        grad_opacity_rows = _alloc.empty(n_cameras, n, dtype=torch.float32, device=conics.device)
        block = launch_settings("antialiasing")
        if grad_out.numel():
            _antialiased_opacities_backward_kernel[(cdiv(grad_out.numel(), block.block),)](
                conics, opacities, grad_out, grad_conics, grad_opacity_rows, grad_out.numel(), n, ctx.eps2d,
                BLOCK=block.block, num_warps=block.num_warps)
        grad_opacities = grad_opacity_rows[0] if n_cameras == 1 else grad_opacity_rows.sum(0)
        return grad_opacities, grad_conics, None


def antialiased_opacities(opacities: torch.Tensor,  # [N] float32
                          conics: torch.Tensor,     # [C, N, 3] float32
                          eps2d: float) -> torch.Tensor:
    """Opacities [N] -> [C, N] scaled by the 2D Mip filter's factor sqrt(det Sigma2D / det(Sigma2D + eps2d I)),
    differentiable in both inputs; as the twin `tritonsplat.reference.antialiasing.antialiased_opacities`
    (float32, contiguous, one device)."""
    if conics.dim() != 3 or conics.shape[-1] != 3 or tuple(opacities.shape) != (conics.shape[1],):
        raise ValueError(f"conics, opacities: expected [C, N, 3] and [N], got {tuple(conics.shape)} and "
                         f"{tuple(opacities.shape)}")
    if conics.dtype != torch.float32 or opacities.dtype != torch.float32:
        raise ValueError(f"conics, opacities: expected float32, got {conics.dtype} and {opacities.dtype}")
    return _AntialiasedOpacities.apply(opacities.contiguous(), conics.contiguous(), eps2d)


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The factor's two kernels (collected by `tritonsplat.aot`)."""
    from ._launch import kernel_signature

    block = launch_settings("antialiasing")
    return [dict(name=f"antialiased_opacities_{direction}", kernel=kernel.fn.__name__,
                 signature=kernel_signature(kernel, {"eps2d": "fp32"}), constexprs=dict(BLOCK=block.block),
                 num_warps=block.num_warps)
            for direction, kernel in (("forward", _antialiased_opacities_forward_kernel),
                                      ("backward", _antialiased_opacities_backward_kernel))]
