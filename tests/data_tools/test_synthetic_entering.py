"""`data-tools synth --enter-at T`: a sphere (the visitor) that enters the scene at frame T.

| check                                                                  | criterion                          |
|------------------------------------------------------------------------|------------------------------------|
| visitor tracks: NaN and invisible before T, finite from T, entry_frame  | exact                              |
| the visitor's points are seen by >= 2 training cameras at T             | exact (the keep rule)              |
| visitor moves rigidly from T on                                         | 1e-5 m                             |
| the visitor's pixels are background before T and foreground at T       | mask mean < 0.3, > 0.75 (see test)|
| default scenes carry no entry_frame / enter_at (files unchanged)        | exact                              |
| --enter-at outside 1..frames-1: a usage error naming the option         | exit code 2                        |
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from data_tools import load, make_synthetic_scene
from data_tools.cli import main
from data_tools.synthetic import VISITOR_ID

SIZE = {"cameras": 4, "test_cameras": 1, "width": 40, "height": 30, "frames": 3, "seed": 1}
ENTER = 2


@pytest.fixture(scope="module")
def entering(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "enter"
    make_synthetic_scene(out, **SIZE, enter_at=ENTER)
    return out


def test_visitor_tracks_start_at_entry(entering):
    with np.load(entering / "gt_tracks.npz") as z:
        gt = {k: z[k] for k in z.files}
    visitor = gt["object_ids"] == VISITOR_ID
    assert visitor.sum() >= 20, "the visitor needs tracked points"
    assert (gt["entry_frame"][visitor] == ENTER).all() and (gt["entry_frame"][~visitor] == 0).all()
    assert gt["entry_frame"].dtype == np.int64
    pts = gt["points"]
    assert np.isnan(pts[:ENTER, visitor]).all() and np.isfinite(pts[ENTER:, visitor]).all()
    assert np.isfinite(pts[:, ~visitor]).all()
    assert not gt["visible"][:ENTER, visitor].any() and not gt["visible_test"][:ENTER, visitor].any()
    assert (gt["visible"][ENTER, visitor].sum(1) >= 2).all()
    assert str(gt["object_names"][VISITOR_ID]) == "visitor"
    # rigid from T on: pairwise distances of the visitor's points stay put
    v = pts[ENTER:, visitor].astype(np.float64)
    d = np.linalg.norm(v[:, :, None] - v[:, None], axis=-1)
    assert np.abs(d - d[0]).max() < 1e-5
    meta = json.loads((entering / "train_meta.json").read_text())
    assert meta["synth"]["enter_at"] == ENTER and meta["synth"]["objects"][-1] == "visitor"


def test_frames_before_entry_do_not_show_the_visitor(entering):
    """Before T the visitor is absent: its points at T project onto background in the frame before, in most
    cameras (the others may have another object in front of where it will be)."""
    seq = load(entering)
    with np.load(entering / "gt_tracks.npz") as z:
        pts = z["points"][ENTER][z["object_ids"] == VISITOR_ID].astype(np.float64)
    before, at = [], []
    for cam in seq.train_cameras:
        uv, zc = cam.project(pts)
        inside = cam.in_image(uv, zc)
        iu = np.clip(uv[inside, 0].astype(int), 0, cam.width - 1)
        iv = np.clip(uv[inside, 1].astype(int), 0, cam.height - 1)
        before.append(seq.mask(ENTER - 1, cam)[iv, iu].mean())
        at.append(seq.mask(ENTER, cam)[iv, iu].mean())
    # At T: > 0.75, not 1, because at 40 x 30 a 0.15 m sphere is ~5 px across and points at its silhouette fall
    # on pixels less than half covered (background in the mask); measured 0.89 (seed 1).
    assert np.mean(at) > 0.75 and np.mean(before) < 0.3, (before, at)


def test_default_scene_has_no_visitor(tmp_path):
    out = make_synthetic_scene(tmp_path / "plain", **{**SIZE, "frames": 2})
    with np.load(out / "gt_tracks.npz") as z:
        assert "entry_frame" not in z.files and VISITOR_ID not in z["object_ids"]
    assert "enter_at" not in json.loads((out / "train_meta.json").read_text())["synth"]


@pytest.mark.parametrize("value", ["0", "3"])
def test_enter_at_out_of_range_is_a_usage_error(value, tmp_path):
    args = ["synth", str(tmp_path / "x"), "--cameras", "3", "--test-cameras", "0", "--width", "16", "--height",
            "12", "--frames", "3", "--enter-at", value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--enter-at" in result.output, result.output
    assert not (tmp_path / "x").exists()
