"""Types shared by every layer: the stage contracts of both backends (a leaf module, imports nothing
from the package but constants).

A render is five stages, each with one function of the same name and signature in
`tritonsplat/ops/<stage>.py` (Triton) and `tritonsplat/reference/<stage>.py` (pure PyTorch):

    projection  project_gaussians(...)                      -> ProjectedGaussians
    binning     bin_tiles(means2d, conics, opacities, radii, depths, settings, *,
                          max_intersections=None)           -> TileBins
    sorting     sort_intersections(bins, n_cameras, n_gaussians, settings)
                                                            -> SortedTiles
    compositing composite(means2d, conics, opacities, colors, depths, backgrounds,
                          tile_ranges, sorted_ids, settings, *, outputs=ALL_OUTPUTS,
                          absgrad=False, densify_channels=None, densify_grad=None,
                          color_grad_channels=None, deterministic=False,
                          means2d_for_absgrad=None)         -> CompositeOutput

The compositor contract (both `composite` functions; the stage tests feed both the same tensors):

Inputs
    means2d      [C, N, 2] float32  pixel coordinates (pixel (i, j) is centred at (i + .5, j + .5))
    conics       [C, N, 3] float32  (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    opacities    [N]       float32  activated opacities
    colors       [N, D] (shared by all cameras) or [C, N, D] float32, any D >= 1
    depths       [C, N]    float32  camera z of the means
    backgrounds  [C, D] float32 or None (black)
    tile_ranges  [C * n_tiles, 2] int32: [start, end) of bin b = c * n_tiles + tile in sorted_ids,
                 tile = ty * tiles_x + tx; (0, 0) for an empty bin
    sorted_ids   [M] int32: flat row c * N + g of each intersection, front to back within a bin
                 (equal depths by Gaussian index); M < 2^31 is checked by binning
Keywords
    outputs      subset of ALL_OUTPUTS; fields not asked for are None and cost nothing
    color_grad_channels  k: only colors[..., :k] receive colour gradients (the others get zeros);
                 gradients of every other input still see all D channels (exact)
    absgrad, densify_channels/densify_grad, deterministic, means2d_for_absgrad: as in `rasterize`
Blending rule (Kerbl et al. 2023, Eq. 3; the original renderer's constants in `constants.py`)
    alpha = min(alpha_cap, o exp(-(a dx^2 + c dy^2) / 2 - b dx dy)), d = mean - pixel centre;
    skipped when alpha < 1/255; a pixel stops before the entry that would take T (1 - alpha) below
    1e-4; colour = sum_i c_i alpha_i T_i + T_final background.
State saved for backward (CompositeState; the backward walks back to front from it)
    final_transmittance [C, H, W] float32
    last_index          [C, H, W] int32: index into sorted_ids of the last blended entry, -1: none
Outputs (CompositeOutput)
    colors        [C, H, W, D]
    alphas        [C, H, W, 1]  1 - final transmittance
    depths        [C, H, W, 1]  expected camera z, sum_i alpha_i T_i z_i / alpha, 0 where alpha = 0
                  (normalised inside the compositor; differentiable)
    median_depths [C, H, W, 1]  detached z of the entry at which T first falls below 0.5, else 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

OutputName = Literal["colors", "alphas", "depths", "median_depths"]
ALL_OUTPUTS: tuple[OutputName, ...] = ("colors", "alphas", "depths", "median_depths")


class CompositeOutput(NamedTuple):
    """What both compositors return; a field not in `outputs` is None."""

    colors: torch.Tensor | None         # [C, H, W, D]
    alphas: torch.Tensor | None         # [C, H, W, 1]
    depths: torch.Tensor | None         # [C, H, W, 1] expected depth (normalised)
    median_depths: torch.Tensor | None  # [C, H, W, 1] detached


class CompositeState(NamedTuple):
    """What the compositing forward saves for its backward."""

    final_transmittance: torch.Tensor  # [C, H, W] float32
    last_index: torch.Tensor           # [C, H, W] int32 into sorted_ids, -1 where nothing blended


@dataclass(frozen=True)
class RenderOptions:
    """Non-tensor options of one render, shared by both backends' pipelines."""

    outputs: tuple[OutputName, ...] = ALL_OUTPUTS
    absgrad: bool = False
    densify_channels: int | None = None
    color_grad_channels: int | None = None
    deterministic: bool = False
    max_intersections: int | None = None
