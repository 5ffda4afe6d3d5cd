"""Static t > 0 steps (`tracking.capture`, `TrackingConfig.cuda_graphs`) on CPU: the CUDA-graph path with
the graph replaced by direct calls of the same step function (`capture.EMULATE_ON_CPU`), on the torch
backend's capacity mode. The captured path on CUDA is compared with eager in tests/test_gpu.py.

Tolerances: exact. A static step runs the eager step's operations on the same values (camera rows picked
by index_select instead of slicing, the scalar row written by index_copy_ instead of stack(out=)), and
the capacity-mode render keeps the exact render's valid intersections in the same order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tracking
from tracking import capture
from tracking.errors import NaNLossError
from tracking.store import completed_frames

from .conftest import tiny_config
from .test_resume import assert_same_frames

QUIET = {"progress": False, "echo": lambda s: None}


@pytest.fixture
def static_on_cpu(monkeypatch):
    monkeypatch.setattr(capture, "EMULATE_ON_CPU", True)


def _same_curves(a, b, n: int) -> None:
    for t in range(n):
        for key, curve in a.curves(t).items():
            assert np.array_equal(b.curves(t)[key], curve), (t, key)


def _static_fit_matching_eager(tiny_scene, tiny_run, out):
    """A 3-frame fit with cuda_graphs (static steps on CPU) into out, checked equal to the eager tiny_run."""
    r = tracking.fit(tiny_scene, out, tiny_config(cuda_graphs=True), **QUIET)
    assert_same_frames(out, tiny_run, 3)
    _same_curves(tracking.load(tiny_run), r, 3)
    return r


def test_static_steps_give_the_eager_fit(static_on_cpu, tiny_scene, tiny_run, tmp_path):
    r = _static_fit_matching_eager(tiny_scene, tiny_run, tmp_path / "static")
    for t in (1, 2):
        stats = r.frame_stats(t)
        assert (stats["graph_captures"], stats["redone_blocks"]) == (1, 0), stats
        assert stats["intersection_capacity"] > 0
    assert "graph_captures" not in r.frame_stats(0)  # t = 0 densifies: always eager


def test_overflow_redoes_the_block_with_a_larger_capacity(static_on_cpu, tiny_scene, tiny_run, tmp_path,
                                                          monkeypatch):
    # A capacity of 13 intersections (the tiny scene's steps have ~1,700): the frame's one block of 8 steps
    # (3 warm-up steps, a capture, 5 replays) overflows and is redone with a grown capacity.
    monkeypatch.setattr(capture.StaticStep, "peak_intersections", lambda self: 10)
    r = _static_fit_matching_eager(tiny_scene, tiny_run, tmp_path / "small")
    for t in (1, 2):
        stats = r.frame_stats(t)
        assert (stats["redone_blocks"], stats["graph_captures"]) == (1, 2), stats
        assert stats["intersection_capacity"] > 100, stats


def test_nan_in_a_static_step_is_located(static_on_cpu, tiny_scene, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONSPLAT_FAULT_AT", "1:4:nan")
    with pytest.raises(NaNLossError) as info:
        tracking.fit(tiny_scene, tmp_path / "nan", tiny_config(cuda_graphs=True, log_every=3), frames=slice(0, 2),
                     **QUIET)
    assert (info.value.t, info.value.step) == (1, 4)
    assert completed_frames(tmp_path / "nan") == 1


def test_capacity_and_eligibility():
    assert capture.frame_capacity(1000) == 1250
    assert capture.frame_capacity(0) == 1
    with pytest.raises(ValueError, match="tile intersections"):
        capture.frame_capacity(2**31)
    assert not capture.available(torch.device("cpu"))  # the option is ignored on CPU

    class Stage:
        densify, after_step = False, None
        params = {"means": torch.zeros(1, 3)}
        config = tiny_config()

        class world:
            active = False

    class Views:
        same_size = True

    class Targets:
        image_stack, seg_stack, segs = torch.zeros(1), None, [None, None]

    assert capture.unsupported(Stage, Views, Targets) is None
    Targets.segs = [torch.zeros(1), None]
    assert "masks" in capture.unsupported(Stage, Views, Targets)
    Views.same_size = False
    assert "image sizes" in capture.unsupported(Stage, Views, Targets)
    Stage.densify = True
    assert "densifies" in capture.unsupported(Stage, Views, Targets)

    class OnCuda:
        device = torch.device("cuda")

    Stage.params = {"means": OnCuda}
    assert "torch backend" in capture.unsupported(Stage, Views, Targets)  # tiny_config's backend
