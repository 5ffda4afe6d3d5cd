"""Backend resolution: the `backend` argument, then the TRITONSPLAT_BACKEND environment variable,
then the device of the tensors.

- "torch": pure PyTorch, any device (the CPU path and the test oracle).
- "triton": Triton kernels on CUDA tensors; on CPU tensors only through Triton's interpreter, which
  must have been switched on with TRITON_INTERPRET=1 before tritonsplat was imported.
- "auto": "triton" for CUDA tensors when triton imports, else "torch".

`render(backend, inputs, settings, options, ...)` is the one seam between the public API
(`rasterize`, `tritonsplat.compat`) and the two pipelines, `ops.pipeline.render_triton` and
`reference.pipeline.render_torch` (same signature; imported on first use, so the torch backend
never imports triton).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from .settings import RenderSettings
from .types import RasterizeInputs, RasterizeOutput, RenderOptions
from .validation import resolve_pending_checks

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
ENV_VARIABLE = "TRITONSPLAT_BACKEND"
DEFAULT_OPTIONS = RenderOptions()

# Read once, at import, like triton itself does when kernels are decorated.
INTERPRETER_ACTIVE = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when the `triton` package is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or half-installed triton counts as absent
        return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` in this process."""
    device = torch.device(device)
    backends = ["torch"]
    if triton_importable() and (device.type == "cuda" or INTERPRETER_ACTIVE):
        backends.append("triton")
    return backends


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the concrete backend ("torch" or "triton") for tensors on `device`.

    Raises:
        ValueError: unknown name, or "triton" where it cannot run (with the reason).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VARIABLE, "").strip().lower()
        if override:
            if override not in BACKENDS:
                raise ValueError(
                    f"{ENV_VARIABLE}: expected one of {BACKENDS}, got {override!r}")
            backend = override
    if backend == "auto":
        use_triton = device.type == "cuda" and triton_importable()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton': the triton package is not installed "
                             "(pip install 'triton>=3.6,<3.10'), use backend='torch'")
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and INTERPRETER_ACTIVE:
            return "triton"
        if device.type == "cpu":
            raise ValueError(
                "backend='triton' with CPU tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before importing tritonsplat "
                "(slow, for tests), move the tensors to a CUDA device, or use backend='torch'")
        raise ValueError(f"backend='triton' does not support device {device}; use backend='torch'")
    return backend


def render(backend: str, inputs: RasterizeInputs, settings: RenderSettings, options: RenderOptions = DEFAULT_OPTIONS,
           *, clamp_limits: torch.Tensor | None = None, covars: torch.Tensor | None = None,
           means2d_hook=None) -> RasterizeOutput:
    """Render validated inputs with a concrete backend ("torch" or "triton", see `resolve_backend`).

    Args:
        inputs: validated inputs (`validation.validate_rasterize_inputs`); pending value checks are
            read by the Triton pipeline with its intersection count, and here for the torch backend.
        settings, options: per-call settings and render options.
        clamp_limits: [C, 4] Jacobian clamp limits, or None for `settings.standard_clamp_limits`.
        covars: [N, 6] covariances replacing quats/scales.  means2d_hook: re-routes the screen-space
            means between projection and compositing (tritonsplat.compat).
    """
    keywords = {"clamp_limits": clamp_limits, "covars": covars, "means2d_hook": means2d_hook}
    if backend == "triton":
        from .ops.pipeline import render_triton

        return render_triton(inputs, settings, options, **keywords)
    if backend == "torch":
        from .reference.pipeline import render_torch

        return render_torch(resolve_pending_checks(inputs), settings, options, **keywords)
    raise ValueError(f"backend: expected 'torch' or 'triton' (resolved by resolve_backend), got {backend!r}")
