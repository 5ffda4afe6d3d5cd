"""The viewer as a user sees it: the served scene through viser's API, the CLI, and a headless browser.

Every test starts its server on a free loopback port (port 0) and stops it (and the browser) in `finally`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest

import tracking
from tracking.errors import TrackingError

from .test_d3dgs import synthetic_run  # noqa: F401  (session fixture: a run written through tracking.store)

viser = pytest.importorskip("viser", reason="the viewer tests need the `viewer` extra (viser)")

from tracking.viewer import RunViewer, trail_colours  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-unsafe-swiftshader", "--window-size=640,480"]
CONNECT_TIMEOUT_S = 30.0
RENDER_H, RENDER_W = 240, 320
MIN_COVERED = 0.005  # share of pixels the splats must cover in the browser's render (measured: ~4 %)
MIN_FRAME_CHANGE = 1.0  # mean |difference| (0..255 RGBA) between frames 0 and 2 (measured: ~6)


def _centres(handle) -> np.ndarray:
    """The splat centres viser serves (float32 x 3 at the start of each 32-byte row)."""
    return np.ascontiguousarray(handle.buffer[:, :3]).view(np.float32)


def test_viewer_serves_the_scene_and_switches_frames(synthetic_run):  # noqa: F811
    r = tracking.load(synthetic_run)
    v = RunViewer(synthetic_run, host="127.0.0.1", port=0, frame=1)
    try:
        assert v.url.startswith("http://127.0.0.1:") and v.server.get_port() != 0
        with urllib.request.urlopen(v.url, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        assert v.frame == 1 and v.gui["frame"].value == 1
        assert v.splats.buffer.shape == (r.n_gaussians, 8)
        np.testing.assert_array_equal(_centres(v.splats), r.means[1].numpy())

        v.gui["frame"].value = 2  # as the slider does
        assert v.frame == 2
        np.testing.assert_array_equal(_centres(v.splats), r.means[2].numpy())
        idx = v.trail_indices()
        assert len(idx) == len(np.flatnonzero(r.fg.numpy())[::25]) > 0
        assert v.trails.points.shape == (len(idx) * 2, 2, 3)  # trails over frames 0..2: two segments each
        np.testing.assert_array_equal(v.trails.points[1, 1], r.means[2][idx[0]].numpy())

        v.gui["background"].value = False
        fg = r.fg.numpy()
        assert v.splats.buffer.shape == (int(fg.sum()), 8)
        np.testing.assert_array_equal(_centres(v.splats), r.means[2].numpy()[fg])
        v.gui["segmentation"].value = True
        rgba = np.ascontiguousarray(v.splats.buffer[:, 7]).view(np.uint8).reshape(-1, 4)
        assert (rgba[:, 0] == 255).all() and (rgba[:, 2] == 0).all()  # foreground is red
        v.gui["trails"].value = False
        assert v.trails is None
        v.gui["cameras"].value = True
        cams = r.train_cameras + r.test_cameras
        assert sorted(v.frustums) == sorted(c.id for c in cams)
        assert v.frustums[cams[0].id].image is not None
        v.gui["cameras"].value = False
        assert v.frustums == {}
        v.gui["play"].value = True
        deadline = time.time() + 5
        while v.frame == 2 and time.time() < deadline:
            time.sleep(0.02)
        assert v.frame != 2  # play advanced (and wrapped)
        v.gui["play"].value = False
        v.view_from_camera(cams[0].id)  # no client connected: nothing to move, no error
        with pytest.raises(ValueError, match="frame"):
            v.show(r.n_frames)
    finally:
        v.close()
    assert len(trail_colours(30)) == 30 and len({tuple(c) for c in trail_colours(30)}) == 30


def test_viewer_bad_input_and_missing_viser(synthetic_run, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="--frame must be in 0..2"):
        RunViewer(synthetic_run, port=0, frame=3)
    monkeypatch.setitem(sys.modules, "viser", None)
    with pytest.raises(TrackingError, match="viewer.*extra"):
        RunViewer(synthetic_run, port=0)


def test_cli_view_prints_the_url_and_serves(synthetic_run, monkeypatch):  # noqa: F811
    from click.testing import CliRunner

    from tracking.cli import main

    served = {}

    def serve_once(self):  # instead of blocking until Ctrl-C: fetch the page once, as a browser would
        with urllib.request.urlopen(self.url, timeout=10) as page:
            served["status"], served["frame"] = page.status, self.frame

    monkeypatch.setattr(RunViewer, "serve_forever", serve_once)
    result = CliRunner().invoke(main, ["view", str(synthetic_run), "--port", "0", "--frame", "2"])
    assert result.exit_code == 0, result.output
    assert "at http://127.0.0.1:" in result.output and served == {"status": 200, "frame": 2}
    result = CliRunner().invoke(main, ["view", str(synthetic_run), "--port", "0", "--frame", "7"])
    assert result.exit_code == 1 and "--frame must be in 0..2" in result.output
    result = CliRunner().invoke(main, ["view", str(synthetic_run.parent / "nothing"), "--port", "0"])
    assert result.exit_code == 1 and "no run here" in result.output


def _wait_for_client(server, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        clients = server.get_clients()
        if clients:
            return next(iter(clients.values()))
        time.sleep(0.05)
    return None


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it: apt-get install "
                                              "chromium); the browser test loads the page headless")
def test_browser_renders_the_splats_and_follows_the_frame(synthetic_run, tmp_path):  # noqa: F811
    v = RunViewer(synthetic_run, host="127.0.0.1", port=0, frame=0)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", v.url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = _wait_for_client(v.server, CONNECT_TIMEOUT_S)
        assert client is not None, f"headless Chromium did not connect to {v.url} in {CONNECT_TIMEOUT_S} s"
        time.sleep(0.5)  # the first scene messages and the splat sort worker
        first = client.get_render(RENDER_H, RENDER_W, transport_format="png", timeout=20)
        from PIL import Image

        Image.fromarray(first).save(tmp_path / "frame0.png")
        assert first.shape == (RENDER_H, RENDER_W, 4)
        covered = (first[..., 3] > 0).mean()
        assert covered > MIN_COVERED, f"blank page: {covered:.4f} of the pixels covered"
        assert first[..., :3][first[..., 3] > 0].std() > 5, "the splats render as one flat colour"

        v.gui["frame"].value = 2
        change, last = 0.0, first
        deadline = time.time() + 10
        while change <= MIN_FRAME_CHANGE and time.time() < deadline:
            time.sleep(0.3)
            last = client.get_render(RENDER_H, RENDER_W, transport_format="png", timeout=20)
            change = float(np.abs(last.astype(np.float64) - first.astype(np.float64)).mean())
        Image.fromarray(last).save(tmp_path / "frame2.png")
        assert change > MIN_FRAME_CHANGE, f"the render did not change with the frame (mean diff {change:.3f})"
    finally:
        try:
            os.killpg(browser.pid, 15)
        except ProcessLookupError:
            pass
        browser.wait(timeout=10)
        v.close()
