"""Evaluation definitions on hand-made tracks, and the tracking readout on hand-made Gaussians.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| metrics of hand-made tracks | rel 1e-9 | float64 arithmetic of the same definitions |
| project/unproject round trip | abs 1e-9 | float64 |
| readout of a rigidly moved Gaussian | abs 1e-5 | float32 storage of means/rotations |
| Kabsch rotations of exact rigid motions | abs 1e-12 | float64 SVD of 3 x 3 matrices |
| rotation error of an exact prediction | abs 1e-9 degrees | atan2 of float64 round-off |
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracking.evaluate import METRIC_KEYS, metrics_2d, metrics_3d, project, track_metrics, unproject
from tracking.metrics import ground_truth_turns, kabsch_rotations, rotation_error_deg
from tracking.result import assign_points


def test_track_metrics_by_hand():
    # Two tracks over t = 1..4 (T = 5).
    errors = np.array([[0.005, 0.03], [0.015, 0.03], [0.03, 0.6], [0.05, 0.03]])
    m = track_metrics(errors, (0.01, 0.02, 0.04, 0.08, 0.16), 0.5)
    assert m["mte"] == pytest.approx(np.median([errors[:, 0].mean(), errors[:, 1].mean()]))
    shares = [(errors < thr).mean() for thr in (0.01, 0.02, 0.04, 0.08, 0.16)]
    assert shares == [1 / 8, 2 / 8, 6 / 8, 7 / 8, 7 / 8]
    assert m["delta"] == pytest.approx(np.mean(shares) * 100)
    # Track 0 never fails (4/4), track 1 fails at its 3rd frame: 2 frames before -> 2/4.
    assert m["survival"] == pytest.approx((1.0 + 0.5) / 2 * 100)


def test_track_metrics_empty():
    assert track_metrics(np.zeros((0, 3)), (1.0,), 1.0) == {"mte": None, "delta": None, "survival": None}


def test_metrics_3d_units_and_percent():
    gt = np.zeros((3, 2, 3))
    gt[:, :, 0] = np.arange(3)[:, None] * 0.1  # both points move 10 cm per frame along x
    pred = gt.copy()
    pred[1:, :, 1] += 0.02  # 2 cm off for t >= 1
    m = metrics_3d(pred, gt, metres_per_unit=1.0, extent=2.0)
    assert m["mte_3d"] == pytest.approx(0.02)
    assert m["mte_3d_pct"] == pytest.approx(1.0)
    assert m["survival_3d"] == 100.0
    assert m["delta_3d"] == pytest.approx(np.mean([0, 0, 1, 1, 1]) * 100)  # 0.02 < 0.02 is false
    m_cm = metrics_3d(pred * 100, gt * 100, metres_per_unit=0.01, extent=200.0)  # data in centimetres
    assert m_cm["mte_3d"] == pytest.approx(0.02) and m_cm["mte_3d_pct"] == pytest.approx(1.0)


def test_metrics_2d_normalised_to_256():
    gt = np.zeros((2, 1, 2))
    pred = gt.copy()
    pred[1, 0] = [5.0, 0.0]  # 5 px along x in a 512-wide image = 2.5 px at 256
    m = metrics_2d(pred, gt, width=512, height=128)
    assert m["mte_2d"] == pytest.approx(2.5)
    pred[1, 0] = [0.0, 5.0]  # 5 px along y in a 128-high image = 10 px at 256
    assert metrics_2d(pred, gt, width=512, height=128)["mte_2d"] == pytest.approx(10.0)


def test_project_unproject_round_trip():
    K = np.array([[100.0, 0, 40], [0, 110.0, 30], [0, 0, 1]])
    R = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    R *= np.sign(np.linalg.det(R))
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, [0.1, -0.2, 3.0]
    pts = np.random.default_rng(1).normal(size=(20, 3)) * 0.3
    uv, z = project(pts, K, w2c)
    np.testing.assert_allclose(unproject(uv, z, K, w2c), pts, atol=1e-9)


def test_assign_points_highest_influence_and_background():
    means = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    log_scales = torch.log(torch.tensor([[0.1, 0.1, 0.1], [0.5, 0.5, 0.5]]))
    opac = torch.tensor([0.9, 0.9])
    pts = torch.tensor([[0.01, 0.0, 0.0], [0.9, 0.0, 0.0], [5.0, 5.0, 5.0]])
    idx, infl = assign_points(pts, means, quats, log_scales, opac, 0.5)
    assert idx.tolist() == [0, 1, -1]
    assert infl[0].item() == pytest.approx(0.9 * np.exp(-0.5 * (0.01 / 0.1) ** 2))


def test_metric_keys_contract():
    assert METRIC_KEYS == ("psnr", "ssim", "lpips", "mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_2d",
                           "delta_2d", "survival_2d", "n_gaussians", "seconds", "preset")


def _axis_angle(axis, angle):
    a = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def test_kabsch_rotations_of_rigid_motions_and_of_a_mirror():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 12, 3))
    R = np.stack([_axis_angle(rng.normal(size=3), a) for a in (0.0, 0.3, 1.5, 3.0, -2.0)])
    dst = np.einsum("bij,bkj->bki", R, src) + rng.normal(size=(5, 1, 3))
    np.testing.assert_allclose(kabsch_rotations(src, dst), R, atol=1e-12)
    # A mirrored copy has no rotation onto it: the fit stays a rotation (det +1), not the reflection.
    mirrored = src[0] * np.array([1.0, 1.0, -1.0])
    fit = kabsch_rotations(src[0], mirrored)
    assert np.linalg.det(fit) == pytest.approx(1.0) and np.allclose(fit @ fit.T, np.eye(3))


def test_ground_truth_turns_and_rotation_error():
    rng = np.random.default_rng(1)
    n_frames = 4
    spin = [_axis_angle([0, 1, 0], 0.1 * t) for t in range(n_frames)]  # object 0: 0.1 rad a frame about y
    roll = [_axis_angle([1, 0, 0], -0.2 * t) for t in range(n_frames)]  # object 1: 0.2 rad a frame about x
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(25, 3))
    points = np.stack([np.concatenate([a @ spin[t].T + t, b @ roll[t].T + 10 - t, np.full((2, 3), 5.0)])
                       for t in range(n_frames)])  # [T, 57, 3]; object 2 has 2 tracks: too few to fit
    ids = np.r_[np.zeros(30, int), np.ones(25, int), np.full(2, 2)]
    truth = ground_truth_turns(points, ids, k=8)
    np.testing.assert_allclose(truth[:, :30], np.broadcast_to(np.stack(spin)[:, None], (n_frames, 30, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose(truth[:, 30:55], np.broadcast_to(np.stack(roll)[:, None], (n_frames, 25, 3, 3)),
                               atol=1e-12)
    assert np.isnan(truth[:, 55:]).all()
    assert rotation_error_deg(truth, truth)["rotation_error_3d_deg"] == pytest.approx(0.0, abs=1e-9)
    # Gaussians that never turn: per track the mean over t = 1..3 of its object's angle, median over the
    # 55 tracks with a ground truth (30 at 0.2 rad on average, 25 at 0.4): the first object's.
    still = np.broadcast_to(np.eye(3), truth.shape)
    assert rotation_error_deg(still, truth)["rotation_error_3d_deg"] == pytest.approx(np.degrees(0.2), rel=1e-9)
    # Turning the wrong way about the right axis doubles the error.
    wrong = np.swapaxes(truth, -1, -2)
    assert rotation_error_deg(wrong, truth)["rotation_error_3d_deg"] == pytest.approx(np.degrees(0.4), rel=1e-9)
    assert rotation_error_deg(truth[:1], truth[:1])["rotation_error_3d_deg"] is None  # no t >= 1


def test_ground_truth_turns_are_local_to_an_articulated_object():
    """Two rigid halves of one object (same id), far apart, turning differently: each track's fit uses its own
    half's tracks, so both rotations are exact."""
    rng = np.random.default_rng(2)
    upper, lower = rng.normal(size=(20, 3)) * 0.1, rng.normal(size=(20, 3)) * 0.1 + [0.0, 3.0, 0.0]
    bend = [_axis_angle([0, 0, 1], 0.3 * t) for t in range(3)]
    points = np.stack([np.concatenate([upper, (lower - [0, 3, 0]) @ bend[t].T + [0, 3, 0]]) for t in range(3)])
    truth = ground_truth_turns(points, np.zeros(40, int), k=8)
    np.testing.assert_allclose(truth[:, :20], np.broadcast_to(np.eye(3), (3, 20, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(truth[:, 20:], np.broadcast_to(np.stack(bend)[:, None], (3, 20, 3, 3)), atol=1e-12)


def test_ground_truth_turns_with_missing_and_degenerate_points():
    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(12, 3))
    line = np.outer(np.arange(6.0), [1.0, 2.0, 3.0]) + 50  # object 1: collinear, its twist is undetermined
    points = np.stack([np.concatenate([cloud, line])] * 3)
    points[0, 0] = np.nan  # not there at t = 0: no rotation, and no neighbour of the others
    points[2, 5] = np.nan  # missing at t = 2 only
    ids = np.r_[np.zeros(12, int), np.ones(6, int)]
    truth = ground_truth_turns(points, ids, k=4)
    assert np.isnan(truth[:, 0]).all() and np.isnan(truth[:, 12:]).all()
    ok = np.isfinite(truth).all((-2, -1))  # [T, P]
    assert ok[:2, 1:12].all() and not ok[2, 5]  # the track itself is in its neighbourhood
    np.testing.assert_allclose(truth[ok], np.broadcast_to(np.eye(3), truth[ok].shape), atol=1e-12)
    per_track = rotation_error_deg(np.broadcast_to(np.eye(3), truth.shape).copy(), truth)
    assert per_track["rotation_error_3d_deg"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="object_ids"):
        ground_truth_turns(points, ids[:-1])
    with pytest.raises(ValueError, match="one shape"):
        rotation_error_deg(truth[:, :5], truth)
