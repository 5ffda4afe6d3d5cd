"""Stage timing hooks and intersection statistics, used by `bench`.

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

import torch

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


@torch.no_grad()
def intersection_report(means, quats, scales, opacities, viewmats, Ks, width, height, *,
                        tile_size: int = 16) -> dict:
    """Tile intersections of one scene under three rules (torch, any device; chunked).

    - "ellipse": tritonsplat's binning (ellipse at the alpha >= 1/255 level set vs tile pixel centres);
    - "exact_minimum": tiles holding at least one pixel where the Gaussian's alpha reaches 1/255;
    - "original_rule": the original renderer's tile rectangle of r = ceil(3 sqrt(lambda_max)).

    Returns:
        dict with n_gaussians, n_visible, the three counts, per-Gaussian averages and the ratios
        ellipse / exact_minimum and exact_minimum / original_rule, ellipse / original_rule.
    """
    from .reference.binning import bin_tiles, exact_tile_intersections, original_rule_tile_count
    from .reference.projection import project_gaussians
    from .settings import RenderSettings, standard_clamp_limits

    settings = RenderSettings(width=width, height=height, tile_size=tile_size)
    limits = standard_clamp_limits(Ks, width, height)
    projected = project_gaussians(means, quats, scales, opacities, viewmats, Ks, limits, settings)
    ellipse = int(bin_tiles(projected.means2d, projected.conics, opacities, projected.radii,
                            projected.depths, settings).keys.numel())
    exact = exact_tile_intersections(projected.means2d, projected.conics, opacities, projected.radii, settings)
    original = original_rule_tile_count(means, quats, scales, viewmats, Ks, settings)
    n = int(means.shape[0]) * int(viewmats.shape[0])
    return {
        "n_gaussians": int(means.shape[0]),
        "n_visible": int((projected.radii > 0).sum()),
        "ellipse": ellipse,
        "exact_minimum": exact,
        "original_rule": original,
        "ellipse_per_gaussian": ellipse / max(n, 1),
        "exact_per_gaussian": exact / max(n, 1),
        "original_per_gaussian": original / max(n, 1),
        "ellipse_over_exact": ellipse / max(exact, 1),
        "exact_over_original": exact / max(original, 1),
        "ellipse_over_original": ellipse / max(original, 1),
    }
