"""Resolved per-call render settings shared by every stage of both backends.

`rasterize()` builds one `RenderSettings` from its keywords; `tritonsplat.compat` builds one with the
original renderer's conventions. Stages read only this object, so the two conventions share one
implementation of every kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import constants

RadiusRule = Literal["opacity_aware", "inria"]
TileRule = Literal["ellipse", "rectangle"]


@dataclass(frozen=True)
class RenderSettings:
    """Everything a stage needs besides tensors.

    Attributes:
        width, height: image size in pixels.
        tile_size: tile side in pixels (power of two for the Triton backend).
        near, far: camera-z culling planes; a Gaussian is culled when z <= near or z >= far.
        eps2d: added to both diagonal entries of the 2D covariance (EWA low-pass).
        alpha_cap: alpha = min(alpha_cap, o G).
        radius_rule: "opacity_aware": r = ceil(min(3.33, sqrt(2 ln(255 o))) sqrt(lambda_max)) and
            Gaussians with o < 1/255 culled (this package); "inria": r = ceil(3 sqrt(lambda_max)) with
            lambda = mid + sqrt(max(0.1, mid^2 - det)), no opacity cull (the original renderer).
        tile_rule: "ellipse": a Gaussian is blended wherever its alpha reaches 1/255 (tiles are a
            pure acceleration); "rectangle": only inside the 16x16 tiles of the original's tile
            rectangle around (mean - 0.5 px) +- r, a truncation that is part of its numbers.
        antialiased: scale each opacity per camera by sqrt(det Sigma2D / det(Sigma2D + eps2d I)), the 2D Mip
            filter of Mip-Splatting (`rasterize(rasterize_mode="antialiased")`); False: "classic".
    """

    width: int
    height: int
    tile_size: int = constants.TILE_SIZE
    near: float = constants.NEAR_PLANE
    far: float = constants.FAR_PLANE
    eps2d: float = constants.EPS2D
    alpha_cap: float = constants.ALPHA_CAP
    radius_rule: RadiusRule = "opacity_aware"
    tile_rule: TileRule = "ellipse"
    antialiased: bool = False

    @property
    def tiles_x(self) -> int:
        return math.ceil(self.width / self.tile_size)

    @property
    def tiles_y(self) -> int:
        return math.ceil(self.height / self.tile_size)

    @property
    def n_tiles(self) -> int:
        return self.tiles_x * self.tiles_y


def standard_clamp_limits(Ks: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Per-camera limits of x/z and y/z used inside the EWA Jacobian only.

    x/z in [-(cx + m W) / fx, (W - cx + m W) / fx] with m = 0.15 (gsplat 1.5), likewise for y.

    Args:
        Ks: [C, 3, 3] intrinsics.
    Returns:
        [C, 4] (x_low, x_high, y_low, y_high), same dtype as Ks.
    """
    fx, fy = Ks[:, 0, 0], Ks[:, 1, 1]
    cx, cy = Ks[:, 0, 2], Ks[:, 1, 2]
    margin_x = constants.CLAMP_MARGIN * width
    margin_y = constants.CLAMP_MARGIN * height
    return torch.stack(
        [-(cx + margin_x) / fx, (width - cx + margin_x) / fx,
         -(cy + margin_y) / fy, (height - cy + margin_y) / fy], dim=-1)
