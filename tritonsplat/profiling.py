"""Stage timing hooks, used by `bench` (hooks only: intersection statistics are in `statistics`).

Every stage of both backends runs inside `stage(name)`; it does nothing unless a timer was installed
with `record(timer)`, so the hooks cost one context-variable lookup per stage in normal use.

    class Timer:                      # anything with this method
        def stage(self, name): ...    # -> context manager timing the block

    with tritonsplat.profiling.record(my_timer):
        out = tritonsplat.rasterize(...)
        out.colors.sum().backward()

Stage names: "projection", "binning", "sorting", "tile_ranges", "compositing" (forward) and
"compositing_backward", "projection_backward" (backward; the torch backend's projection backward is
autograd and is not reported separately).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_ACTIVE_TIMER: contextvars.ContextVar = contextvars.ContextVar("tritonsplat_stage_timer", default=None)

STAGES = ("projection", "binning", "sorting", "tile_ranges", "compositing", "compositing_backward",
          "projection_backward")


def stage(name: str):
    """Context manager timing `name` with the installed timer, or a no-op."""
    timer = _ACTIVE_TIMER.get()
    if timer is None:
        return contextlib.nullcontext()
    return timer.stage(name)


@contextlib.contextmanager
def record(timer) -> Iterator[None]:
    """Install `timer` (an object with `.stage(name)` returning a context manager) for this block.

    Backward passes run in autograd's threads; the timer is also visible there because this module
    keeps a process-wide fallback while the block is active.
    """
    global _GLOBAL_TIMER
    token = _ACTIVE_TIMER.set(timer)
    previous, _GLOBAL_TIMER = _GLOBAL_TIMER, timer
    try:
        yield
    finally:
        _ACTIVE_TIMER.reset(token)
        _GLOBAL_TIMER = previous


_GLOBAL_TIMER = None


def backward_stage(name: str):
    """Like `stage`, for code running inside autograd backward (possibly another thread)."""
    timer = _ACTIVE_TIMER.get() or _GLOBAL_TIMER
    if timer is None:
        return contextlib.nullcontext()
    return timer.stage(name)
