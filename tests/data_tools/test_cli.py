"""The data-tools command line (click.testing.CliRunner) and atomic writes.

| check                                                              | criterion                          |
|--------------------------------------------------------------------|------------------------------------|
| info --json: required keys and values for every real dataset        | exact                              |
| convert lego -> Panoptic layout -> load: cameras, images, masks     | K/w2c 1e-9; png pixels 1/255       |
| convert basketball --frames 2:4 --downscale 4                       | 160x90, source frames 2, 3 (JPEG)  |
| convert a source without split: --test-every                        | index % N == 0 are test cameras    |
| errors: missing file, mask size, existing DST, read-only DATA        | exit 1, message names file/--out   |
| interrupted write leaves neither DST nor a temporary folder          | exact                              |
| synth default size generates quickly on 2 cores                      | < 60 s (measured ~4 s)             |
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data_tools import load, write_panoptic
from data_tools.cli import main

KEYS = {"format", "n_train_cameras", "n_test_cameras", "n_frames", "width", "height"}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def fails(*args, code=1):
    """Run a command that must fail with a click error (1) or usage error (2), without a traceback."""
    result = run(*args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a click error, not an uncaught exception
    return result.output


@pytest.mark.parametrize(
    "which, expected",
    [
        ("basketball", dict(format="panoptic", n_train_cameras=27, n_test_cameras=4, n_frames=30, width=640,
                            height=360)),
        ("lego", dict(format="blender", n_train_cameras=100, n_test_cameras=25, n_frames=1, width=200,
                      height=200)),
        ("temple", dict(format="middlebury", n_train_cameras=14, n_test_cameras=2, n_frames=1, width=640,
                        height=480)),
    ],
)
def test_info_json(which, expected, request):
    path = request.getfixturevalue(which)
    out = json.loads(ok("info", path, "--json").output)
    assert KEYS <= out.keys()
    assert {k: out[k] for k in expected} == expected
    assert len(out["scene_bounds"] or []) in (0, 2)
    text = ok("info", path).output
    assert expected["format"] in text


def test_info_on_a_folder_of_datasets(temple):
    out = run("info", temple.parent, "--json")
    assert out.exit_code == 0
    assert "warning: " in out.output and "holds 2 datasets" in out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith("{"))
    assert json.loads(line)["format"] == "middlebury"


def test_convert_lego_roundtrip(lego, tmp_path):
    dst = tmp_path / "lego_pan"
    ok("convert", lego, dst, "--downscale", 2, "--image-format", "png", "--background", "black")
    src = load(lego, downscale=2, background="black")
    seq = load(dst)
    assert seq.format == "panoptic" and seq.n_frames == 1
    assert [c.id for c in seq.train_cameras] == [c.id for c in src.train_cameras]
    assert [c.id for c in seq.test_cameras] == [c.id for c in src.test_cameras]
    assert seq.background == (0.0, 0.0, 0.0)
    for a, b in zip(seq.cameras[::17], src.cameras[::17]):
        assert (a.width, a.height) == (b.width, b.height) == (100, 100)
        np.testing.assert_allclose(a.K, b.K, atol=1e-9)
        np.testing.assert_allclose(a.w2c, b.w2c, atol=1e-9)
        np.testing.assert_allclose(seq.image(0, a), src.image(0, b), atol=0.51 / 255)
        np.testing.assert_array_equal(seq.mask(0, a), src.mask(0, b))
    meta = json.loads((dst / "train_meta.json").read_text())
    assert meta["fn"][0][0] == "0/000000.png" and meta["w"] == 100
    assert not (dst / "init_pt_cld.npz").exists()


def test_convert_basketball_frames_and_downscale(basketball, tmp_path):
    dst = tmp_path / "bb"
    ok("convert", basketball, dst, "--frames", "2:4", "--downscale", 4)
    seq = load(dst)
    assert seq.n_frames == 2 and (seq.width, seq.height) == (160, 90)
    assert len(seq.train_cameras) == 27 and len(seq.test_cameras) == 4
    src = load(basketball, frames=range(2, 4), downscale=4)
    np.testing.assert_allclose(seq.image(1, 5), src.image(1, 5), atol=0.2)  # JPEG q95 at edges
    assert np.abs(seq.image(1, 5) - src.image(1, 5)).mean() < 0.01
    assert np.mean(seq.mask(0, 5) == src.mask(0, 5)) == 1.0
    assert seq.mask(0, 0) is None  # test cameras had no masks
    assert sorted(p.name for p in (dst / "ims" / "5").iterdir()) == ["000000.jpg", "000001.jpg"]


def test_convert_without_split_uses_test_every(temple, tmp_path):
    ok("convert", temple, tmp_path / "t", "--test-every", 4, "--downscale", 4)
    seq = load(tmp_path / "t")
    assert [c.id for c in seq.test_cameras] == [0, 4, 8, 12]
    assert len(seq.train_cameras) == 12 and (seq.width, seq.height) == (160, 120)


def test_convert_errors(basketball, tmp_path):
    out = fails("convert", tmp_path / "missing", tmp_path / "x")
    assert "missing: no such file or folder" in out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    out = fails("convert", basketball, tmp_path / "full", "--frames", "0:1")
    assert "already exists" in out
    out = fails("convert", basketball, tmp_path / "y", "--frames", "a:b", code=2)
    assert "--frames" in out
    out = fails("convert", basketball, tmp_path / "y", "--frames", "29:40")
    assert not (tmp_path / "y").exists()


def test_mask_size_mismatch_is_named(basketball, tmp_path):
    tiny = tmp_path / "tiny"
    write_panoptic(load(basketball, cameras=[1, 2, 3], frames=[0], downscale=8), tiny, image_format="png")
    Image.new("1", (80, 46)).save(tiny / "seg" / "2" / "000000.png")
    out = fails("info", tiny)
    assert "seg/2/000000.png: mask is 80x46 but its image 000000.png is 80x45" in out
    out = fails("convert", tiny, tmp_path / "out")
    assert "seg/2/000000.png" in out and not (tmp_path / "out").exists()
    (tiny / "ims" / "3" / "000000.png").unlink()
    out = fails("info", tiny)
    assert "ims/3/000000.png" in out and "not found" in out


def test_init_points_cli(basketball, tmp_path):
    tiny = tmp_path / "tiny"
    write_panoptic(load(basketball, frames=[0], downscale=4), tiny)
    res = ok("init-points", tiny, "--voxel-size", 0.03)
    assert "foreground" in res.output
    with np.load(tiny / "init_pt_cld.npz") as f:
        data = f["data"]
        assert data.dtype == np.float32 and data.shape[1] == 7 and float(f["voxel_size"]) == pytest.approx(0.03)
    assert load(tiny).init_points().shape == data.shape
    ok("init-points", tiny, "--out", tmp_path / "pts.npz", "--no-floor", "--no-shell")
    with np.load(tmp_path / "pts.npz") as f:
        assert (f["data"][:, 6] == 1).all()
    # DATA not writable and no --out: the error names --out; nothing is written
    before = (tiny / "init_pt_cld.npz").stat().st_mtime_ns
    os.chmod(tiny, 0o555)
    try:
        out = fails("init-points", tiny)
        assert "--out" in out and "not writable" in out
    finally:
        os.chmod(tiny, 0o755)
    assert (tiny / "init_pt_cld.npz").stat().st_mtime_ns == before
    assert not list(tiny.glob("*.tmp-*"))
    out = fails("init-points", tmp_path / "nothing")
    assert "no such file" in out


def test_init_points_on_read_only_real_data(basketball):
    if os.stat(basketball).st_mode & 0o222:
        pytest.skip("the data folder is writable here")
    assert "--out" in fails("init-points", basketball)


def test_synth_small_then_load(tmp_path):
    res = ok("synth", tmp_path / "s", "--cameras", 4, "--test-cameras", 1, "--width", 48, "--height", 36,
             "--frames", 3, "--seed", 1)
    assert "tracked points" in res.output
    seq = load(tmp_path / "s")
    assert len(seq.train_cameras) == 4 and len(seq.test_cameras) == 1 and seq.n_frames == 3
    assert seq.image(2, seq.test_cameras[0]).shape == (36, 48, 3)
    assert "already exists" in fails("synth", tmp_path / "s")


def test_synth_default_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    ok("synth", tmp_path / "demo")
    elapsed = time.perf_counter() - t0
    print(f"synth default: {elapsed:.1f} s")
    assert elapsed < 60
    seq = load(tmp_path / "demo")
    assert len(seq.train_cameras) == 12 and len(seq.test_cameras) == 2 and seq.n_frames == 10
    assert (seq.width, seq.height) == (160, 120)
    with np.load(tmp_path / "demo" / "gt_tracks.npz") as gt:
        assert gt["visible"].shape[2] == 12 and 500 <= gt["points"].shape[1] <= 2000


def test_interrupted_write_leaves_nothing(basketball, tmp_path):
    seq = load(basketball, frames=[0, 1], downscale=8)
    calls = {"n": 0}
    original = seq.image

    def flaky(t, cam):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(t, cam)

    seq.image = flaky
    with pytest.raises(KeyboardInterrupt):
        write_panoptic(seq, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
