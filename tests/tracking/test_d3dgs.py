"""The original's params.npz: ours -> npz -> ours bit for bit, a file as `save_params` writes it, bad input.

`write_synthetic_run` (also used by the export and viewer tests) writes a small run folder directly through
tracking.store, in the real on-disk format, on the tiny synthetic scene's cameras: no fit needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tracking
from tracking.cli import main
from tracking.d3dgs import KEY_ORDER, MAX_CAMS, export_params_npz, import_original
from tracking.store import CameraRecord, FrameRecord, RunRecord, read_frame, read_run, write_frame, write_run

from .conftest import tiny_config

MOTION_PER_FRAME = 0.15  # x scene radius: the foreground's shift per frame (visible in a 320 x 240 view)


def write_synthetic_run(data: Path, out: Path, *, n_frames: int = 3, max_points: int = 400, seed: int = 0) -> Path:
    """A run on DATA's cameras: Gaussians at DATA's init_pt_cld points, foreground translating and turning."""
    import data_tools

    rng = np.random.default_rng(seed)
    seq = data_tools.load(data)
    with np.load(Path(data) / "init_pt_cld.npz") as z:
        pts = z["data"].astype(np.float32)
    pts = pts[rng.permutation(len(pts))[:max_points]]
    n = len(pts)
    seg = np.stack([pts[:, 6], np.zeros(n), 1 - pts[:, 6]], 1).astype(np.float32)
    fg = seg[:, 0] > 0.5
    radius = float(seq.scene_radius)
    quats0 = (rng.normal(size=(n, 4)) * 2).astype(np.float32)  # unnormalised, as Adam leaves them
    params0 = {"means": pts[:, :3].copy(), "rgb": pts[:, 3:6].copy(), "seg": seg, "quats": quats0,
               "logit_opacities": rng.normal(1.0, 0.5, size=(n, 1)).astype(np.float32),
               "log_scales": np.full((n, 3), np.log(0.012 * radius), np.float32)
               + rng.normal(0, 0.2, size=(n, 3)).astype(np.float32),
               "cam_m": rng.normal(0, 0.05, size=(len(seq.train_cameras), 3)).astype(np.float32),
               "cam_c": rng.normal(0, 0.02, size=(len(seq.train_cameras), 3)).astype(np.float32)}
    config = tiny_config()
    empty = np.zeros((int(fg.sum()), 0), np.float32)
    write_run(out, RunRecord(
        config=config, data=tracking.store.DataSpec(str(Path(data).resolve()), seq.format, 1.0,
                                                    [int(i) for i in seq.source_frames]),
        train_cameras=[CameraRecord.from_camera(c) for c in seq.train_cameras],
        test_cameras=[CameraRecord.from_camera(c) for c in seq.test_cameras], scene_radius=radius,
        params0=params0, fg=fg, neighbour_indices=empty.astype(np.int64), neighbour_weights=empty,
        neighbour_distances=empty.copy(), background=list(seq.background), has_masks=True, extra={}))
    direction = np.array([1.0, 0.0, 0.0], np.float32) * MOTION_PER_FRAME * radius
    for t in range(n_frames):
        means = params0["means"] + np.where(fg[:, None], t * direction, 0).astype(np.float32)
        quats = params0["quats"] + np.where(fg[:, None], 0.1 * t, 0).astype(np.float32)
        rgb = np.clip(params0["rgb"] + 0.01 * t, 0, 1).astype(np.float32)
        adam = {"means": {"step": np.int64(t)}, "quats": {"step": np.int64(t)},
                "rgb": {"step": np.int64(t), "exp_avg": np.zeros((n, 3), np.float32),
                        "exp_avg_sq": np.zeros((n, 3), np.float32)}}
        write_frame(out, FrameRecord(t=t, means=means, quats=quats, rgb=rgb, adam=adam,
                                     stats={"source_frame": t}, seconds=0.0))
    return out


@pytest.fixture(scope="session")
def synthetic_run(tiny_scene, tmp_path_factory) -> Path:
    """A 3-frame run written through tracking.store on the tiny scene (shared, read-only)."""
    return write_synthetic_run(tiny_scene, tmp_path_factory.mktemp("d3dgs") / "run")


def assert_runs_identical(a: Path, b: Path) -> None:
    ra, rb = read_run(a), read_run(b)
    assert sorted(ra.params0) == sorted(rb.params0)
    for k in ra.params0:
        assert ra.params0[k].dtype == rb.params0[k].dtype and ra.params0[k].shape == rb.params0[k].shape, k
        assert ra.params0[k].tobytes() == rb.params0[k].tobytes(), k
    np.testing.assert_array_equal(ra.fg, rb.fg)
    assert [c.id for c in ra.train_cameras] == [c.id for c in rb.train_cameras]
    assert tracking.load(a).n_frames == tracking.load(b).n_frames
    for t in range(tracking.load(a).n_frames):
        fa, fb = read_frame(a, t), read_frame(b, t)
        for k in ("means", "quats", "rgb"):
            assert getattr(fa, k).tobytes() == getattr(fb, k).tobytes(), (t, k)


def test_round_trip_is_bit_identical(synthetic_run, tiny_scene, tmp_path):
    npz = export_params_npz(synthetic_run, tmp_path / "params.npz")
    r = tracking.load(synthetic_run)
    n, c = r.n_gaussians, len(r.train_cameras)
    with np.load(npz) as z:
        assert list(z.files) == list(KEY_ORDER)
        shapes = {k: z[k].shape for k in z.files}
        assert shapes == {"means3D": (3, n, 3), "rgb_colors": (3, n, 3), "unnorm_rotations": (3, n, 4),
                          "seg_colors": (n, 3), "logit_opacities": (n, 1), "log_scales": (n, 3),
                          "cam_m": (MAX_CAMS, 3), "cam_c": (MAX_CAMS, 3)}
        assert all(z[k].dtype == np.float32 for k in z.files)
        assert not z["cam_m"][c:].any() and not z["cam_c"][c:].any()
        np.testing.assert_array_equal(z["cam_m"][:c], read_run(synthetic_run).params0["cam_m"])
        np.testing.assert_array_equal(z["unnorm_rotations"][2], read_frame(synthetic_run, 2).quats)
    out = import_original(npz, tiny_scene, tmp_path / "imported", config=tiny_config())
    assert_runs_identical(synthetic_run, out)
    again = export_params_npz(out, tmp_path / "again.npz")
    with np.load(npz) as z1, np.load(again) as z2:
        assert all(z1[k].tobytes() == z2[k].tobytes() for k in KEY_ORDER)


def _original_save_params(output_params: list[dict], folder: Path) -> Path:
    """The original train.py's params2cpu + save_params, verbatim in behaviour: every key at t = 0, only
    means3D / rgb_colors / unnorm_rotations afterwards; keys present at t = 1 stacked; np.savez(".../params")."""
    to_save = {}
    for k in output_params[0].keys():
        if k in output_params[1].keys():
            to_save[k] = np.stack([params[k] for params in output_params])
        else:
            to_save[k] = output_params[0][k]
    os.makedirs(folder, exist_ok=True)
    np.savez(folder / "params", **to_save)
    return folder / "params.npz"


def test_a_file_written_as_save_params_imports(tiny_scene, tmp_path):
    rng = np.random.default_rng(3)
    import data_tools

    seq = data_tools.load(tiny_scene)
    n = 50
    with np.load(tiny_scene / "init_pt_cld.npz") as z:
        base = torch.from_numpy(z["data"][:n, :3].astype(np.float32))
    seg = (torch.rand(n) > 0.4).float()
    params = {  # the original's initialize_params: nn.Parameters in this order, cam tables of max_cams rows
        "means3D": base, "rgb_colors": torch.rand(n, 3), "seg_colors": torch.stack([seg, 0 * seg, 1 - seg], -1),
        "unnorm_rotations": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), "logit_opacities": torch.zeros(n, 1),
        "log_scales": torch.full((n, 3), -3.0), "cam_m": torch.zeros(MAX_CAMS, 3), "cam_c": torch.zeros(MAX_CAMS, 3)}
    params = {k: torch.nn.Parameter(v.float().contiguous()) for k, v in params.items()}
    output_params = []
    for t in range(seq.n_frames):
        if t:
            with torch.no_grad():
                params["means3D"] += torch.from_numpy(rng.normal(0, 0.01, (n, 3)).astype(np.float32))
                params["unnorm_rotations"].copy_(torch.nn.functional.normalize(
                    params["unnorm_rotations"] + 0.05 * torch.randn(n, 4)))
        is_initial = t == 0
        if is_initial:
            res = {k: v.detach().cpu().contiguous().numpy() for k, v in params.items()}
        else:
            res = {k: v.detach().cpu().contiguous().numpy() for k, v in params.items()
                   if k in ["means3D", "rgb_colors", "unnorm_rotations"]}
        output_params.append(res)
    npz = _original_save_params(output_params, tmp_path / "output" / "exp1" / "tiny")

    result = CliRunner().invoke(main, ["import-original", str(npz), str(tiny_scene), str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    r = tracking.load(tmp_path / "run")
    assert r.n_frames == seq.n_frames and r.n_gaussians == n
    np.testing.assert_array_equal(r.fg.numpy(), seg.numpy() > 0.5)
    for t in range(seq.n_frames):
        np.testing.assert_array_equal(r.means[t].numpy(), output_params[t]["means3D"])
    np.testing.assert_array_equal(r.params(0)["cam_m"].numpy(), np.zeros((len(seq.train_cameras), 3)))
    assert torch.isfinite(r.render(seq.n_frames - 1, r.train_cameras[0], backend="torch")).all()
    for command in (["eval", "--no-lpips"], ["render", "--format", "png"], ["export"]):
        result = CliRunner().invoke(main, [command[0], str(tmp_path / "run"), *command[1:]])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "export" / "tracks.npz").exists()


def _good_arrays(n_frames: int, n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"means3D": rng.normal(size=(n_frames, n, 3)).astype(np.float32),
            "rgb_colors": rng.uniform(size=(n_frames, n, 3)).astype(np.float32),
            "seg_colors": np.tile(np.array([[1.0, 0, 0]], np.float32), (n, 1)),
            "unnorm_rotations": rng.normal(size=(n_frames, n, 4)).astype(np.float32),
            "logit_opacities": np.zeros((n, 1), np.float32), "log_scales": np.full((n, 3), -3.0, np.float32),
            "cam_m": np.zeros((MAX_CAMS, 3), np.float32), "cam_c": np.zeros((MAX_CAMS, 3), np.float32)}


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda a: a.pop("log_scales"), "missing key.*log_scales", id="missing-key"),
    pytest.param(lambda a: a.update(means3D=a["means3D"][0]), r"means3D must be \[T, N, 3\]", id="means-rank"),
    pytest.param(lambda a: a.update(unnorm_rotations=a["unnorm_rotations"][..., :3]), r"unnorm_rotations must be",
                 id="rotation-width"),
    pytest.param(lambda a: a.update(logit_opacities=a["logit_opacities"][:, 0]), r"logit_opacities must be \[N, 1\]",
                 id="opacity-shape"),
    pytest.param(lambda a: a.update(seg_colors=a["seg_colors"][:5]), r"seg_colors must be \[N, 3\]", id="seg-rows"),
    pytest.param(lambda a: a.update({k: a[k][:2] for k in ("means3D", "rgb_colors", "unnorm_rotations")}),
                 "2 timestep.*3 frame", id="frame-count"),
    pytest.param(lambda a: a.update(cam_m=a["cam_m"][:2]), "cam_m has 2 rows", id="camera-rows"),
    pytest.param(lambda a: a["log_scales"].__setitem__((0, 0), np.nan), "log_scales holds NaN", id="nan"),
])
def test_bad_params_name_the_key_and_leave_out_untouched(edit, message, tiny_scene, tmp_path):
    arrays = _good_arrays(3)
    edit(arrays)
    npz = tmp_path / "params.npz"
    np.savez(npz, **arrays)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        import_original(npz, tiny_scene, out, config=tiny_config())
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["params.npz"]
    result = CliRunner().invoke(main, ["import-original", str(npz), str(tiny_scene), str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message.split(".*")[0].replace("\\", "") in result.output


def test_import_refuses_an_existing_run_and_a_non_npz(synthetic_run, tiny_scene, tmp_path):
    npz = tmp_path / "params.npz"
    np.savez(npz, **_good_arrays(3))
    with pytest.raises(ValueError, match="already holds a run"):
        import_original(npz, tiny_scene, synthetic_run)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable .npz"):
        import_original(bad, tiny_scene, tmp_path / "o")
    out = tmp_path / "o2"
    import_original(npz, tiny_scene, out, config=tiny_config())
    import_original(npz, tiny_scene, out, overwrite=True, config=tiny_config())
    assert tracking.load(out).n_gaussians == 20


def test_cli_export_d3dgs(synthetic_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    result = CliRunner().invoke(main, ["export", str(out), "--format", "d3dgs"])
    assert result.exit_code == 0, result.output
    with np.load(out / "export" / "params.npz") as z:
        assert z["means3D"].shape == (3, tracking.load(out).n_gaussians, 3)
