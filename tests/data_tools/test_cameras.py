"""Camera conventions, conversions and validation.

| check                                           | tolerance        |
|-------------------------------------------------|------------------|
| projection vs hand-computed K [R|t] X            | 1e-9 px          |
| pixel rays re-project to their pixel centres     | 1e-6 px          |
| scaled(): pixel edges map to pixel edges         | 1e-9 px          |
| OpenGL -> OpenCV: camera looks along -z_gl        | 1e-12            |
| rigidity check rejects scale / shear / mirror    | deviation > 1e-4 |
"""

from __future__ import annotations

import numpy as np
import pytest

from data_tools import Camera, DataError, look_at_w2c, opengl_c2w_to_w2c
from data_tools.cameras import axes_focus, check_intrinsics, check_rigid, scene_radius


def _cam(cam_id=0, eye=(0.0, -1.0, -3.0), target=(0.0, 0.0, 0.0), w=64, h=48, f=50.0):
    K = np.array([[f, 0, w / 2 + 0.3], [0, f * 1.1, h / 2 - 0.2], [0, 0, 1]])
    return Camera(cam_id, K, look_at_w2c(eye, target), w, h)


def test_project_matches_matrix_product():
    cam = _cam()
    X = np.random.default_rng(0).normal(size=(20, 3)) * 0.3
    uv, z = cam.project(X)
    P = cam.K @ cam.w2c[:3]
    hom = np.c_[X, np.ones(len(X))] @ P.T
    np.testing.assert_allclose(uv, hom[:, :2] / hom[:, 2:], atol=1e-9)
    np.testing.assert_allclose(z, hom[:, 2], atol=1e-12)


def test_look_at_points_optical_axis_at_target_and_keeps_down_down():
    cam = _cam()
    uv, z = cam.project(np.zeros((1, 3)))
    np.testing.assert_allclose(uv[0], cam.K[:2, 2], atol=1e-9)  # the target is on the optical axis
    assert z[0] > 0
    # A point below the target (+y world = down) appears lower in the image (larger v).
    uv_down, _ = cam.project(np.array([[0.0, 0.3, 0.0]]))
    assert uv_down[0, 1] > uv[0, 1]
    np.testing.assert_allclose(cam.center, [0.0, -1.0, -3.0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(cam.R), 1.0, atol=1e-12)


def test_pixel_rays_hit_pixel_centres():
    cam = _cam()
    origin, dirs = cam.pixel_rays()
    X = origin + 2.0 * dirs.reshape(-1, 3)
    uv, _ = cam.project(X)
    jj, ii = np.mgrid[0 : cam.height, 0 : cam.width]
    np.testing.assert_allclose(uv[:, 0], ii.ravel() + 0.5, atol=1e-6)
    np.testing.assert_allclose(uv[:, 1], jj.ravel() + 0.5, atol=1e-6)


def test_scaled_maps_pixel_edges_to_pixel_edges():
    cam = _cam(w=640, h=360, f=500.0)
    small = cam.scaled(0.25)
    assert (small.width, small.height) == (160, 90)
    X = np.random.default_rng(1).normal(size=(10, 3)) * 0.2
    uv, _ = cam.project(X)
    uv_s, _ = small.project(X)
    np.testing.assert_allclose(uv_s, uv * [160 / 640, 90 / 360], atol=1e-9)
    # Non-integer factor: the exact size ratio per axis.
    odd = cam.scaled(1 / 3)
    assert (odd.width, odd.height) == (213, 120)
    np.testing.assert_allclose(odd.K[0, 0], cam.K[0, 0] * 213 / 640)
    np.testing.assert_allclose(odd.K[1, 2], cam.K[1, 2] * 120 / 360)


def test_opengl_conversion():
    # A Blender camera at (0, 0, 4) looking at the origin: identity rotation in OpenGL axes.
    c2w_gl = np.eye(4)
    c2w_gl[2, 3] = 4.0
    w2c = opengl_c2w_to_w2c(c2w_gl)
    cam = Camera(0, np.array([[100.0, 0, 50], [0, 100, 50], [0, 0, 1]]), w2c, 100, 100)
    np.testing.assert_allclose(cam.center, [0, 0, 4], atol=1e-12)
    np.testing.assert_allclose(cam.forward, [0, 0, -1], atol=1e-12)
    # World +y (Blender up) must appear at the top of the image (smaller v).
    uv, _ = cam.project(np.array([[0.0, 0.5, 0.0]]))
    assert uv[0, 1] < 50


@pytest.mark.parametrize(
    "bad",
    [
        np.diag([1.0, 1.0, 1.01, 1.0]),  # scale
        np.diag([1.0, -1.0, 1.0, 1.0]),  # mirror (det -1)
        np.array([[1, 0.01, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),  # shear
        np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]),  # projective last row
    ],
)
def test_non_rigid_w2c_is_rejected(bad):
    with pytest.raises(DataError, match="rigid|last row"):
        check_rigid(bad, "cams.json", "w2c")


def test_rigid_w2c_is_reorthonormalised():
    R = look_at_w2c((1, -1, -2), (0, 0, 0))
    R[:3, :3] += 3e-5  # rounding noise within tolerance
    M = check_rigid(R)
    np.testing.assert_allclose(M[:3, :3].T @ M[:3, :3], np.eye(3), atol=1e-12)


@pytest.mark.parametrize(
    "K",
    [
        [[0, 0, 1], [0, 1, 1], [0, 0, 1]],  # singular
        [[1, 0, 1], [0, 1, 1], [0, 1, 1]],  # bad bottom row
        [[-5, 0, 1], [0, 5, 1], [0, 0, 1]],  # mirrored
    ],
)
def test_bad_intrinsics_are_rejected(K):
    with pytest.raises(DataError, match="meta.json"):
        check_intrinsics(K, "meta.json")


def test_scene_radius_and_focus():
    cams = [_cam(i, eye=(3 * np.cos(a), -1.0, 3 * np.sin(a))) for i, a in enumerate(np.linspace(0, 6, 8))]
    np.testing.assert_allclose(axes_focus(cams), [0, 0, 0], atol=1e-9)
    centres = np.stack([c.center for c in cams])
    expected = 1.1 * np.linalg.norm(centres - centres.mean(0), axis=1).max()
    assert scene_radius(cams) == pytest.approx(expected)
