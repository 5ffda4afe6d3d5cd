"""Metric definitions on arrays (no run, no rendering): image PSNR conventions, track errors, projection.

Two reductions of track errors live here (see `tracking.evaluate` for the table of metrics.json keys):

- `track_metrics`: this project's first definition (per track the mean error over t >= 1, then the
  median over tracks; survival over t >= 1).
- `pod_track_metrics`: PointOdyssey's released evaluation (Zheng et al., "PointOdyssey: A Large-Scale
  Synthetic Dataset for Long-Term Point Tracking", ICCV 2023; `test_on_fullseq` in the PIPs++ tester
  `test_on_pod.py`), which the Dynamic 3D Gaussians paper (Luiten et al., 3DV 2024, Sec. 4) says it follows:
  per track the median error over the valid frames *including* t = 0, then the mean over tracks; delta
  over the valid (track, t >= 1) pairs; survival as a running product over all frames including t = 0.
"""

from __future__ import annotations

import numpy as np
import torch

DELTA_3D_THRESHOLDS_M = (0.01, 0.02, 0.04, 0.08, 0.16)  # the paper's 3D delta thresholds, 1-16 cm
SURVIVAL_3D_M = 0.5  # the paper's 3D survival threshold, 50 cm
DELTA_2D_THRESHOLDS_PX = (1.0, 2.0, 4.0, 8.0, 16.0)  # PointOdyssey's thrs = [1, 2, 4, 8, 16], pixels at 256 x 256
SURVIVAL_2D_PX = 50.0  # PointOdyssey's sur_thr at the time of both papers (its tester moved to 16 in Sep 2023)
NORMALISED_SIZE = 256.0  # PointOdyssey divides x by W / 256 and y by H / 256
CM_PER_M = 100.0


# ----------------------------------------------------------------------------- image metrics
def psnr_per_channel(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over channels of each channel's PSNR (dB) for images [C, H, W] in [0, 1].

    The convention of the original code's `calc_psnr` (Luiten et al. `helpers.py`): it reshapes a CHW
    image to (C, -1), takes one MSE per channel and its PSNR -10 log10(MSE), and the caller averages the
    channel PSNRs. By Jensen's inequality this is at least the whole-image PSNR.
    """
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must be [C, H, W] of one shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    mse = ((pred.double() - gt.double()) ** 2).reshape(pred.shape[0], -1).mean(1)
    return float((-10.0 * torch.log10(mse)).mean())


# ----------------------------------------------------------------------------- track metrics
def track_metrics(errors: np.ndarray, thresholds, survival_threshold: float) -> dict[str, float | None]:
    """MTE, delta and survival from per-track errors (this project's first definition).

    Args:
        errors: [T - 1, P] error of each track at t = 1..T-1 (any unit).
        thresholds: delta thresholds in the same unit.
        survival_threshold: a track dies at the first error above this.

    Returns:
        {"mte": median over tracks of the mean over t, "delta": percent, "survival": percent};
        None values when there is no track or no t >= 1.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[0] == 0 or errors.shape[1] == 0:
        return {"mte": None, "delta": None, "survival": None}
    n_t = errors.shape[0]
    mte = float(np.median(errors.mean(0)))
    delta = float(np.mean([(errors < thr).mean() for thr in thresholds]) * 100.0)
    failed = errors > survival_threshold
    first_fail = np.where(failed.any(0), failed.argmax(0), n_t)  # frames (t >= 1) before the first failure
    survival = float((first_fail / n_t).mean() * 100.0)
    return {"mte": mte, "delta": delta, "survival": survival}


def pod_track_metrics(errors: np.ndarray, valid: np.ndarray | None, thresholds, survival_threshold: float
                      ) -> dict[str, float | None]:
    """MTE, delta and survival as PointOdyssey's released evaluation reduces them.

    Args:
        errors: [T, P] error of each track at t = 0..T-1 (t = 0 included: the query frame); non-finite
            values (a track with no prediction) count as infinitely far.
        valid: [T, P] bool, whether the ground truth of (t, track) exists (PointOdyssey's `valids`:
            finite and inside the image; occluded points stay valid); None: all valid.
        thresholds: delta thresholds in the unit of errors.
        survival_threshold: a valid error above this ends the track's survival.

    Returns:
        {"mte": mean over tracks of the per-track median over its valid frames (t = 0 included),
         "delta": percent, mean over thresholds of the share of valid (t >= 1, track) pairs below it,
         "survival": percent, mean over all (t, track) of prod_{s <= t} not(valid_s and error_s > thr)};
        None values without tracks, and delta None without a valid t >= 1.
    """
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 2 or err.shape[0] == 0 or err.shape[1] == 0:
        return {"mte": None, "delta": None, "survival": None}
    err = np.where(np.isfinite(err), err, np.inf)
    ok = np.ones(err.shape, bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != err.shape:
        raise ValueError(f"valid must have the shape of errors {err.shape}, got {ok.shape}")
    later = ok[1:]  # PointOdyssey excludes t = 0 from delta
    delta = None
    if later.any():
        delta = float(np.mean([(err[1:][later] < thr).mean() for thr in thresholds]) * 100.0)
    alive = np.cumprod(~(ok & (err > survival_threshold)), axis=0)  # [T, P], 1 until the first failure
    survival = float(alive.mean() * 100.0)
    medians = [np.median(err[ok[:, p], p]) for p in range(err.shape[1]) if ok[:, p].any()]
    mte = float(np.mean(medians)) if medians else None
    return {"mte": mte, "delta": delta, "survival": survival}


def metrics_3d(pred: np.ndarray, gt: np.ndarray, metres_per_unit: float = 1.0,
               extent: float | None = None) -> dict[str, float | None]:
    """3D track metrics of predicted vs ground-truth tracks [T, P, 3] (data units).

    Returns mte_3d (m), mte_3d_pct, delta_3d, survival_3d, error_3d_per_frame and the PointOdyssey
    reductions mte_3d_pod_cm (cm), delta_3d_pod, survival_3d_pod over every frame of ground truth that is
    finite."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    err_all = np.linalg.norm(pred - gt, axis=-1) * metres_per_unit  # [T, P] metres
    err = err_all[1:]
    m = track_metrics(err, DELTA_3D_THRESHOLDS_M, SURVIVAL_3D_M)
    pct = None
    if m["mte"] is not None and extent is not None and extent > 0:
        pct = m["mte"] / (extent * metres_per_unit) * 100.0
    pod = {"mte": None, "delta": None, "survival": None}
    if err_all.shape[0] >= 2:
        pod = pod_track_metrics(err_all * CM_PER_M, np.isfinite(gt).all(-1),
                                [t * CM_PER_M for t in DELTA_3D_THRESHOLDS_M], SURVIVAL_3D_M * CM_PER_M)
    return {"mte_3d": m["mte"], "mte_3d_pct": pct, "delta_3d": m["delta"], "survival_3d": m["survival"],
            "mte_3d_pod_cm": pod["mte"], "delta_3d_pod": pod["delta"], "survival_3d_pod": pod["survival"],
            "error_3d_per_frame": _per_frame_median(err)}


def metrics_2d(pred_uv: np.ndarray, gt_uv: np.ndarray, width: int | np.ndarray, height: int | np.ndarray,
               valid: np.ndarray | None = None) -> dict[str, float | None]:
    """2D track metrics of pixel tracks [T, P, 2] scaled to 256 x 256 (x 256/W, y 256/H).

    width, height: image size, scalars or [P] per track (tracks from cameras of different sizes).
    valid: [T, P] bool ground truth inside its image (the PointOdyssey keys' mask; None: all valid); the
    first-definition keys mte_2d, delta_2d, survival_2d use every frame."""
    scale = np.stack(np.broadcast_arrays(NORMALISED_SIZE / np.asarray(width, np.float64),
                                         NORMALISED_SIZE / np.asarray(height, np.float64)), -1)
    diff = (np.asarray(pred_uv, np.float64) - np.asarray(gt_uv, np.float64)) * scale
    err_all = np.linalg.norm(diff, axis=-1)
    err_all = np.where(np.isfinite(err_all), err_all, np.inf)
    err = err_all[1:]
    m = track_metrics(err, DELTA_2D_THRESHOLDS_PX, SURVIVAL_2D_PX)
    pod = {"mte": None, "delta": None, "survival": None}
    if err_all.shape[0] >= 2:
        pod = pod_track_metrics(err_all, valid, DELTA_2D_THRESHOLDS_PX, SURVIVAL_2D_PX)
    return {"mte_2d": m["mte"], "delta_2d": m["delta"], "survival_2d": m["survival"],
            "mte_2d_pod": pod["mte"], "delta_2d_pod": pod["delta"], "survival_2d_pod": pod["survival"],
            "error_2d_per_frame": _per_frame_median(err)}


def _per_frame_median(err: np.ndarray) -> list[float | None]:
    if err.ndim != 2 or err.shape[1] == 0:
        return []
    return [0.0] + [float(np.median(e)) for e in err]  # t = 0 is the query itself


# ----------------------------------------------------------------------------- cameras
def project(points: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uv [..., 2] pixels (u = fx X/Z + cx) and camera z [...] of world points [..., 3]."""
    X = np.asarray(points, np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    z = X[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (X[..., :2] / z[..., None]) @ K[:2, :2].T + K[:2, 2]
    return uv, z


def unproject(uv: np.ndarray, z: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """World points [P, 3] at camera depth z [P] through pixel positions uv [P, 2]."""
    pix = np.concatenate([uv, np.ones((len(uv), 1))], 1)
    X_cam = (pix @ np.linalg.inv(K).T) * z[:, None]
    R, t = w2c[:3, :3], w2c[:3, 3]
    return (X_cam - t) @ R  # R^T (X - t) for row vectors


__all__ = ["finite_median", "ground_truth_turns", "kabsch_rotations", "metrics_2d", "metrics_3d", "pod_track_metrics",
           "project", "psnr_per_channel", "rotation_error_deg", "rotation_errors_per_track", "track_metrics",
           "unproject"]


# ----------------------------------------------------------------------------- rotation of tracks
ROTATION_NEIGHBOURS = 16
"""ground-truth tracks (the track itself included) of one object whose rigid fit gives a track's true rotation."""
RANK_TOLERANCE = 1e-9
"""a neighbourhood spans a plane when its cross-covariance's second singular value exceeds this x the first."""


def kabsch_rotations(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotations R [..., 3, 3] with dst - mean(dst) ~ R (src - mean(src)) for point sets
    [..., K, 3] (Kabsch 1976; the reflection-free solution from the SVD of the cross-covariance). NaN where the
    sets are not finite or span less than a plane (collinear or coincident points leave a twist undetermined)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    a = src - src.mean(-2, keepdims=True)
    b = dst - dst.mean(-2, keepdims=True)
    h = np.einsum("...ki,...kj->...ij", a, b)  # H = sum a b^T = U S V^T
    finite = np.isfinite(h).all((-2, -1))
    h = np.where(finite[..., None, None], h, 0.0)  # the SVD does not converge on NaN
    u, sv, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.einsum("...ji,...kj->...ik", vt, u)))  # det(V U^T) = +-1
    flip = np.ones(d.shape + (3,))
    flip[..., 2] = d
    rot = np.einsum("...ji,...j,...kj->...ik", vt, flip, u)  # R = V diag(1, 1, d) U^T
    planar = sv[..., 1] > RANK_TOLERANCE * np.maximum(sv[..., 0], np.finfo(np.float64).tiny)
    return np.where((finite & planar)[..., None, None], rot, np.nan)


def _nearest_rows(p0: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """[R, k] indices of each point's k nearest points (itself first) among p0 [R, 3], in row chunks so that
    memory stays O(chunk x R)."""
    out = np.empty((len(p0), k), np.int64)
    for s in range(0, len(p0), chunk):
        d2 = ((p0[s:s + chunk, None] - p0[None]) ** 2).sum(-1)
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]  # k <= R
        order = np.argsort(np.take_along_axis(d2, part, 1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def ground_truth_turns(points: np.ndarray, object_ids: np.ndarray, k: int = ROTATION_NEIGHBOURS) -> np.ndarray:
    """[T, P, 3, 3] the rotation each ground-truth track's neighbourhood made from t = 0 to t: the Kabsch fit of
    its k nearest tracks (at t = 0) on the same object. Exact for the rigid parts of a synthetic scene; on an
    articulated one it averages the parts within the neighbourhood. NaN for a track whose object has fewer than
    3 tracks finite at t = 0, and at the frames where its neighbourhood is not finite or spans less than a
    plane."""
    pts = np.asarray(points, np.float64)
    ids = np.asarray(object_ids)
    n_frames, n_tracks = pts.shape[:2]
    if ids.shape != (n_tracks,):
        raise ValueError(f"object_ids must be [P] = [{n_tracks}], got {ids.shape}")
    out = np.full((n_frames, n_tracks, 3, 3), np.nan)
    start_ok = np.isfinite(pts[0]).all(-1)
    for obj in np.unique(ids):
        rows = np.flatnonzero((ids == obj) & start_ok)
        if len(rows) < 3:
            continue
        nearest = rows[_nearest_rows(pts[0, rows], min(k, len(rows)))]  # [R, k] track indices
        hood = pts[:, nearest]  # [T, R, k, 3]
        out[:, rows] = kabsch_rotations(np.broadcast_to(hood[:1], hood.shape), hood)
    return out


def rotation_errors_per_track(pred_turns: np.ndarray, gt_turns: np.ndarray) -> np.ndarray:
    """[P] degrees: per track the mean over t >= 1 of the angle between the predicted and true rotation since
    t = 0, both [T, P, 3, 3] (R_t R_0^T); NaN where either is NaN at some t >= 1."""
    pred, gt = np.asarray(pred_turns, np.float64), np.asarray(gt_turns, np.float64)
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-2:] != (3, 3):
        raise ValueError(f"pred_turns and gt_turns must be [T, P, 3, 3] of one shape, got {pred.shape} and {gt.shape}")
    if pred.shape[0] < 2:
        return np.full(pred.shape[1], np.nan)
    relative = np.einsum("tpij,tpkj->tpik", pred[1:], gt[1:])  # R_pred R_gt^T
    cos = (np.trace(relative, axis1=-2, axis2=-1) - 1.0) / 2.0
    axis = np.stack([relative[..., 2, 1] - relative[..., 1, 2], relative[..., 0, 2] - relative[..., 2, 0],
                     relative[..., 1, 0] - relative[..., 0, 1]], -1) / 2.0  # sin(angle) x unit axis
    return np.degrees(np.arctan2(np.linalg.norm(axis, axis=-1), cos)).mean(0)


def rotation_error_deg(pred_turns: np.ndarray, gt_turns: np.ndarray) -> dict[str, float | None]:
    """The median over tracks of `rotation_errors_per_track` where it is finite.

    Returns {"rotation_error_3d_deg": degrees, or None without a track and a frame t >= 1}."""
    return {"rotation_error_3d_deg": finite_median(rotation_errors_per_track(pred_turns, gt_turns))}


def finite_median(values: np.ndarray) -> float | None:
    """Median of the finite entries, None when there is none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None
