"""`fit`: the Dynamic 3D Gaussians optimisation, frame by frame, resumable.

Luiten et al., "Dynamic 3D Gaussians: Tracking by Persistent Dynamic View Synthesis" (3DV 2024):

- t = 0: reconstruct the first frame from an initial point cloud (`steps_first` steps, one random
  training camera per step, L = L_im + 3 L_seg, densification from `tracking.strategy`);
- then freeze opacities, scales and the per-camera colour correction, find K = 20 neighbours among
  the foreground Gaussians and weight them by exp(-lambda d^2);
- each t > 0: extrapolate means and rotations at constant velocity from t - 1 and t - 2, zero their
  Adam moments (the step counter is kept, as in the original), and optimise means, rotations and
  colours for `steps_per_frame` steps with the full loss (`tracking.losses`).

RGB and segmentation colours are rendered in one pass (6 channels, `densify_channels=3`).

Resume: every completed frame is stored (`tracking.store`). Frame t draws its random numbers from a
generator seeded with seed * 1,000,003 + t, and its starting state is rebuilt from exactly what the
previous frames stored, in an uninterrupted run as in a resumed one, so both give the same bits on
the CPU torch backend.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tritonsplat

from . import losses as L
from .config import TrackingConfig
from .errors import ConfigMismatchError, NaNLossError, TrackingError, fault_at
from .neighbours import knn
from .params import (
    activated,
    foreground_mask,
    init_params,
    learning_rates,
    make_optimizer,
)
from .quaternions import quat_normalize
from .store import (
    CameraRecord,
    DataSpec,
    FrameRecord,
    RunRecord,
    clean_temporaries,
    completed_frames,
    read_frame,
    read_run,
    read_run_identity,
    remove_run,
    write_frame,
    write_json_atomic,
    write_run,
)
from .strategy import AllGaussiansPrunedError, DensifyStrategy

SEED_STRIDE = 1_000_003  # frame t's generator seed = seed * SEED_STRIDE + t (no hashing)
PROGRESS_UPDATES = 50  # progress-bar refreshes per frame


def frame_generator(seed: int, t: int) -> torch.Generator:
    """The CPU generator of frame t (camera order, split noise)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) * SEED_STRIDE + int(t))
    return g


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrackingError(f"device {name!r} requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------- data
def open_data(data, downscale: float = 1.0, frames=None):
    """(Sequence, DataSpec) from a dataset path or an existing data_tools.Sequence."""
    import data_tools

    if isinstance(data, str | Path):
        seq = data_tools.load(data, downscale=downscale, frames=frames)
        spec = DataSpec(path=str(Path(data).resolve()), format=seq.format, downscale=float(downscale),
                        source_frames=[int(i) for i in seq.source_frames])
    else:
        seq = data
        if frames is not None or downscale != 1:
            raise ValueError("downscale and frames apply to a dataset path, not to a loaded Sequence")
        full = _full_width(seq)
        factor = full / seq.width if (full and seq.width) else 1.0
        spec = DataSpec(path=str(Path(seq.path).resolve()), format=seq.format, downscale=float(factor),
                        source_frames=[int(i) for i in getattr(seq, "source_frames", range(seq.n_frames))])
    return seq, spec


def _full_width(seq) -> int | None:
    """Image width of the sequence's files at full size (to record its downscale factor)."""
    import data_tools

    try:
        return data_tools.load(seq.path).width
    except Exception:
        return None


def check_sequence(seq) -> bool:
    """Validate the data for tracking; returns whether training masks exist (warns when not).

    Raises:
        TrackingError: fewer than 2 training cameras, or a missing/mis-sized image or mask in any frame.
    """
    n_train = len(seq.train_cameras)
    if n_train < 2:
        raise TrackingError(f"{seq.path}: Dynamic 3D Gaussians needs at least 2 training cameras, found {n_train}")
    if seq.n_frames < 1:
        raise TrackingError(f"{seq.path}: no frames")
    seq.check_files(list(range(seq.n_frames)))
    has_masks = bool(seq.has_masks())
    if not has_masks:
        warnings.warn(f"{seq.path}: no foreground masks for the training cameras: the segmentation loss is off "
                      "and every Gaussian of the initial cloud keeps its label", stacklevel=3)
    return has_masks


def initial_points(seq, out_dir: Path, init_points_file: str | Path | None) -> tuple[np.ndarray, str]:
    """float32 [N, 7] initial cloud and where it came from: DATA/init_pt_cld.npz if present, else
    `init_points_file`, else built from the masks of frame 0 with data_tools into OUT/init_pt_cld.npz."""
    import data_tools

    shipped = seq.init_points()
    if shipped is not None:
        if init_points_file is not None:
            warnings.warn(f"--init-points {init_points_file} ignored: the data ships init_pt_cld.npz", stacklevel=3)
        return _check_points(shipped, Path(seq.path) / "init_pt_cld.npz"), "data"
    if init_points_file is not None:
        path = Path(init_points_file)
        try:
            with np.load(path) as z:
                pts = z["data"] if "data" in z.files else z[z.files[0]]
        except FileNotFoundError:
            raise TrackingError(f"{path}: initial point cloud not found") from None
        except Exception as exc:
            raise TrackingError(f"{path}: cannot read the initial point cloud ({exc})") from None
        return _check_points(pts, path), str(path)
    built = out_dir / "init_pt_cld.npz"
    if built.exists():
        try:
            with np.load(built) as z:
                return _check_points(z["data"], built), str(built)
        except Exception:
            built.unlink()
    pts = data_tools.build_init_points(seq, 0)
    data_tools.write_init_points(pts, built)
    return _check_points(pts, built), str(built)


def _check_points(pts, source) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 7:
        raise TrackingError(f"{source}: initial points must be [N, 7] (xyz, rgb, seg), got shape {pts.shape}")
    if len(pts) < 4:
        raise TrackingError(f"{source}: only {len(pts)} initial points")
    if not np.isfinite(pts).all():
        raise TrackingError(f"{source}: initial points contain NaN or Inf")
    return pts


@dataclass
class _Views:
    """Training cameras as tensors on the device."""

    viewmats: torch.Tensor  # [C, 4, 4]
    Ks: torch.Tensor  # [C, 3, 3]
    sizes: list[tuple[int, int]]  # (W, H) per camera
    background: torch.Tensor  # [6]: RGB background, then black for the segmentation channels

    @classmethod
    def build(cls, cameras, background, device, uncovered_is_background: bool = False) -> _Views:
        vm = torch.tensor(np.stack([c.w2c for c in cameras]), dtype=torch.float32, device=device)
        Ks = torch.tensor(np.stack([c.K for c in cameras]), dtype=torch.float32, device=device)
        bg = torch.zeros(6, device=device)
        if background is not None:
            bg[:3] = torch.tensor(background, dtype=torch.float32)
        if uncovered_is_background:
            bg[5] = 1.0  # segmentation colour of background: blue (0, 0, 1)
        return cls(vm, Ks, [(c.width, c.height) for c in cameras], bg)


def load_targets(seq, t: int, cameras, has_masks: bool, device) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Images [3, H, W] and segmentation targets [3, H, W] = (m, 0, 1 - m) of frame t per camera."""
    images, segs = [], []
    for cam in cameras:
        images.append(torch.from_numpy(np.ascontiguousarray(seq.image(t, cam))).permute(2, 0, 1).contiguous()
                      .to(device))
        seg = None
        if has_masks:
            m = seq.mask(t, cam)
            if m is not None:
                mt = torch.from_numpy(m.astype(np.float32))
                seg = torch.stack([mt, torch.zeros_like(mt), 1 - mt]).to(device)
        segs.append(seg)
    return images, segs


# ----------------------------------------------------------------------------- one step's render and loss
def render_view(act: dict[str, torch.Tensor], views: _Views, c: int, config: TrackingConfig,
                densify: bool) -> tritonsplat.RasterizeOutput:
    W, H = views.sizes[c]
    return tritonsplat.rasterize(
        act["means"], act["quats"], act["scales"], act["opacities"], act["colors"],
        views.viewmats[c:c + 1], views.Ks[c:c + 1], W, H, near=config.near * 1.0 / config.metres_per_unit,
        backgrounds=views.background[None], densify_channels=3 if densify else None,
        deterministic=config.deterministic, backend=config.backend)


def colour_correct(rgb_hwc: torch.Tensor, cam_m: torch.Tensor, cam_c: torch.Tensor) -> torch.Tensor:
    """exp(m) * rgb + c per channel; rgb [H, W, 3], m, c [3]."""
    return torch.exp(cam_m) * rgb_hwc + cam_c


def photometric_terms(out, params, c: int, image: torch.Tensor, seg_target: torch.Tensor | None,
                      config: TrackingConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{"im", "seg"} losses of one view and the corrected RGB render [3, H, W] (detached)."""
    colors = out.colors[0]  # [H, W, 6]
    rgb = colour_correct(colors[..., :3], params["cam_m"][c], params["cam_c"][c]).permute(2, 0, 1)
    s = config.weights.ssim
    terms = {"im": L.image_loss(rgb, image, s)}
    if seg_target is not None:
        terms["seg"] = L.image_loss(colors[..., 3:].permute(2, 0, 1), seg_target, s)
    return terms, rgb.detach()


def total_loss(terms: dict[str, torch.Tensor], config: TrackingConfig) -> torch.Tensor:
    w = config.weights
    return sum(getattr(w, k) * v for k, v in terms.items())


def _check_finite(terms: dict[str, torch.Tensor], loss: torch.Tensor, t: int, step: int, poison: bool) -> float:
    value = float("nan") if poison else float(loss.detach())
    if math.isfinite(value):
        return value
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    raise NaNLossError(t, step, bad[0] if bad else ("injected" if poison else "total"))


class _Progress:
    """A tqdm bar per frame (loss, PSNR, Gaussians; tqdm shows steps/s) and a summary line."""

    def __init__(self, enabled: bool, echo: Callable[[str], None], t: int, n_frames: int, steps: int):
        self.echo = echo
        self.bar = None
        self.every = max(1, steps // PROGRESS_UPDATES)
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"frame {t}/{n_frames - 1}", unit="step", leave=False,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, loss: float, psnr: float, n: int) -> None:
        if self.bar is not None and ((step + 1) % self.every == 0):
            self.bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{psnr:.2f}", n=n, refresh=False)
            self.bar.update(step + 1 - self.bar.n)

    def close(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
        self.echo(line)


def _np(x: torch.Tensor) -> np.ndarray:
    """A numpy copy (never sharing memory with a live tensor)."""
    return x.detach().cpu().numpy().copy()


def _adam_record(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict:
    """The Adam state that carries to the next frame: colour moments and every group's step."""
    rec: dict[str, dict] = {}
    for name in ("means", "quats", "rgb"):
        p = params[name]
        state = optimizer.state.get(p, {})
        step = int(state["step"].item()) if "step" in state else 0
        entry: dict = {"step": np.int64(step)}
        if name == "rgb":
            n = p.shape[0]
            zeros = np.zeros((n, 3), np.float32)
            entry["exp_avg"] = _np(state["exp_avg"]) if "exp_avg" in state else zeros
            entry["exp_avg_sq"] = _np(state["exp_avg_sq"]) if "exp_avg_sq" in state else zeros
        rec[name] = entry
    return rec


def _curves_summary(curves: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for k, v in curves.items():
        if v:
            tail = np.asarray(v[-max(1, len(v) // 10):], np.float64)
            out[f"final_{k}"] = float(tail.mean())
    return out


# ----------------------------------------------------------------------------- t = 0
def fit_first_frame(seq, points: np.ndarray, config: TrackingConfig, scene_radius: float, has_masks: bool,
                    device: torch.device, *, progress: bool = True, echo: Callable[[str], None] = print
                    ) -> tuple[dict[str, torch.Tensor], FrameRecord, list[dict]]:
    """Reconstruct frame 0; returns the parameters (CPU), frame 0's record and the densification log."""
    t0 = time.perf_counter()
    cams = seq.train_cameras
    views = _Views.build(cams, seq.background, device, config.uncovered_is_background)
    images, segs = load_targets(seq, 0, cams, has_masks, device)
    params = init_params(torch.from_numpy(points).to(device), len(cams), n_neighbours=config.init_scale_neighbours,
                         max_scale=None if config.max_init_scale is None else config.max_init_scale * scene_radius)
    lrs = learning_rates(config, scene_radius)
    optimizer = make_optimizer(params, lrs, config)
    strategy = DensifyStrategy(config.densify, scene_radius)
    dstate = strategy.initialize_state(params["means"].shape[0], device)
    gen = frame_generator(config.seed, 0)
    steps = config.steps_first
    order = torch.randint(len(cams), (steps,), generator=gen).tolist()
    curves: dict[str, list[float]] = {"loss": [], "psnr": [], "im": [], "seg": []}
    bar = _Progress(progress, echo, 0, seq.n_frames, steps)
    for step in range(steps):
        poison = fault_at(0, step) == "nan"
        c = order[step]
        act = activated(params)
        out = render_view(act, views, c, config, densify=True)
        terms, rgb = photometric_terms(out, params, c, images[c], segs[c], config)
        loss = total_loss(terms, config)
        value = _check_finite(terms, loss, 0, step, poison)
        loss.backward()
        optimizer.step()
        W, H = views.sizes[c]
        try:
            strategy.step_post_backward(params, optimizer, dstate, step, gen, densify_grad=out.densify_grad[0],
                                        radii=out.radii[0], width=W, height=H)
        except AllGaussiansPrunedError as exc:
            raise TrackingError(str(exc)) from None
        optimizer.zero_grad(set_to_none=True)
        psnr = float(L.psnr(rgb.clamp(0, 1), images[c]))
        curves["loss"].append(value)
        curves["psnr"].append(psnr)
        for k in ("im", "seg"):
            curves[k].append(float(terms[k].detach()) if k in terms else 0.0)
        bar.update(step, value, psnr, params["means"].shape[0])
    seconds = time.perf_counter() - t0
    n = params["means"].shape[0]
    stats = {**_curves_summary(curves), "n_gaussians": n, "steps": steps, "steps_per_second": steps / seconds,
             "source_frame": int(seq.source_frames[0])}
    bar.close(f"frame 0/{seq.n_frames - 1}: loss {stats['final_loss']:.4f}, train PSNR {stats['final_psnr']:.2f} dB, "
              f"{n:,} Gaussians, {steps} steps in {seconds:.1f} s ({steps / seconds:.1f} steps/s)")
    record = FrameRecord(
        t=0, means=_np(params["means"]), quats=_np(params["quats"]), rgb=_np(params["rgb"]),
        adam=_adam_record(optimizer, params),
        curves={k: np.asarray(v, np.float32) for k, v in curves.items()}, stats=stats, seconds=seconds)
    final = {k: v.detach().cpu() for k, v in params.items()}
    return final, record, dstate.history


def neighbour_graph(means0: torch.Tensor, fg: torch.Tensor, config: TrackingConfig
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kNN among foreground Gaussians at t = 0: indices [Nfg, K] (into the foreground subset),
    weights exp(-lambda d^2) and distances d, float32. K = min(knn_k, Nfg - 1); empty when Nfg < 2."""
    fg_means = means0[fg]
    n_fg = fg_means.shape[0]
    k = min(config.knn_k, n_fg - 1)
    if k < 1:
        if n_fg:
            warnings.warn(f"only {n_fg} foreground Gaussian(s): the rigidity losses are off", stacklevel=3)
        z = np.zeros((n_fg, 0), np.float32)
        return np.zeros((n_fg, 0), np.int64), z, z.copy()
    idx, d2 = knn(fg_means, k)
    lam = L.lambda_in_data_units(config.knn_lambda, config.metres_per_unit)
    weights = L.neighbour_weights(d2, lam)
    return idx.cpu().numpy(), weights.cpu().numpy().astype(np.float32), torch.sqrt(d2).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- t > 0
@dataclass
class _Static:
    """What frames t > 0 share, on the device, all from run.h5."""

    scales: torch.Tensor  # [N, 3] activated, frozen
    opacities: torch.Tensor  # [N]
    seg: torch.Tensor  # [N, 3]
    cam_m: torch.Tensor  # [C, 3]
    cam_c: torch.Tensor  # [C, 3]
    fg_idx: torch.Tensor  # [Nfg] int64
    bg_idx: torch.Tensor  # [Nbg] int64
    init_bg_means: torch.Tensor  # [Nbg, 3]
    init_bg_quats: torch.Tensor  # [Nbg, 4] normalised
    nb_idx: torch.Tensor  # [Nfg, K]
    nb_w: torch.Tensor  # [Nfg, K]
    nb_d: torch.Tensor  # [Nfg, K]

    @classmethod
    def from_run(cls, run: RunRecord, device) -> _Static:
        p = {k: torch.from_numpy(v).to(device) for k, v in run.params0.items()}
        fg = torch.from_numpy(run.fg).to(device)
        bg_idx = torch.nonzero(~fg).squeeze(1)
        return cls(
            scales=torch.exp(p["log_scales"]), opacities=torch.sigmoid(p["logit_opacities"]).squeeze(-1),
            seg=p["seg"], cam_m=p["cam_m"], cam_c=p["cam_c"], fg_idx=torch.nonzero(fg).squeeze(1), bg_idx=bg_idx,
            init_bg_means=p["means"][bg_idx], init_bg_quats=quat_normalize(p["quats"][bg_idx]),
            nb_idx=torch.from_numpy(run.neighbour_indices).to(device),
            nb_w=torch.from_numpy(run.neighbour_weights).to(device),
            nb_d=torch.from_numpy(run.neighbour_distances).to(device))


def fit_next_frame(seq, t: int, prev: FrameRecord, prev2: FrameRecord, static: _Static, views: _Views,
                   config: TrackingConfig, scene_radius: float, has_masks: bool, device: torch.device, *,
                   progress: bool = True, echo: Callable[[str], None] = print) -> FrameRecord:
    """Fit frame t > 0 from the records of t - 1 and t - 2 (t - 2 = t - 1 at t = 1: zero velocity)."""
    t_start = time.perf_counter()
    cams = seq.train_cameras
    images, segs = load_targets(seq, t, cams, has_masks, device)

    def dev(a):
        return torch.from_numpy(np.asarray(a)).to(device)

    prev_means, prev2_means = dev(prev.means), dev(prev2.means)
    prev_quats, prev2_quats = quat_normalize(dev(prev.quats)), quat_normalize(dev(prev2.quats))
    # Constant-velocity initialisation (original `initialize_per_timestep`).
    params = {
        "means": nn.Parameter(prev_means + (prev_means - prev2_means)),
        "quats": nn.Parameter(quat_normalize(prev_quats + (prev_quats - prev2_quats))),
        "rgb": nn.Parameter(dev(prev.rgb).clone()),
    }
    lrs = learning_rates(config, scene_radius)
    optimizer = make_optimizer(params, lrs, config)
    for name, p in params.items():
        if p not in optimizer.state and any(p is q for g in optimizer.param_groups for q in g["params"]):
            saved = prev.adam.get(name, {})
            step = torch.tensor(float(saved.get("step", 0)), dtype=torch.float32)
            if name == "rgb" and "exp_avg" in saved:
                m1, m2 = dev(saved["exp_avg"]).clone(), dev(saved["exp_avg_sq"]).clone()
            else:  # means and rotations: moments reset each frame, step counter kept
                m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
            optimizer.state[p] = {"step": step, "exp_avg": m1, "exp_avg_sq": m2}

    prev_fg_means = prev_means[static.fg_idx]
    prev_fg_quats = prev_quats[static.fg_idx]
    prev_rgb = dev(prev.rgb)
    use_rigidity = static.nb_idx.shape[1] > 0
    gen = frame_generator(config.seed, t)
    steps = config.steps_per_frame
    order = torch.randint(len(cams), (steps,), generator=gen).tolist()
    keys = ["im", "seg", "rigid", "rot", "iso", "floor", "bg", "colour"]
    curves: dict[str, list[float]] = {"loss": [], "psnr": [], **{k: [] for k in keys}}
    frozen = {"cam_m": static.cam_m, "cam_c": static.cam_c}
    bar = _Progress(progress, echo, t, seq.n_frames, steps)
    n = params["means"].shape[0]
    for step in range(steps):
        poison = fault_at(t, step) == "nan"
        c = order[step]
        quats_n = quat_normalize(params["quats"])
        act = {"means": params["means"], "quats": quats_n, "scales": static.scales, "opacities": static.opacities,
               "colors": torch.cat([params["rgb"], static.seg], -1)}
        out = render_view(act, views, c, config, densify=False)
        terms, rgb = photometric_terms(out, frozen, c, images[c], segs[c], config)
        if use_rigidity:
            fg_means = params["means"][static.fg_idx]
            terms.update(L.rigidity_losses_fast(fg_means, quats_n[static.fg_idx], prev_fg_means, prev_fg_quats,
                                                static.nb_idx, static.nb_w, static.nb_d))
        if config.floor_y is not None and static.fg_idx.numel():
            terms["floor"] = L.floor_loss(params["means"][static.fg_idx], config.floor_y)
        if static.bg_idx.numel():
            terms["bg"] = L.background_loss(params["means"][static.bg_idx], quats_n[static.bg_idx],
                                            static.init_bg_means, static.init_bg_quats)
        terms["colour"] = L.l1_rows(params["rgb"], prev_rgb)
        loss = total_loss(terms, config)
        value = _check_finite(terms, loss, t, step, poison)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        psnr = float(L.psnr(rgb.clamp(0, 1), images[c]))
        curves["loss"].append(value)
        curves["psnr"].append(psnr)
        for k in keys:
            curves[k].append(float(terms[k].detach()) if k in terms else 0.0)
        bar.update(step, value, psnr, n)
    seconds = time.perf_counter() - t_start
    stats = {**_curves_summary(curves), "n_gaussians": n, "steps": steps, "steps_per_second": steps / seconds,
             "source_frame": int(seq.source_frames[t])}
    bar.close(f"frame {t}/{seq.n_frames - 1}: loss {stats['final_loss']:.4f}, train PSNR {stats['final_psnr']:.2f} dB, "
              f"{n:,} Gaussians, {steps} steps in {seconds:.1f} s ({steps / seconds:.1f} steps/s)")
    return FrameRecord(
        t=t, means=_np(params["means"]), quats=_np(params["quats"]), rgb=_np(params["rgb"]),
        adam=_adam_record(optimizer, params),
        curves={k: np.asarray(v, np.float32) for k, v in curves.items()}, stats=stats, seconds=seconds)


# ----------------------------------------------------------------------------- the driver
def _describe_mismatch(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _describe_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} in OUT, {b!r} now")
    return diffs


def _frame_mismatch(out: Path, source_frames: list[int]) -> list[str]:
    """Completed frames must be the same source frames as now requested (the list may grow or shrink)."""
    diffs = []
    for t in range(min(completed_frames(out), len(source_frames))):
        stored = read_frame(out, t, arrays=False).stats.get("source_frame")
        if stored is not None and stored != source_frames[t]:
            diffs.append(f"frame {t}: source frame {stored} in OUT, {source_frames[t]} now")
            break
    return diffs


def fit(data, out_dir, config: TrackingConfig | None = None, *, downscale: float = 1.0, frames=None,
        init_points: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        echo: Callable[[str], None] = print):
    """Fit Dynamic 3D Gaussians to a multi-camera sequence, resuming what OUT already holds.

    Args:
        data: a dataset path (any `data_tools` format) or a `data_tools.Sequence`.
        out_dir: run folder: run.h5, frames/NNNNNN.h5, config.json (and init_pt_cld.npz when built).
        config: a TrackingConfig (default: the original's settings, `TrackingConfig()`).
        downscale: image downscale factor for a dataset path.
        frames: frame selection for a dataset path (slice, range or list of source indices).
        init_points: an N x 7 .npz (key "data") used when the data ships no init_pt_cld.npz.
        overwrite: start afresh, removing the run OUT holds (run.h5, frames/, metrics, plots, exports,
            renders; other files, e.g. the demo's OUT/data, stay).
        progress: show a progress bar per frame.
        echo: prints the summary line of each frame.

    Returns:
        `tracking.TrackingResult` of OUT.

    Raises:
        ConfigMismatchError: OUT holds a run with another config or data (and not overwrite).
        NaNLossError: a loss became NaN; completed frames are kept.
        TrackingError / data_tools.DataError: unusable input, with a message naming it.
        StorageError: the disk is full or not writable; completed frames are kept.
    """
    from .result import TrackingResult

    t_wall = time.perf_counter()
    config = (config or TrackingConfig()).validate()
    if config.floor_y is None:
        warnings.warn("floor_y is None: the floor loss is off", stacklevel=2)
    device = resolve_device(config.device)
    seq, spec = open_data(data, downscale, frames)
    has_masks = check_sequence(seq)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out)

    if overwrite:
        remove_run(out)
    existing = read_run_identity(out)
    if existing is not None:
        diffs = _describe_mismatch(existing[0], config.identity()) + _describe_mismatch(existing[1], spec.identity())
        diffs += _frame_mismatch(out, spec.source_frames)
        if diffs:
            raise ConfigMismatchError(
                f"{out} holds a run with a different config or data ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}): use another OUT, or --overwrite to replace it")
    if not (out / "run.h5").exists() and (out / "frames").exists():
        remove_run(out)  # frames without run.h5: a run killed before t = 0 was recorded
    write_json_atomic(out / "config.json", {"config": config.to_dict(), "data": spec.__dict__})

    done = completed_frames(out)
    scene_radius = float(seq.scene_radius)
    n_frames = seq.n_frames
    if done == 0:
        points, source = initial_points(seq, out, init_points)
        setup_seconds = time.perf_counter() - t_wall
        params0, rec0, history = fit_first_frame(seq, points, config, scene_radius, has_masks, device,
                                                 progress=progress, echo=echo)
        t_nb = time.perf_counter()
        fg = foreground_mask(params0, config.fg_threshold)
        nb_idx, nb_w, nb_d = neighbour_graph(params0["means"], fg, config)
        run = RunRecord(
            config=config, data=spec, train_cameras=[CameraRecord.from_camera(c) for c in seq.train_cameras],
            test_cameras=[CameraRecord.from_camera(c) for c in seq.test_cameras], scene_radius=scene_radius,
            params0={k: params0[k].numpy() for k in params0}, fg=fg.numpy(), neighbour_indices=nb_idx,
            neighbour_weights=nb_w, neighbour_distances=nb_d,
            background=list(seq.background) if seq.background is not None else None, has_masks=has_masks,
            extra={"init_points": source, "densify_log": history, "n_init_points": int(len(points)),
                   "setup_seconds": setup_seconds, "neighbours_seconds": time.perf_counter() - t_nb})
        write_run(out, run)
        write_frame(out, rec0)
        done = 1
        prev, prev2 = rec0, rec0
    else:
        run = read_run(out)
        prev = read_frame(out, done - 1)
        prev2 = read_frame(out, done - 2) if done >= 2 else prev
        if done < n_frames:
            echo(f"resuming {out} after frame {done - 1} ({done} of {n_frames} frames complete)")

    if done < n_frames:
        static = _Static.from_run(run, device)
        views = _Views.build(seq.train_cameras, seq.background, device, config.uncovered_is_background)
        for t in range(done, n_frames):
            try:
                rec = fit_next_frame(seq, t, prev, prev2, static, views, config, scene_radius, has_masks, device,
                                     progress=progress, echo=echo)
            except NaNLossError as exc:
                raise NaNLossError(exc.t, exc.step, exc.term, completed=t) from None
            write_frame(out, rec)
            prev2, prev = prev, rec
    result = TrackingResult(out)
    result.fit_seconds = time.perf_counter() - t_wall
    return result


__all__ = ["fit", "fit_first_frame", "fit_next_frame", "frame_generator", "initial_points", "open_data"]
