"""New Gaussians for objects that enter after the first frame (`TrackingConfig.spawn_new`).

Dynamic 3D Gaussians (Luiten et al. 2024) track a fixed set of Gaussians made at t = 0, so an object
that appears later is never reconstructed (the paper's Sec. 6 names this as its main limitation).
The segmentation masks say where foreground is; the rendered segmentation channel says where the
Gaussians already explain it. Where they disagree in several cameras, something new has appeared:

1. detection (`uncovered_masks`), after the frame's optimisation: per training camera, the pixels
   with mask foreground whose rendered foreground coverage is below `spawn_coverage_threshold`,
   opened morphologically (radius `spawn_open_pixels`) to drop outline slivers; a camera counts when
   at least `spawn_min_pixels` such pixels remain, and nothing happens unless `spawn_min_cameras` do;
2. points (`candidate_points`): the frame's visual hull (`data_tools.carve_visual_hull` on the full
   masks, voxels of SPAWN_VOXEL_PIXELS = 0.5 px, a third of the t = 0 hull's, so that the new
   Gaussians are about as dense as those of t = 0), restricted to the surface voxels that project onto
   uncovered pixels in at least `spawn_min_cameras` cameras, coloured by the median over the cameras
   that see them;
3. spawning (`spawn_gaussians`): Gaussians initialised from those points as at t = 0
   (`tracking.params.init_params`: isotropic scales from the neighbour distances, opacity 0.5,
   foreground label), optimised for `spawn_steps` steps with L_im + 3 L_seg while every existing
   Gaussian and the colour correction stay frozen, densified (clone / split / prune,
   `tracking.strategy`, without the final 0.25 opacity cull: there is no opacity reset) among
   themselves only; then their rigidity neighbours are found among the new Gaussians and the existing
   foreground ones (K nearest in their union), and from frame t + 1 on they are tracked like every
   other foreground Gaussian (opacity and scale frozen).

Spawned Gaussians are always foreground, and appended after the existing ones (`tracking.store`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from . import losses as L
from .config import MIN_REFINE_EVERY, DensifyConfig, TrackingConfig
from .distributed import SINGLE, World, broadcast_object
from .neighbours import knn
from .params import activated, init_params, learning_rates, make_optimizer
from .strategy import AllGaussiansPrunedError, DensifyStrategy, densify_hook

SPAWN_OPTIMISED = ("means", "rgb", "quats", "logit_opacities", "log_scales")  # seg stays the label (1, 0, 0)
MIN_SPAWN_POINTS = 4  # fewer hull points cannot carry neighbour-distance scales (3 neighbours each)
# Hull voxel edge of the spawn carve, in pixels of the median camera (the t = 0 hull uses 1.5 px,
# `data_tools.init_points.auto_voxel_size`). Measured on a 96x72, 8-camera synthetic scene (demo preset x 0.5
# steps, a 0.15 m visitor sphere entering at frame 3; its tracks' static error 2.55 % of the extent): at 1.5 px
# the hull gave 45 points ~6 cm apart and 49 Gaussians whose rigidity weights exp(-lambda d^2) were ~0
# (median 2e-6, t = 0's 0.10), and the visitor's tracks, following their highest-influence Gaussian, were at
# 2.26 %; without the spawn's final cull (`spawn_densify_config`) 2.13 % at 1.5 px, 1.75 % at 0.75 px (223
# points) and 1.64 % at 0.5 px (582 points, 640 Gaussians of 1.7 cm; t = 0's are 2.1 cm). A region carved at
# 0.5 px has ~9x the surface points of one at 1.5 px.
SPAWN_VOXEL_PIXELS = 0.5


def spawn_densify_config(config: TrackingConfig) -> DensifyConfig:
    """The t = 0 densification thresholds on a spawn_steps-long schedule: refinements every tenth of the
    steps (at least MIN_REFINE_EVERY apart), stopping at three quarters, no opacity reset (its recovery
    needs far more steps than a spawn has), hence no final cull either, and too-big Gaussians pruned from
    the start."""
    steps = config.spawn_steps
    every = max(MIN_REFINE_EVERY, steps // 10)
    # The last refinement prunes at prune_opacity too, not at final_prune_opacity: that cull (0.25) follows
    # the opacity reset at t = 0, and without one it removes what the spawn just made. Measured (scene of
    # SPAWN_VOXEL_PIXELS, 0.75 px): the Gaussians inside the saturated silhouette drift to opacity ~0.1 in
    # 70 steps and the 0.25 cull removed 381 of 386.
    d = config.densify
    return replace(d, start=every, stop=max(every, (3 * steps) // 4), every=every, opacity_reset_at=0,
                   prune_big_from=0, final_prune_opacity=d.prune_opacity)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = 2 * radius + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=radius)[0, 0] > 0.5


def _open(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Morphological opening with a (2r + 1)^2 square: erosion, then dilation."""
    if radius <= 0:
        return mask
    eroded = ~_dilate(~mask, radius)
    return _dilate(eroded, radius) & mask


def uncovered_masks(act: dict[str, torch.Tensor], views, targets, config: TrackingConfig,
                    render: Callable) -> list[torch.Tensor | None]:
    """Per training camera, bool [H, W] (CPU): mask foreground that the render leaves uncovered, opened;
    None for a camera without a mask."""
    out = []
    thr, radius = config.spawn_coverage_threshold, config.spawn_open_pixels
    with torch.no_grad():
        frozen = {k: v.detach() for k, v in act.items()}
        for c, seg in enumerate(targets.segs):
            if seg is None:
                out.append(None)
                continue
            coverage = render(frozen, views, [c], config, densify=False).colors[0, ..., 3]  # foreground channel
            uncovered = (seg[0] > 0.5) & (coverage < thr)
            out.append(_open(uncovered, radius).cpu())
    return out


def counting_cameras(uncovered: list[torch.Tensor | None], config: TrackingConfig) -> int:
    """Cameras with at least spawn_min_pixels uncovered pixels."""
    return sum(int(m is not None and int(m.sum()) >= config.spawn_min_pixels) for m in uncovered)


def candidate_points(seq, t: int, uncovered: list[torch.Tensor | None], config: TrackingConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Surface points of frame t's visual hull seen on uncovered pixels by >= spawn_min_cameras cameras:
    (xyz float32 [M, 3], rgb float32 [M, 3])."""
    from data_tools.init_points import _region, _View, auto_voxel_size, carve_visual_hull

    views, regions = [], []
    for cam, region in zip(seq.train_cameras, uncovered):
        mask = seq.mask(t, cam)
        if mask is None or region is None:
            continue
        views.append(_View(cam, mask, seq.image(t, cam)))
        # One pixel of slack: surface-voxel centres of a 1.5 px voxel project up to a pixel off the outline.
        regions.append(_dilate(region, 1).reshape(-1))
    if len(views) < config.spawn_min_cameras:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    cams = [view.cam for view in views]
    voxel = auto_voxel_size(cams, _region(cams)[0], pixels=SPAWN_VOXEL_PIXELS)
    hull = carve_visual_hull(seq, t, voxel_size=voxel, min_views=config.spawn_min_cameras, floor_y=config.floor_y,
                             views=views)
    if not len(hull.points):
        return hull.points, hull.colors
    X = torch.from_numpy(hull.points)
    hits = torch.zeros(len(X), dtype=torch.int32)
    for view, region in zip(views, regions):
        u, v, z = view.project(X)
        seen = view.inside(u, v, z)
        hits += (seen & region[view.pixel_index(u, v, seen)]).int()
    keep = (hits >= config.spawn_min_cameras).numpy()
    return hull.points[keep], hull.colors[keep]


def spawn_gaussians(seq, t: int, act: dict[str, torch.Tensor], fg_means: torch.Tensor, n_neighbours: int,
                    views, targets, config: TrackingConfig, scene_radius: float, device: torch.device,
                    gen: torch.Generator, *, render: Callable, optimise: Callable, make_stage: Callable,
                    camera_order: Callable, echo: Callable[[str], None] = print, n_frames: int = 1,
                    progress: bool = False, world: World = SINGLE) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Detect, carve and optimise new Gaussians at frame t (see the module docstring).

    Args:
        act: the frame's optimised rasterizer inputs (means, quats, scales, opacities, colors [N, 6]).
        fg_means: [Nfg, 3] the existing foreground Gaussians' means at t (for the neighbour search).
        n_neighbours: K of the existing neighbour graph (the new rows get the same K).
        render, optimise, make_stage, camera_order: `tracking.stages`' loop pieces (no import cycle).
        world: the torchrun processes (`tracking.distributed`); `make_stage` gives the stage the same world, so
            each rank renders its share of every step's cameras.

    Returns:
        (rows, stats): rows = numpy arrays means [M, 3], quats [M, 4], rgb [M, 3], log_scales [M, 3],
        logit_opacities [M, 1], seg [M, 3], nb_indices [M, K] (into the foreground subset after appending),
        nb_weights, nb_distances [M, K] float32; None when nothing is spawned. stats: spawn_cameras (cameras
        with an uncovered region), n_born.
    """
    def detect() -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
        uncovered = uncovered_masks(act, views, targets, config, render)
        n_cams = counting_cameras(uncovered, config)
        if n_cams < config.spawn_min_cameras:
            return n_cams, None
        return n_cams, candidate_points(seq, t, uncovered, config)

    # Under torchrun rank 0 detects and carves and every rank starts from its points: renders whose last bits
    # differ between GPUs must not make the ranks spawn different Gaussians.
    n_cams, found = broadcast_object(detect() if world.is_main else None, world, f"frame {t}: spawn detection")
    stats = {"spawn_cameras": n_cams, "n_born": 0}
    if found is None:
        return None, stats
    xyz, rgb = found
    stats["spawn_points"] = int(len(xyz))
    if len(xyz) < MIN_SPAWN_POINTS:
        return None, stats
    cloud = np.concatenate([xyz, np.clip(rgb, 0, 1), np.ones((len(xyz), 1), np.float32)], 1)
    new = init_params(torch.from_numpy(cloud).to(device), 1, n_neighbours=config.init_scale_neighbours,
                      max_scale=None if config.max_init_scale is None else config.max_init_scale * scene_radius)
    for key in ("cam_m", "cam_c"):
        new.pop(key)
    frozen = {k: v.detach() for k, v in act.items()}
    n_old = frozen["means"].shape[0]
    scale = math.sqrt(config.cameras_per_step) if config.lr_batch_scaling == "sqrt" else 1.0
    optimizer = make_optimizer(new, learning_rates(config, scene_radius, scale=scale), config, names=SPAWN_OPTIMISED)
    strategy = DensifyStrategy(spawn_densify_config(config), scene_radius)
    dstate = strategy.initialize_state(len(xyz), device)

    def render_inputs() -> dict[str, torch.Tensor]:
        a = activated(new)
        return {k: torch.cat([frozen[k], a[k]], 0) for k in a}

    after_step = densify_hook(strategy, new, optimizer, dstate, views.sizes, gen, world, f"frame {t} spawn",
                              first_row=n_old)  # statistics of the new rows only

    order = camera_order(gen, len(views.sizes), config.spawn_steps, config.cameras_per_step)
    stage = make_stage(L.FIRST, t, config.spawn_steps, config, new, optimizer, render_inputs, densify=True,
                       densify_until=strategy.statistics_until, after_step=after_step, generator=gen)
    try:
        curves = optimise(stage, views, targets, order, n_frames=n_frames, progress=progress, echo=lambda s: None)
    except AllGaussiansPrunedError:
        stage.extra_stats.pop("_bar").close(f"frame {t}: every spawned Gaussian was pruned")
        warnings.warn(f"frame {t}: every spawned Gaussian was pruned; nothing spawned", stacklevel=2)
        return None, stats
    m = new["means"].shape[0]
    stats.update(n_born=m, spawn_final_psnr=float(np.mean(curves["psnr"][-max(1, len(curves["psnr"]) // 10):])))
    stage.extra_stats.pop("_bar").close(f"frame {t}: spawned {m:,} Gaussians from {len(xyz):,} hull points "
                                        f"({n_cams} cameras with uncovered foreground), {config.spawn_steps} steps")
    rows = {k: new[k].detach().cpu().numpy().astype(np.float32).copy()
            for k in ("means", "quats", "rgb", "log_scales", "logit_opacities", "seg")}
    rows.update(_new_neighbours(fg_means.detach(), new["means"].detach(), n_neighbours, config))
    return rows, stats


def _new_neighbours(fg_means: torch.Tensor, new_means: torch.Tensor, k_graph: int, config: TrackingConfig
                    ) -> dict[str, np.ndarray]:
    """K nearest of each new Gaussian among the new and existing foreground ones, indices into the
    foreground subset after appending (existing first); short rows are padded with the Gaussian itself at
    weight 0 (no pull)."""
    n_fg, m = fg_means.shape[0], new_means.shape[0]
    z = np.zeros((m, k_graph), np.float32)
    self_rows = (n_fg + np.arange(m, dtype=np.int64))[:, None]
    if k_graph == 0:
        return {"nb_indices": np.zeros((m, 0), np.int64), "nb_weights": z, "nb_distances": z.copy()}
    union = torch.cat([fg_means, new_means], 0)
    k = min(k_graph, union.shape[0] - 1)
    idx, d2 = knn(union, k)
    idx, d2 = idx[n_fg:].cpu().numpy(), d2[n_fg:].cpu()
    weights = L.neighbour_weights(d2, L.lambda_in_data_units(config.knn_lambda, config.metres_per_unit)).numpy()
    indices = np.repeat(self_rows, k_graph, 1)
    w, d = z.copy(), z.copy()
    indices[:, :k], w[:, :k], d[:, :k] = idx, weights, torch.sqrt(d2).numpy()
    return {"nb_indices": indices.astype(np.int64), "nb_weights": w.astype(np.float32),
            "nb_distances": d.astype(np.float32)}
