"""Fixtures for the tracking tests: a tiny synthetic scene on disk, tiny configs, sequence wrappers."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tracking.config import DensifyConfig, TrackingConfig

# Under pytest-xdist every worker would run 2 intra-op threads on the 2 cores: oversubscribed OpenMP
# threads spin and the tracking tests ran 5x slower (measured: 26 s serial vs 128 s with -n 2).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses of the kill tests

# ../shared/data relative to the repository root, overridable with TRITONSPLAT_DATA.
DATA_ROOT = Path(os.environ.get("TRITONSPLAT_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def tiny_config(**overrides) -> TrackingConfig:
    """A few steps per stage, one short densification window without the opacity reset (which needs
    hundreds of steps to recover before the final cull)."""
    cfg = TrackingConfig(
        preset="test", steps_first=30, steps_per_frame=8,
        densify=DensifyConfig(start=10, stop=20, every=10, opacity_reset_at=0, prune_big_from=20,
                              final_prune_opacity=0.02),
        backend="torch", device="cpu")
    return replace(cfg, **overrides)


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """data_tools' synthetic scene at 40x30: 4 training + 1 test camera, 3 frames, with gt_tracks.npz."""
    from data_tools import make_synthetic_scene

    out = tmp_path_factory.mktemp("tracking") / "tiny"
    make_synthetic_scene(out, cameras=4, test_cameras=1, width=40, height=30, frames=3, seed=1)
    return out


@pytest.fixture
def tiny_copy(tiny_scene, tmp_path) -> Path:
    """A private copy of the tiny scene (for tests that edit the data)."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_scene, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tiny_scene, tmp_path_factory) -> Path:
    """A finished 3-frame fit of the tiny scene (shared, read-only)."""
    import tracking

    out = tmp_path_factory.mktemp("tracking") / "run"
    tracking.fit(tiny_scene, out, tiny_config(), progress=False, echo=lambda s: None)
    return out


class SequenceView:
    """Delegates to a data_tools.Sequence, overriding some attributes (e.g. no masks, fewer cameras)."""

    def __init__(self, seq, **overrides):
        self._seq = seq
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            value = self._overrides[name]
            return value
        return getattr(self._seq, name)


def without_masks(seq) -> SequenceView:
    return SequenceView(seq, mask=lambda t, cam: None, has_masks=lambda: False)
