"""Variable-N storage: Gaussians born after t = 0 (`TrackingConfig.spawn_new`), written by the store and read
back by `tracking.load`, without fitting (hand-made records).

| check                                                                     | criterion |
|---------------------------------------------------------------------------|-----------|
| means[t] holds the N_t Gaussians alive at t; birth_frame / alive(t) say which | exact    |
| params(t): fixed parameters of the born Gaussians follow those of t = 0       | exact    |
| stack(): rows before a Gaussian's birth are NaN                               | exact    |
| track(start_frame=s): NaN before s, the born Gaussian carried from s          | 1e-6     |
| a run written before birth frames existed loads with birth_frame all 0        | exact    |
| _Static.extend appends fixed parameters and neighbour rows                    | exact    |
| config: spawn fields default off; a stored config without them compares equal | exact    |
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import tracking
from tracking.config import TrackingConfig
from tracking.fit import _describe_mismatch
from tracking.stages import _Static
from tracking.store import CameraRecord, DataSpec, FrameRecord, RunRecord, frame_path, write_frame, write_run

N0, M = 5, 3


def _frame(t: int, n: int, births: np.ndarray | None, born=None) -> FrameRecord:
    rng = np.random.default_rng(t)
    quats = np.zeros((n, 4), np.float32)
    quats[:, 0] = 1
    return FrameRecord(t=t, means=rng.normal(size=(n, 3)).astype(np.float32), quats=quats,
                       rgb=rng.uniform(size=(n, 3)).astype(np.float32),
                       adam={"rgb": {"exp_avg": np.zeros((n, 3), np.float32),
                                     "exp_avg_sq": np.zeros((n, 3), np.float32), "step": np.int64(t)},
                             "means": {"step": np.int64(t)}, "quats": {"step": np.int64(t)}},
                       stats={"source_frame": t}, birth_frame=births, born=born)


def _born(m: int, n_fg: int, k: int) -> dict:
    return {"log_scales": np.full((m, 3), -3.0, np.float32), "logit_opacities": np.zeros((m, 1), np.float32),
            "seg": np.tile(np.array([[1, 0, 0]], np.float32), (m, 1)),
            "nb_indices": np.tile(np.arange(n_fg, n_fg + k, dtype=np.int64), (m, 1)) % (n_fg + m),
            "nb_weights": np.ones((m, k), np.float32), "nb_distances": np.ones((m, k), np.float32)}


def _write_run(out, *, spawn: bool = True, births_stored: bool = True) -> None:
    cam = CameraRecord(0, np.array([[20.0, 0, 8], [0, 20, 6], [0, 0, 1]]), np.eye(4), 16, 12)
    params0 = {"means": np.zeros((N0, 3), np.float32), "rgb": np.full((N0, 3), 0.5, np.float32),
               "seg": np.tile(np.array([[1, 0, 0]], np.float32), (N0, 1)),
               "quats": np.tile(np.array([[1, 0, 0, 0]], np.float32), (N0, 1)),
               "logit_opacities": np.zeros((N0, 1), np.float32), "log_scales": np.full((N0, 3), -2.0, np.float32),
               "cam_m": np.zeros((1, 3), np.float32), "cam_c": np.zeros((1, 3), np.float32)}
    k = 2
    run = RunRecord(config=TrackingConfig(spawn_new=spawn), data=DataSpec(str(out), "panoptic", 1.0, [0, 1, 2]),
                    train_cameras=[cam], test_cameras=[], scene_radius=1.0, params0=params0, fg=np.ones(N0, bool),
                    neighbour_indices=np.tile(np.arange(1, k + 1), (N0, 1)) % N0,
                    neighbour_weights=np.ones((N0, k), np.float32), neighbour_distances=np.ones((N0, k), np.float32))
    write_run(out, run)
    zeros = np.zeros(N0, np.int64)
    write_frame(out, _frame(0, N0, zeros if births_stored else None))
    if spawn:
        births = np.concatenate([zeros, np.ones(M, np.int64)])
        write_frame(out, _frame(1, N0 + M, births, _born(M, N0, k)))
        write_frame(out, _frame(2, N0 + M, births))
    else:
        write_frame(out, _frame(1, N0, zeros if births_stored else None))
        write_frame(out, _frame(2, N0, zeros if births_stored else None))


def test_load_gives_the_gaussians_alive_at_each_frame(tmp_path):
    _write_run(tmp_path)
    r = tracking.load(tmp_path)
    assert r.n_gaussians == N0 + M
    assert r.birth_frame.tolist() == [0] * N0 + [1] * M and r.birth_frame.dtype == torch.int64
    assert [r.means[t].shape[0] for t in range(3)] == [N0, N0 + M, N0 + M]
    assert [r.n_alive(t) for t in range(3)] == [N0, N0 + M, N0 + M]
    assert r.alive(0).sum() == N0 and r.alive(1).all()
    assert r.fg.shape == (N0 + M,) and r.fg.all()
    p0, p1 = r.params(0), r.params(1)
    assert p0["log_scales"].shape == (N0, 3) and p1["log_scales"].shape == (N0 + M, 3)
    assert torch.equal(p1["log_scales"][N0:], torch.full((M, 3), -3.0))
    assert p1["cam_m"].shape == (1, 3)
    stacked = r.means.stack()
    assert stacked.shape == (3, N0 + M, 3)
    assert torch.isnan(stacked[0, N0:]).all()
    assert torch.isfinite(stacked[1:]).all() and torch.isfinite(stacked[0, :N0]).all()
    # track from frame 1: points on a born Gaussian (0.05 = its scale) follow it; NaN before frame 1
    born_means = r.means[1][N0:]
    out = r.track(born_means.double(), threshold=0.0, start_frame=1)
    assert torch.isnan(out[0]).all()
    assert torch.allclose(out[1].double(), born_means.double(), atol=1e-6)
    assert torch.allclose(out[2].double(), r.means[2][N0:].double(), atol=1e-6)
    with pytest.raises(ValueError, match="start_frame"):
        r.track(born_means, start_frame=3)


def test_a_run_without_birth_frames_loads_with_all_zero(tmp_path):
    _write_run(tmp_path, spawn=False, births_stored=False)
    for t in range(3):  # as written before birth frames were stored
        with h5py.File(frame_path(tmp_path, t), "r+") as f:
            del f["birth_frame"]
    r = tracking.load(tmp_path)
    assert r.n_gaussians == N0 and r.birth_frame.tolist() == [0] * N0
    assert r.means.stack().shape == (3, N0, 3)


def test_static_extend_appends_born_gaussians(tmp_path):
    _write_run(tmp_path)
    from tracking.store import read_born, read_run

    static = _Static.from_run(read_run(tmp_path), "cpu")
    static.extend(read_born(tmp_path, 1))
    assert static.scales.shape == (N0 + M, 3) and static.opacities.shape == (N0 + M,)
    assert static.fg_idx.tolist() == list(range(N0 + M))
    assert static.nb_idx.shape == (N0 + M, 2) and static.seg.shape == (N0 + M, 3)
    assert torch.equal(static.scales[N0:], torch.exp(torch.full((M, 3), -3.0)))


def test_spawn_config_defaults_and_old_runs():
    cfg = TrackingConfig()
    assert cfg.spawn_new is False and cfg.spawn_min_cameras == 3 and cfg.spawn_steps >= 1
    old = cfg.identity()
    for key in [k for k in old if k.startswith("spawn_")]:
        old.pop(key)
    assert _describe_mismatch(old, cfg.identity(), TrackingConfig().identity()) == []
    assert _describe_mismatch(old, TrackingConfig(spawn_new=True).identity(), TrackingConfig().identity())
    assert TrackingConfig().scaled_steps(0.1).spawn_steps == cfg.spawn_steps  # unscaled unless spawning
    for bad in ({"spawn_min_cameras": 1}, {"spawn_steps": 0}, {"spawn_coverage_threshold": 0.0},
                {"spawn_min_pixels": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrackingConfig(**bad).validate()
