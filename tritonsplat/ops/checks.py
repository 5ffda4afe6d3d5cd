"""Input value checks of `rasterize()` on the device (Triton), read later with the intersection count.

Torch twin: `tritonsplat.validation.value_checks` (same checks, same order, same messages; tests raise
the same ValueErrors through both). One launch checks every input: program p covers elements
[p * BLOCK, (p + 1) * BLOCK) of each flattened tensor (and the same range of Gaussian and camera
rows for the row-wise checks) and raises its flags with relaxed atomic maxima into a zeroed [k]
int32 buffer, so the checks cost two launches and no host read of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..types import PendingChecks, RasterizeInputs
from ..validation import VALUE_CHECK_MESSAGES, checked_colors
from . import _alloc
from ._launch import cdiv

BLOCK = 1024
N_FLAGS = len(VALUE_CHECK_MESSAGES)


@triton.jit
def _non_finite(ptr, index, count):
    value = tl.load(ptr + index, mask=index < count, other=0.0)
    bad = (value != value) | (tl.abs(value) == float("inf"))
    return tl.max(bad.to(tl.int32), axis=0)


@triton.jit
def _raise(flags_ptr, slot: tl.constexpr, bad):
    if bad > 0:
        tl.atomic_max(flags_ptr + slot, bad, sem="relaxed")


@triton.jit
def _value_checks_kernel(
    means_ptr,        # [N, 3] float
    quats_ptr,        # [N, 4] float
    scales_ptr,       # [N, 3] float
    opacities_ptr,    # [N] float
    colors_ptr,       # [n_colors] float, flattened
    viewmats_ptr,     # [C, 4, 4] float
    Ks_ptr,           # [C, 3, 3] float
    backgrounds_ptr,  # [C, D] float (HAS_BACKGROUNDS)
    flags_ptr,        # out [12] int32, zero-initialised; nonzero = check failed
    n_gaussians, n_colors, n_cameras, n_backgrounds,
    BLOCK: tl.constexpr, HAS_BACKGROUNDS: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)     # [BLOCK] int64
    _raise(flags_ptr, 0, _non_finite(means_ptr, index, n_gaussians * 3))
    _raise(flags_ptr, 1, _non_finite(quats_ptr, index, n_gaussians * 4))
    _raise(flags_ptr, 2, _non_finite(scales_ptr, index, n_gaussians * 3))
    _raise(flags_ptr, 3, _non_finite(opacities_ptr, index, n_gaussians))
    _raise(flags_ptr, 4, _non_finite(colors_ptr, index, n_colors))
    _raise(flags_ptr, 5, _non_finite(viewmats_ptr, index, n_cameras * 16))
    _raise(flags_ptr, 6, _non_finite(Ks_ptr, index, n_cameras * 9))
    if HAS_BACKGROUNDS:
        _raise(flags_ptr, 7, _non_finite(backgrounds_ptr, index, n_backgrounds))
    # Row-wise checks; written as "not (ok)" so that NaN fails them, as the torch twin's all() does.
    gaussian = index < n_gaussians
    opacity = tl.load(opacities_ptr + index, mask=gaussian, other=0.5)
    _raise(flags_ptr, 8, tl.max((gaussian & ~((opacity >= 0.0) & (opacity <= 1.0))).to(tl.int32), axis=0))
    scale_bad = index < 0
    for axis in tl.static_range(3):
        scale = tl.load(scales_ptr + index * 3 + axis, mask=gaussian, other=1.0)
        scale_bad = scale_bad | ~(scale >= 0.0)
    _raise(flags_ptr, 9, tl.max((gaussian & scale_bad).to(tl.int32), axis=0))
    qw = tl.load(quats_ptr + index * 4 + 0, mask=gaussian, other=1.0)
    qx = tl.load(quats_ptr + index * 4 + 1, mask=gaussian, other=1.0)
    qy = tl.load(quats_ptr + index * 4 + 2, mask=gaussian, other=1.0)
    qz = tl.load(quats_ptr + index * 4 + 3, mask=gaussian, other=1.0)
    norm = qw * qw + qx * qx + qy * qy + qz * qz      # in the input dtype, like the twin
    _raise(flags_ptr, 10, tl.max((gaussian & ~(norm > 0.0)).to(tl.int32), axis=0))
    camera = index < n_cameras
    fx = tl.load(Ks_ptr + index * 9 + 0, mask=camera, other=1.0)
    fy = tl.load(Ks_ptr + index * 9 + 4, mask=camera, other=1.0)
    _raise(flags_ptr, 11, tl.max((camera & ~((fx > 0.0) & (fy > 0.0))).to(tl.int32), axis=0))


def pending_value_checks(inputs: RasterizeInputs) -> PendingChecks:
    """Launch the value checks of `inputs`; the flags stay on the device (nothing is read here)."""
    colors = checked_colors(inputs).contiguous()
    tensors = [t.contiguous() for t in (inputs.means, inputs.quats, inputs.scales, inputs.opacities)]
    viewmats, Ks = inputs.viewmats.contiguous(), inputs.Ks.contiguous()
    backgrounds = inputs.backgrounds.contiguous() if inputs.backgrounds is not None else None
    flags = _alloc.zeros(N_FLAGS, dtype=torch.int32, device=inputs.means.device)
    n = inputs.n_gaussians
    largest = max(n * 4, colors.numel(), inputs.n_cameras * 16, backgrounds.numel() if backgrounds is not None else 0)
    _value_checks_kernel[(cdiv(largest, BLOCK),)](
        *tensors, colors, viewmats, Ks, backgrounds if backgrounds is not None else Ks, flags,
        n, colors.numel(), inputs.n_cameras, backgrounds.numel() if backgrounds is not None else 0,
        BLOCK=BLOCK, HAS_BACKGROUNDS=backgrounds is not None, num_warps=4)
    return PendingChecks(flags, VALUE_CHECK_MESSAGES)


def compiled_variants(exhaustive: bool = False) -> list[dict]:
    """The value-check kernel's configurations (collected by `tritonsplat.aot`)."""
    from ._launch import kernel_signature

    signature = kernel_signature(_value_checks_kernel, {"flags_ptr": "*i32"})
    return [dict(name=f"value_checks[backgrounds={has}]", kernel="_value_checks_kernel", signature=signature,
                 constexprs=dict(BLOCK=BLOCK, HAS_BACKGROUNDS=has), num_warps=4) for has in (False, True)]
