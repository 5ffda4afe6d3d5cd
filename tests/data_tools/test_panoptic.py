"""Panoptic (Dynamic 3D Gaussians) layout: the real basketball data and corrupted small copies.

| check                                                              | tolerance / criterion          |
|--------------------------------------------------------------------|--------------------------------|
| K, w2c equal the raw JSON (frame 0)                                 | 1e-4 (re-orthonormalisation)   |
| coarse visual hull (8 cm voxels) of the 27 masks is non-empty        | >= 200 voxels                  |
| its centroid projects inside every train and test image             | 2 px margin                    |
| its projection covers the mask foreground in every train camera      | >= 60% of mask pixels (coarse) |
| hull height (people standing on the floor, +y down, floor y = 0)     | lowest voxel within 0.15 m of 0|
| frames selection picks the files of the source indices              | exact pixels                   |
| downscale 4: 160x90, K scaled exactly, image = 4x4 box average       | 1/255 + JPEG-free exact ratio  |
| bad input raises DataError naming the file                          | message contains the file name |
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import data_tools
from data_tools import DataError, load, write_panoptic


@pytest.fixture(scope="module")
def seq(basketball):
    return load(basketball)


def test_format_and_counts(seq, basketball):
    meta = json.loads((basketball / "train_meta.json").read_text())
    assert seq.format == "panoptic"
    assert seq.n_frames == len(meta["fn"]) == 30
    assert [c.id for c in seq.train_cameras] == meta["cam_id"][0]
    assert [c.id for c in seq.test_cameras] == [0, 10, 15, 30]
    assert (seq.width, seq.height) == (640, 360)
    assert seq.background is None
    assert seq.init_points() is None  # the shared copy has no init_pt_cld.npz


def test_cameras_equal_raw_json(seq, basketball):
    meta = json.loads((basketball / "train_meta.json").read_text())
    for c, cam in enumerate(seq.train_cameras):
        np.testing.assert_allclose(cam.K, meta["k"][0][c], atol=1e-12)
        np.testing.assert_allclose(cam.w2c, meta["w2c"][0][c], atol=1e-4)
    # scene_radius as defined by the original code
    w2c = np.array(meta["w2c"][0])
    centres = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])
    expected = 1.1 * np.linalg.norm(centres - centres.mean(0), axis=1).max()
    assert seq.scene_radius == pytest.approx(expected, rel=1e-6)


def test_images_and_masks_match_files(seq, basketball):
    cam = seq.train_cameras[3]
    img = seq.image(0, cam)
    raw = np.asarray(Image.open(basketball / "ims" / f"{cam.id}/000000.jpg"), dtype=np.float32) / 255
    assert img.dtype == np.float32 and img.shape == (360, 640, 3)
    np.testing.assert_array_equal(img, raw)
    mask = seq.mask(0, cam.id)  # by id as well as by Camera
    raw_mask = np.asarray(Image.open(basketball / "seg" / f"{cam.id}/000000.png")).astype(bool)
    assert mask.dtype == bool and mask.shape == (360, 640)
    np.testing.assert_array_equal(mask, raw_mask)
    assert 0.01 < mask.mean() < 0.5
    assert seq.mask(0, 0) is None  # test cameras have no masks


def _coarse_hull(seq, voxel=0.08):
    """Voxel centres consistent with every training mask that sees them (>= 3 views)."""
    g = np.arange(-2.5, 2.5, voxel) + voxel / 2
    X = np.stack(np.meshgrid(g, g - 1.0, g, indexing="ij"), -1).reshape(-1, 3)
    seen = np.zeros(len(X), int)
    ok = np.ones(len(X), bool)
    for cam in seq.train_cameras:
        mask = seq.mask(0, cam)
        uv, z = cam.project(X)
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
        iu = np.clip(uv[:, 0], 0, cam.width - 1).astype(int)
        iv = np.clip(uv[:, 1], 0, cam.height - 1).astype(int)
        fg = mask[iv, iu]
        seen += inside
        ok &= ~inside | fg
    return X[ok & (seen >= 3)]


def test_visual_hull_centroid_projects_into_every_image(seq):
    hull = _coarse_hull(seq)
    assert len(hull) >= 200, "masks and cameras disagree: the hull is (almost) empty"
    # People stand on the floor: +y is down and the floor is at y = 0.
    assert abs(hull[:, 1].max()) < 0.15
    assert hull[:, 1].min() < -1.2  # and they are taller than 1.2 m (metric scale)
    centroid = hull.mean(0, keepdims=True)
    for cam in seq.cameras:
        uv, z = cam.project(centroid)
        assert z[0] > 0
        assert 2 <= uv[0, 0] <= cam.width - 2 and 2 <= uv[0, 1] <= cam.height - 2, cam
    # The hull explains most of each mask (a coarse check that masks and cameras agree).
    for cam in seq.train_cameras:
        mask = seq.mask(0, cam)
        uv, z = cam.project(hull)
        r = int(np.ceil(0.06 * cam.K[0, 0] / z.min()))
        hit = np.zeros_like(mask)
        for u, v in uv.astype(int):
            hit[max(v - r, 0) : v + r + 1, max(u - r, 0) : u + r + 1] = True
        assert (hit & mask).sum() >= 0.6 * mask.sum(), cam


def test_frames_selection_and_downscale(basketball):
    meta = json.loads((basketball / "train_meta.json").read_text())
    seq = load(basketball, frames=slice(5, 8), downscale=4, cameras=[1, 2, 0])
    assert seq.n_frames == 3 and seq.source_frames == [5, 6, 7]
    assert [c.id for c in seq.train_cameras] == [1, 2] and [c.id for c in seq.test_cameras] == [0]
    cam = seq.camera(2)
    assert (cam.width, cam.height) == (160, 90)
    np.testing.assert_allclose(cam.K[:2], np.array(meta["k"][0][1])[:2] / 4, atol=1e-12)
    full = np.asarray(Image.open(basketball / "ims" / meta["fn"][6][1]), dtype=np.float64) / 255
    box = full.reshape(90, 4, 160, 4, 3).mean((1, 3))
    np.testing.assert_allclose(seq.image(1, cam), box, atol=1.01 / 255)
    full_mask = np.asarray(Image.open(basketball / "seg" / meta["fn"][6][1].replace(".jpg", ".png")), dtype=float)
    small_mask = seq.mask(1, cam)
    assert small_mask.shape == (90, 160)
    assert np.mean(small_mask == (full_mask.reshape(90, 4, 160, 4).mean((1, 3)) >= 0.5)) > 0.995
    seq2 = load(basketball, frames=[29, 0])
    assert seq2.source_frames == [29, 0] and seq2.image_path(0, 1).name == "000029.jpg"
    with pytest.raises(DataError, match="out of range"):
        load(basketball, frames=[30])


def test_images_are_loaded_lazily_with_a_bounded_cache(basketball):
    seq = load(basketball, cache_size=8)
    assert len(seq._cache) == 0
    for t in range(3):
        for cam in seq.train_cameras[:5]:
            seq.image(t, cam)
    assert len(seq._cache) <= 8


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def tiny(basketball, tmp_path):
    """A 4-camera, 2-frame, 80x45 copy of basketball written by data_tools (png images)."""
    out = tmp_path / "tiny"
    write_panoptic(load(basketball, cameras=[1, 2, 3, 0], frames=[0, 1], downscale=8), out, image_format="png")
    return out


def _edit_meta(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_tiny_roundtrip(tiny):
    seq = load(tiny)
    assert seq.n_frames == 2 and len(seq.train_cameras) == 3 and len(seq.test_cameras) == 1
    assert seq.mask(1, 3).shape == (45, 80)


def test_missing_image_names_the_file(tiny):
    (tiny / "ims" / "2" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"ims/2/000001.png.*not found"):
        load(tiny)


def test_missing_mask_names_the_file(tiny):
    (tiny / "seg" / "3" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"seg/3/000001.png.*not found"):
        load(tiny)


def test_meta_count_mismatch(tiny):
    _edit_meta(tiny / "train_meta.json", lambda m: m["k"].pop())
    with pytest.raises(DataError, match=r"train_meta.json: 'k' has 1 frames but 'fn' has 2"):
        load(tiny)
    _edit_meta(tiny / "test_meta.json", lambda m: [m[k].pop() for k in ("fn", "k", "w2c", "cam_id")])
    _edit_meta(tiny / "train_meta.json", lambda m: m["k"].append(m["k"][0]))
    with pytest.raises(DataError, match=r"test_meta.json: lists 1 frames but train_meta.json lists 2"):
        load(tiny)


def test_camera_count_mismatch_within_a_frame(tiny):
    _edit_meta(tiny / "train_meta.json", lambda m: m["w2c"][1].pop())
    with pytest.raises(DataError, match=r"'w2c'\[1\] lists 2 cameras"):
        load(tiny)


def test_mask_size_mismatch(tiny):
    Image.new("1", (81, 45)).save(tiny / "seg" / "1" / "000000.png")
    with pytest.raises(DataError, match=r"seg/1/000000.png: mask is 81x45 but its image 000000.png is 80x45"):
        load(tiny)  # frame 0 is checked at load time
    shutil.copy(tiny / "seg" / "2" / "000000.png", tiny / "seg" / "1" / "000000.png")
    Image.new("1", (81, 45)).save(tiny / "seg" / "1" / "000001.png")
    seq = load(tiny)  # later frames are checked when read
    with pytest.raises(DataError, match=r"seg/1/000001.png: mask is 81x45"):
        seq.mask(1, 1)
    with pytest.raises(DataError, match=r"seg/1/000001.png: mask is 81x45"):
        seq.check_files([0, 1])


def test_singular_and_non_rigid_cameras(tiny):
    _edit_meta(tiny / "train_meta.json", lambda m: m["k"][0].__setitem__(1, [[0, 0, 40], [0, 0, 22], [0, 0, 1]]))
    with pytest.raises(DataError, match=r"train_meta.json: frame 0 camera 2 intrinsics is singular"):
        load(tiny)
    shutil.copy(tiny / "test_meta.json", tiny / "train_meta.json")  # restore a valid train meta
    _edit_meta(tiny / "test_meta.json", lambda m: m["w2c"][0][0][0].__setitem__(0, 2.0))
    with pytest.raises(DataError, match=r"test_meta.json: frame 0 camera 0 extrinsics is not rigid"):
        load(tiny)


def test_malformed_matrix(tiny):
    _edit_meta(tiny / "train_meta.json", lambda m: m["k"][0][0].__setitem__(0, [1, 2]))
    with pytest.raises(DataError, match=r"train_meta.json: frame 0 camera 1 intrinsics is not a 3x3"):
        load(tiny)


def test_unreadable_image(tiny):
    (tiny / "ims" / "1" / "000001.png").write_bytes(b"not an image")
    seq = load(tiny)  # only frame 0 is opened at load time
    with pytest.raises(DataError, match=r"ims/1/000001.png: cannot read image"):
        seq.image(1, 1)
    (tiny / "ims" / "1" / "000000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"ims/1/000000.png: cannot read image"):
        load(tiny)


def test_frame_numbers_need_not_start_at_zero_and_masks_may_be_0_255(tiny):
    def renumber(meta):
        meta["fn"] = [[f.replace("00000", "00010") for f in row] for row in meta["fn"]]

    for split in ("train_meta.json", "test_meta.json"):
        _edit_meta(tiny / split, renumber)
    for sub in ("ims", "seg"):
        for f in sorted((tiny / sub).rglob("00000*.png")):
            f.rename(f.with_name(f.name.replace("00000", "00010")))
    mask_file = tiny / "seg" / "1" / "000100.png"
    expected = np.asarray(Image.open(mask_file)).astype(bool)
    Image.fromarray(expected.astype(np.uint8) * 255).save(mask_file)  # 0/255 L mode
    Image.fromarray(expected.astype(np.uint8)).save(tiny / "seg" / "2" / "000100.png")  # 0/1 L mode
    seq = load(tiny)
    assert seq.image_path(0, 1).name == "000100.png"
    np.testing.assert_array_equal(seq.mask(0, 1), expected)
    assert seq.mask(0, 2).dtype == bool


def test_missing_dataset_and_unknown_folder(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match="not a dataset"):
        data_tools.load(tmp_path)
