"""Synthetic scenes with ground-truth tracks.

| check                                                                  | criterion                          |
|------------------------------------------------------------------------|------------------------------------|
| gt_tracks.npz keys, shapes, dtypes; cam_ids in train_meta order          | exact                              |
| same seed -> identical files; other seed -> different images            | exact                              |
| rigid parts keep pairwise distances over time                           | 1e-5 m                             |
| GT points are on the analytic surfaces at every frame                   | 1e-5 m                             |
| all points above the floor (+y down, floor y = 0); in every image        | y <= 1e-6; 100% in all cameras      |
| motion per frame is moderate                                            | mean < 5 cm, max < 10 cm            |
| colour of a visible point agrees between cameras (render <-> GT)         | median |diff| < 0.06, shuffled >1.8x|
| visible = inside image & unoccluded & on the mask                        | mask true at every visible point    |
| extent: diameter of the minimum enclosing sphere                        | D <= extent <= D sqrt(3/2) (Jung)   |
| bounding_sphere is minimal (brute force over 2-4 point subsets)         | 1e-9 relative                      |
"""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from data_tools import load, make_synthetic_scene
from data_tools.synthetic import _place, bounding_sphere, build_scene

from .test_init_points import _analytic_distance


@pytest.fixture(scope="module")
def gt(small_synth):
    with np.load(small_synth / "gt_tracks.npz") as f:
        return {k: f[k] for k in f.files}


def test_layout_and_shapes(small_synth, gt):
    seq = load(small_synth)
    meta = json.loads((small_synth / "train_meta.json").read_text())
    test_meta = json.loads((small_synth / "test_meta.json").read_text())
    T, P, _ = gt["points"].shape
    assert seq.format == "panoptic" and seq.n_frames == T == 4
    assert (seq.width, seq.height) == (128, 96)
    assert gt["points"].dtype == np.float32 and 300 <= P <= 3000
    assert gt["visible"].shape == (T, P, 6) and gt["visible"].dtype == bool
    assert gt["visible_test"].shape == (T, P, 1) and gt["visible_test"].dtype == bool
    assert gt["cam_ids"].tolist() == meta["cam_id"][0] == [c.id for c in seq.train_cameras]
    assert np.issubdtype(gt["cam_ids"].dtype, np.integer)
    assert gt["extent"].shape == () and gt["extent"].dtype == np.float32
    assert meta["background"] == test_meta["background"] and seq.background == tuple(meta["background"])
    assert meta["synth"]["seed"] == 3 and meta["synth"]["frames"] == 4 and meta["synth"]["cameras"] == 6
    init = seq.init_points()
    assert init is not None and (init[:, 6] == 1).sum() > 200 and (init[:, 6] == 0).sum() > 200
    # every point is seen by >= 2 training cameras at t = 0
    assert (gt["visible"][0].sum(1) >= 2).all()


def test_points_move_rigidly_on_the_true_surfaces(gt, small_synth):
    pts = gt["points"].astype(np.float64)
    parts = build_scene(3)
    for t in range(len(pts)):
        d = _analytic_distance(pts[t], _place(parts, float(t)))
        assert d.max() < 1e-5
    assert pts[..., 1].max() <= 1e-6  # above the floor (+y down)
    for oid in (1, 2, 3, 5):  # rigid objects: pairwise distances are constant
        sub = pts[:, gt["object_ids"] == oid][:, :60]
        dist = np.linalg.norm(sub[:, :, None] - sub[:, None], axis=-1)
        assert np.abs(dist - dist[0]).max() < 1e-5
    arm = pts[:, gt["object_ids"] == 4]
    assert np.linalg.norm(arm[-1] - arm[0], axis=-1).max() > 0.03  # the limb moves
    step = np.linalg.norm(np.diff(pts, axis=0), axis=-1)
    assert step.mean() < 0.05 and step.max() < 0.10 and step.mean() > 0.005
    seq = load(small_synth)
    for cam in seq.cameras:  # every camera sees all objects
        for t in range(len(pts)):
            uv, z = cam.project(pts[t])
            assert cam.in_image(uv, z).all()


def test_visibility_agrees_with_images_and_masks(small_synth, gt):
    seq = load(small_synth)
    pts, vis = gt["points"].astype(np.float64), gt["visible"]
    diffs, shuffled = [], []
    rng = np.random.default_rng(0)
    for t in range(seq.n_frames):
        cols = np.full((len(seq.train_cameras), pts.shape[1], 3), np.nan)
        for c, cam in enumerate(seq.train_cameras):
            uv, z = cam.project(pts[t])
            iu = np.clip(uv[:, 0], 0, cam.width - 1).astype(int)
            iv = np.clip(uv[:, 1], 0, cam.height - 1).astype(int)
            mask = seq.mask(t, cam)
            assert mask[iv[vis[t, :, c]], iu[vis[t, :, c]]].all()
            cols[c, vis[t, :, c]] = _bilinear(seq.image(t, cam), uv)[vis[t, :, c]]
        for p in range(pts.shape[1]):
            seen = np.nonzero(vis[t, p])[0]
            if len(seen) >= 2:
                a, b = rng.choice(seen, 2, replace=False)
                diffs.append(np.abs(cols[a, p] - cols[b, p]).mean())
                q = rng.integers(pts.shape[1])
                if not np.isnan(cols[b, q, 0]):
                    shuffled.append(np.abs(cols[a, p] - cols[b, q]).mean())
    assert len(diffs) > 1000
    assert np.median(diffs) < 0.06 and np.median(shuffled) > 1.8 * np.median(diffs), (
        np.median(diffs), np.median(shuffled))
    assert 0.2 < vis.mean() < 0.8  # occlusion, back faces and mask edges hide a good part


def _bilinear(img, uv):
    """Colours [N, 3] at continuous pixel positions (pixel centres at i + 0.5)."""
    x = np.clip(uv[:, 0] - 0.5, 0, img.shape[1] - 1.001)
    y = np.clip(uv[:, 1] - 0.5, 0, img.shape[0] - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return (img[y0, x0] * (1 - fx) * (1 - fy) + img[y0, x0 + 1] * fx * (1 - fy)
            + img[y0 + 1, x0] * (1 - fx) * fy + img[y0 + 1, x0 + 1] * fx * fy)


def test_extent_is_bounding_sphere_diameter(gt):
    pts = gt["points"].reshape(-1, 3).astype(np.float64)
    sub = pts[:: max(1, len(pts) // 3000)]
    diam = max(np.linalg.norm(sub[i:i + 500, None] - sub[None], axis=-1).max() for i in range(0, len(sub), 500))
    extent = float(gt["extent"])
    assert diam - 1e-6 <= extent <= diam * np.sqrt(1.5)
    c, r = bounding_sphere(pts)
    assert np.linalg.norm(pts - c, axis=1).max() <= r + 1e-9
    assert 2 * r == pytest.approx(extent, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounding_sphere_is_minimal(seed):
    P = np.random.default_rng(seed).normal(size=(9, 3)) * [1, 0.5, 0.2]
    best = np.inf
    for k in (2, 3, 4):
        for idx in itertools.combinations(range(len(P)), k):
            from data_tools.synthetic import _circumsphere

            c, r = _circumsphere([P[i] for i in idx])
            if np.linalg.norm(P - c, axis=1).max() <= r * (1 + 1e-9):
                best = min(best, r)
    c, r = bounding_sphere(P)
    assert r == pytest.approx(best, rel=1e-9)


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    kw = dict(cameras=3, test_cameras=1, width=40, height=30, frames=2)
    a = make_synthetic_scene(tmp_path / "a", seed=5, **kw)
    b = make_synthetic_scene(tmp_path / "b", seed=5, **kw)
    c = make_synthetic_scene(tmp_path / "c", seed=6, **kw)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary folders left behind
