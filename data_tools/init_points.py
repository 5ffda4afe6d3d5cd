"""Initial point clouds from foreground masks: a visual hull plus a floor plane and a far shell.

The hull is carved coarse-to-fine on a voxel grid covering the region the cameras look at. At the
final resolution a voxel counts as *seen* by a camera when its centre projects inside that camera's
image, and it is kept when at least ``min_views`` cameras see it and every one of them has
foreground at that pixel. Coarser levels use a conservative version of the same test (a coarse voxel
is dropped only if some camera sees its whole projected footprint as background), so that no voxel
that would survive at the final level is lost. Only the surface voxels of the hull become points
(interior points are never seen); they are coloured by the median of the pixel colours over the
cameras that see them and labelled foreground (seg = 1).

Background points (seg = 0) are a floor grid on y = 0 (the Panoptic convention: +y down, floor at
y = 0) and a sphere beyond the cameras, both coloured by the median of background pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ._common import single_threaded
from .cameras import Camera, axes_focus
from .errors import DataError
from .sequence import Sequence
from .writer import save_npz_atomic

_NEAR = 1e-3  # metres; points closer to a camera plane than this are not seen by it


@dataclass
class VisualHull:
    """Result of :func:`carve_visual_hull`.

    Attributes:
        points: float32 [N, 3] centres of the surface voxels.
        colors: float32 [N, 3] median colour over the cameras that see each voxel, in [0, 1].
        voxel_size: edge length of the voxels in world units.
        n_voxels: number of voxels in the (solid) hull.
        bounds: float64 [2, 3] the carved region (min, max corner).
    """

    points: np.ndarray
    colors: np.ndarray
    voxel_size: float
    n_voxels: int
    bounds: np.ndarray


class _View:
    """One camera's data as torch tensors: projection, mask (and its summed-area table), image."""

    def __init__(self, cam: Camera, mask: np.ndarray, image: np.ndarray):
        self.cam = cam
        self.W, self.H = cam.width, cam.height
        self.R = torch.from_numpy(cam.R.astype(np.float32))
        self.t = torch.from_numpy(cam.t.astype(np.float32))
        self.fx, self.fy = float(cam.K[0, 0]), float(cam.K[1, 1])
        self.cx, self.cy, self.skew = float(cam.K[0, 2]), float(cam.K[1, 2]), float(cam.K[0, 1])
        self.mask = torch.from_numpy(np.ascontiguousarray(mask)).reshape(-1)
        sat = np.zeros((self.H + 1, self.W + 1), dtype=np.int32)
        sat[1:, 1:] = mask.astype(np.int32).cumsum(0).cumsum(1)
        self.sat = torch.from_numpy(sat).reshape(-1)
        self.image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(-1, 3)

    def project(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u, v, z for world points X [N, 3] (pixel-centre convention: pixel i spans [i, i + 1))."""
        Xc = X @ self.R.T + self.t
        z = Xc[:, 2]
        zs = torch.where(z > _NEAR, z, torch.full_like(z, _NEAR))
        u = (self.fx * Xc[:, 0] + self.skew * Xc[:, 1]) / zs + self.cx
        v = self.fy * Xc[:, 1] / zs + self.cy
        return u, v, z

    def pixel_index(self, u, v, valid) -> torch.Tensor:
        iu = u.floor().long().clamp(0, self.W - 1)
        iv = v.floor().long().clamp(0, self.H - 1)
        return torch.where(valid, iv * self.W + iu, torch.zeros_like(iu))

    def inside(self, u, v, z) -> torch.Tensor:
        return (z > _NEAR) & (u >= 0) & (u < self.W) & (v >= 0) & (v < self.H)

    def box_count(self, u0, u1, v0, v1) -> torch.Tensor:
        """Foreground pixels in the pixel box [u0, u1) x [v0, v1) (integer tensors, pre-clipped)."""
        w1 = self.W + 1
        s = self.sat
        return s[v1 * w1 + u1] - s[v0 * w1 + u1] - s[v1 * w1 + u0] + s[v0 * w1 + u0]


def _carve_level(
    X: torch.Tensor, size: float, views: list[_View], min_views: int, conservative: bool
) -> torch.Tensor:
    """bool [N]: which voxels (centres X [N, 3], edge ``size``) survive this level's test."""
    n_seen = torch.zeros(len(X), dtype=torch.int32)
    ok = torch.ones(len(X), dtype=torch.bool)
    for view in views:
        u, v, z = view.project(X)
        if conservative:
            front = z > _NEAR
            # Half-width in pixels of a square that contains the projected cube (its bounding sphere).
            r = 0.8661 * size * max(view.fx, view.fy) / z.clamp_min(_NEAR)
            u0, u1 = (u - r).floor(), (u + r).floor() + 1
            v0, v1 = (v - r).floor(), (v + r).floor() + 1
            overlaps = front & (u1 > 0) & (u0 < view.W) & (v1 > 0) & (v0 < view.H)
            within = front & (u0 >= 0) & (u1 <= view.W) & (v0 >= 0) & (v1 <= view.H)
            cu0, cu1 = (t.clamp(0, view.W).long() for t in (u0, u1))
            cv0, cv1 = (t.clamp(0, view.H).long() for t in (v0, v1))
            empty = view.box_count(cu0, cu1, cv0, cv1) == 0
            n_seen += overlaps.int()
            ok &= ~(within & empty)  # only a camera that sees the whole footprint may carve
        else:
            seen = view.inside(u, v, z)
            fg = view.mask[view.pixel_index(u, v, seen)]
            n_seen += seen.int()
            ok &= ~(seen & ~fg)
    return ok & (n_seen >= min_views)


def _region(cams: list[Camera]) -> tuple[np.ndarray, float]:
    """Centre and half-size of a cube around the point the cameras look at."""
    focus = axes_focus(cams)
    dist = np.array([np.linalg.norm(c.center - focus) for c in cams])
    return focus, 0.9 * float(np.median(dist))


def auto_voxel_size(cams: list[Camera], focus: np.ndarray, pixels: float = 1.5) -> float:
    """`pixels` pixels of the median camera at the focus point. The default 1.5: the hull silhouette is then
    within a pixel of the masks (IoU > 0.9 on the Panoptic data) and a person gets a few tens of thousands
    of points."""
    px = [np.linalg.norm(c.center - focus) / max(c.K[0, 0], c.K[1, 1]) for c in cams]
    return pixels * float(np.median(px))


def _surface(ijk: torch.Tensor) -> torch.Tensor:
    """bool [N]: voxels (integer coords [N, 3], unique) with at least one empty 6-neighbour."""
    lo = ijk.min(0).values - 1
    span = ijk.max(0).values - lo + 2
    key = lambda a: ((a[:, 0] - lo[0]) * span[1] + (a[:, 1] - lo[1])) * span[2] + (a[:, 2] - lo[2])  # noqa: E731
    keys, order = torch.sort(key(ijk))
    surf = torch.zeros(len(ijk), dtype=torch.bool)
    for axis in range(3):
        for step in (-1, 1):
            nb = ijk.clone()
            nb[:, axis] += step
            k = key(nb)
            pos = torch.searchsorted(keys, k).clamp_max(len(keys) - 1)
            surf |= keys[pos] != k
    return surf


def _median_color(X: torch.Tensor, views: list[_View], use_mask: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Median colour [N, 3] over the cameras that see each point and its number of such cameras.

    use_mask: None (all seeing cameras), "fg" or "bg" (only cameras with that label at the pixel).
    """
    cols = torch.full((len(views), len(X), 3), float("nan"))
    for i, view in enumerate(views):
        u, v, z = view.project(X)
        seen = view.inside(u, v, z)
        idx = view.pixel_index(u, v, seen)
        if use_mask == "bg":
            seen &= ~view.mask[idx]
        elif use_mask == "fg":
            seen &= view.mask[idx]
        cols[i, seen] = view.image[idx[seen]]
    n = (~torch.isnan(cols[..., 0])).sum(0)
    return torch.nanmedian(cols, dim=0).values, n


def _views(seq: Sequence, frame: int, need_masks: bool = True) -> list[_View]:
    views = []
    for cam in seq.train_cameras:
        mask = seq.mask(frame, cam)
        if mask is None:
            continue
        views.append(_View(cam, mask, seq.image(frame, cam)))
    if need_masks and len(views) < 3:
        raise DataError(
            seq.path, f"init-points needs foreground masks in at least 3 training cameras; found {len(views)}"
        )
    return views


@single_threaded
def carve_visual_hull(
    seq: Sequence,
    frame: int = 0,
    *,
    voxel_size: float | None = None,
    min_views: int = 3,
    floor_y: float | None = None,
    progress: bool = False,
    views: list[_View] | None = None,
) -> VisualHull:
    """Visual hull of the training cameras' masks at ``frame`` (see the module docstring).

    Args:
        voxel_size: final voxel edge in world units; default :func:`auto_voxel_size`.
        min_views: a voxel must be inside at least this many training images.
        floor_y: when given, voxels entirely below this plane (y > floor_y, +y down) are dropped.
    """
    views = views if views is not None else _views(seq, frame)
    cams = [v.cam for v in views]
    focus, half = _region(cams)
    size = float(voxel_size) if voxel_size else auto_voxel_size(cams, focus)
    if size <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    # Start with about 32 voxels across, then halve the voxel size down to `size`.
    levels = max(0, math.ceil(math.log2(2 * half / size / 32)))
    s0 = size * 2**levels
    n0 = math.ceil(2 * half / s0)
    origin = torch.tensor(focus - 0.5 * n0 * s0, dtype=torch.float32)
    r = torch.arange(n0)
    ijk = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    children = torch.stack(
        torch.meshgrid(*[torch.arange(2)] * 3, indexing="ij"), -1
    ).reshape(-1, 3)
    s = s0
    for level in tqdm(range(levels + 1), desc="carving visual hull", disable=not progress):
        final = level == levels
        X = origin + (ijk.float() + 0.5) * s
        keep = torch.zeros(len(X), dtype=torch.bool)
        for a in range(0, len(X), 1 << 20):  # chunks bound the memory of the projections
            keep[a : a + (1 << 20)] = _carve_level(X[a : a + (1 << 20)], s, views, min_views, not final)
        if floor_y is not None:
            keep &= X[:, 1] - (0.0 if final else 0.5 * s) <= floor_y
        ijk = ijk[keep]
        if final or not len(ijk):
            break
        ijk = (ijk[:, None, :] * 2 + children[None]).reshape(-1, 3)
        s *= 0.5
    bounds = np.stack([focus - half, focus + half])
    if not len(ijk):
        return VisualHull(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), s, 0, bounds)
    surf = _surface(ijk)
    X = origin + (ijk[surf].float() + 0.5) * s
    colors, _ = _median_color(X, views, None)
    return VisualHull(X.numpy(), colors.nan_to_num(0.5).numpy(), s, int(len(ijk)), bounds)


def fibonacci_sphere(n: int) -> np.ndarray:
    """float64 [n, 3] nearly uniform unit vectors."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], -1)


def floor_points(views: list[_View], focus: np.ndarray, n_target: int, y: float = 0.0) -> np.ndarray:
    """float32 [M, 7] grid points on the plane y = ``y`` seen by at least 2 cameras (seg = 0)."""
    centres = np.stack([v.cam.center for v in views])
    # Rigs stand on the floor around the scene: the floor seen by them ends about where they stand.
    radius = float(np.max(np.linalg.norm((centres - focus)[:, [0, 2]], axis=1)))
    step = math.sqrt(math.pi * radius**2 / n_target)
    g = np.arange(-radius, radius + 1e-9, step)
    gx, gz = np.meshgrid(g + focus[0], g + focus[2])
    keep = (gx - focus[0]) ** 2 + (gz - focus[2]) ** 2 <= radius**2
    X = torch.tensor(np.stack([gx[keep], np.full(keep.sum(), y), gz[keep]], -1), dtype=torch.float32)
    return _background_points(X, views, min_seen=2)


def shell_points(views: list[_View], focus: np.ndarray, n: int, below_y: float | None) -> np.ndarray:
    """float32 [M, 7] points on a sphere just beyond the farthest camera (seg = 0)."""
    centres = np.stack([v.cam.center for v in views])
    radius = 1.1 * float(np.max(np.linalg.norm(centres - focus, axis=1)))
    X = focus + radius * fibonacci_sphere(n)
    if below_y is not None:
        X = X[X[:, 1] < below_y]
    return _background_points(torch.tensor(X, dtype=torch.float32), views, min_seen=1)


def _background_points(X: torch.Tensor, views: list[_View], min_seen: int) -> np.ndarray:
    bg_col, n_bg = _median_color(X, views, "bg")
    any_col, n_any = _median_color(X, views, None)
    # Under people every camera may see foreground: fall back to all cameras' median.
    col = torch.where((n_bg > 0)[:, None], bg_col, any_col)
    keep = n_any >= min_seen
    out = torch.cat([X[keep], col[keep], torch.zeros(int(keep.sum()), 1)], 1)
    return out.numpy().astype(np.float32)


@single_threaded
def build_init_points(
    seq: Sequence,
    frame: int = 0,
    *,
    voxel_size: float | None = None,
    min_views: int = 3,
    floor: bool | None = None,
    shell: bool | None = None,
    n_floor: int | None = None,
    n_shell: int | None = None,
    progress: bool = False,
    return_hull: bool = False,
) -> np.ndarray | tuple[np.ndarray, VisualHull]:
    """Initial point cloud float32 [N, 7] (xyz, rgb in [0, 1], seg) for ``seq`` at ``frame``.

    ``n_floor`` / ``n_shell`` (candidate floor / shell points before dropping unseen ones) default to
    one per 100 training-image pixels, between 1000 and 15000.

    Foreground (seg = 1): surface voxels of the masks' visual hull (:func:`carve_visual_hull`).
    Background (seg = 0): a floor grid on y = 0 (``floor``) and a sphere beyond the cameras
    (``shell``), coloured from background pixels. Both default to on for the Panoptic layout (whose
    world has +y down and the floor at y = 0) and off for the other formats.

    With ``return_hull`` the :class:`VisualHull` (e.g. its ``voxel_size``) is returned as well.

    Raises:
        DataError: when fewer than 3 training cameras have masks, or the hull is empty.
    """
    views = _views(seq, frame)
    is_panoptic = seq.format == "panoptic"
    floor = is_panoptic if floor is None else floor
    shell = is_panoptic if shell is None else shell
    hull = carve_visual_hull(
        seq, frame, voxel_size=voxel_size, min_views=min_views, floor_y=0.0 if floor else None,
        progress=progress, views=views,
    )
    if len(hull.points) == 0:
        raise DataError(seq.path, f"the visual hull of frame {frame} is empty (do the masks and cameras agree?)")
    parts = [np.concatenate([hull.points, hull.colors, np.ones((len(hull.points), 1), np.float32)], 1)]
    focus = axes_focus([v.cam for v in views])
    n_auto = int(np.clip(sum(v.W * v.H for v in views) // 100, 1000, 15000))
    n_floor = n_auto if n_floor is None else n_floor
    n_shell = n_auto if n_shell is None else n_shell
    if floor:
        parts.append(floor_points(views, focus, n_floor))
    if shell:
        parts.append(shell_points(views, focus, n_shell, below_y=0.0 if floor else None))
    out = np.concatenate(parts, 0).astype(np.float32)
    out[:, 3:6] = np.clip(out[:, 3:6], 0.0, 1.0)
    return (out, hull) if return_hull else out


def default_init_points_path(seq_path: str | Path) -> Path:
    p = Path(seq_path)
    return (p.parent if p.is_file() else p) / "init_pt_cld.npz"


def write_init_points(points: np.ndarray, out: str | Path, voxel_size: float | None = None) -> Path:
    """Save ``np.savez(out, data=float32[N, 7])`` atomically (plus ``voxel_size`` when given)."""
    out = Path(out)
    extra = {} if voxel_size is None else {"voxel_size": np.float32(voxel_size)}
    save_npz_atomic(out, data=np.asarray(points, dtype=np.float32), **extra)
    return out
