"""Exports: PLY in the 3DGS layout (write, then parse the header and values; read back as Inria's load_ply
does with SH degree 3), .splat records, depth maps, tracks npz, renders.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| PLY values vs inputs | rel 1e-6 | float32 storage of float32/float64 inputs |
| .splat colour / rotation | exact | uint8 truncation as the format's converter does, recomputed here |
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tracking
from tracking.cli import main
from tracking.export import (
    PLY_PROPERTIES,
    SH_C0,
    depth_to_mm,
    export_run,
    read_ply,
    read_splat,
    render_run,
    write_ply,
    write_splat,
)

from .test_d3dgs import synthetic_run  # noqa: F401  (session fixture: a run written through tracking.store)


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


def inria_load_ply(path, max_sh_degree: int = 3) -> dict[str, np.ndarray]:
    """What graphdeco-inria's GaussianModel.load_ply does with the file (plyfile replaced by our header parser):
    f_rest_* sorted by their index, `assert len(extra_f_names) == 3 * (max_sh_degree + 1) ** 2 - 3`, features
    reshaped to [N, 3, (d + 1)^2 - 1], scale_* and rot* sorted by index."""
    v = read_ply(path)
    names = list(v)
    xyz = np.stack((v["x"], v["y"], v["z"]), axis=1)
    opacities = v["opacity"][..., np.newaxis]
    features_dc = np.stack([v["f_dc_0"], v["f_dc_1"], v["f_dc_2"]], 1)[..., None]
    extra = sorted([p for p in names if p.startswith("f_rest_")], key=lambda x: int(x.split("_")[-1]))
    assert len(extra) == 3 * (max_sh_degree + 1) ** 2 - 3
    features_extra = np.zeros((xyz.shape[0], len(extra)))
    for idx, attr_name in enumerate(extra):
        features_extra[:, idx] = v[attr_name]
    features_extra = features_extra.reshape((xyz.shape[0], 3, (max_sh_degree + 1) ** 2 - 1))
    scale_names = sorted([p for p in names if p.startswith("scale_")], key=lambda x: int(x.split("_")[-1]))
    rot_names = sorted([p for p in names if p.startswith("rot")], key=lambda x: int(x.split("_")[-1]))
    return {"xyz": xyz, "opacity": opacities, "features_dc": features_dc, "features_extra": features_extra,
            "scaling": np.stack([v[p] for p in scale_names], 1), "rotation": np.stack([v[p] for p in rot_names], 1)}


def test_ply_sh_degree_3_reads_as_inria_does(synthetic_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    r = tracking.load(out)
    result = CliRunner().invoke(main, ["export", str(out), "--format", "ply", "--sh-degree", "3"])
    assert result.exit_code == 0, result.output
    path = out / "export" / "ply" / "000002.ply"
    header = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    names = [line.split()[-1] for line in header if line.startswith("property")]
    assert names == list(PLY_PROPERTIES[:9]) + [f"f_rest_{i}" for i in range(45)] + list(PLY_PROPERTIES[9:])
    g = inria_load_ply(path)
    p0, p2 = r.params(0), r.params(2)
    np.testing.assert_array_equal(g["xyz"], p2["means"].numpy())
    np.testing.assert_allclose(0.5 + SH_C0 * g["features_dc"][..., 0], p2["rgb"].numpy(), rtol=1e-6, atol=1e-6)
    assert g["features_extra"].shape == (r.n_gaussians, 3, 15) and not g["features_extra"].any()
    np.testing.assert_array_equal(g["opacity"], p0["logit_opacities"].numpy())
    np.testing.assert_array_equal(g["scaling"], p0["log_scales"].numpy())
    q = p2["quats"].double().numpy()
    np.testing.assert_allclose(g["rotation"], q / np.linalg.norm(q, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    # Today's default (degree 0, no f_rest) is what Inria's default loader rejects.
    write_ply(tmp_path / "d0.ply", p2["means"], p2["quats"], p0["log_scales"], p0["logit_opacities"], p2["rgb"])
    with pytest.raises(AssertionError):
        inria_load_ply(tmp_path / "d0.ply")
    assert inria_load_ply(tmp_path / "d0.ply", max_sh_degree=0)["features_extra"].shape == (r.n_gaussians, 3, 0)


def test_splat_32_byte_layout(tmp_path):
    rng = np.random.default_rng(1)
    n = 9
    means, quats = rng.normal(size=(n, 3)), rng.normal(size=(n, 4))
    log_scales, logits, rgb = rng.normal(-3, 1, size=(n, 3)), rng.normal(size=(n, 1)), rng.uniform(size=(n, 3))
    path = write_splat(tmp_path / "g.splat", means, quats, log_scales, logits, rgb)
    raw = path.read_bytes()
    assert len(raw) == 32 * n
    opacity = 1 / (1 + np.exp(-logits[:, 0]))
    order = np.argsort(-np.exp(log_scales.sum(1)) * opacity)
    for row, i in enumerate(order):  # an independent byte-level parse of each record
        rec = raw[32 * row:32 * row + 32]
        pos, scale = struct.unpack("<3f", rec[:12]), struct.unpack("<3f", rec[12:24])
        rgba, rot = struct.unpack("4B", rec[24:28]), struct.unpack("4B", rec[28:32])
        np.testing.assert_allclose(pos, means[i], rtol=1e-6)
        np.testing.assert_allclose(scale, np.exp(log_scales[i]), rtol=1e-6)
        assert rgba == tuple((np.append(rgb[i], opacity[i]) * 255).clip(0, 255).astype(np.uint8))
        q = quats[i] / np.linalg.norm(quats[i])
        assert rot == tuple((q * 128 + 128).clip(0, 255).astype(np.uint8))
    back = read_splat(path)
    np.testing.assert_array_equal(back["position"], means[order].astype(np.float32))
    (tmp_path / "bad.splat").write_bytes(b"\0" * 33)
    with pytest.raises(ValueError, match="32-byte"):
        read_splat(tmp_path / "bad.splat")


def test_export_splat_and_depth(synthetic_run, tmp_path):  # noqa: F811
    from PIL import Image

    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    r = tracking.load(out)
    result = CliRunner().invoke(main, ["export", str(out), "--format", "splat", "--depth", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    splats = sorted((out / "export" / "splat").glob("*.splat"))
    assert [p.name for p in splats] == ["000000.splat", "000001.splat", "000002.splat"]
    assert len(read_splat(splats[1])) == r.n_gaussians
    assert not (out / "export" / "ply").exists() and not (out / "export" / "tracks.npz").exists()
    cams = r.train_cameras + r.test_cameras
    assert sorted(p.name for p in (out / "export" / "depth").iterdir()) == sorted(str(c.id) for c in cams)
    cam = r.test_cameras[0]
    rendered = r.render_output(1, cam, backend="torch")
    mpu = r.config.metres_per_unit
    for kind, ref in (("expected", rendered.depths), ("median", rendered.median_depths)):
        depth = np.load(out / "export" / "depth" / str(cam.id) / f"{kind}_000001.npy")
        assert depth.dtype == np.float32 and depth.shape == (cam.height, cam.width)
        np.testing.assert_allclose(depth, ref[0, ..., 0].numpy(), rtol=1e-5, atol=1e-6)
        with Image.open(out / "export" / "depth" / str(cam.id) / f"{kind}_000001.png") as im:
            mm = np.asarray(im).astype(np.int64)
        covered = depth > 0
        assert covered.any() and (~covered).any(), "the test view must have covered and uncovered pixels"
        assert (mm[~covered] == 0).all()
        np.testing.assert_array_equal(mm[covered], np.rint(depth[covered].astype(np.float64) * mpu * 1000))
    result = CliRunner().invoke(main, ["export", str(out), "--format", "splat", "--sh-degree", "3"])
    assert result.exit_code != 0 and "--sh-degree" in result.output


def test_depth_to_mm_convention():
    depth = np.array([[0.0, 0.0004, 1.2344], [2.0, 70.0, 0.5]], np.float32)
    np.testing.assert_array_equal(depth_to_mm(depth, 1.0), [[0, 1, 1234], [2000, 65535, 500]])
    np.testing.assert_array_equal(depth_to_mm(depth, 0.01), [[0, 1, 12], [20, 700, 5]])
    assert depth_to_mm(depth, 1.0).dtype == np.uint16
