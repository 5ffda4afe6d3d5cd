"""Resumable storage: fault injection at chosen steps, a real SIGKILL, atomic writes, config refusal.

Tolerances: exact. A resumed run must be bit-identical to an uninterrupted one on the CPU torch
backend (frame t's random numbers come from (seed, t); its starting state is exactly what t - 1 and
t - 2 stored).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import tracking
from tracking.errors import ConfigMismatchError, InjectedFault
from tracking.store import FRAMES_DIR, completed_frames, frame_path

from .conftest import tiny_config

QUIET = {"progress": False, "echo": lambda s: None}
ARRAYS = ("means", "quats", "rgb", "adam/rgb/exp_avg", "adam/rgb/exp_avg_sq", "adam/rgb/step", "adam/means/step")


def assert_same_frames(a: Path, b: Path, n: int) -> None:
    for t in range(n):
        with h5py.File(frame_path(a, t)) as fa, h5py.File(frame_path(b, t)) as fb:
            for key in ARRAYS:
                assert np.array_equal(fa[key][()], fb[key][()]), f"frame {t} {key} differs"
    with h5py.File(a / "run.h5") as fa, h5py.File(b / "run.h5") as fb:
        for key in fa["params0"]:
            assert np.array_equal(fa["params0"][key][()], fb["params0"][key][()]), key


@pytest.mark.parametrize("fault", [pytest.param("2:3", id="frame2-step3"), pytest.param("0:17", id="frame0-step17"),
                                   pytest.param("1:write", id="frame1-before-rename")])
def test_injected_fault_then_resume_is_bit_identical(fault, tiny_scene, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TRITONSPLAT_FAULT_AT", fault)
    with pytest.raises(InjectedFault):
        tracking.fit(tiny_scene, out, tiny_config(), **QUIET)
    t_fault = int(fault.split(":")[0])
    assert completed_frames(out) == t_fault
    assert not list(out.rglob(".*.tmp-*")), "no temporary file may survive a failure"
    monkeypatch.delenv("TRITONSPLAT_FAULT_AT")
    r = tracking.fit(tiny_scene, out, tiny_config(), **QUIET)
    assert r.n_frames == 3
    assert_same_frames(out, tiny_run, 3)


def test_self_sigkill_then_resume(tiny_scene, tiny_run, tmp_path):
    out = tmp_path / "run"
    script = _fit_script(tiny_scene, out)
    env = {**os.environ, "TRITONSPLAT_FAULT_AT": "1:4:kill"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert completed_frames(out) == 1
    tracking.fit(tiny_scene, out, tiny_config(), **QUIET)
    assert_same_frames(out, tiny_run, 3)


def test_external_sigkill_mid_run_then_resume(tiny_scene, tmp_path):
    """A real kill from outside at an arbitrary moment (after frame 1 is on disk), then resume."""
    cfg = {"steps_per_frame": 40}
    out, ref = tmp_path / "killed", tmp_path / "reference"
    tracking.fit(tiny_scene, ref, tiny_config(**cfg), **QUIET)
    proc = subprocess.Popen([sys.executable, "-c", _fit_script(tiny_scene, out, cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not frame_path(out, 1).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = completed_frames(out)
    assert done >= 1
    tracking.fit(tiny_scene, out, tiny_config(**cfg), **QUIET)
    assert_same_frames(out, ref, 3)


def _fit_script(data: Path, out: Path, overrides: dict | None = None) -> str:
    here = Path(__file__).resolve().parent
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(here.parents[1])!r})
        sys.path.insert(0, {str(here)!r})
        import tracking
        from conftest import tiny_config
        tracking.fit({str(data)!r}, {str(out)!r}, tiny_config(**{overrides or {}!r}), progress=False,
                     echo=lambda s: None)
    """)


def test_completed_run_is_not_refitted(tiny_scene, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = {p: p.stat().st_mtime_ns for p in (out / FRAMES_DIR).iterdir()}
    r = tracking.fit(tiny_scene, out, tiny_config(), **QUIET)
    assert r.n_frames == 3
    assert before == {p: p.stat().st_mtime_ns for p in (out / FRAMES_DIR).iterdir()}


def test_other_config_is_refused_unless_overwrite(tiny_scene, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "data").mkdir()  # e.g. the demo's generated data: never removed by --overwrite
    with pytest.raises(ConfigMismatchError, match="seed: 0 in OUT, 7 now"):
        tracking.fit(tiny_scene, out, tiny_config(seed=7), **QUIET)
    with pytest.raises(ConfigMismatchError, match="downscale"):
        tracking.fit(tiny_scene, out, tiny_config(), downscale=2, **QUIET)
    r = tracking.fit(tiny_scene, out, tiny_config(seed=7, steps_first=5), frames=slice(0, 1), overwrite=True, **QUIET)
    assert r.n_frames == 1 and r.config.seed == 7 and (out / "data").is_dir()


def test_device_and_backend_do_not_block_resume(tiny_scene, tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    r = tracking.fit(tiny_scene, out, tiny_config(backend="auto", device=None), **QUIET)
    assert r.n_frames == 3


def test_frames_may_grow_but_not_change(tiny_scene, tiny_run, tmp_path):
    out = tmp_path / "run"
    assert tracking.fit(tiny_scene, out, tiny_config(), frames=slice(0, 2), **QUIET).n_frames == 2
    with pytest.raises(ConfigMismatchError, match="source frame 0 in OUT, 1 now"):
        tracking.fit(tiny_scene, out, tiny_config(), frames=slice(1, 3), **QUIET)
    r = tracking.fit(tiny_scene, out, tiny_config(), frames=slice(0, 3), **QUIET)
    assert r.n_frames == 3 and r.source_frames == [0, 1, 2]
    assert_same_frames(out, tiny_run, 3)  # frames are causal: extending equals fitting 3 at once
