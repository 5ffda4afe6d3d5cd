"""tracking.fit end to end on a tiny synthetic scene, and its handling of bad input.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| readout vs the stored Gaussian's rigid frame | abs 1e-5 | float32 means and rotations, float64 readout |
| tiny-scene quality | PSNR > 12 dB | 30 + 2 x 8 steps only: checks the pipeline, not the optimiser |
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import data_tools
import tracking
from tracking.errors import NaNLossError, TrackingError
from tracking.evaluate import METRIC_KEYS
from tracking.plots import write_plots
from tracking.quaternions import quat_to_rotmat

from .conftest import SequenceView, tiny_config, without_masks

QUIET = {"progress": False, "echo": lambda s: None}


def test_fit_result_api(tiny_run):
    r = tracking.load(tiny_run)
    assert r.n_frames == 3 and len(r.means) == 3
    n = r.n_gaussians
    assert r.means[2].shape == (n, 3) and r.quats[1].shape == (n, 4) and r.colours[0].shape == (n, 3)
    torch.testing.assert_close(r.quats[1].norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    assert r.opacities.shape == (n,) and r.scales.shape == (n, 3) and r.fg.dtype == torch.bool
    p = r.params(1)
    assert set(p) >= {"means", "quats", "rgb", "seg", "logit_opacities", "log_scales", "cam_m", "cam_c"}
    img = r.render(2, r.test_cameras[0])
    assert img.shape == (30, 40, 3) and torch.isfinite(img).all()
    assert r.render(0, r.train_cameras[0].id).shape == (30, 40, 3)
    stats = r.frame_stats(1)
    assert stats["steps"] == 8 and stats["n_gaussians"] == n
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["config"]["steps_first"] == 30 and cfg["data"]["path"].endswith("tiny")


def test_track_carries_points_in_the_gaussian_frame(tiny_run):
    r = tracking.load(tiny_run)
    g = int(torch.nonzero(r.fg)[0])
    offset = 0.2 * r.scales[g]  # well inside the Gaussian: it has the highest influence there
    q0 = r.means[0][g] + quat_to_rotmat(r.quats[0][g]) @ offset
    idx, _ = r.assign(q0[None], threshold=0.0)
    g = int(idx[0])
    local = quat_to_rotmat(r.quats[0][g].double()).T @ (q0.double() - r.means[0][g].double())
    tracks = r.track(q0[None], threshold=0.0)
    assert tracks.shape == (3, 1, 3)
    for t in range(3):
        expected = r.means[t][g].double() + quat_to_rotmat(r.quats[t][g].double()) @ local
        torch.testing.assert_close(tracks[t, 0].double(), expected, atol=1e-5, rtol=0)
    far = torch.tensor([[50.0, 50.0, 50.0]])
    assert torch.equal(r.track(far)[2], far)  # static background


def test_evaluate_writes_metrics_and_plots(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    m = tracking.evaluate(out, lpips=False)
    write_plots(tracking.load(out), m)
    assert list(m)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["preset"] == "test" and on_disk["n_gaussians"] == tracking.load(out).n_gaussians
    assert on_disk["psnr"] > 12 and 0 < on_disk["ssim"] <= 1 and on_disk["lpips"] is None
    for key in ("mte_3d", "mte_3d_pct", "delta_3d", "survival_3d", "mte_2d", "delta_2d", "survival_2d"):
        assert on_disk[key] is not None and np.isfinite(on_disk[key]), key
    assert len(on_disk["psnr_per_frame"]) == 3 and len(on_disk["error_3d_per_frame"]) == 3
    for name in ("psnr_per_frame.png", "loss_curves.png", "trajectories.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_single_frame_is_a_static_fit(tiny_scene, tmp_path):
    r = tracking.fit(tiny_scene, tmp_path / "one", tiny_config(), frames=slice(0, 1), **QUIET)
    assert r.n_frames == 1
    m = tracking.evaluate(tmp_path / "one", lpips=False)
    write_plots(tracking.load(tmp_path / "one"), m)
    assert m["psnr"] is not None and m["mte_3d"] is None and m["survival_2d"] is None


def test_missing_masks_turn_the_seg_term_off(tiny_scene, tmp_path):
    seq = without_masks(data_tools.load(tiny_scene))
    with pytest.warns(UserWarning, match="segmentation loss is off"):
        r = tracking.fit(seq, tmp_path / "nomask", tiny_config(steps_first=12), frames=None, **QUIET)
    assert r.n_frames == 3
    assert float(np.abs(r.curves(0)["seg"]).max()) == 0.0


def test_fewer_than_two_training_cameras(tiny_scene, tmp_path):
    seq = data_tools.load(tiny_scene)
    one = SequenceView(seq, train_cameras=seq.train_cameras[:1])
    with pytest.raises(TrackingError, match="at least 2 training cameras"):
        tracking.fit(one, tmp_path / "x", tiny_config(), **QUIET)


def test_missing_frame_image_is_named(tiny_copy, tmp_path):
    victim = tiny_copy / "ims" / "2" / "000002.png"
    victim.unlink()
    with pytest.raises(data_tools.DataError, match="000002.png"):
        tracking.fit(tiny_copy, tmp_path / "x", tiny_config(), **QUIET)
    assert not (tmp_path / "x" / "run.h5").exists()


def test_nan_loss_stops_and_keeps_completed_frames(tiny_scene, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONSPLAT_FAULT_AT", "2:3:nan")
    with pytest.raises(NaNLossError) as info:
        tracking.fit(tiny_scene, tmp_path / "nan", tiny_config(), **QUIET)
    err = info.value
    assert (err.t, err.step, err.completed) == (2, 3, 2)
    assert "frame 2, step 3" in str(err) and "frames 0..1" in str(err)
    assert tracking.load(tmp_path / "nan").n_frames == 2


def test_init_points_built_or_given(tiny_copy, tmp_path):
    shipped = np.load(tiny_copy / "init_pt_cld.npz")["data"]
    (tiny_copy / "init_pt_cld.npz").unlink()
    cfg = tiny_config(steps_first=5)
    r = tracking.fit(tiny_copy, tmp_path / "built", cfg, frames=slice(0, 1), **QUIET)
    assert (tmp_path / "built" / "init_pt_cld.npz").exists() and r.n_frames == 1
    given = tmp_path / "given.npz"
    np.savez(given, data=shipped[:200])
    r = tracking.fit(tiny_copy, tmp_path / "given", cfg, frames=slice(0, 1), init_points=given, **QUIET)
    assert not (tmp_path / "given" / "init_pt_cld.npz").exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, data=np.zeros((10, 5)))
    with pytest.raises(TrackingError, match=r"\[N, 7\]"):
        tracking.fit(tiny_copy, tmp_path / "bad", cfg, frames=slice(0, 1), init_points=bad, **QUIET)


def test_config_presets_and_scaling():
    demo = tracking.TrackingConfig.from_preset("demo")
    assert demo.preset == "demo" and tracking.TrackingConfig().preset == "original"
    orig = tracking.TrackingConfig.from_preset("original")
    assert (orig.steps_first, orig.steps_per_frame, orig.densify.stop, orig.lr.means) == (10_000, 2_000, 5000, 1.6e-4)
    half = orig.scaled_steps(0.5)
    assert (half.steps_first, half.steps_per_frame, half.densify.start, half.densify.every) == (5000, 1000, 250, 50)
    assert tracking.TrackingConfig.from_json(orig.to_json()) == orig
    with pytest.raises(ValueError, match="unknown preset"):
        tracking.TrackingConfig.from_preset("fast")
