"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a tritonsplat.ops module is first
imported; so it is set here, before any tritonsplat import, whenever no CUDA GPU is present.
Ahead-of-time compiles need it unset and run in a subprocess (tests/test_aot.py).
"""

import os
import sys
from pathlib import Path


def _cuda_present() -> bool:
    # Avoid importing torch.cuda machinery needlessly: the driver file is enough to decide.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always imports in our environments
        return False


if "tritonsplat" in sys.modules or any(m.startswith("tritonsplat.") for m in sys.modules):
    raise RuntimeError("tritonsplat was imported before tests/conftest.py could set TRITON_INTERPRET")

HAS_CUDA = _cuda_present()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker already has a core: two torch threads per worker on 2 cores made the
# tracking tests 6x slower (128 s vs 22 s with -n 2, measured).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("TRITONSPLAT_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_root() -> Path:
    if not DATA_ROOT.exists():
        pytest.skip(f"real data not found at {DATA_ROOT} (set TRITONSPLAT_DATA)")
    return DATA_ROOT


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
