"""`fit`: the Dynamic 3D Gaussians optimisation, frame by frame, resumable (the driver).

Luiten et al., "Dynamic 3D Gaussians: Tracking by Persistent Dynamic View Synthesis" (3DV 2024):

- t = 0: reconstruct the first frame from an initial point cloud (`steps_first` steps, one random
  training camera per step, L = L_im + 3 L_seg, densification from `tracking.strategy`);
- then freeze opacities, scales and the per-camera colour correction, find K = 20 neighbours among
  the foreground Gaussians and weight them by exp(-lambda d^2);
- each t > 0: extrapolate means and rotations at constant velocity from t - 1 and t - 2, zero their
  Adam moments (the step counter is kept, as in the original), and optimise means, rotations and
  colours for `steps_per_frame` steps with the full loss (`tracking.losses.TERMS`).

Layout: `tracking.targets` (data, initial points, per-frame targets), `tracking.stages` (the two
stages and the one optimisation loop), this module (resume, run records, the frame loop).
RGB and segmentation colours are rendered in one pass (6 channels, `densify_channels=3`).

Resume: every completed frame is stored (`tracking.store`). Frame t draws its random numbers from a
generator seeded with seed * 1,000,003 + t, and its starting state is rebuilt from exactly what the
previous frames stored, in an uninterrupted run as in a resumed one, so both give the same bits on
the CPU torch backend.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import losses as L
from .config import TrackingConfig
from .distributed import (
    DEFAULT_TIMEOUT_S,
    World,
    barrier,
    broadcast_object,
    close_world,
    init_world,
    rank_cameras,
)
from .errors import ConfigMismatchError, NaNLossError, TrackingError
from .neighbours import knn
from .params import foreground_mask
from .stages import _Static, fit_first_frame, fit_next_frame, frame_generator
from .store import (
    CameraRecord,
    RunRecord,
    clean_temporaries,
    completed_frames,
    read_born,
    read_frame,
    read_run,
    read_run_identity,
    remove_run,
    write_frame,
    write_json_atomic,
    write_run,
)
from .targets import Views, check_sequence, initial_points, open_data


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrackingError(f"device {name!r} requested but CUDA is not available")
    return dev


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


# ----------------------------------------------------------------------------- the driver
def _describe_mismatch(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """Differences of two identities. A key missing from the stored `old` compares as its value in
    `defaults` (fields added since the run was written take their defaults); keys no longer in `new`
    (fields removed from the identity) are ignored."""
    defaults = defaults or {}
    diffs = []
    for k in sorted(new):
        b = new[k]
        a = old.get(k, defaults.get(k))
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(k) if isinstance(defaults.get(k), dict) else {}
            diffs += _describe_mismatch(a, b, sub, f"{prefix}{k}.")
        elif _plain(a) != _plain(b):
            diffs.append(f"{prefix}{k}: {a!r} in OUT, {b!r} now")
    return diffs


def _plain(value):
    """Tuples and lists compare alike (a stored JSON list against a config tuple)."""
    return list(value) if isinstance(value, tuple) else value


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
        echo: Callable[[str], None] = print, dist_timeout: float = DEFAULT_TIMEOUT_S):
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
        dist_timeout: under `torchrun`, seconds after which a collective with a dead or hung rank
            fails (every rank then exits with a DistributedError instead of hanging).

    Under `torchrun --nproc-per-node N` (see `tracking.distributed`) every rank fits the whole
    Gaussian set on its B / N of each step's B = cameras_per_step views; gradients are averaged and
    densification statistics summed before each step, so all ranks stay identical (the spawn stage of
    `spawn_new` too, from rank 0's detection). Only rank 0 writes OUT; every rank reads it to resume
    (multi-node: OUT on a shared filesystem).

    Returns:
        `tracking.TrackingResult` of OUT.

    Raises:
        ConfigMismatchError: OUT holds a run with another config or data (and not overwrite).
        NaNLossError: a loss became NaN; completed frames are kept.
        TrackingError / data_tools.DataError: unusable input, with a message naming it.
        StorageError: the disk is full or not writable; completed frames are kept.
    """
    t_wall = time.perf_counter()
    config = (config or TrackingConfig()).validate()
    if config.floor_y is None:
        warnings.warn("floor_y is None: the floor loss is off", stacklevel=2)
    world, world_device = init_world(config.device, dist_timeout)
    try:
        if world.active:
            rank_cameras(list(range(config.cameras_per_step)), world)  # B divisible by N, or a clear error
            config = replace(config, device=world_device)
            progress = progress and world.is_main
            if not world.is_main:
                echo = _silent
        return _fit(data, out_dir, config, world, downscale=downscale, frames=frames, init_points=init_points,
                    overwrite=overwrite, progress=progress, echo=echo, t_wall=t_wall)
    finally:
        close_world(world)


def _silent(*_args, **_kwargs) -> None:
    return None


def _fit(data, out_dir, config: TrackingConfig, world: World, *, downscale, frames, init_points, overwrite,
         progress, echo, t_wall):
    from .result import TrackingResult

    device = resolve_device(config.device)
    seq, spec = open_data(data, downscale, frames)
    has_masks = check_sequence(seq)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        clean_temporaries(out)
        if overwrite:
            remove_run(out)
    barrier(world, "run setup")
    existing = read_run_identity(out)
    if existing is not None:
        diffs = (_describe_mismatch(existing[0], config.identity(), TrackingConfig().identity())
                 + _describe_mismatch(existing[1], spec.identity()))
        diffs += _frame_mismatch(out, spec.source_frames)
        if diffs:
            raise ConfigMismatchError(
                f"{out} holds a run with a different config or data ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}): use another OUT, or --overwrite to replace it")
    if world.is_main:
        if not (out / "run.h5").exists() and (out / "frames").exists():
            remove_run(out)  # frames without run.h5: a run killed before t = 0 was recorded
        write_json_atomic(out / "config.json", {"config": config.to_dict(), "data": spec.__dict__})
    barrier(world, "run setup")

    done = broadcast_object(completed_frames(out), world, "resume point")
    scene_radius = float(seq.scene_radius)
    n_frames = seq.n_frames
    if done == 0:
        if not world.is_main:
            barrier(world, "initial points")    # rank 0 builds OUT/init_pt_cld.npz when needed; the others read it
        points, source = initial_points(seq, out, init_points)
        if world.is_main:
            barrier(world, "initial points")
        setup_seconds = time.perf_counter() - t_wall
        params0, rec0, history = fit_first_frame(seq, points, config, scene_radius, has_masks, device,
                                                 progress=progress, echo=echo, world=world)
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
        if world.is_main:
            write_run(out, run)
            write_frame(out, rec0)
        done = 1
        prev, prev2 = rec0, rec0
        born_by_frame = {}
    else:
        run = read_run(out)
        prev = read_frame(out, done - 1)
        born_by_frame = {s: read_born(out, s) for s in range(1, done)} if config.spawn_new else {}
        prev2 = read_frame(out, done - 2) if done >= 2 else prev
        if done < n_frames:
            echo(f"resuming {out} after frame {done - 1} ({done} of {n_frames} frames complete)")

    if done < n_frames:
        static = _Static.from_run(run, device)
        for s in sorted(born_by_frame):  # Gaussians born at earlier frames, in birth order
            if born_by_frame[s] is not None:
                static.extend(born_by_frame[s])
        views = Views.build(seq.train_cameras, seq.background, device, config.uncovered_is_background)
        for t in range(done, n_frames):
            try:
                rec = fit_next_frame(seq, t, prev, prev2, static, views, config, scene_radius, has_masks, device,
                                     progress=progress, echo=echo, world=world)
            except NaNLossError as exc:
                raise NaNLossError(exc.t, exc.step, exc.term, completed=t) from None
            if world.is_main:
                write_frame(out, rec)
            if rec.born is not None:
                static.extend(rec.born)
            prev2, prev = prev, rec
    barrier(world, "end of the fit")          # rank 0's last frame is on disk before anyone reads OUT
    result = TrackingResult(out)
    result.fit_seconds = time.perf_counter() - t_wall
    return result


__all__ = ["fit", "fit_first_frame", "fit_next_frame", "frame_generator", "initial_points", "neighbour_graph",
           "open_data"]
