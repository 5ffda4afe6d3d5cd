"""Backend resolution: the `backend` argument, then the TRITONSPLAT_BACKEND environment variable,
then the device of the tensors.

- "torch": pure PyTorch, any device (the CPU path and the test oracle).
- "triton": Triton kernels on CUDA tensors; on CPU tensors only through Triton's interpreter, which
  must have been switched on with TRITON_INTERPRET=1 before tritonsplat was imported.
- "auto": "triton" for CUDA tensors when triton imports, else "torch".
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
ENV_VARIABLE = "TRITONSPLAT_BACKEND"

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
