"""Evaluation definitions on hand-made tracks, and the tracking readout on hand-made Gaussians.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| metrics of hand-made tracks | rel 1e-9 | float64 arithmetic of the same definitions |
| project/unproject round trip | abs 1e-9 | float64 |
| readout of a rigidly moved Gaussian | abs 1e-5 | float32 storage of means/rotations |
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracking.evaluate import METRIC_KEYS, metrics_2d, metrics_3d, project, track_metrics, unproject
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
