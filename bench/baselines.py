"""Baselines, imported (never copied): gsplat 1.5 `rasterization(..., packed=False)`.

gsplat is an optional extra that needs a CUDA build; it is imported lazily, and where it cannot run
the reason is recorded as `{"backend": "gsplat", "skipped": "<reason>"}`.
"""

from __future__ import annotations

import functools

import torch

GSPLAT_VERSION_COMPARED = "1.5"


@functools.lru_cache(maxsize=1)
def _import_gsplat():
    """(module, None) or (None, why it does not import)."""
    try:
        import gsplat
    except Exception as error:  # ImportError, or a CUDA extension failing to build/load
        return None, f"gsplat does not import ({type(error).__name__}: {error}); install with pip install gsplat==1.5.*"
    if not hasattr(gsplat, "rasterization"):
        return None, f"gsplat {getattr(gsplat, '__version__', '?')} has no rasterization()"
    return gsplat, None


def gsplat_unavailable_reason(device: torch.device | str) -> str | None:
    """None when gsplat can render on `device`, else the reason it is skipped."""
    if torch.device(device).type != "cuda":
        return "gsplat needs a CUDA device (its rasterizer is CUDA-only)"
    module, reason = _import_gsplat()
    return reason


def gsplat_version() -> str | None:
    module, _ = _import_gsplat()
    return getattr(module, "__version__", None) if module is not None else None


def gsplat_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height):
    """gsplat.rasterization with packed=False on the same inputs as `tritonsplat.rasterize`.

    Returns:
        (colors [C, H, W, D], number of tile intersections or None).
    """
    module, reason = _import_gsplat()
    if module is None:
        raise RuntimeError(reason)
    render_colors, _, meta = module.rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width,
                                                  height, packed=False)
    isect_ids = meta.get("isect_ids") if isinstance(meta, dict) else None
    return render_colors, (int(isect_ids.numel()) if isect_ids is not None else None)
