"""Initial point clouds: visual hull + floor + shell.

| check                                                                     | criterion                  |
|---------------------------------------------------------------------------|----------------------------|
| basketball frame 0, every training camera: IoU(mask, hull splatted with     | >= 0.8 (measured ~0.92)    |
|   each voxel as a square of the voxel's projected size)                     |                            |
| hull points project onto mask foreground in every training camera           | >= 99%                     |
| people stand on the floor: hull lowest point                                | within 2 voxels of y = 0   |
| floor points lie on y = 0; shell points lie beyond every camera              | exact / > max camera dist  |
| synthetic scene: hull surface points near the true analytic surfaces         | 90% < 1 voxel, 99% < 2     |
| a sequence without masks is refused                                         | DataError                  |
"""

from __future__ import annotations

import numpy as np
import pytest

from data_tools import DataError, build_init_points, load
from data_tools.cameras import axes_focus
from data_tools.synthetic import _place, build_scene


def splat_voxels(cam, points, voxel):
    """bool [H, W]: union of squares of side voxel * f / z centred at each point's projection
    (pixel i is covered when its centre i + 0.5 lies in [u - r, u + r))."""
    uv, z = cam.project(points)
    ok = z > 0
    uv, z = uv[ok], z[ok]
    r = 0.5 * voxel * cam.K[0, 0] / z
    u0 = np.clip(np.ceil(uv[:, 0] - r - 0.5), 0, cam.width).astype(int)
    u1 = np.clip(np.ceil(uv[:, 0] + r - 0.5), 0, cam.width).astype(int)
    v0 = np.clip(np.ceil(uv[:, 1] - r - 0.5), 0, cam.height).astype(int)
    v1 = np.clip(np.ceil(uv[:, 1] + r - 0.5), 0, cam.height).astype(int)
    keep = (u1 > u0) & (v1 > v0)
    diff = np.zeros((cam.height + 1, cam.width + 1), np.int64)
    for a, b, s in ((v0, u0, 1), (v1, u1, 1), (v0, u1, -1), (v1, u0, -1)):
        np.add.at(diff, (a[keep], b[keep]), s)
    return diff.cumsum(0).cumsum(1)[: cam.height, : cam.width] > 0


@pytest.fixture(scope="module")
def basketball_points(basketball):
    seq = load(basketball)
    pts, hull = build_init_points(seq, 0, return_hull=True)
    return seq, pts, hull


def test_basketball_hull_iou_every_training_camera(basketball_points):
    seq, pts, hull = basketball_points
    fg = pts[pts[:, 6] == 1, :3].astype(np.float64)
    np.testing.assert_allclose(fg, hull.points, atol=1e-6)
    ious = []
    for cam in seq.train_cameras:
        mask = seq.mask(0, cam)
        sil = splat_voxels(cam, fg, hull.voxel_size)
        ious.append((sil & mask).sum() / (sil | mask).sum())
    print("IoU per camera:", np.round(ious, 3))
    assert min(ious) >= 0.8, ious


def test_basketball_point_cloud_layout(basketball_points):
    seq, pts, hull = basketball_points
    assert pts.dtype == np.float32 and pts.shape[1] == 7
    assert set(np.unique(pts[:, 6])) == {0.0, 1.0}
    assert (pts[:, 3:6] >= 0).all() and (pts[:, 3:6] <= 1).all()
    fg, bg = pts[pts[:, 6] == 1], pts[pts[:, 6] == 0]
    assert 10_000 < len(fg) < 100_000 and 5_000 < len(bg) < 60_000
    # hull points are on the masks of every camera (the carving rule)
    for cam in seq.train_cameras:
        uv, z = cam.project(fg[:, :3])
        inside = cam.in_image(uv, z)
        mask = seq.mask(0, cam)
        on = mask[uv[inside, 1].astype(int), uv[inside, 0].astype(int)]
        assert on.mean() >= 0.99
    assert fg[:, 1].max() > -2 * hull.voxel_size and fg[:, 1].max() <= 1e-6  # feet on the floor
    assert fg[:, 1].min() < -1.5  # people are taller than 1.5 m
    centres = np.stack([c.center for c in seq.train_cameras])
    floor = bg[bg[:, 1] == 0]
    shell = bg[bg[:, 1] != 0]
    assert len(floor) > 1000 and len(shell) > 1000
    assert shell[:, 1].max() < 0  # above the floor only
    focus = axes_focus(seq.train_cameras)
    assert np.linalg.norm(shell[:, :3] - focus, axis=1).min() > np.linalg.norm(centres - focus, axis=1).max()
    # floor colours are the grey floor, not the people: low saturation
    sat = floor[:, 3:6].max(1) - floor[:, 3:6].min(1)
    assert np.median(sat) < 0.1


def test_voxel_size_option(basketball):
    seq = load(basketball, cameras=list(range(1, 30)))
    pts, hull = build_init_points(seq, 0, voxel_size=0.05, floor=False, shell=False, return_hull=True)
    assert hull.voxel_size == pytest.approx(0.05)
    assert (pts[:, 6] == 1).all() and 500 < len(pts) < 5000


def _analytic_distance(X, placed):
    """Distance of points X [N, 3] to the union of the parts' surfaces (sphere, box, capsule)."""
    best = np.full(len(X), np.inf)
    for pp in placed:
        q = (X - pp.T) @ pp.R
        p = pp.part
        if p.kind == "sphere":
            d = np.abs(np.linalg.norm(q, axis=1) - p.radius)
        elif p.kind == "box":
            e = np.abs(q) - p.half
            d = np.abs(np.linalg.norm(np.maximum(e, 0), axis=1) + np.minimum(e.max(1), 0))
        else:
            ba = p.b - p.a
            s = np.clip((q - p.a) @ ba / (ba @ ba), 0, 1)
            d = np.abs(np.linalg.norm(q - (p.a + s[:, None] * ba), axis=1) - p.radius)
        best = np.minimum(best, d)
    return best


def test_synthetic_hull_is_near_the_true_surfaces(small_synth):
    seq = load(small_synth)
    pts, hull = build_init_points(seq, 0, return_hull=True)
    fg = pts[pts[:, 6] == 1, :3].astype(np.float64)
    assert len(fg) > 200
    seed = seq.meta["synth"]["seed"]
    d = _analytic_distance(fg, _place(build_scene(seed), 0.0)) / hull.voxel_size
    assert np.mean(d < 1.0) >= 0.9 and np.mean(d < 2.0) >= 0.99, np.percentile(d, [50, 90, 99])
    # the file written by synth was built the same way
    saved = np.load(small_synth / "init_pt_cld.npz")["data"]
    np.testing.assert_allclose(saved, pts, atol=1e-6)


def test_no_masks_is_refused(temple):
    with pytest.raises(DataError, match="needs foreground masks"):
        build_init_points(load(temple), 0)
