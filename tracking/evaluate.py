"""Evaluation of a run: novel-view image metrics and 3D/2D tracking metrics, into OUT/metrics.json.

`evaluate()` computes and writes OUT/metrics.json only; drawing (OUT/plots) is `tracking.plots.write_plots`,
called by the command line. It reads the fitted run and never rewrites its files (run.h5, frames/,
config.json). How it reads the run is an `EvalConfig` (`tracking.eval_config`), recorded in metrics.json
as ``eval_config``.

The original (Luiten et al. 2024) released no evaluation code; the paper (Sec. 4) evaluates PSNR, SSIM and
LPIPS on held-out cameras and MTE, delta and survival "as in PointOdyssey". The keys of metrics.json (the
same table, unabridged, is docs/metrics.md):

| key | definition | source |
|---|---|---|
| psnr | dB; mean over frames x test cameras of the whole-image PSNR of the clamped render | 3DGS |
| psnr_per_channel | dB; as psnr, each image's PSNR the mean of its 3 per-channel PSNRs | original `calc_psnr` |
| ssim | mean over frames x test cameras; 11 x 11 Gaussian window, sigma 1.5 | 3DGS `ssim` |
| lpips | = lpips_alex (its first name) | `lpips` package |
| lpips_alex, lpips_vgg | LPIPS, AlexNet / VGG-16, inputs in [-1, 1]; null (1) | `lpips`; 3DGS: VGG |
| mte_3d | m; per track the mean error over t >= 1, then the median over tracks | this project |
| mte_3d_pct | mte_3d in percent of the ground truth's `extent` | this project |
| delta_3d | %; mean over thr 1, 2, 4, 8, 16 cm of the share of (track, t >= 1) below thr | paper's thr |
| survival_3d | %; mean over tracks of (frames t >= 1 before the first error > 50 cm) / (T - 1) | paper's 50 cm |
| mte_2d, delta_2d, survival_2d | as the 3D keys, pixels at 256 x 256, thr 1..16 px, survival 50 px | this project |
| mte_3d_pod_cm | cm; per track the median over its valid frames, t = 0 included; mean over tracks | POD `median_l2` |
| delta_3d_pod | %; mean over thr 1..16 cm of the share of valid (track, t >= 1) pairs < thr | POD `d_avg` |
| survival_3d_pod | %; mean over all (t, track), t = 0 included, of the running product (2) | POD `survival` |
| mte_2d_pod, delta_2d_pod, survival_2d_pod | the same, pixels at 256 x 256 (3), thr 1..16 px, survival 50 px | POD |
| entering_mte_3d_pct | mte_3d_pct of tracks entering at E > 0 (gt entry_frame), queried at E, errors t > E | ours |
| n_gaussians, seconds, preset | Gaussians of the run (t = 0 and born later), fit wall time, the preset | this project |
| eval_config | the EvalConfig used | this project |

POD: PointOdyssey's released evaluation (`test_on_fullseq` in the PIPs++ tester `test_on_pod.py`; Zheng et
al., ICCV 2023). (1) null with a warning when the backbone or its weights cannot be loaded (an offline
machine, no `eval` extra) or it is not in eval_config.lpips_backbones. (2) prod_{s <= t} [not (valid_s and
error_s > survival threshold)]: a track is alive until its first valid error above the threshold; invalid
frames never fail it (POD's `cumprod` of `dist_ok`). (3) x 256/W, y 256/H (POD's `sc_py`); valid = ground
truth in front of the camera and inside the image, occluded points stay valid (POD's `valids`); survival at
50 px, POD's `sur_thr` as its tester stood when both papers appeared (16 since its Sep 2023 commit "made all
testers use thr 16"). The 3D thresholds (1..16 cm, 50 cm) are the paper's.

Notes on the PointOdyssey keys: 3D ground truth is valid where finite (all of it for our data); PointOdyssey
adds 1e-6 to the delta denominator, which we leave out (a relative change below 1e-6 / pairs); its data
loader also drops tracks that are static or short, which is dataset selection and not done here. 2D tracks
are the (point, camera) pairs of eval_config.cameras_2d where the point is visible at t = 0 (the paper's
rule); the queries are unprojected with the rendered median depth, tracked in 3D and reprojected.

Tracks of objects that enter after t = 0 (gt_tracks.npz ``entry_frame`` > 0, NaN before it) are left out of
the keys above and evaluated from their entry frame on: entering_mte_3d, entering_mte_3d_pct, entering_delta_3d,
entering_survival_3d, entering_mte_3d_pct_highest_influence, entering_tracks (count) and entering_frame.

Test cameras get the colour correction eval_config.test_colour_correction; the 3D/2D tracks follow the
readout eval_config.readout. Tracking keys are null without ground truth (or with a single frame).
Diagnostics: mte_3d*_highest_influence, delta_3d_highest_influence, survival_3d_highest_influence and the 2D mte_2d
/ delta_2d / survival_2d_highest_influence (readout "highest", whatever eval_config says),
rotation_error_3d_deg_highest_influence (degrees: per track the mean over t >= 1 of the angle between its
highest-influence Gaussian's turn R_t R_0^T and the ground truth's, a Kabsch fit of its 16 nearest ground-truth
tracks on the same object, ground truth `object_ids`; then the median over tracks;
entering_rotation_error_3d_deg_highest_influence for the entering tracks) and tracked_fraction_3d (share of
ground-truth points whose best influence reaches eval_config.influence_threshold). Per-frame arrays:
psnr_per_frame, ssim_per_frame, lpips_per_frame, train_psnr_per_frame, error_3d_per_frame (median over tracks,
metres), error_2d_per_frame (median, 256-scaled pixels), seconds_per_frame.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import TrackingError
from .eval_config import EvalConfig
from .losses import psnr as psnr_fn
from .losses import ssim as ssim_fn
from .metrics import (  # noqa: F401  (re-exported: the metric definitions' historic home)
    DELTA_2D_THRESHOLDS_PX,
    DELTA_3D_THRESHOLDS_M,
    NORMALISED_SIZE,
    SURVIVAL_2D_PX,
    SURVIVAL_3D_M,
    finite_median,
    ground_truth_turns,
    metrics_2d,
    metrics_3d,
    pod_track_metrics,
    project,
    psnr_per_channel,
    rotation_error_deg,
    rotation_errors_per_track,
    track_metrics,
    unproject,
)
from .quaternions import quat_to_rotmat
from .result import TrackingResult
from .store import RUN_FILE, write_json_atomic

METRIC_KEYS = ("psnr", "ssim", "lpips", "mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_2d", "delta_2d",
               "survival_2d", "n_gaussians", "seconds", "preset")
ADDED_METRIC_KEYS = ("psnr_per_channel", "lpips_vgg", "lpips_alex", "mte_3d_pod_cm", "delta_3d_pod",
                     "survival_3d_pod", "mte_2d_pod", "delta_2d_pod", "survival_2d_pod", "eval_config")
"""Keys after METRIC_KEYS in metrics.json, in this order (see the module docstring's table)."""

TRACK_3D_KEYS = ("mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_3d_pod_cm", "delta_3d_pod",
                 "survival_3d_pod")
TRACK_2D_KEYS = ("mte_2d", "delta_2d", "survival_2d", "mte_2d_pod", "delta_2d_pod", "survival_2d_pod")
TRACK_2D_DIAGNOSTIC_KEYS = ("mte_2d_highest_influence", "delta_2d_highest_influence", "survival_2d_highest_influence")

LpipsNetwork = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(a, b) images [1, 3, H, W] in [-1, 1] -> distance (any shape; its mean is the value), as `lpips.LPIPS`."""


# ----------------------------------------------------------------------------- image metrics
class _Lpips:
    """One LPIPS backbone: an injected network, or `lpips.LPIPS(net=backbone)` when the package and its
    weights load; otherwise None with a warning."""

    def __init__(self, backbone: str, network: LpipsNetwork | None = None):
        self.backbone, self.model = backbone, network
        if network is not None:
            return
        try:
            import lpips  # optional: the `eval` extra

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = lpips.LPIPS(net=backbone, verbose=False).eval()
        except Exception as exc:
            warnings.warn(f"LPIPS ({backbone}) unavailable ({type(exc).__name__}: {str(exc)[:120]}); install the "
                          f"`eval` extra and its {backbone} weights: lpips_{backbone} is null", stacklevel=3)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float | None:
        if self.model is None:
            return None
        with torch.no_grad():
            return float(self.model(a[None] * 2 - 1, b[None] * 2 - 1).mean())


def _mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def image_metrics(result: TrackingResult, seq, n_frames: int, eval_config: EvalConfig | None = None, *,
                  lpips_networks: dict[str, LpipsNetwork] | None = None, device=None, progress: bool = False
                  ) -> dict:
    """psnr, psnr_per_channel, ssim, lpips_alex, lpips_vgg (lpips = lpips_alex) over frames x test cameras,
    and per-frame means. lpips_networks: injected networks by backbone name (tests, custom weights)."""
    cfg = eval_config or EvalConfig()
    names = ("psnr", "psnr_per_channel", "ssim", "lpips_alex", "lpips_vgg")
    cams = result.test_cameras
    if not cams:
        warnings.warn("no test cameras: psnr, ssim and lpips are null", stacklevel=3)
        out = {k: None for k in names}
        out.update({"lpips": None, "psnr_per_frame": [], "ssim_per_frame": [], "lpips_per_frame": []})
        return out
    injected = lpips_networks or {}
    nets = {b: _Lpips(b, injected.get(b)) for b in cfg.lpips_backbones}
    per_frame = {k: [] for k in names}
    iterator = range(n_frames)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="evaluating views", unit="frame", leave=False)
    for t in iterator:
        vals = {k: [] for k in names}
        for cam in cams:
            pred = result.render(t, cam, colour_correction=cfg.test_colour_correction, device=device)
            pred = pred.clamp(0, 1).permute(2, 0, 1)
            gt = torch.from_numpy(np.ascontiguousarray(seq.image(t, cam.id))).permute(2, 0, 1)
            vals["psnr"].append(float(psnr_fn(pred, gt)))
            vals["psnr_per_channel"].append(psnr_per_channel(pred, gt))
            vals["ssim"].append(float(ssim_fn(pred, gt)))
            for b, net in nets.items():
                vals[f"lpips_{b}"].append(net(pred, gt))
        for k in names:
            per_frame[k].append(_mean_or_none(vals[k]))
    out = {k: _mean_or_none(per_frame[k]) for k in names}
    out.update({"lpips": out["lpips_alex"], "psnr_per_frame": per_frame["psnr"], "ssim_per_frame": per_frame["ssim"],
                "lpips_per_frame": per_frame["lpips_alex"]})
    return out


# ----------------------------------------------------------------------------- tracking metrics
def load_gt_tracks(path: str | Path, source_frames: list[int]) -> dict:
    """gt_tracks.npz rows of the fitted frames: points [T, P, 3], visible [T, P, C] with cam_ids [C] (training
    cameras), visible_test [T, P, C'] with test_cam_ids [C'] (None when absent), extent, entry_frame [P] and
    object_ids [P] (None when absent)."""
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
        for vis_key, ids_key in (("visible", "cam_ids"), ("visible_test", "test_cam_ids")):
            ok = vis_key in z.files and ids_key in z.files
            out[vis_key] = z[vis_key][source_frames] if ok else None
            out[ids_key] = z[ids_key] if ok else None
        out["extent"] = float(z["extent"]) if "extent" in z.files else None
        n_points = out["points"].shape[1]
        out["object_ids"] = z["object_ids"].astype(np.int64) if "object_ids" in z.files else None
        if out["object_ids"] is not None and out["object_ids"].shape != (n_points,):
            raise TrackingError(f"{path}: object_ids must be [P] = [{n_points}], got {out['object_ids'].shape}")
        out["entry_frame"] = (z["entry_frame"].astype(np.int64) if "entry_frame" in z.files
                              else np.zeros(n_points, np.int64))
    # Entry frames are source-frame indices: in fitted-frame units, the first fitted frame at or after entry.
    out["entry_frame"] = np.searchsorted(np.asarray(source_frames), out["entry_frame"]).astype(np.int64)
    if out["extent"] is None:
        pts = out["points"].reshape(-1, 3)
        pts = pts[np.isfinite(pts).all(1)]
        out["extent"] = float(np.linalg.norm(pts.max(0) - pts.min(0)))
    return out


ENTERING_KEYS = ("entering_mte_3d", "entering_mte_3d_pct", "entering_delta_3d", "entering_survival_3d",
                 "entering_mte_3d_pct_highest_influence", "entering_tracks", "entering_frame",
                 "entering_rotation_error_3d_deg_highest_influence")


def _subset(gt: dict, rows: np.ndarray) -> dict:
    """gt restricted to the tracks `rows` (bool [P])."""
    out = dict(gt)
    for key in ("points", "visible", "visible_test"):
        if out.get(key) is not None:
            out[key] = out[key][:, rows]
    out["entry_frame"] = gt["entry_frame"][rows]
    if gt.get("object_ids") is not None:
        out["object_ids"] = gt["object_ids"][rows]
    return out


def entering_metrics(result: TrackingResult, gt: dict, n_frames: int, eval_config: EvalConfig | None = None) -> dict:
    """Metrics of the tracks that start after t = 0 (ENTERING_KEYS): each group of tracks with entry frame E
    (fitted-frame units) is queried at E and followed to the last frame; errors over t > E, pooled over
    groups by track. None where no such track has two fitted frames."""
    cfg = eval_config or EvalConfig()
    out = dict.fromkeys(ENTERING_KEYS)
    entry = gt.get("entry_frame")
    if entry is None:
        return out
    mpu = result.config.metres_per_unit
    preds, nearest, truths, turns = [], [], [], []
    for e in sorted(set(entry[(entry > 0) & (entry <= n_frames - 2)].tolist())):
        rows = entry == e
        pts = gt["points"][e:n_frames, rows]
        queries = torch.from_numpy(pts[0])
        ruled, highest, best, _ = _readouts(result, queries, cfg.readout_threshold, e)
        preds.append(ruled[e:n_frames])
        nearest.append(highest[e:n_frames])
        truths.append(pts)
        if gt.get("object_ids") is not None:
            turns.append(rotation_errors_per_track(gaussian_turns(result, best, n_frames, e),
                                                   ground_truth_turns(pts, gt["object_ids"][rows])))
        out["entering_frame"] = e if out["entering_frame"] is None else min(out["entering_frame"], e)
    if not truths:
        return out
    # Groups with different entry frames have different lengths: each is scored on its own, then the
    # scores are pooled weighted by their numbers of tracks.
    scored = [metrics_3d(p, g, mpu, gt["extent"]) for p, g in zip(preds, truths)]
    diag = [metrics_3d(p, g, mpu, gt["extent"]) for p, g in zip(nearest, truths)]
    weights = np.array([g.shape[1] for g in truths], np.float64)

    def pooled(ms, key):
        vals = [m[key] for m in ms]
        return None if any(v is None for v in vals) else float(np.average(vals, weights=weights))

    out.update(entering_mte_3d=pooled(scored, "mte_3d"), entering_mte_3d_pct=pooled(scored, "mte_3d_pct"),
               entering_delta_3d=pooled(scored, "delta_3d"), entering_survival_3d=pooled(scored, "survival_3d"),
               entering_mte_3d_pct_highest_influence=pooled(diag, "mte_3d_pct"), entering_tracks=int(weights.sum()))
    if turns:  # one median over the tracks of every group (each group's errors start at its own entry)
        out["entering_rotation_error_3d_deg_highest_influence"] = finite_median(np.concatenate(turns))
    return out


def tracking_metrics(result: TrackingResult, gt: dict, n_frames: int, eval_config: EvalConfig | None = None,
                     device=None) -> dict:
    """3D and 2D track metrics against ground truth for frames 0..n_frames-1 (tracks that exist from t = 0;
    those of objects entering later are `entering_metrics`)."""
    cfg = eval_config or EvalConfig()
    entry = gt.get("entry_frame")
    if entry is not None and (entry > 0).any():
        gt = _subset(gt, entry == 0)
    pts = gt["points"][:n_frames]
    mpu = result.config.metres_per_unit
    queries = torch.from_numpy(pts[0])
    pred, nearest, best, influence = _readouts(result, queries, cfg.readout_threshold)
    out = metrics_3d(pred[:n_frames], pts, mpu, gt["extent"])
    # Diagnostic: every point follows its highest-influence Gaussian, whatever the readout rule.
    diagnostic = metrics_3d(nearest[:n_frames], pts, mpu, gt["extent"])
    for key in ("mte_3d", "mte_3d_pct", "delta_3d", "survival_3d"):
        out[f"{key}_highest_influence"] = diagnostic[key]
    out["rotation_error_3d_deg_highest_influence"] = None
    if gt.get("object_ids") is not None:
        truth = ground_truth_turns(pts, gt["object_ids"])
        out["rotation_error_3d_deg_highest_influence"] = rotation_error_deg(
            gaussian_turns(result, best, n_frames), truth)["rotation_error_3d_deg"]
    out["tracked_fraction_3d"] = float((influence >= cfg.influence_threshold).double().mean())
    out.update(_metrics_2d(result, gt, pts, n_frames, cfg, device))
    return out


def _readouts(result: TrackingResult, queries: torch.Tensor, threshold: float, start_frame: int = 0
              ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Both readouts of the queries [P, 3] at start_frame from one assignment: tracks [T, P, 3] (float64) under
    `threshold` (static where the best influence is below it) and following the highest-influence Gaussian,
    then that Gaussian's index [P] and influence [P]."""
    best, influence = result.assign(queries.double(), threshold=0.0, t=start_frame)
    ruled = torch.where(influence >= threshold, best, torch.full_like(best, -1))
    return (result.carry(queries, ruled, start_frame).double().numpy(),
            result.carry(queries, best, start_frame).double().numpy(), best, influence)


def gaussian_turns(result: TrackingResult, index: torch.Tensor, n_frames: int, start_frame: int = 0) -> np.ndarray:
    """[n_frames - start_frame, P, 3, 3] float64: R_t R_s^T of the Gaussians `index` [P] (each track's carrier)
    for t = s..n_frames - 1, s = start_frame."""
    R0 = quat_to_rotmat(result.quats[start_frame].double()[index])
    return np.stack([torch.einsum("pij,pkj->pik", quat_to_rotmat(result.quats[t].double()[index]), R0).numpy()
                     for t in range(start_frame, n_frames)])


def _camera_sets(gt: dict, which: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(camera ids [C], visible [T, P, C]) groups of the ground truth for EvalConfig.cameras_2d."""
    groups = []
    if which in ("train", "all") and gt.get("visible") is not None:
        groups.append((np.asarray(gt["cam_ids"]), gt["visible"]))
    if which in ("test", "all") and gt.get("visible_test") is not None:
        groups.append((np.asarray(gt["test_cam_ids"]), gt["visible_test"]))
    return groups


def _metrics_2d(result: TrackingResult, gt: dict, pts: np.ndarray, n_frames: int, cfg: EvalConfig,
                device=None) -> dict:
    """The 2D keys under cfg's readout, and mte_2d / delta_2d / survival_2d_highest_influence under the readout
    "highest" (the same queries, unprojected from the same renders)."""
    empty = {k: None for k in TRACK_2D_KEYS + TRACK_2D_DIAGNOSTIC_KEYS}
    empty["error_2d_per_frame"] = []
    by_id = {c.id: c for c in result.train_cameras + result.test_cameras}
    pred_uv, nearest_uv, gt_uv, valid, widths, heights = [], [], [], [], [], []
    for cam_ids, visible in _camera_sets(gt, cfg.cameras_2d):
        for ci, cam_id in enumerate(cam_ids.tolist()):
            cam = by_id.get(int(cam_id))
            if cam is None:
                continue
            vis0 = visible[0, :, ci].astype(bool)
            if not vis0.any():
                continue
            K, w2c = cam.K, cam.w2c
            uv_gt, z_gt = project(pts[:, vis0], K, w2c)  # [T, P_c, 2], [T, P_c]
            out = result.render_output(0, cam, device=device)
            median = out.median_depths[0, ..., 0].cpu().numpy()
            expected = out.depths[0, ..., 0].cpu().numpy()
            u = np.clip(np.floor(uv_gt[0, :, 0]).astype(int), 0, cam.width - 1)
            v = np.clip(np.floor(uv_gt[0, :, 1]).astype(int), 0, cam.height - 1)
            z = median[v, u]
            z = np.where(z > 0, z, expected[v, u])  # uncovered by the median: fall back to the mean depth
            queries = torch.from_numpy(unproject(uv_gt[0], z, K, w2c))
            for tracked, into in zip(_readouts(result, queries, cfg.readout_threshold)[:2], (pred_uv, nearest_uv)):
                uv_pred, z_pred = project(tracked[:n_frames], K, w2c)
                uv_pred = np.where((z_pred > 0)[..., None], uv_pred, np.inf)
                uv_pred[:, z <= 0] = np.inf  # no depth at the query: a failed track
                into.append(uv_pred)
            inside = ((z_gt > 0) & (uv_gt[..., 0] >= 0) & (uv_gt[..., 0] < cam.width) & (uv_gt[..., 1] >= 0)
                      & (uv_gt[..., 1] < cam.height))
            gt_uv.append(uv_gt)
            valid.append(inside)
            widths.append(np.full(vis0.sum(), cam.width))
            heights.append(np.full(vis0.sum(), cam.height))
    if not pred_uv:
        return empty
    args = (np.concatenate(gt_uv, 1), np.concatenate(widths), np.concatenate(heights))
    out = metrics_2d(np.concatenate(pred_uv, 1), *args, valid=np.concatenate(valid, 1))
    diagnostic = metrics_2d(np.concatenate(nearest_uv, 1), *args, valid=np.concatenate(valid, 1))
    out.update({f"{key}_highest_influence": diagnostic[key] for key in ("mte_2d", "delta_2d", "survival_2d")})
    return out


# ----------------------------------------------------------------------------- settings
def stored_config(out_dir: str | Path) -> dict:
    """The TrackingConfig dict exactly as OUT/run.h5 stores it (moved evaluation fields included)."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        raise TrackingError(f"{out_dir}: no {RUN_FILE} (not a finished t = 0 of tracking.fit)")
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["config"])


def default_eval_config(out_dir: str | Path, **overrides) -> EvalConfig:
    """The evaluation settings of the run in OUT: EvalConfig defaults, replaced by the values a run fitted
    before the settings moved out of TrackingConfig stored, then by overrides."""
    return replace(EvalConfig.for_legacy(stored_config(out_dir)), **overrides).validate()


# ----------------------------------------------------------------------------- the entry point
def evaluate(out_dir, data=None, gt_tracks=None, *, eval_config: EvalConfig | None = None,
             lpips: bool | None = None, lpips_networks: dict[str, LpipsNetwork] | None = None, device=None,
             write: bool = True, progress: bool = False) -> dict:
    """Evaluate the run in OUT against its data; write OUT/metrics.json (nothing else).

    Args:
        out_dir: run folder.
        data: dataset path (default: the one recorded in the run) or a data_tools.Sequence.
        gt_tracks: ground-truth tracks .npz (default: DATA/gt_tracks.npz when present).
        eval_config: the settings (default: `default_eval_config(out_dir)`).
        lpips: False skips LPIPS (eval_config.lpips_backbones = ()); None/True keeps eval_config's.
        lpips_networks: injected LPIPS networks by backbone ("alex", "vgg"), used instead of loading them.
        device: where to render (default: cuda when available).
        write: write OUT/metrics.json (atomically).

    Returns:
        the metrics dict (see the module docstring); draw it with `tracking.plots.write_plots`.
    """
    import data_tools

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = (eval_config or default_eval_config(out_dir)).validate()
    if lpips is False:
        cfg = replace(cfg, lpips_backbones=())
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
    metrics.update(image_metrics(result, seq, n, cfg, lpips_networks=lpips_networks, device=device,
                                 progress=progress))
    gt_path = Path(gt_tracks) if gt_tracks is not None else (path if path.is_dir() else path.parent) / "gt_tracks.npz"
    if (gt_tracks is not None or gt_path.exists()) and n >= 2:
        gt = load_gt_tracks(gt_path, result.source_frames[:n])
        metrics.update(tracking_metrics(result, gt, n, cfg, device))
        if (gt["entry_frame"] > 0).any():
            metrics.update(entering_metrics(result, gt, n, cfg))
    else:
        metrics.update({k: None for k in TRACK_3D_KEYS + TRACK_2D_KEYS})
        metrics.update({"error_3d_per_frame": [], "error_2d_per_frame": []})
    stats = [result.frame_stats(t) for t in range(n)]
    metrics["n_gaussians"] = result.n_gaussians
    metrics["seconds"] = result.seconds if n == result.n_frames else float(sum(s["seconds"] for s in stats))
    metrics["preset"] = result.config.preset
    metrics["eval_config"] = cfg.to_dict()
    metrics["train_psnr_per_frame"] = [s.get("final_psnr") for s in stats]
    metrics["seconds_per_frame"] = [s["seconds"] for s in stats]
    ordered = {k: metrics[k] for k in METRIC_KEYS + ADDED_METRIC_KEYS}
    ordered.update({k: v for k, v in metrics.items() if k not in ordered})
    if write:
        write_json_atomic(result.out_dir / "metrics.json", ordered)
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
