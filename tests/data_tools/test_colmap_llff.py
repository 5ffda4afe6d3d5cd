"""COLMAP (text and binary) and LLFF, on fixtures that a small independent writer below makes from
the Middlebury temple cameras (parsed independently) and points of its silhouette hull.

| check                                                           | tolerance / criterion               |
|-----------------------------------------------------------------|-------------------------------------|
| COLMAP K, R, t == Middlebury par values                          | 1e-9 (R 1e-6)                       |
| COLMAP points3D round-trip (xyz, rgb)                            | 1e-9, 1/255                         |
| loaded points project into every silhouette (all 16 cameras)      | >= 97% (2 px dilation)              |
| images sorted by name regardless of image ids                    | exact                               |
| radial models warn, fisheye models are refused                  | warning / DataError                 |
| LLFF (principal point moved to the centre by shifting the images) | K within 0.5 px, same projection test |
| LLFF f scaled by actual width / W when only images_2 exists       | 1e-9                                |
| poses_bounds.npy beside an incomplete sparse/ is LLFF             | format == "llff"                    |
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from data_tools import DataError, load

from .helpers import dilate_mask, middlebury_hull, parse_par, project, silhouette

BBOX = ((-0.073568, 0.021728, -0.012445), (0.028855, 0.181892, 0.062736))


# ----------------------------------------------------------------------------- independent writers
def rotmat_to_qvec(R):
    """(w, x, y, z) of a rotation matrix (Shepperd's method)."""
    tr = np.trace(R)
    if tr > 0:
        s = 2 * np.sqrt(tr + 1)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(1 + R[i, i] - R[j, j] - R[k, k])
        q = np.zeros(4)
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def write_colmap(root, cams, points, colors, binary, model="PINHOLE", extra=()):
    """A COLMAP sparse model in root/sparse/0 and the images (symlinks) in root/images.

    cams: [(name, K, R, t, image_path)]. Image ids are assigned in reverse name order on purpose.
    """
    model_dir = root / "sparse" / "0"
    model_dir.mkdir(parents=True)
    (root / "images").mkdir()
    for name, *_, src in cams:
        (root / "images" / name).symlink_to(src)
    K = cams[0][1]
    params = {
        "PINHOLE": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
        "SIMPLE_RADIAL": [K[0, 0], K[0, 2], K[1, 2], *extra],
        "OPENCV_FISHEYE": [K[0, 0], K[1, 1], K[0, 2], K[1, 2], 0, 0, 0, 0],
    }[model]
    model_id = {"PINHOLE": 1, "SIMPLE_RADIAL": 2, "OPENCV_FISHEYE": 5}[model]
    ids = list(range(len(cams), 0, -1))
    if not binary:
        (model_dir / "cameras.txt").write_text(
            "# Camera list\n" + f"1 {model} 640 480 " + " ".join(repr(float(p)) for p in params) + "\n"
        )
        lines = ["# Image list with two lines of data per image:"]
        for iid, (name, _, R, t, _) in zip(ids, cams):
            q = rotmat_to_qvec(R)
            lines.append(f"{iid} {' '.join(repr(float(v)) for v in (*q, *t))} 1 {name}")
            lines.append("" if iid % 2 else "100.5 200.25 -1 10.0 20.0 3")  # empty and non-empty 2D lists
        (model_dir / "images.txt").write_text("\n".join(lines) + "\n")
        pts = [f"{i + 1} {x!r} {y!r} {z!r} {r} {g} {b} 0.5 1 0 2 1" for i, ((x, y, z), (r, g, b)) in
               enumerate(zip(points.tolist(), colors.tolist()))]
        (model_dir / "points3D.txt").write_text("# 3D point list\n" + "\n".join(pts) + "\n")
        return
    with open(model_dir / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<iiQQ", 1, model_id, 640, 480))
        f.write(struct.pack(f"<{len(params)}d", *params))
    with open(model_dir / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", len(cams)))
        for iid, (name, _, R, t, _) in zip(ids, cams):
            f.write(struct.pack("<I4d3dI", iid, *rotmat_to_qvec(R), *t, 1))
            f.write(name.encode() + b"\0")
            f.write(struct.pack("<Q", 2))
            f.write(struct.pack("<ddq", 1.0, 2.0, -1) + struct.pack("<ddq", 3.0, 4.0, 0))
    with open(model_dir / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(points)))
        for i, (p, c) in enumerate(zip(points, colors)):
            f.write(struct.pack("<Q3d3BdQ", i + 1, *p, *c, 0.5, 2))
            f.write(struct.pack("<iiii", 1, 0, 2, 1))


def write_llff(root, cams, folder="images", scale=1.0):
    """poses_bounds.npy with images shifted so that the principal point is at the image centre."""
    (root / folder).mkdir(parents=True)
    rows = []
    for name, K, R, t, src in cams:
        dx, dy = int(round(320 - K[0, 2])), int(round(240 - K[1, 2]))
        img = np.asarray(Image.open(src))
        shifted = np.zeros_like(img)
        shifted[max(dy, 0) : 480 + min(dy, 0), max(dx, 0) : 640 + min(dx, 0)] = img[
            max(-dy, 0) : 480 - max(dy, 0), max(-dx, 0) : 640 - max(dx, 0)
        ]
        out = Image.fromarray(shifted)
        if scale != 1.0:
            out = out.resize((int(640 * scale), int(480 * scale)), Image.Resampling.BOX)
        out.save(root / folder / name)
        c2w = np.c_[R.T, -R.T @ t]  # columns: right, down, forward, centre
        mat = np.c_[c2w[:, 1], c2w[:, 0], -c2w[:, 2], c2w[:, 3], [480, 640, K[0, 0]]]
        rows.append(np.r_[mat.ravel(), 0.4, 0.9])
    np.save(root / "poses_bounds.npy", np.array(rows))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def temple_cams(temple):
    return [(name, K, R, t, temple / name) for name, K, R, t in parse_par(temple / "templeSR_par.txt")]


@pytest.fixture(scope="module")
def temple_points(temple, temple_cams):
    """Hull points of the temple silhouettes computed with the raw par cameras (no data_tools)."""
    from types import SimpleNamespace

    sils = {name: silhouette(np.asarray(Image.open(src), dtype=np.float32) / 255) for name, *_, src in temple_cams}
    cams = []
    for name, K, R, t, _ in temple_cams:
        cam = SimpleNamespace(name=name, width=640, height=480)
        cam.project = lambda X, K=K, R=R, t=t: project(K, R, t, X)
        cams.append(cam)
    pts = middlebury_hull(cams, lambda c: sils[c.name], BBOX, voxel=0.004)
    rng = np.random.default_rng(0)
    pts = pts[rng.choice(len(pts), size=min(len(pts), 600), replace=False)]
    colors = rng.integers(0, 256, size=(len(pts), 3))
    return pts, colors, sils


def _check_projection(seq, points, sils, names, min_frac=0.97):
    for cam in seq.cameras:
        name = names[cam.id]
        sil = dilate_mask(sils[name], 2)
        if seq.format == "llff":  # the LLFF images were shifted: compare against shifted silhouettes
            sil = dilate_mask(silhouette(seq.image(0, cam)), 2)
        uv, z = cam.project(points)
        iu = np.clip(uv[:, 0], 0, cam.width - 1).astype(int)
        iv = np.clip(uv[:, 1], 0, cam.height - 1).astype(int)
        ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
        frac = (ok & sil[iv, iu]).mean()
        assert frac >= min_frac, (name, frac)


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_roundtrip(tmp_path, temple_cams, temple_points, binary):
    pts, colors, sils = temple_points
    write_colmap(tmp_path, temple_cams, pts, colors, binary)
    seq = load(tmp_path, test_every=0)
    assert seq.format == "colmap" and len(seq.train_cameras) == 16 and seq.n_frames == 1
    names = {}
    for cam, (name, K, R, t, _) in zip(seq.train_cameras, sorted(temple_cams, key=lambda c: c[0])):
        assert seq.image_path(0, cam).name == name
        names[cam.id] = name
        np.testing.assert_allclose(cam.K, K, atol=1e-9)
        np.testing.assert_allclose(cam.R, R, atol=1e-6)
        np.testing.assert_allclose(cam.t, t, atol=1e-9)
    init = seq.init_points()
    np.testing.assert_allclose(init[:, :3], pts, atol=1e-6)
    np.testing.assert_allclose(init[:, 3:6], colors / 255, atol=1e-6)
    assert (init[:, 6] == 0).all()
    _check_projection(seq, init[:, :3].astype(np.float64), sils, names)
    # the model folder itself and the default 1-in-8 split
    seq8 = load(tmp_path / "sparse" / "0")
    assert [c.id for c in seq8.test_cameras] == [0, 8]


def test_colmap_radial_warns_and_fisheye_is_refused(tmp_path, temple_cams, temple_points):
    pts, colors, _ = temple_points
    write_colmap(tmp_path / "radial", temple_cams, pts, colors, False, model="SIMPLE_RADIAL", extra=(0.01,))
    with pytest.warns(UserWarning, match="SIMPLE_RADIAL.*distortion"):
        seq = load(tmp_path / "radial")
    assert seq.train_cameras[0].K[0, 0] == seq.train_cameras[0].K[1, 1]
    write_colmap(tmp_path / "fish", temple_cams, pts, colors, True, model="OPENCV_FISHEYE")
    with pytest.raises(DataError, match="OPENCV_FISHEYE is not supported"):
        load(tmp_path / "fish")


def test_colmap_missing_image_is_named(tmp_path, temple_cams, temple_points):
    pts, colors, _ = temple_points
    write_colmap(tmp_path, temple_cams, pts, colors, False)
    (tmp_path / "images" / "templeSR0005.png").unlink()
    with pytest.raises(DataError, match=r"images/templeSR0005.png: image listed in images.txt not found"):
        load(tmp_path)


def test_llff_roundtrip(tmp_path, temple_cams, temple_points):
    pts, _, sils = temple_points
    write_llff(tmp_path, temple_cams)
    (tmp_path / "sparse" / "0").mkdir(parents=True)  # an incomplete sparse/ beside poses_bounds.npy
    (tmp_path / "sparse" / "0" / "cameras.txt").write_text("# nothing else\n")
    seq = load(tmp_path, test_every=0)
    assert seq.format == "llff" and len(seq.cameras) == 16
    names = {}
    for cam, (name, K, R, t, _) in zip(seq.cameras, temple_cams):
        names[cam.id] = name
        np.testing.assert_allclose(cam.K[0, 0], K[0, 0], atol=1e-9)
        np.testing.assert_allclose(cam.K[:2, 2], [320, 240])
        np.testing.assert_allclose(cam.R, R, atol=1e-6)
        np.testing.assert_allclose(cam.t, t, atol=1e-9)
    _check_projection(seq, pts, sils, names)


def test_llff_uses_images_n_folder_and_scales_f(tmp_path, temple_cams):
    write_llff(tmp_path, temple_cams[:4], folder="images_2", scale=0.5)
    seq = load(tmp_path, test_every=0)
    cam = seq.cameras[0]
    assert (cam.width, cam.height) == (320, 240)
    np.testing.assert_allclose(cam.K[0, 0], temple_cams[0][1][0, 0] * 0.5, atol=1e-9)
    (tmp_path / "images_2" / "templeSR0004.png").unlink()
    with pytest.raises(DataError, match="holds 3 images but poses_bounds.npy has 4 poses"):
        load(tmp_path)
