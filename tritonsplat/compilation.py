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
- unset (or any other value): only functions compiled with ``cuda_by_default`` (the rigidity terms), on
  CUDA, with dynamic shapes (one graph for every Gaussian count).
- ``TRITONSPLAT_COMPILE=1``: besides, every wrapped function inside `fixed_shapes()`, on any device,
  with static shapes. `tracking` enters it for the t > 0 steps of a fit, where every step renders the
  same Gaussians. Off by default on the CPU because the compile costs more than short fits save: on the
  README's Panoptic quick check (3 frames, 100 steps per t > 0 frame; 2-core Intel Xeon, 2 threads,
  2026-12-03) frame 1 took 33.6 s with a cold Inductor cache and 21.7 s with a warm one against 8.0 s
  eager, while frame 2 ran at 13.9 steps/s against 12.2 eager; resumed for frames 3-5 (warm cache):
  12.5 s for frame 3 against 9.3 s, then 12.4 / 12.7 steps/s against 11.8 / 11.8. That is 4-10 ms a
  step, 8-20 s per frame of the original's 2,000 steps, against the one-time 3-26 s. The gain grows with
  the Gaussian count: on a 3,211-Gaussian synthetic scene (96x72, 8 cameras, 1,000-step frames) compiled
  and eager steps ran alike (37.9-42.3 against 40.6-42.3 steps/s), so the CPU compile stays opt-in. Since
  the eager projection has a hand-written backward (4.8 ms forward + backward at 33,075 Gaussians), the gain
  is smaller: on the quick check extended to 4 frames (2-core AMD EPYC with AVX-512, 2 threads, 2026-12-04)
  frames 2-3 ran at 18.3 / 18.0 against 16.6 / 17.1 steps/s, and the compile made frame 1 take 23.8 s
  against 5.8 s. A `rasterize()` outside such a loop never compiles.

A failure to compile at the first call warns once and falls back to eager code for the rest of the
process (no C++ compiler, an unsupported torch build, ...); an error that the eager function raises
too is raised as it is. The backward graph compiles at the first backward, outside this wrapper: its
failure raises. Compiled and eager code agree up to floating-point rounding, like the two backends, so
a CPU run resumes bit-identically with the same setting as long as every shape keeps its graph
(torch._dynamo falls back to eager after its recompile limit of distinct shapes, which a fit that
spawns Gaussians at many frames can reach).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Callable, Iterator

import torch

ENV = "TRITONSPLAT_COMPILE"

# Depth of nested `fixed_shapes()` contexts in this thread / task (a render elsewhere is not affected).
_fixed_shapes: contextvars.ContextVar[int] = contextvars.ContextVar("tritonsplat_fixed_shapes", default=0)
_wrappers: list[dict] = []   # every wrapper's state, for `reset`


def _setting() -> str | None:
    """"0", "1", or None (unset or any other value)."""
    value = os.environ.get(ENV)
    return value if value in ("0", "1") else None


def _mode(device: torch.device | str, cuda_by_default: bool) -> str | None:
    """"dynamic" or "static" (how to compile for `device`), or None (run eagerly)."""
    setting = _setting()
    if setting == "0":
        return None
    if cuda_by_default and torch.device(device).type == "cuda":
        return "dynamic"
    if setting == "1" and _fixed_shapes.get() > 0:
        return "static"
    return None


def wanted(device: torch.device | str, *, cuda_by_default: bool = False) -> bool:
    """Whether a wrapped function runs compiled for tensors on `device` (the module docstring's rule)."""
    return _mode(device, cuda_by_default) is not None


@contextlib.contextmanager
def fixed_shapes() -> Iterator[None]:
    """A loop whose calls keep their shapes: with TRITONSPLAT_COMPILE=1, wrapped functions compile here."""
    token = _fixed_shapes.set(_fixed_shapes.get() + 1)
    try:
        yield
    finally:
        _fixed_shapes.reset(token)


def reset() -> None:
    """Forget every wrapper's compiled functions and failures (tests)."""
    for state in _wrappers:
        state.clear()


def _first_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def compiled(function: Callable, name: str, *, cuda_by_default: bool = False,
             eager: Callable | None = None) -> Callable:
    """`function` through `torch.compile` where `wanted`, `eager` (default: `function`) elsewhere and after a
    failed compile. `eager` is another implementation of the same contract that suits eager execution
    better (the torch projection's hand-written backward, which Inductor need not trace).

    Inside `fixed_shapes()` the graphs are static: each new input shape compiles its own (up to
    torch._dynamo's recompile limit, then eager). With dynamic=True (torch 2.13, CPU) a backward compiled
    for one Gaussian count asserted on the gradient strides of another instead of recompiling. The CUDA
    default (`cuda_by_default`) keeps dynamic shapes, as the rigidity terms always had. `.failed()` says
    whether the compile failed (the caller may then prefer another eager path).
    """
    state: dict = {}
    _wrappers.append(state)
    eager = function if eager is None else eager

    @functools.wraps(function)
    def call(*args, **kwargs):
        device = _first_device(args, kwargs)
        mode = None if device is None or state.get("failed") else _mode(device, cuda_by_default)
        if mode is None:
            return eager(*args, **kwargs)
        if mode not in state:
            state[mode] = torch.compile(function, dynamic=mode == "dynamic")
        try:
            return state[mode](*args, **kwargs)
        except Exception as exc:   # the toolchain decides; the eager result is always available
            result = eager(*args, **kwargs)   # an error of the function itself raises here, as eagerly
            state["failed"] = True
            warnings.warn(f"torch.compile of {name} failed ({type(exc).__name__}: {str(exc)[:160]}); using eager "
                          f"PyTorch (set {ENV}=0 to skip the attempt)", stacklevel=2)
            return result

    call.failed = lambda: bool(state.get("failed"))
    return call
