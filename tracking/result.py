"""`TrackingResult`: a fitted run reopened from its folder (`tracking.load(OUT)`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import tritonsplat

from .config import TrackingConfig
from .eval_config import DEFAULT_INFLUENCE_THRESHOLD
from .quaternions import quat_normalize, quat_to_rotmat
from .store import RUN_FILE, DataSpec, completed_frames, read_birth_frame, read_born, read_frame, read_run

TRACK_CHUNK_ELEMENTS = 1 << 24  # query x Gaussian pairs per block in `track` (float64: 128 MB)


def assign_points(points, means, quats, log_scales, opacities, threshold: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, the Gaussian of highest influence o exp(-d^T Sigma^-1 d / 2) (paper Sec. 3.8).

    Args:
        points: [P, 3] query positions.
        means [N, 3], quats [N, 4] (any norm), log_scales [N, 3], opacities [N] (activated).
        threshold: influence below which a point is assigned to the static background.

    Returns:
        index [P] int64 (-1 for static background), influence [P] float64 of the best Gaussian.
    """
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3)
    mu = torch.as_tensor(means).double()
    R = quat_to_rotmat(torch.as_tensor(quats).double())  # [N, 3, 3]
    inv_s2 = torch.exp(-2 * torch.as_tensor(log_scales).double())  # [N, 3]
    M = torch.einsum("nij,nj,nkj->nik", R, inv_s2, R)  # Sigma^-1 = R S^-2 R^T, [N, 3, 3]
    # d^T M d = p^T M p - 2 p^T M mu + mu^T M mu: one matmul over 10 monomials of p per block.
    b = torch.einsum("nij,nj->ni", M, mu)
    coef = torch.stack([M[:, 0, 0], M[:, 1, 1], M[:, 2, 2], 2 * M[:, 0, 1], 2 * M[:, 0, 2], 2 * M[:, 1, 2],
                        -2 * b[:, 0], -2 * b[:, 1], -2 * b[:, 2], (mu * b).sum(1)], 1)  # [N, 10]
    opac = torch.as_tensor(opacities).double().reshape(-1)
    log_o = torch.log(opac.clamp_min(1e-30))
    best = torch.empty(len(pts), dtype=torch.int64)
    rows = max(1, TRACK_CHUNK_ELEMENTS // max(1, len(mu)))
    for s in range(0, len(pts), rows):
        x, y, z = pts[s:s + rows].unbind(1)
        mono = torch.stack([x * x, y * y, z * z, x * y, x * z, y * z, x, y, z, torch.ones_like(x)], 1)
        maha = (mono @ coef.T).clamp_min(0)
        best[s:s + rows] = (log_o[None] - 0.5 * maha).argmax(1)
    d = pts - mu[best]
    exact = torch.einsum("pi,pij,pj->p", d, M[best], d)  # recomputed directly: no cancellation
    influence = opac[best] * torch.exp(-0.5 * exact)
    return torch.where(influence >= threshold, best, torch.full_like(best, -1)), influence


class _PerFrame:
    """Lazy per-frame tensors: `series[t]` -> Tensor, `len(series)` = frames; a small cache."""

    def __init__(self, result: TrackingResult, key: str, normalise: bool = False):
        self._result, self._key, self._normalise = result, key, normalise

    def __len__(self) -> int:
        return self._result.n_frames

    def __getitem__(self, t: int) -> torch.Tensor:
        if t < 0:
            t += len(self)
        value = self._result._frame_arrays(t)[self._key]
        return quat_normalize(value) if self._normalise else value

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def stack(self) -> torch.Tensor:
        """[T, N, D] all frames, N = every Gaussian of the run; rows of Gaussians not yet born at t are NaN."""
        n = self._result.n_gaussians
        rows = []
        for value in self:
            if value.shape[0] < n:
                value = torch.cat([value, value.new_full((n - value.shape[0], *value.shape[1:]), float("nan"))])
            rows.append(value)
        return torch.stack(rows)


class TrackingResult:
    """A run folder written by `tracking.fit`.

    Attributes:
        out_dir: the run folder.
        config: the TrackingConfig it was fitted with.
        data: DataSpec (path, format, downscale, source frames) of the fitted data.
        n_frames: completed frames (0..n_frames-1 can be read).
        train_cameras, test_cameras: data_tools.Camera lists (as fitted, with downscale applied).
        scene_radius: data units.
        n_gaussians: N, every Gaussian of the run (fixed after t = 0 unless the run spawned new ones,
            `TrackingConfig.spawn_new`; Gaussians are only appended, never removed after t = 0).
        birth_frame: int64 [N], the frame from which each Gaussian exists (0 for those of t = 0).
        fg: bool [N] foreground Gaussians.
        means[t] [N_t, 3], quats[t] [N_t, 4] normalised (w, x, y, z), colours[t] [N_t, 3] rgb: the N_t
            Gaussians alive at t, i.e. rows 0..N_t - 1, those with birth_frame <= t (`alive(t)`).
        opacities [N], scales [N, 3] (activated, fixed from each Gaussian's birth frame).
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if not (self.out_dir / RUN_FILE).exists():
            raise FileNotFoundError(f"{self.out_dir}: no {RUN_FILE} (not a finished t = 0 of tracking.fit)")
        self._run = read_run(self.out_dir)
        self.config: TrackingConfig = self._run.config
        self.data: DataSpec = self._run.data
        self.n_frames = completed_frames(self.out_dir)
        self.scene_radius = self._run.scene_radius
        self.train_cameras = [c.to_camera() for c in self._run.train_cameras]
        self.test_cameras = [c.to_camera() for c in self._run.test_cameras]
        self.background = self._run.background
        p0 = {k: torch.from_numpy(v) for k, v in self._run.params0.items()}
        fg = self._run.fg.astype(bool)
        # Gaussians born after t = 0 (spawn_new): their fixed parameters follow those of t = 0.
        if getattr(self.config, "spawn_new", False):
            for t in range(1, self.n_frames):
                born = read_born(self.out_dir, t)
                if born is not None:
                    for k in ("log_scales", "logit_opacities", "seg"):
                        p0[k] = torch.cat([p0[k], torch.from_numpy(born[k])])
                    fg = np.concatenate([fg, np.ones(len(born["seg"]), bool)])
        self._params0 = p0
        self.n_gaussians = int(p0["log_scales"].shape[0])
        births = read_birth_frame(self.out_dir, self.n_frames - 1) if self.n_frames else None
        if births is None or len(births) != self.n_gaussians:  # runs written before birth frames were stored
            births = np.zeros(self.n_gaussians, np.int64)
        self.birth_frame = torch.from_numpy(births)
        self.fg = torch.from_numpy(fg)
        self.opacities = torch.sigmoid(p0["logit_opacities"]).squeeze(-1)
        self.scales = torch.exp(p0["log_scales"])
        self.means = _PerFrame(self, "means")
        self.quats = _PerFrame(self, "quats", normalise=True)
        self.colours = _PerFrame(self, "rgb")
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.fit_seconds: float | None = None

    def __repr__(self) -> str:
        return (f"TrackingResult({self.out_dir}, {self.n_frames} frame(s), {self.n_gaussians:,} Gaussians "
                f"({int(self.fg.sum()):,} foreground), preset {self.config.preset!r})")

    # ------------------------------------------------------------------ parameters
    def _frame_arrays(self, t: int) -> dict[str, torch.Tensor]:
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range: {self.n_frames} completed frame(s) in {self.out_dir}")
        if t not in self._cache:
            rec = read_frame(self.out_dir, t)
            self._cache[t] = {"means": torch.from_numpy(rec.means), "quats": torch.from_numpy(rec.quats),
                              "rgb": torch.from_numpy(rec.rgb)}
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(t)
        return self._cache[t]

    def n_alive(self, t: int) -> int:
        """N_t: Gaussians alive at frame t (rows 0..N_t - 1)."""
        return int(self._frame_arrays(t)["means"].shape[0])

    def alive(self, t: int) -> torch.Tensor:
        """bool [N]: the Gaussians that exist at frame t (birth_frame <= t)."""
        return self.birth_frame <= t

    def params(self, t: int) -> dict[str, torch.Tensor]:
        """Raw parameters of the N_t Gaussians alive at frame t (tracking.params names): per-frame means, quats,
        rgb; the rest fixed (from t = 0, or from the birth frame); cam_m, cam_c per camera."""
        frame = self._frame_arrays(t)
        n = frame["means"].shape[0]
        fixed = {k: (v if k in ("cam_m", "cam_c") else v[:n]) for k, v in self._params0.items()}
        return {**fixed, **frame}

    def frame_stats(self, t: int) -> dict:
        """Scalar statistics of frame t's optimisation (final loss, train PSNR, steps/s, ...) and seconds."""
        rec = read_frame(self.out_dir, t, arrays=False)
        return {**rec.stats, "seconds": rec.seconds}

    def curves(self, t: int) -> dict[str, np.ndarray]:
        """Per-step curves of frame t: loss, psnr and each loss term."""
        return read_frame(self.out_dir, t, arrays=False).curves

    @property
    def seconds(self) -> float:
        """Wall time of `fit` for the completed frames, resumed sessions summed: set-up (data checks,
        initial points), every frame's optimisation and the neighbour search."""
        extra = self._run.extra
        fixed = float(extra.get("setup_seconds", 0.0)) + float(extra.get("neighbours_seconds", 0.0))
        return fixed + float(sum(read_frame(self.out_dir, t, arrays=False).seconds for t in range(self.n_frames)))

    @property
    def source_frames(self) -> list[int]:
        """For each completed frame, its index in the data source (the run may have been extended)."""
        out = []
        for t in range(self.n_frames):
            stats = read_frame(self.out_dir, t, arrays=False).stats
            out.append(int(stats.get("source_frame", self.data.source_frames[0] + t)))
        return out

    def metrics(self) -> dict | None:
        """OUT/metrics.json, or None before `tracking.evaluate`."""
        path = self.out_dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def camera(self, camera) -> object:
        """The stored camera for a data_tools.Camera or a camera id."""
        cam_id = int(camera if isinstance(camera, int | np.integer) else camera.id)
        for c in self.train_cameras + self.test_cameras:
            if c.id == cam_id:
                return c
        if not isinstance(camera, int | np.integer):
            return camera  # an external camera (e.g. a novel view)
        raise KeyError(f"no camera with id {cam_id} in {self.out_dir}")

    # ------------------------------------------------------------------ tracking readout
    def assign(self, points: torch.Tensor, threshold: float | None = None, t: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian of highest influence at frame t (default 0) for each point [P, 3], among those alive at
        t (see `assign_points`); threshold defaults to DEFAULT_INFLUENCE_THRESHOLD. Returns index [P] (-1:
        static), influence [P]."""
        thr = DEFAULT_INFLUENCE_THRESHOLD if threshold is None else threshold
        p = self._params0 if t == 0 else self.params(t)
        n = p["means"].shape[0] if t == 0 else self.n_alive(t)
        return assign_points(points, p["means"][:n], p["quats"][:n], p["log_scales"][:n], self.opacities[:n], thr)

    def track(self, points_at_t0, threshold: float | None = None, start_frame: int = 0) -> torch.Tensor:
        """Dense 6-DoF tracking readout (paper Sec. 3.8): [P, 3] points at `start_frame` -> [T, P, 3].

        Each point follows the Gaussian of highest influence at start_frame (default 0; later for objects
        that entered later), carried in that Gaussian's local frame: p_t = mu_t + R_t R_s^T (p - mu_s);
        points where no influence reaches the threshold stay put (static background). Rows t < start_frame
        are NaN. `assign` followed by `carry`.
        """
        self._check_start_frame(start_frame)
        pts = torch.as_tensor(points_at_t0, dtype=torch.float64).reshape(-1, 3)
        idx, _ = self.assign(pts, threshold, t=int(start_frame))
        return self.carry(pts, idx, start_frame)

    def carry(self, points_at_t0, index: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        """[P, 3] points at `start_frame`, each carried by the Gaussian `index` [P] (an `assign` result; -1:
        static) in its local frame -> [T, P, 3] float32, NaN before start_frame. Several readouts of the same
        points (thresholds) share one `assign`."""
        s = self._check_start_frame(start_frame)
        pts = torch.as_tensor(points_at_t0, dtype=torch.float64).reshape(-1, 3)
        moving = index >= 0
        g = index.clamp_min(0)
        mu0 = self.means[s].double()[g]
        R0 = quat_to_rotmat(self.quats[s].double()[g])
        local = torch.einsum("pji,pj->pi", R0, pts - mu0)  # R_s^T (p - mu_s)
        out = torch.full((self.n_frames, len(pts), 3), float("nan"), dtype=torch.float64)
        for t in range(s, self.n_frames):
            mu_t = self.means[t].double()[g]
            R_t = quat_to_rotmat(self.quats[t].double()[g])
            moved = mu_t + torch.einsum("pij,pj->pi", R_t, local)
            out[t] = torch.where(moving[:, None], moved, pts)
        return out.float()

    def _check_start_frame(self, start_frame: int) -> int:
        s = int(start_frame)
        if not 0 <= s < max(self.n_frames, 1):
            raise ValueError(f"start_frame must be in 0..{self.n_frames - 1}, got {start_frame}")
        return s

    # ------------------------------------------------------------------ rendering
    def colour_correction(self, camera, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(m, c) [3] of a camera: a training camera's own ("auto"/"train"), none for others ("auto",
        "none") unless mode == "mean" (the training cameras' mean; EvalConfig.test_colour_correction)."""
        cam = self.camera(camera)
        train_ids = [c.id for c in self.train_cameras]
        m_all, c_all = self._params0["cam_m"], self._params0["cam_c"]
        if mode in ("auto", "train") and cam.id in train_ids:
            i = train_ids.index(cam.id)
            return m_all[i], c_all[i]
        if mode == "mean":
            return m_all.mean(0), c_all.mean(0)
        return torch.zeros(3), torch.zeros(3)

    def render_output(self, t: int, camera, *, device: str | torch.device | None = None,
                      backend: str | None = None) -> tritonsplat.RasterizeOutput:
        """The raw rasterizer output (RGB, alpha, depths, median depths) of frame t in a camera."""
        cam = self.camera(camera)
        p = self.params(t)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        bg = torch.tensor(self.background if self.background is not None else [0.0, 0.0, 0.0],
                          dtype=torch.float32, device=dev)
        n = p["means"].shape[0]
        with torch.no_grad():
            return tritonsplat.rasterize(
                p["means"].to(dev), p["quats"].to(dev), self.scales[:n].to(dev), self.opacities[:n].to(dev),
                p["rgb"].to(dev), torch.tensor(cam.w2c, dtype=torch.float32, device=dev)[None],
                torch.tensor(cam.K, dtype=torch.float32, device=dev)[None], cam.width, cam.height,
                backgrounds=bg[None], backend=backend or self.config.backend, **self.config.rasterize_settings())

    def render(self, t: int, camera, *, colour_correction: str = "auto", device=None, backend: str | None = None
               ) -> torch.Tensor:
        """Image [H, W, 3] float32 (CPU, unclamped) of frame t seen by `camera` (a data_tools.Camera
        or camera id). Training cameras get their colour correction; test cameras none by default
        (colour_correction="mean" gives them the training cameras' mean)."""
        out = self.render_output(t, camera, device=device, backend=backend)
        m, c = self.colour_correction(camera, colour_correction)
        return (torch.exp(m.to(out.colors.device)) * out.colors[0] + c.to(out.colors.device)).cpu()


def load(out_dir: str | Path) -> TrackingResult:
    """Reopen a run written by `tracking.fit`."""
    return TrackingResult(out_dir)
