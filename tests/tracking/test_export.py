"""Exports: PLY in the 3DGS layout (write, then parse the header and values), tracks npz, renders.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| PLY values vs inputs | rel 1e-6 | float32 storage of float32/float64 inputs |
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import tracking
from tracking.export import PLY_PROPERTIES, SH_C0, export_run, read_ply, render_run, write_ply


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 7
    means = rng.normal(size=(n, 3))
    quats = rng.normal(size=(n, 4)) * 3  # unnormalised on purpose
    log_scales = rng.normal(size=(n, 3)) - 4
    logit_opacities = rng.normal(size=(n, 1))
    rgb = rng.uniform(size=(n, 3))
    path = write_ply(tmp_path / "g.ply", means, quats, log_scales, logit_opacities, rgb)

    raw = path.read_bytes()
    header = raw[: raw.index(b"end_header\n")].decode().splitlines()
    assert header[:3] == ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    assert [line.split()[-1] for line in header[3:]] == list(PLY_PROPERTIES)
    assert all(line.startswith("property float ") for line in header[3:])
    assert not any("f_rest" in line for line in header)

    v = read_ply(path)
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), means, rtol=1e-6)
    np.testing.assert_array_equal(np.stack([v["nx"], v["ny"], v["nz"]], 1), 0)
    dc = np.stack([v[f"f_dc_{i}"] for i in range(3)], 1)
    np.testing.assert_allclose(0.5 + SH_C0 * dc, rgb, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(v["opacity"], logit_opacities[:, 0], rtol=1e-6)
    np.testing.assert_allclose(np.stack([v[f"scale_{i}"] for i in range(3)], 1), log_scales, rtol=1e-6)
    rot = np.stack([v[f"rot_{i}"] for i in range(4)], 1)
    np.testing.assert_allclose(rot, quats / np.linalg.norm(quats, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)


def test_export_run_tracks_and_renders(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    r = tracking.load(out)
    paths = export_run(out)
    with np.load(paths["tracks"]) as z:
        assert z["centres"].shape == (3, r.n_gaussians, 3) and z["quats"].shape == (3, r.n_gaussians, 4)
        np.testing.assert_array_equal(z["centres"][2], r.means[2].numpy())
        np.testing.assert_allclose(np.linalg.norm(z["quats"], axis=-1), 1.0, rtol=1e-5)
        assert z["foreground"].sum() == int(r.fg.sum())
    v = read_ply(paths["ply"] / "000001.ply")
    np.testing.assert_array_equal(v["x"], r.means[1][:, 0].numpy())

    written = render_run(out, camera=r.train_cameras[1].id, fmt="png")
    pngs = sorted(written["png"].glob("*.png"))
    assert len(pngs) == 3 and "gif" not in written
    from PIL import Image

    with Image.open(pngs[0]) as im:
        rendered = np.asarray(im).astype(np.float32) / 255
    expected = r.render(0, r.train_cameras[1]).clamp(0, 1).numpy()
    assert np.abs(rendered - expected).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="format"):
        render_run(out, fmt="avi")
    assert torch.isfinite(r.render(1, r.test_cameras[0])).all()
