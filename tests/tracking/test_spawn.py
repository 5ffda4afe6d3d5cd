"""Objects that enter after the first frame: `TrackingConfig.spawn_new` on `synth --enter-at`.

Two scenes, both data_tools' synthetic scene with the visitor sphere (0.2 m) entering after t = 0, fitted
with the torch backend on the CPU:

- mechanics (fast): 64 x 48, 6 training + 1 test camera, FRAMES frames, entry at ENTER, SPAWN_CONFIG;
- quality (slow): 96 x 72, 6 + 1 cameras, 8 frames, entry at frame 2, the demo preset x 0.5 steps
  (QUALITY_*), where the visitor matters: at 64 x 48 with 60 steps at t = 0 the reconstruction is so coarse
  (held-out ~23 dB) that the missing sphere costs ~0.05 dB, and its tracks' static error is already
  below 2 % (1.6 %), so neither target can tell spawning from not spawning.

| check                                                                   | criterion                        |
|-------------------------------------------------------------------------|----------------------------------|
| without spawning nothing is born                                         | exact                            |
| with spawning, Gaussians are born at the entry frame only                | exact                            |
| spawned Gaussians: foreground, birth_frame = ENTER, in every later frame  | exact                            |
| the spawn's schedule has no final 0.25 cull (it has no opacity reset)    | exact                            |
| frames before the entry are bit-identical with and without spawning      | exact                            |
| held-out PSNR of every post-entry frame: with spawning > without          | strict                           |
| resume after a fault in a frame after spawning                           | bit-identical (CPU torch)        |
| under torchrun (2 gloo processes): the one-process run's births         | equal counts                     |
| slow: held-out PSNR after the entry >= before - 1 dB with spawning,       | PSNR_DROP_WITH (required)        |
|   <= before - PSNR_DROP_WITHOUT without                                  | 0.6 dB (measured 1.17)           |
| slow: the spawn keeps what it carved                                    | born >= hull points / 2          |
| slow: the visitor's tracks from its entry (highest influence): <= 2 %,   | ENTERING_MTE_PCT (required)      |
|   and lower than without spawning                                        |                                  |

Measured (quality scene, 2-core AMD EPYC with AVX-512, 1 thread, the demo preset of 2026-12-04): held-out PSNR
before | after the entry 28.61 | 27.44 dB without spawning, 28.61 | 28.42 dB with; the visitor's tracks following
their highest-influence Gaussian 5.82 % of the extent without, 1.47 % with (static: 2.54 %), their rotation error
21.3 and 15.5 degrees; fits 52 s and 59 s of CPU. Under the default
0.5-influence readout no query point on the visitor reaches influence 0.5 (nor almost any point of the
other objects, see test_slow), so entering_mte_3d_pct is the static error either way (reported, not
asserted).
"""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pytest

import tracking
from tracking.config import TrackingConfig
from tracking.errors import InjectedFault
from tracking.evaluate import evaluate
from tracking.spawn import spawn_densify_config
from tracking.store import completed_frames, frame_path

from .conftest import tiny_config

FRAMES, ENTER = 6, 2
QUIET = {"progress": False, "echo": lambda s: None}
SPAWN_CONFIG = tiny_config(steps_first=60, steps_per_frame=10, spawn_steps=30, uncovered_is_background=True,
                           max_init_scale=0.02)
PSNR_DROP_WITH = 1.0  # dB: the required bound on post-entry vs pre-entry PSNR with spawning
PSNR_DROP_WITHOUT = 0.6  # dB: the drop without spawning must be at least this (measured 1.17 dB)
ENTERING_MTE_PCT = 2.0  # % of the extent: the required bound on the entering tracks
QUALITY_SCENE = {"cameras": 6, "test_cameras": 1, "width": 96, "height": 72, "frames": 8, "seed": 1, "enter_at": 2}
QUALITY_CONFIG = replace(TrackingConfig.from_preset("demo", backend="torch", device="cpu").scaled_steps(0.5),
                         spawn_steps=100)  # the CLI's default with --steps-scale 0.5 (200 x 0.5)


@pytest.fixture(scope="module")
def entering_scene(tmp_path_factory):
    from data_tools import make_synthetic_scene

    out = tmp_path_factory.mktemp("spawn") / "scene"
    make_synthetic_scene(out, cameras=6, test_cameras=1, width=64, height=48, frames=FRAMES, seed=1, enter_at=ENTER)
    return out


def _fit(scene, out, config):
    r = tracking.fit(scene, out, config, **QUIET)
    return r, evaluate(out, lpips=False, write=True)


@pytest.fixture(scope="module")
def runs(entering_scene, tmp_path_factory):
    base = tmp_path_factory.mktemp("spawn")
    return {spawn: (base / f"spawn{int(spawn)}",
                    *_fit(entering_scene, base / f"spawn{int(spawn)}", replace(SPAWN_CONFIG, spawn_new=spawn)))
            for spawn in (False, True)}


def _pre_post(metrics, enter: int) -> tuple[float, float]:
    psnr = np.asarray(metrics["psnr_per_frame"], np.float64)
    return float(psnr[:enter].mean()), float(psnr[enter:].mean())


def test_gaussians_are_born_at_the_entry_frame(runs):
    _, plain, _ = runs[False]
    _, spawned, _ = runs[True]
    assert plain.n_gaussians == plain.n_alive(0) and (plain.birth_frame == 0).all()
    born = spawned.birth_frame > 0
    assert born.sum() > 0, "the entering sphere must get Gaussians"
    assert (spawned.birth_frame[born] == ENTER).all()
    assert spawned.fg[born].all()
    assert spawned.n_alive(ENTER - 1) == spawned.n_alive(0) < spawned.n_alive(ENTER) == spawned.n_gaussians
    assert spawned.means[FRAMES - 1].shape[0] == spawned.n_gaussians


def test_the_spawn_schedule_has_no_final_cull():
    """The t = 0 schedule's final cull at opacity 0.25 follows an opacity reset; the spawn has no reset, and with
    the cull it removed 381 of 386 Gaussians (0.75 px hull voxels, 96x72 scene): inside a saturated
    silhouette the opacities drift to ~0.1. (The slow test checks the outcome with the demo preset.)"""
    for cfg in (TrackingConfig(), QUALITY_CONFIG):
        d = spawn_densify_config(cfg)
        assert d.opacity_reset_at <= 0 and d.final_prune_opacity == d.prune_opacity == cfg.densify.prune_opacity
        assert cfg.densify.final_prune_opacity > d.final_prune_opacity


def test_frames_before_the_entry_are_unchanged_by_spawning(runs):
    for t in range(ENTER):
        with h5py.File(frame_path(runs[False][0], t)) as fa, h5py.File(frame_path(runs[True][0], t)) as fb:
            for key in ("means", "quats", "rgb"):
                assert np.array_equal(fa[key][()], fb[key][()]), f"frame {t} {key}"


def test_spawning_raises_the_post_entry_psnr(runs):
    psnr0 = np.asarray(runs[False][2]["psnr_per_frame"])
    psnr1 = np.asarray(runs[True][2]["psnr_per_frame"])
    assert (psnr1[ENTER:] > psnr0[ENTER:]).all(), (psnr0, psnr1)
    assert runs[True][2]["mte_3d_pct"] is not None  # the original objects' tracks are still scored
    for spawn in (False, True):  # the visitor's rotations are scored from its entry frame on
        assert 0.0 <= runs[spawn][2]["entering_rotation_error_3d_deg_highest_influence"] < 180.0


def test_resume_after_spawning_is_bit_identical(runs, entering_scene, tmp_path, monkeypatch):
    ref = runs[True][0]
    out = tmp_path / "run"
    monkeypatch.setenv("TRITONSPLAT_FAULT_AT", f"{ENTER + 1}:3")
    with pytest.raises(InjectedFault):
        tracking.fit(entering_scene, out, replace(SPAWN_CONFIG, spawn_new=True), **QUIET)
    assert completed_frames(out) == ENTER + 1
    monkeypatch.delenv("TRITONSPLAT_FAULT_AT")
    tracking.fit(entering_scene, out, replace(SPAWN_CONFIG, spawn_new=True), **QUIET)
    for t in range(FRAMES):
        with h5py.File(frame_path(out, t)) as fa, h5py.File(frame_path(ref, t)) as fb:
            keys = ["means", "quats", "rgb", "birth_frame", "adam/rgb/exp_avg"]
            keys += [f"born/{k}" for k in fb.get("born", {})]
            for key in keys:
                assert np.array_equal(fa[key][()], fb[key][()]), f"frame {t} {key} differs"


TORCHRUN_SCRIPT = """
import sys
import tracking
from tracking.config import TrackingConfig
config = TrackingConfig.from_json(open(sys.argv[3]).read())
tracking.fit(sys.argv[1], sys.argv[2], config, frames=slice(0, int(sys.argv[4])), progress=False, dist_timeout=60)
"""


def test_spawning_under_torchrun_matches_one_process(entering_scene, tmp_path):
    """2 gloo processes, each rendering one of the step's 2 cameras, spawn the Gaussians one process spawns, to
    float rounding amplified by Adam.

    As in test_distributed_fit, densification keeps away from decision boundaries (no opacity pruning,
    gradient threshold 1e-12: every new Gaussian seen in any view is cloned or split), so a rank that
    densified from its own views' statistics alone would clone or split other Gaussians, and the ranks'
    parameter checksums at the refinement would stop the run. Rank 0's detection and hull points are
    broadcast, so every rank starts the spawn from the same points."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    cfg = replace(SPAWN_CONFIG, spawn_new=True, cameras_per_step=2)
    cfg = replace(cfg, densify=replace(cfg.densify, prune_opacity=0.0, final_prune_opacity=0.0, grad_threshold=1e-12))
    frames = ENTER + 2
    one = tracking.fit(entering_scene, tmp_path / "one", cfg, frames=slice(0, frames), **QUIET)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "fit.py").write_text(TORCHRUN_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), str(tmp_path / "fit.py"), str(entering_scene), str(tmp_path / "two"),
               str(tmp_path / "config.json"), str(frames)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = tracking.load(tmp_path / "two")
    assert one.n_alive(ENTER - 1) == two.n_alive(ENTER - 1)
    born_one = int((one.birth_frame == ENTER).sum())
    born_two = int((two.birth_frame == ENTER).sum())
    assert born_one > 0 and born_two == born_one, (born_one, born_two)
    assert (two.birth_frame[two.birth_frame > 0] == ENTER).all() and two.fg[two.birth_frame > 0].all()
    # The born Gaussians at their birth frame, in units of the means' learning rate (test_distributed_fit's
    # tolerance and reasons; seen: median 0.002, 95th percentile 0.08, maximum 7.8 of cfg.spawn_steps = 30).
    born = one.birth_frame == ENTER
    gap = np.abs(np.asarray(two.means[ENTER])[born] - np.asarray(one.means[ENTER])[born])
    gap /= cfg.lr.means * float(one.scene_radius)
    assert np.median(gap) <= 0.01 and np.quantile(gap, 0.95) <= 1.0, (np.median(gap), np.quantile(gap, 0.95))
    assert gap.max() <= cfg.spawn_steps, gap.max()


@pytest.mark.slow
def test_entry_psnr_and_tracks(tmp_path):
    from data_tools import make_synthetic_scene

    scene, enter = tmp_path / "scene", QUALITY_SCENE["enter_at"]
    make_synthetic_scene(scene, **QUALITY_SCENE)
    m0 = _fit(scene, tmp_path / "plain", QUALITY_CONFIG)[1]
    r1, m1 = _fit(scene, tmp_path / "spawn", replace(QUALITY_CONFIG, spawn_new=True))
    stats = r1.frame_stats(enter)
    assert stats["n_born"] >= stats["spawn_points"] / 2, stats  # the spawn keeps what it carved
    pre0, post0 = _pre_post(m0, enter)
    pre1, post1 = _pre_post(m1, enter)
    assert pre0 == pre1  # the frames before the entry are the same fit
    assert post0 <= pre0 - PSNR_DROP_WITHOUT, (pre0, post0)
    assert post1 >= pre1 - PSNR_DROP_WITH, (pre1, post1)
    assert m1["entering_tracks"] > 0 and m1["entering_frame"] == enter
    hi0, hi1 = m0["entering_mte_3d_pct_highest_influence"], m1["entering_mte_3d_pct_highest_influence"]
    assert hi1 <= ENTERING_MTE_PCT and hi1 < hi0, (m0, m1)
    assert m1["entering_mte_3d_pct"] is not None
