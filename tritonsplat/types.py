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
                 (equal depths by Gaussian index); M < 2^31 is checked by binning. In capacity
                 mode entries past the valid count are 0 (a valid row) and no range points at them
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

# Intersections are indexed with int32 downstream (sorted ids, last blended index).
MAX_INTERSECTIONS = 2**31 - 1

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


class TileBins(NamedTuple):
    """What `bin_tiles` returns (both backends): one key per (camera, tile, Gaussian) intersection,
    in flat Gaussian order c * N + g, then tile order (so a stable sort orders equal depths by index).

    keys: int64 camera | tile << 32 | float32 bits of depth, or (Triton, when it fits) int32
    camera | tile << rank_bits | depth rank of the Gaussian in its camera (see `ops.binning`).
    In capacity mode (`max_intersections=N`) keys and ids have N entries of which the first
    min(n_intersections, N) are valid; the remaining keys hold the dtype's maximum (they sort
    last, and tile ranges stop at the valid count), the remaining ids are unspecified.
    """

    keys: torch.Tensor                 # [M] int64 or int32
    gaussian_ids: torch.Tensor         # [M] int32 flat index c * N + g
    tiles_per_gaussian: torch.Tensor   # [C, N] int32
    n_intersections: int | torch.Tensor     # int; capacity mode: 0-d int64 device tensor
    overflow: torch.Tensor | None = None          # None; capacity mode: 0-d bool, count > capacity
    # int32 depth-rank keys only (Triton): [C, N] int64, depth_order[c, rank] = Gaussian index g, so
    # the sort needs no values (the id is recovered from the key); None for int64 depth-bit keys.
    depth_order: torch.Tensor | None = None


class SortedTiles(NamedTuple):
    """What `sort_intersections` returns (both backends): the compositor's tile lists."""

    keys: torch.Tensor          # [M] sorted keys (dtype of TileBins.keys)
    gaussian_ids: torch.Tensor  # [M] int32 flat index c * N + g, front to back within a bin
    tile_ranges: torch.Tensor   # [C * n_tiles, 2] int32 [start, end) of each bin, (0, 0) if empty


class PendingChecks(NamedTuple):
    """Value checks computed on the device and not read yet: flags[i] != 0 means check i failed
    (ValueError f"{name}: {message}" of the first failing one, in order); the Triton pipeline reads the
    flags in the same transfer as its intersection count."""

    flags: torch.Tensor                       # [k] int32 on the inputs' device
    messages: tuple[tuple[str, str], ...]     # (argument name, message) of each flag


@dataclass(frozen=True)
class RasterizeInputs:
    """Validated, dtype-normalised inputs of `rasterize()` (both backends' pipelines take it).

    colors is [C, N, D] (per-camera view, possibly expanded with stride 0) or, with SH,
    the coefficients [N, K, 3].
    """

    means: torch.Tensor        # [N, 3]
    quats: torch.Tensor        # [N, 4]
    scales: torch.Tensor       # [N, 3]
    opacities: torch.Tensor    # [N]
    colors: torch.Tensor       # [C, N, D] or SH [N, K, 3]
    viewmats: torch.Tensor     # [C, 4, 4]
    Ks: torch.Tensor           # [C, 3, 3]
    backgrounds: torch.Tensor | None  # [C, D]
    n_cameras: int
    n_gaussians: int
    n_channels: int
    sh_degree: int | None
    pending_checks: PendingChecks | None = None   # value checks still on the device, or None


@dataclass(frozen=True)
class RasterizeOutput:
    """What `rasterize()` returns. C cameras, N Gaussians, D channels, images H x W.

    Attributes:
        colors: [C, H, W, D] composited colours (background included).
        alphas: [C, H, W, 1] 1 - final transmittance.
        depths: [C, H, W, 1] expected camera z, sum_i(w_i z_i) / alpha, 0 where alpha = 0;
            differentiable (to the means, and to everything alpha depends on).
        median_depths: [C, H, W, 1] detached camera z of the Gaussian at which transmittance
            first falls below 0.5; 0 where it never does.
            Each of these four is None when it was not in `rasterize(..., outputs=...)`.
        radii: [C, N] int32 screen-space radius in pixels, 0 for culled Gaussians.
        means2d: [C, N, 2] pixel coordinates of the projected means. After backward, `.grad` holds
            the screen-space gradient used for densification (pixel units; the original's NDC
            threshold 2e-4 corresponds to this times (W/2, H/2)); with absgrad=True also `.absgrad`.
        n_intersections: tile-Gaussian pairs produced by the backend's binning (both backends bin with
            the same exact ellipse-tile test, so the counts agree up to float rounding at the level set):
            an int, or with `max_intersections=N` a 0-d int64 tensor on the device (no host read).
            The torch compositor refines each tile's list into 8x8 sub-tile lists with the same test;
            those entries, which it walks, are not what this counts.
        densify_grad: with densify_channels=k, [C, N, 2] filled by backward with the screen-space
            gradient from the upstream gradient of colors[..., :k] alone; else None.
        backend: the backend that ran ("torch" or "triton").
        overflow: None, or with `max_intersections=N` a 0-d bool tensor on the device, True when
            the intersections exceeded N (the images then miss the intersections past N: render
            again with a larger capacity).
    """

    colors: torch.Tensor | None
    alphas: torch.Tensor | None
    depths: torch.Tensor | None
    median_depths: torch.Tensor | None
    radii: torch.Tensor
    means2d: torch.Tensor
    n_intersections: int | torch.Tensor
    densify_grad: torch.Tensor | None = None
    backend: str = "torch"
    overflow: torch.Tensor | None = None

    @property
    def visible(self) -> torch.Tensor:
        """[C, N] bool, radii > 0."""
        return self.radii > 0
