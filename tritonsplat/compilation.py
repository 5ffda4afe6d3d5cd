"""Optional `torch.compile` of torch code made of many small pointwise ops, with an eager fallback.

Some torch-path functions are dozens of elementwise ops over [C, N] tensors (the torch backend's
projection: ~100 per forward, as many again in its autograd backward; the tracking loop's rigidity
terms). Eagerly each op is one pass over memory plus its dispatch; Inductor fuses them into a few
C++ (CPU) or Triton (CUDA) loops. Measured on a 2-core Intel Xeon (AVX-512, torch 2.13, 2 threads,
2026-12-03): the projection's forward + backward at 32,744 Gaussians (160x90) takes 2.8 ms compiled
against 9.3 ms eager, with the same bits on that scene; its first call compiles for ~15 s, and Inductor's
on-disk cache saves a later process only part of that.

When it is used (`wanted`):
- ``TRITONSPLAT_COMPILE=0``: never.
- unset (or any other value): on CUDA only.
- ``TRITONSPLAT_COMPILE=1``: on CUDA, and on the CPU inside `allow_cpu()`, which long loops of fixed
  shapes take: the t > 0 steps of `tracking.fit`, where every step renders the same Gaussians. Off by
  default on the CPU because the compile costs more than short fits save: on the README's Panoptic
  quick check (3 frames, 100 steps per t > 0 frame; 2-core Intel Xeon, 2 threads, 2026-12-03) frame 1
  took 33.6 s with a cold Inductor cache and 21.7 s with a warm one against 8.0 s eager, while frame 2
  ran at 13.9 steps/s against 12.2 eager; resumed for frames 3-5 (warm cache): 12.5 s for frame 3 against
  9.3 s, then 12.4 / 12.7 steps/s against 11.8 / 11.8. That is 4-10 ms a step, 8-20 s per frame of the
  original's 2,000 steps, against the one-time 3-26 s. A single `rasterize()` on the CPU never compiles.

A failure to compile or to run the compiled function warns once and falls back to eager code for the
rest of the process (no C++ compiler, an unsupported torch build, ...). Compiled and eager code agree
up to floating-point rounding, like the two backends; a run resumes bit-identically on the CPU as long
as the setting is the same.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator

import torch

ENV = "TRITONSPLAT_COMPILE"

_cpu_allowed = 0   # depth of nested `allow_cpu()` contexts


def _setting() -> str | None:
    """"0", "1", or None (unset or any other value)."""
    value = os.environ.get(ENV)
    return value if value in ("0", "1") else None


def wanted(device: torch.device | str) -> bool:
    """Whether compiled code should run for tensors on `device` (the module docstring's rule)."""
    setting = _setting()
    if setting == "0":
        return False
    if torch.device(device).type == "cuda":
        return True
    return setting == "1" and _cpu_allowed > 0


@contextlib.contextmanager
def allow_cpu() -> Iterator[None]:
    """Within this context, compiled code also runs on the CPU when TRITONSPLAT_COMPILE=1."""
    global _cpu_allowed
    _cpu_allowed += 1
    try:
        yield
    finally:
        _cpu_allowed -= 1


def _first_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def compiled(function: Callable, name: str) -> Callable:
    """`function` behind `torch.compile(dynamic=False)` where `wanted`, eager elsewhere and after a failure.

    Static shapes: each new input shape compiles a new graph (up to torch._dynamo's recompile limit, then
    eager), so it pays where shapes stay fixed for many calls (a t > 0 frame: every step has the same
    Gaussians). With dynamic=True (torch 2.13, CPU) a backward compiled for one Gaussian count asserted
    on the gradient strides of another instead of recompiling.
    """
    state: dict = {}

    @functools.wraps(function)
    def call(*args, **kwargs):
        device = _first_device(args, kwargs)
        if state.get("failed") or device is None or not wanted(device):
            return function(*args, **kwargs)
        try:
            if "compiled" not in state:
                state["compiled"] = torch.compile(function, dynamic=False)
            return state["compiled"](*args, **kwargs)
        except Exception as exc:   # the toolchain decides; the eager result is always available
            state["failed"] = True
            warnings.warn(f"torch.compile of {name} failed ({type(exc).__name__}: {str(exc)[:160]}); using eager "
                          f"PyTorch (set {ENV}=0 to skip the attempt)", stacklevel=2)
            return function(*args, **kwargs)

    call.eager = function
    return call
