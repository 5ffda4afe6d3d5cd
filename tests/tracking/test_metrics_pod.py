"""PointOdyssey-style track reductions and the per-channel PSNR on hand-computed arrays.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| metrics of hand-made tracks | rel 1e-9 | float64 arithmetic of the same definitions |
| per-channel PSNR of constant images | rel 1e-9 | float64 MSE of exact values |
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tracking.losses import psnr
from tracking.metrics import metrics_2d, metrics_3d, pod_track_metrics, psnr_per_channel, track_metrics

THRESHOLDS_CM = (1.0, 2.0, 4.0, 8.0, 16.0)
# Two tracks over t = 0..3 (cm); t = 0 is the query frame.
ERRORS = np.array([[0.0, 0.0], [0.5, 10.0], [1.5, 60.0], [3.0, 5.0]])


def test_pod_mte_is_the_mean_over_tracks_of_the_median_over_time_with_t0():
    m = pod_track_metrics(ERRORS, None, THRESHOLDS_CM, 50.0)
    # medians (0, 0.5, 1.5, 3) -> 1.0 and (0, 10, 60, 5) -> 7.5; mean 4.25
    assert m["mte"] == pytest.approx(4.25, rel=1e-9)
    # the first definition on the same errors: means over t >= 1 (1.667, 25), median 13.33
    assert track_metrics(ERRORS[1:], THRESHOLDS_CM, 50.0)["mte"] == pytest.approx((5 / 3 + 25) / 2, rel=1e-9)


def test_pod_delta_excludes_t0_and_pools_all_pairs():
    m = pod_track_metrics(ERRORS, None, THRESHOLDS_CM, 50.0)
    # pairs t >= 1: 0.5, 1.5, 3, 10, 60, 5 -> below 1, 2, 4, 8, 16: 1, 2, 3, 4, 5 of 6
    assert m["delta"] == pytest.approx(np.mean([1, 2, 3, 4, 5]) / 6 * 100, rel=1e-9)
    # t = 0 counts nowhere in delta: a huge t = 0 error changes nothing
    bad0 = ERRORS.copy()
    bad0[0] = 99.0
    assert pod_track_metrics(bad0, None, THRESHOLDS_CM, 500.0)["delta"] == pytest.approx(m["delta"], rel=1e-9)


def test_pod_survival_is_a_running_product_over_all_frames():
    m = pod_track_metrics(ERRORS, None, THRESHOLDS_CM, 50.0)
    # track 0 alive at 4/4 frames, track 1 dies at t = 2 (60 > 50): alive at t = 0, 1 -> 6 of 8
    assert m["survival"] == pytest.approx(75.0, rel=1e-9)
    # t = 0 counts: a failure at t = 0 kills the whole track
    bad0 = ERRORS.copy()
    bad0[0, 0] = 51.0
    assert pod_track_metrics(bad0, None, THRESHOLDS_CM, 50.0)["survival"] == pytest.approx(25.0, rel=1e-9)
    # the first definition: track 1 survives 1 of 3 frames t >= 1 -> (1 + 1/3) / 2
    assert track_metrics(ERRORS[1:], THRESHOLDS_CM, 50.0)["survival"] == pytest.approx(200 / 3, rel=1e-9)


def test_pod_invalid_frames_are_skipped_and_never_fail():
    valid = np.ones_like(ERRORS, dtype=bool)
    valid[2, 1] = False  # the 60 cm error has no ground truth
    m = pod_track_metrics(ERRORS, valid, THRESHOLDS_CM, 50.0)
    assert m["survival"] == pytest.approx(100.0, rel=1e-9)
    assert m["mte"] == pytest.approx((1.0 + 5.0) / 2, rel=1e-9)  # median(0, 10, 5) = 5
    assert m["delta"] == pytest.approx(np.mean([1, 2, 3, 4, 5]) / 5 * 100, rel=1e-9)  # 5 pairs left


def test_pod_non_finite_prediction_is_infinitely_far():
    err = np.array([[0.0], [np.nan], [1.0]])
    m = pod_track_metrics(err, None, THRESHOLDS_CM, 50.0)
    assert m["survival"] == pytest.approx(100 / 3, rel=1e-9)  # alive at t = 0 only
    assert m["mte"] == pytest.approx(1.0, rel=1e-9)  # median(0, inf, 1)
    assert m["delta"] == pytest.approx(np.mean([0, 0.5, 0.5, 0.5, 0.5]) * 100, rel=1e-9)


def test_pod_empty_and_shape_errors():
    assert pod_track_metrics(np.zeros((0, 2)), None, THRESHOLDS_CM, 50.0) == {"mte": None, "delta": None,
                                                                               "survival": None}
    with pytest.raises(ValueError, match="valid must have the shape"):
        pod_track_metrics(ERRORS, np.ones((4, 3), bool), THRESHOLDS_CM, 50.0)


def test_metrics_3d_pod_keys_in_centimetres():
    gt = np.zeros((3, 2, 3))
    pred = gt.copy()
    pred[1:, :, 1] += 0.02  # 2 cm off for t >= 1
    m = metrics_3d(pred, gt)
    assert m["mte_3d_pod_cm"] == pytest.approx(2.0, rel=1e-9)  # median(0, 2, 2)
    assert m["delta_3d_pod"] == pytest.approx(np.mean([0, 0, 1, 1, 1]) * 100, rel=1e-9)  # 2 < 2 is false
    assert m["survival_3d_pod"] == 100.0
    far = pred.copy()
    far[2, 0, 0] = 0.6  # 60 cm off at t = 2 for track 0: dead there (50 cm)
    assert metrics_3d(far, gt)["survival_3d_pod"] == pytest.approx((3 + 2) / 6 * 100, rel=1e-9)
    assert metrics_3d(pred[:1], gt[:1])["mte_3d_pod_cm"] is None  # one frame: no tracking metrics


def test_metrics_2d_pod_keys_scaled_to_256_with_valid_mask():
    gt = np.zeros((3, 2, 2))
    pred = gt.copy()
    pred[1:, 0] = [5.0, 0.0]  # 5 px along x in a 512-wide image = 2.5 px at 256
    pred[1:, 1] = [0.0, 30.0]  # 30 px along y in a 128-high image = 60 px at 256
    m = metrics_2d(pred, gt, width=512, height=128)
    assert m["mte_2d_pod"] == pytest.approx((2.5 + 60.0) / 2, rel=1e-9)
    assert m["survival_2d_pod"] == pytest.approx((3 + 1) / 6 * 100, rel=1e-9)
    assert m["delta_2d_pod"] == pytest.approx(np.mean([0, 0, 0.5, 0.5, 0.5]) * 100, rel=1e-9)
    valid = np.ones((3, 2), bool)
    valid[1:, 1] = False  # track 1 leaves the image after t = 0
    mv = metrics_2d(pred, gt, width=512, height=128, valid=valid)
    assert mv["survival_2d_pod"] == 100.0
    assert mv["mte_2d_pod"] == pytest.approx((2.5 + 0.0) / 2, rel=1e-9)
    assert mv["mte_2d"] == m["mte_2d"]  # the first definition ignores the mask


def test_psnr_per_channel_is_the_mean_of_channel_psnrs():
    pred = torch.zeros(3, 2, 2, dtype=torch.float64)
    gt = torch.stack([torch.full((2, 2), v, dtype=torch.float64) for v in (0.1, 0.2, 0.4)])
    expected = np.mean([-10 * math.log10(v * v) for v in (0.1, 0.2, 0.4)])  # 20, 13.98, 7.96 dB
    assert psnr_per_channel(pred, gt) == pytest.approx(expected, rel=1e-9)
    whole = float(psnr(pred, gt))
    assert whole == pytest.approx(-10 * math.log10((0.01 + 0.04 + 0.16) / 3), rel=1e-9)
    assert psnr_per_channel(pred, gt) > whole + 1.0  # Jensen: never below, here 2.4 dB above
    with pytest.raises(ValueError, match="C, H, W"):
        psnr_per_channel(pred[0], gt[0])
