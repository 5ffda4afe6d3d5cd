"""Evaluation of a run: novel-view image metrics and 3D/2D tracking metrics, into OUT/metrics.json.

The original (Luiten et al. 2024) released no evaluation code; this follows the paper's protocol
(Sec. 4: PSNR/SSIM/LPIPS on held-out cameras; MTE, delta and survival as in PointOdyssey) with these
definitions (keys of metrics.json):

Keys of metrics.json:

- psnr, ssim: mean over frames x test cameras of the whole-image value; no mask; test cameras get
  no colour correction (config.test_colour_correction).
- lpips: `lpips` package, AlexNet; null (with a warning) when unavailable.
- mte_3d: metres; per track, the mean error over t >= 1; the median over tracks.
- mte_3d_pct: mte_3d as percent of the ground truth's `extent`.
- delta_3d: percent; mean over thresholds 0.01, 0.02, 0.04, 0.08, 0.16 m of the share of
  (track, t >= 1) within the threshold.
- survival_3d: percent; mean over tracks of (frames before the first error > 0.5 m) / (T - 1).
- mte_2d, delta_2d, survival_2d: the same in pixels scaled to 256 x 256 (x 256/W, y 256/H),
  thresholds 1..16 px, survival 50 px, over (point, training camera) pairs visible at t = 0; the
  queries are unprojected with the rendered median depth, tracked in 3D and reprojected.
- n_gaussians, seconds, preset: Gaussians after t = 0, optimisation wall time, the config preset.

Tracking keys are null without ground truth (or with a single frame). Per-frame arrays:
psnr_per_frame, ssim_per_frame, lpips_per_frame, train_psnr_per_frame, error_3d_per_frame (median over
tracks, metres), error_2d_per_frame (median, 256-scaled pixels), seconds_per_frame.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import TrackingError
from .losses import psnr as psnr_fn
from .losses import ssim as ssim_fn
from .result import TrackingResult
from .store import write_json_atomic

DELTA_3D_THRESHOLDS_M = (0.01, 0.02, 0.04, 0.08, 0.16)  # PointOdyssey / the paper, in metres
SURVIVAL_3D_M = 0.5
DELTA_2D_THRESHOLDS_PX = (1.0, 2.0, 4.0, 8.0, 16.0)  # pixels at 256 x 256
SURVIVAL_2D_PX = 50.0
NORMALISED_SIZE = 256.0

METRIC_KEYS = ("psnr", "ssim", "lpips", "mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_2d", "delta_2d",
               "survival_2d", "n_gaussians", "seconds", "preset")


# ----------------------------------------------------------------------------- track metrics (pure functions)
def track_metrics(errors: np.ndarray, thresholds, survival_threshold: float) -> dict[str, float | None]:
    """MTE, delta and survival from per-track errors.

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


def metrics_3d(pred: np.ndarray, gt: np.ndarray, metres_per_unit: float = 1.0,
               extent: float | None = None) -> dict[str, float | None]:
    """3D track metrics of predicted vs ground-truth tracks [T, P, 3] (data units)."""
    err = np.linalg.norm(np.asarray(pred, np.float64)[1:] - np.asarray(gt, np.float64)[1:], axis=-1) * metres_per_unit
    m = track_metrics(err, DELTA_3D_THRESHOLDS_M, SURVIVAL_3D_M)
    pct = None
    if m["mte"] is not None and extent is not None and extent > 0:
        pct = m["mte"] / (extent * metres_per_unit) * 100.0
    return {"mte_3d": m["mte"], "mte_3d_pct": pct, "delta_3d": m["delta"], "survival_3d": m["survival"],
            "error_3d_per_frame": _per_frame_median(err)}


def metrics_2d(pred_uv: np.ndarray, gt_uv: np.ndarray, width: int | np.ndarray, height: int | np.ndarray
               ) -> dict[str, float | None]:
    """2D track metrics of pixel tracks [T, P, 2] scaled to 256 x 256 (x 256/W, y 256/H).

    width, height: image size, scalars or [P] per track (tracks from cameras of different sizes)."""
    scale = np.stack(np.broadcast_arrays(NORMALISED_SIZE / np.asarray(width, np.float64),
                                         NORMALISED_SIZE / np.asarray(height, np.float64)), -1)
    diff = (np.asarray(pred_uv, np.float64)[1:] - np.asarray(gt_uv, np.float64)[1:]) * scale
    err = np.linalg.norm(diff, axis=-1)
    err = np.where(np.isfinite(err), err, np.inf)
    m = track_metrics(err, DELTA_2D_THRESHOLDS_PX, SURVIVAL_2D_PX)
    return {"mte_2d": m["mte"], "delta_2d": m["delta"], "survival_2d": m["survival"],
            "error_2d_per_frame": _per_frame_median(err)}


def _per_frame_median(err: np.ndarray) -> list[float | None]:
    if err.ndim != 2 or err.shape[1] == 0:
        return []
    return [0.0] + [float(np.median(e)) for e in err]  # t = 0 is the query itself


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


# ----------------------------------------------------------------------------- image metrics
class _Lpips:
    """LPIPS (AlexNet) when the `lpips` package and its weights load; otherwise None with a warning."""

    def __init__(self, enabled: bool):
        self.model = None
        if not enabled:
            return
        try:
            import lpips  # optional: the `eval` extra

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as exc:
            warnings.warn(f"LPIPS unavailable ({type(exc).__name__}: {str(exc)[:120]}); install the `eval` extra "
                          "and its AlexNet weights: lpips is null", stacklevel=3)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float | None:
        if self.model is None:
            return None
        with torch.no_grad():
            return float(self.model(a[None] * 2 - 1, b[None] * 2 - 1).mean())


def _mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def image_metrics(result: TrackingResult, seq, n_frames: int, *, lpips: bool = True, device=None,
                  progress: bool = False) -> dict:
    """psnr, ssim, lpips over frames x test cameras (+ per-frame means)."""
    cams = result.test_cameras
    if not cams:
        warnings.warn("no test cameras: psnr, ssim and lpips are null", stacklevel=3)
        return {"psnr": None, "ssim": None, "lpips": None, "psnr_per_frame": [], "ssim_per_frame": [],
                "lpips_per_frame": []}
    lp = _Lpips(lpips)
    mode = result.config.test_colour_correction
    per_frame = {"psnr": [], "ssim": [], "lpips": []}
    iterator = range(n_frames)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="evaluating views", unit="frame", leave=False)
    for t in iterator:
        vals = {"psnr": [], "ssim": [], "lpips": []}
        for cam in cams:
            pred = result.render(t, cam, colour_correction=mode, device=device).clamp(0, 1).permute(2, 0, 1)
            gt = torch.from_numpy(np.ascontiguousarray(seq.image(t, cam.id))).permute(2, 0, 1)
            vals["psnr"].append(float(psnr_fn(pred, gt)))
            vals["ssim"].append(float(ssim_fn(pred, gt)))
            vals["lpips"].append(lp(pred, gt))
        for k in per_frame:
            per_frame[k].append(_mean_or_none(vals[k]))
    return {"psnr": _mean_or_none(per_frame["psnr"]), "ssim": _mean_or_none(per_frame["ssim"]),
            "lpips": _mean_or_none(per_frame["lpips"]), "psnr_per_frame": per_frame["psnr"],
            "ssim_per_frame": per_frame["ssim"], "lpips_per_frame": per_frame["lpips"]}


# ----------------------------------------------------------------------------- tracking metrics
def load_gt_tracks(path: str | Path, source_frames: list[int]) -> dict:
    """gt_tracks.npz rows of the fitted frames: points [T, P, 3], visible [T, P, C], cam_ids, extent."""
    path = Path(path)
    try:
        z = np.load(path)
    except FileNotFoundError:
        raise TrackingError(f"{path}: ground-truth tracks not found") from None
    except Exception as exc:
        raise TrackingError(f"{path}: cannot read ground-truth tracks ({exc})") from None
    with z:
        if "points" not in z.files:
            raise TrackingError(f"{path}: no 'points' array (expected points [T, P, 3])")
        points = z["points"]
        if points.ndim != 3 or points.shape[2] != 3:
            raise TrackingError(f"{path}: points must be [T, P, 3], got {points.shape}")
        if max(source_frames) >= points.shape[0]:
            raise TrackingError(f"{path}: has {points.shape[0]} frames but the run uses source frame "
                                f"{max(source_frames)}")
        out = {"points": points[source_frames].astype(np.float64)}
        out["visible"] = z["visible"][source_frames] if "visible" in z.files else None
        out["cam_ids"] = z["cam_ids"] if "cam_ids" in z.files else None
        out["extent"] = float(z["extent"]) if "extent" in z.files else None
    if out["extent"] is None:
        pts = out["points"].reshape(-1, 3)
        out["extent"] = float(np.linalg.norm(pts.max(0) - pts.min(0)))
    return out


def tracking_metrics(result: TrackingResult, gt: dict, n_frames: int, device=None) -> dict:
    """3D and 2D track metrics against ground truth for frames 0..n_frames-1."""
    pts = gt["points"][:n_frames]
    mpu = result.config.metres_per_unit
    pred = result.track(torch.from_numpy(pts[0])).double().numpy()[:n_frames]
    out = metrics_3d(pred, pts, mpu, gt["extent"])
    # Diagnostic: every point follows its highest-influence Gaussian, whatever the influence (no static
    # fallback); the official keys above use config.track_influence (the 0.5 rule by default).
    nearest = result.track(torch.from_numpy(pts[0]), threshold=0.0).double().numpy()[:n_frames]
    diagnostic = metrics_3d(nearest, pts, mpu, gt["extent"])
    _, influence = result.assign(torch.from_numpy(pts[0]).double())
    for key in ("mte_3d", "mte_3d_pct", "delta_3d", "survival_3d"):
        out[f"{key}_highest_influence"] = diagnostic[key]
    out["tracked_fraction_3d"] = float((influence >= result.config.track_influence).double().mean())
    out.update(_metrics_2d(result, gt, pts, n_frames, device))
    return out


def _metrics_2d(result: TrackingResult, gt: dict, pts: np.ndarray, n_frames: int, device=None) -> dict:
    empty = {"mte_2d": None, "delta_2d": None, "survival_2d": None, "error_2d_per_frame": []}
    if gt["visible"] is None or gt["cam_ids"] is None:
        return empty
    by_id = {c.id: c for c in result.train_cameras}
    pred_uv, gt_uv, widths, heights = [], [], [], []
    for ci, cam_id in enumerate(np.asarray(gt["cam_ids"]).tolist()):
        cam = by_id.get(int(cam_id))
        if cam is None:
            continue
        vis0 = gt["visible"][0, :, ci].astype(bool)
        if not vis0.any():
            continue
        K, w2c = cam.K, cam.w2c
        uv_gt, _ = project(pts[:, vis0], K, w2c)  # [T, P_c, 2]
        out = result.render_output(0, cam, device=device)
        median = out.median_depths[0, ..., 0].cpu().numpy()
        expected = out.depths[0, ..., 0].cpu().numpy()
        u = np.clip(np.floor(uv_gt[0, :, 0]).astype(int), 0, cam.width - 1)
        v = np.clip(np.floor(uv_gt[0, :, 1]).astype(int), 0, cam.height - 1)
        z = median[v, u]
        z = np.where(z > 0, z, expected[v, u])  # uncovered by the median: fall back to the mean depth
        queries = unproject(uv_gt[0], z, K, w2c)
        tracked = result.track(torch.from_numpy(queries)).double().numpy()[:n_frames]
        uv_pred, z_pred = project(tracked, K, w2c)
        uv_pred = np.where((z_pred > 0)[..., None], uv_pred, np.inf)
        uv_pred[:, z <= 0] = np.inf  # no depth at the query: a failed track
        pred_uv.append(uv_pred)
        gt_uv.append(uv_gt)
        widths.append(np.full(vis0.sum(), cam.width))
        heights.append(np.full(vis0.sum(), cam.height))
    if not pred_uv:
        return empty
    return metrics_2d(np.concatenate(pred_uv, 1), np.concatenate(gt_uv, 1), np.concatenate(widths),
                      np.concatenate(heights))


# ----------------------------------------------------------------------------- the entry point
def evaluate(out_dir, data=None, gt_tracks=None, *, lpips: bool | None = None, device=None, write: bool = True,
             plots: bool = True, progress: bool = False) -> dict:
    """Evaluate the run in OUT against its data; write OUT/metrics.json (and OUT/plots/*.png).

    Args:
        out_dir: run folder.
        data: dataset path (default: the one recorded in the run) or a data_tools.Sequence.
        gt_tracks: ground-truth tracks .npz (default: DATA/gt_tracks.npz when present).
        lpips: compute LPIPS (default: config.lpips).
        device: where to render (default: cuda when available).

    Returns:
        the metrics dict (see the module docstring).
    """
    import data_tools

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = TrackingResult(out_dir)
    if result.n_frames == 0:
        raise TrackingError(f"{out_dir}: no completed frame to evaluate (run fit again to finish t = 0)")
    spec = result.data
    if data is None or isinstance(data, str | Path):
        path = Path(data) if data is not None else Path(spec.path)
        if not path.exists():
            raise TrackingError(f"the data {path} of this run is not found: pass it with --data DATA")
        seq = data_tools.load(path, downscale=spec.downscale, frames=result.source_frames)
    else:
        seq, path = data, Path(data.path)
    _check_same_cameras(result, seq)
    n = min(result.n_frames, seq.n_frames)
    if result.n_frames < seq.n_frames:
        warnings.warn(f"{result.n_frames} of {seq.n_frames} frames are fitted: evaluating those", stacklevel=2)
    metrics: dict = {}
    metrics.update(image_metrics(result, seq, n, lpips=result.config.lpips if lpips is None else lpips,
                                 device=device, progress=progress))
    gt_path = Path(gt_tracks) if gt_tracks is not None else (path if path.is_dir() else path.parent) / "gt_tracks.npz"
    track_keys = ("mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_2d", "delta_2d", "survival_2d")
    if (gt_tracks is not None or gt_path.exists()) and n >= 2:
        gt = load_gt_tracks(gt_path, result.source_frames[:n])
        metrics.update(tracking_metrics(result, gt, n, device))
    else:
        metrics.update({k: None for k in track_keys})
        metrics.update({"error_3d_per_frame": [], "error_2d_per_frame": []})
    stats = [result.frame_stats(t) for t in range(n)]
    metrics["n_gaussians"] = result.n_gaussians
    metrics["seconds"] = result.seconds if n == result.n_frames else float(sum(s["seconds"] for s in stats))
    metrics["preset"] = result.config.preset
    metrics["train_psnr_per_frame"] = [s.get("final_psnr") for s in stats]
    metrics["seconds_per_frame"] = [s["seconds"] for s in stats]
    ordered = {k: metrics[k] for k in METRIC_KEYS}
    ordered.update({k: v for k, v in metrics.items() if k not in ordered})
    if write:
        write_json_atomic(result.out_dir / "metrics.json", ordered)
        if plots:
            from .plots import write_plots

            write_plots(result, ordered, seq=seq)
    return ordered


def _check_same_cameras(result: TrackingResult, seq) -> None:
    ids = {c.id: c for c in seq.cameras}
    for cam in result.train_cameras + result.test_cameras:
        other = ids.get(cam.id)
        if other is None:
            raise TrackingError(f"{seq.path}: camera {cam.id} of the run is not in the data")
        if (other.width, other.height) != (cam.width, cam.height):
            raise TrackingError(f"{seq.path}: camera {cam.id} is {other.width}x{other.height} but the run used "
                                f"{cam.width}x{cam.height} (another --downscale?)")
