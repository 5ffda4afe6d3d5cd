"""Blender / NeRF-synthetic: the real lego_200 data.

| check                                                         | tolerance / criterion           |
|---------------------------------------------------------------|---------------------------------|
| every camera centre at the common orbit radius                 | 1e-4 relative                   |
| optical axis points at the origin                              | angle < 0.1 degree              |
| focal length 0.5 W / tan(angle / 2), principal point W/2, H/2   | 1e-9                            |
| coarse visual hull (4 cm) of 25 alpha masks is non-empty        | >= 100 voxels                   |
| the hull explains the masks of the held-out test cameras        | >= 90% of mask pixels covered   |
| Blender world +z (up) appears upwards in the images             | hull top projects above bottom  |
| white - black composite == 1 - alpha                            | 1e-6                            |
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from data_tools import load


@pytest.fixture(scope="module")
def seq(lego):
    return load(lego)


def test_counts_and_intrinsics(seq, lego):
    meta = json.loads((lego / "transforms_train.json").read_text())
    assert seq.format == "blender" and seq.n_frames == 1
    assert len(seq.train_cameras) == 100 and len(seq.test_cameras) == 25
    f = 0.5 * 200 / math.tan(0.5 * meta["camera_angle_x"])
    for cam in seq.cameras[:5]:
        np.testing.assert_allclose(cam.K, [[f, 0, 100], [0, f, 100], [0, 0, 1]], atol=1e-9)
    assert seq.background == (1.0, 1.0, 1.0)


def test_cameras_on_a_sphere_looking_at_origin(seq):
    radii = np.array([np.linalg.norm(c.center) for c in seq.cameras])
    np.testing.assert_allclose(radii, np.median(radii), rtol=1e-4)
    assert 3.5 < np.median(radii) < 4.5
    for cam in seq.cameras:
        to_origin = -cam.center / np.linalg.norm(cam.center)
        assert np.degrees(np.arccos(np.clip(cam.forward @ to_origin, -1, 1))) < 0.1
        uv, z = cam.project(np.zeros((1, 3)))
        assert z[0] > 0 and np.abs(uv[0] - 100).max() < 0.5


def test_alpha_visual_hull_explains_held_out_masks(seq):
    g = np.arange(-1.5, 1.5, 0.04) + 0.02
    X = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    keep = np.ones(len(X), bool)
    for cam in seq.train_cameras[::4]:
        mask = seq.mask(0, cam)
        uv, z = cam.project(X)
        iu = np.clip(uv[:, 0], 0, 199).astype(int)
        iv = np.clip(uv[:, 1], 0, 199).astype(int)
        keep &= mask[iv, iu]
    hull = X[keep]
    assert len(hull) >= 100
    for cam in seq.test_cameras[:8]:
        mask = seq.mask(0, cam)
        uv, z = cam.project(hull)
        r = int(math.ceil(0.03 * cam.K[0, 0] / z.min()))
        hit = np.zeros_like(mask)
        for u, v in uv.astype(int):
            hit[max(v - r, 0) : v + r + 1, max(u - r, 0) : u + r + 1] = True
        assert (hit & mask).sum() >= 0.9 * mask.sum()
    # Blender's +z is up: the top of the model appears above its bottom in a side view.
    cam = seq.test_cameras[0]
    top = hull[hull[:, 2] > np.percentile(hull[:, 2], 90)].mean(0)
    bottom = hull[hull[:, 2] < np.percentile(hull[:, 2], 10)].mean(0)
    uv, _ = cam.project(np.stack([top, bottom]))
    assert uv[0, 1] < uv[1, 1]


def test_background_compositing_and_mask(lego):
    white = load(lego, cameras=[3])
    black = load(lego, cameras=[3], background="black")
    assert black.background == (0.0, 0.0, 0.0)
    rgba = np.asarray(Image.open(white.image_path(0, 3)), dtype=np.float32) / 255
    alpha = rgba[..., 3:]
    difference = white.image(0, 3) - black.image(0, 3)
    np.testing.assert_allclose(difference, np.broadcast_to(1 - alpha, (200, 200, 3)), atol=1e-6)
    np.testing.assert_array_equal(white.mask(0, 3), alpha[..., 0] >= 0.5)


def test_single_transforms_json_uses_test_every(lego, tmp_path):
    meta = json.loads((lego / "transforms_train.json").read_text())
    meta["frames"] = meta["frames"][:10]
    (tmp_path / "train").symlink_to(lego / "train")
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    seq = load(tmp_path, test_every=4)
    assert [c.id for c in seq.test_cameras] == [0, 4, 8] and len(seq.train_cameras) == 7
    full = load(lego, cameras=[5])
    np.testing.assert_allclose(seq.camera(5).w2c, full.camera(5).w2c)
