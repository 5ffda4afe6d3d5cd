"""Shared fixtures for the data_tools tests: the real data root and small generated scenes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data relative to the repository root, overridable with TRITONSPLAT_DATA.
DATA_ROOT = Path(os.environ.get("TRITONSPLAT_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """A path under the real data root; skips the test when it is absent."""
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set TRITONSPLAT_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def basketball() -> Path:
    return data_path("panoptic", "basketball")


@pytest.fixture(scope="session")
def lego() -> Path:
    return data_path("nerf_synthetic", "lego_200")


@pytest.fixture(scope="session")
def temple() -> Path:
    return data_path("middlebury", "templeSparseRing")


@pytest.fixture(scope="session")
def dino() -> Path:
    return data_path("middlebury", "dinoSparseRing")


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """A small synthetic scene shared by several tests (6 + 1 cameras, 128x96, 4 frames)."""
    from data_tools import make_synthetic_scene

    out = tmp_path_factory.mktemp("synth") / "scene"
    make_synthetic_scene(out, cameras=6, test_cameras=1, width=128, height=96, frames=4, seed=3)
    return out
