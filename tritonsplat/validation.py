"""Argument checks for the public API, raised once at the boundary.

Every error is a `ValueError` that names the argument, what was expected and what was received.
Value checks (NaN/Inf, ranges) are batched into one device synchronisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import constants

_ACCEPTED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


def require_tensor(name: str, value, expected: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {expected}, got {type(value).__name__}")
    if value.dtype not in _ACCEPTED_FLOATS:
        raise ValueError(f"{name}: expected a floating tensor {expected} (float16, bfloat16, float32 "
                         f"or float64), got {_describe(value)}")
    return value


def require_shape(name: str, tensor: torch.Tensor, shape: tuple, expected: str) -> None:
    """`shape` holds ints or None (any size)."""
    ok = tensor.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {_describe(tensor)}")


def require_positive_int(name: str, value, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected at most {upper}, got {value}")
    return value


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_values(checks: list[tuple[str, torch.Tensor, str]]) -> None:
    """Evaluate boolean checks with one synchronisation and report the first failing one.

    Args:
        checks: (argument name, 0-d bool tensor that must be True, message) triples.
    """
    if not checks:
        return
    flags = torch.stack([flag.reshape(()) for _, flag, _ in checks]).cpu()
    for (name, _, message), ok in zip(checks, flags.tolist()):
        if not ok:
            raise ValueError(f"{name}: {message}")


def finite_check(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, str]:
    return (name, torch.isfinite(tensor).all() if tensor.numel() else torch.tensor(True),
            "expected only finite values, found NaN or Inf")


@dataclass(frozen=True)
class RasterizeInputs:
    """Validated, dtype-normalised inputs of `rasterize()`.

    colors is [C, N, D] (per-camera view, possibly expanded with stride 0) or, with SH,
    the coefficients [N, K, 3].
    """

    means: torch.Tensor        # [N, 3]
    quats: torch.Tensor        # [N, 4]
    scales: torch.Tensor       # [N, 3]
    opacities: torch.Tensor    # [N]
    colors: torch.Tensor       # [C, N, D] or SH [N, K, 3]
    viewmats: torch.Tensor     # [C, 4, 4]
    Ks: torch.Tensor           # [C, 3, 3]
    backgrounds: torch.Tensor | None  # [C, D]
    n_cameras: int
    n_gaussians: int
    n_channels: int
    sh_degree: int | None


def validate_rasterize_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                              sh_degree, near, far, backgrounds, alpha_cap, eps2d, tile_size,
                              densify_channels) -> RasterizeInputs:
    """Check every argument of `rasterize()` and return them as one compute dtype on one device."""
    means = require_tensor("means", means, "[N, 3]")
    require_shape("means", means, (None, 3), "[N, 3]")
    n = means.shape[0]
    quats = require_tensor("quats", quats, f"[N={n}, 4]")
    require_shape("quats", quats, (n, 4), f"[N={n}, 4] (w, x, y, z)")
    scales = require_tensor("scales", scales, f"[N={n}, 3]")
    require_shape("scales", scales, (n, 3), f"[N={n}, 3]")
    opacities = require_tensor("opacities", opacities, f"[N={n}]")
    require_shape("opacities", opacities, (n,), f"[N={n}]")
    viewmats = require_tensor("viewmats", viewmats, "[C, 4, 4]")
    require_shape("viewmats", viewmats, (None, 4, 4), "[C, 4, 4] world-to-camera matrices")
    c = viewmats.shape[0]
    if c == 0:
        raise ValueError("viewmats: expected at least one camera, got shape (0, 4, 4)")
    Ks = require_tensor("Ks", Ks, f"[C={c}, 3, 3]")
    require_shape("Ks", Ks, (c, 3, 3), f"[C={c}, 3, 3] (one per camera in viewmats)")
    width = require_positive_int("width", width, upper=1 << 15)
    height = require_positive_int("height", height, upper=1 << 15)
    colors = require_tensor("colors", colors, "[N, D], [C, N, D] or SH [N, K, 3]")

    if sh_degree is not None:
        if isinstance(sh_degree, bool) or not isinstance(sh_degree, int) or not (
                0 <= sh_degree <= constants.MAX_SH_DEGREE):
            raise ValueError(f"sh_degree: expected None or an int in 0..{constants.MAX_SH_DEGREE}, "
                             f"got {sh_degree!r}")
        n_coeffs = (sh_degree + 1) ** 2
        if not (colors.dim() == 3 and colors.shape[0] == n and colors.shape[2] == 3
                and colors.shape[1] >= n_coeffs):
            raise ValueError(f"colors: with sh_degree={sh_degree} expected SH coefficients "
                             f"[N={n}, K>={n_coeffs}, 3], got {_describe(colors)}")
        n_channels = 3
    else:
        if colors.dim() == 2 and colors.shape[0] == n and colors.shape[1] >= 1:
            n_channels = colors.shape[1]
        elif colors.dim() == 3 and colors.shape[0] == c and colors.shape[1] == n and colors.shape[2] >= 1:
            n_channels = colors.shape[2]
        else:
            raise ValueError(f"colors: expected [N={n}, D] or [C={c}, N={n}, D] with D >= 1 (or SH "
                             f"coefficients [N, K, 3] with sh_degree set), got {_describe(colors)}")

    if backgrounds is not None:
        backgrounds = require_tensor("backgrounds", backgrounds, f"[C={c}, D={n_channels}]")
        require_shape("backgrounds", backgrounds, (c, n_channels), f"[C={c}, D={n_channels}]")

    for name, value in (("near", near), ("far", far), ("alpha_cap", alpha_cap), ("eps2d", eps2d)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
    if not (0 < near < far):
        raise ValueError(f"near, far: expected 0 < near < far, got near={near}, far={far}")
    if not (0 < alpha_cap < 1):
        raise ValueError(f"alpha_cap: expected a value in (0, 1), got {alpha_cap}")
    if not (eps2d >= 0):
        raise ValueError(f"eps2d: expected a value >= 0, got {eps2d}")
    require_positive_int("tile_size", tile_size, upper=256)
    if densify_channels is not None:
        if isinstance(densify_channels, bool) or not isinstance(densify_channels, int) or not (
                1 <= densify_channels <= n_channels):
            raise ValueError(f"densify_channels: expected None or an int in 1..D={n_channels}, "
                             f"got {densify_channels!r}")

    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
               "colors": colors, "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    device = means.device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of means), got "
                             f"{tensor.device}")

    dtype = compute_dtype(*tensors.values())
    tensors = {name: t if t.dtype == dtype else t.to(dtype) for name, t in tensors.items()}

    checks = [finite_check(name, t) for name, t in tensors.items()]
    if n:
        checks += [
            ("opacities", ((tensors["opacities"] >= 0) & (tensors["opacities"] <= 1)).all(),
             "expected values in [0, 1] (activated opacities, e.g. sigmoid of logits)"),
            ("scales", (tensors["scales"] >= 0).all(),
             "expected non-negative activated standard deviations (e.g. exp of log-scales); "
             "found negative values"),
            ("quats", (tensors["quats"].square().sum(-1) > 0).all(),
             "expected non-zero quaternions (they are normalised inside), found a zero quaternion"),
        ]
    checks += [
        ("Ks", ((tensors["Ks"][:, 0, 0] > 0) & (tensors["Ks"][:, 1, 1] > 0)).all(),
         "expected positive focal lengths fx = K[0, 0] and fy = K[1, 1]"),
    ]
    check_values(checks)

    colors = tensors["colors"]
    if sh_degree is None and colors.dim() == 2:
        colors = colors.unsqueeze(0).expand(c, n, n_channels)
    return RasterizeInputs(
        means=tensors["means"], quats=tensors["quats"], scales=tensors["scales"],
        opacities=tensors["opacities"], colors=colors, viewmats=tensors["viewmats"], Ks=tensors["Ks"],
        backgrounds=tensors.get("backgrounds"), n_cameras=c, n_gaussians=n, n_channels=n_channels,
        sh_degree=sh_degree)


def contiguous_inputs(function):
    """Decorator for launchers: make every tensor argument contiguous (kernels assume it)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return function(*args, **kwargs)

    return wrapper
