"""Argument checks for the public API, raised once at the boundary.

Every error is a `ValueError` that names the argument, what was expected and what was received.
Shape, dtype, device and option checks read no device data. Value checks (NaN/Inf, ranges) are
device reductions: with the torch backend they come back in one transfer here; with the Triton
backend they stay on the device (`PendingChecks`) and come back in the same transfer as the
intersection count, raising the same errors (a ~2 MB-per-100k-Gaussians read, no extra sync).
"""

from __future__ import annotations

import functools

import torch

from . import constants
from .types import ALL_OUTPUTS, MAX_INTERSECTIONS, RasterizeInputs, RenderOptions

__all__ = ["RasterizeInputs", "validate_rasterize_inputs", "validate_render_options", "value_checks",
           "check_values", "raise_failed_checks", "resolve_pending_checks"]

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


def validate_rasterize_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                              sh_degree, near, far, backgrounds, alpha_cap, eps2d, tile_size,
                              densify_channels, check_values_now: bool = True) -> RasterizeInputs:
    """Check every argument of `rasterize()` and return them as one compute dtype on one device.

    check_values_now=False skips the value checks (NaN/Inf, ranges: they need device data); the
    caller then runs `value_checks` itself, on the host now or pending on the device.
    """
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

    colors = tensors["colors"]
    if sh_degree is None and colors.dim() == 2:
        colors = colors.unsqueeze(0).expand(c, n, n_channels)
    inputs = RasterizeInputs(
        means=tensors["means"], quats=tensors["quats"], scales=tensors["scales"],
        opacities=tensors["opacities"], colors=colors, viewmats=tensors["viewmats"], Ks=tensors["Ks"],
        backgrounds=tensors.get("backgrounds"), n_cameras=c, n_gaussians=n, n_channels=n_channels,
        sh_degree=sh_degree)
    if check_values_now:
        check_values(value_checks(inputs))
    return inputs


# The value checks, in the order their errors are reported: (argument, message).
FINITE_MESSAGE = "expected only finite values, found NaN or Inf"
CHECKED_TENSORS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "backgrounds")
RANGE_CHECKS = (
    ("opacities", "expected values in [0, 1] (activated opacities, e.g. sigmoid of logits)"),
    ("scales", "expected non-negative activated standard deviations (e.g. exp of log-scales); "
               "found negative values"),
    ("quats", "expected non-zero quaternions (they are normalised inside), found a zero quaternion"),
    ("Ks", "expected positive focal lengths fx = K[0, 0] and fy = K[1, 1]"),
)
VALUE_CHECK_MESSAGES: tuple[tuple[str, str], ...] = (
    tuple((name, FINITE_MESSAGE) for name in CHECKED_TENSORS) + RANGE_CHECKS)


def checked_colors(inputs: RasterizeInputs) -> torch.Tensor:
    """The colours as given ([N, D] when `inputs.colors` is their per-camera expansion)."""
    colors = inputs.colors
    if inputs.sh_degree is None and colors.dim() == 3 and colors.shape[0] > 1 and colors.stride(0) == 0:
        return colors[0]
    return colors


def value_checks(inputs: RasterizeInputs) -> list[tuple[str, torch.Tensor, str]]:
    """The value checks of `inputs` as torch reductions: (argument, 0-d bool that must be True,
    message), in the order of VALUE_CHECK_MESSAGES (absent backgrounds skipped)."""
    tensors = {"means": inputs.means, "quats": inputs.quats, "scales": inputs.scales,
               "opacities": inputs.opacities, "colors": checked_colors(inputs), "viewmats": inputs.viewmats,
               "Ks": inputs.Ks}
    if inputs.backgrounds is not None:
        tensors["backgrounds"] = inputs.backgrounds
    n = inputs.n_gaussians
    checks = [finite_check(name, t) for name, t in tensors.items()]
    opacities, scales, quats, Ks = tensors["opacities"], tensors["scales"], tensors["quats"], tensors["Ks"]
    flags = {"Ks": (Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)}
    if n:
        flags.update({"opacities": (opacities >= 0) & (opacities <= 1), "scales": scales >= 0,
                      "quats": quats.square().sum(-1) > 0})
    checks += [(name, flags[name].all(), message) for name, message in RANGE_CHECKS if name in flags]
    return checks


def raise_failed_checks(messages, flags) -> None:
    """Raise the ValueError of the first failed flag (host values, nonzero = failed), if any."""
    for (name, message), failed in zip(messages, flags):
        if failed:
            raise ValueError(f"{name}: {message}")


def resolve_pending_checks(inputs: RasterizeInputs) -> RasterizeInputs:
    """Read and raise `inputs.pending_checks` now (one transfer); inputs without them."""
    if inputs.pending_checks is None:
        return inputs
    from dataclasses import replace

    raise_failed_checks(inputs.pending_checks.messages, inputs.pending_checks.flags.tolist())
    return replace(inputs, pending_checks=None)


def validate_render_options(*, outputs, absgrad, densify_channels, color_grad_channels, deterministic,
                            max_intersections, n_channels: int) -> RenderOptions:
    """Check the non-tensor options of `rasterize()` and return them as a RenderOptions."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)) or not outputs or any(
            name not in ALL_OUTPUTS for name in outputs) or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: expected a non-empty tuple of distinct names from {ALL_OUTPUTS}, "
                         f"got {outputs!r}")
    if color_grad_channels is not None and (
            isinstance(color_grad_channels, bool) or not isinstance(color_grad_channels, int)
            or not 1 <= color_grad_channels <= n_channels):
        raise ValueError(f"color_grad_channels: expected None or an int in 1..D={n_channels}, "
                         f"got {color_grad_channels!r}")
    if max_intersections is not None and (
            isinstance(max_intersections, bool) or not isinstance(max_intersections, int)
            or not 1 <= max_intersections <= MAX_INTERSECTIONS):
        raise ValueError(f"max_intersections: expected None or an int in 1..{MAX_INTERSECTIONS} "
                         f"(the capacity of the intersection buffers), got {max_intersections!r}")
    ordered = tuple(name for name in ALL_OUTPUTS if name in outputs)
    return RenderOptions(outputs=ordered, absgrad=absgrad, densify_channels=densify_channels,
                         color_grad_channels=color_grad_channels, deterministic=deterministic,
                         max_intersections=max_intersections)


def contiguous_inputs(function):
    """Decorator for launchers: make every tensor argument contiguous (kernels assume it)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return function(*args, **kwargs)

    return wrapper
