"""Helpers shared by the format readers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from .cameras import Camera
from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror})") from None


def require_file(path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    return path


def select_and_scale(
    train: list[Camera],
    test: list[Camera],
    cameras,
    downscale: float,
    source: Path,
) -> tuple[list[Camera], list[Camera], dict[int, tuple[int, int]]]:
    """Keep the cameras whose id is in ``cameras`` (all when None) and shrink them by ``downscale``.

    Returns the kept train and test cameras and the on-disk (native) image size per camera id.
    """
    if cameras is not None:
        wanted = {int(c) for c in cameras}
        known = {c.id for c in train + test}
        missing = sorted(wanted - known)
        if missing:
            raise DataError(source, f"camera id(s) {missing} not in the dataset (ids: {sorted(known)})")
        train = [c for c in train if c.id in wanted]
        test = [c for c in test if c.id in wanted]
    if downscale <= 0 or not np.isfinite(downscale):
        raise ValueError(f"downscale must be a positive number, got {downscale}")
    native = {c.id: c.size for c in train + test}
    if downscale != 1:
        train = [c.scaled(1.0 / downscale) for c in train]
        test = [c.scaled(1.0 / downscale) for c in test]
    return train, test, native


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def single_threaded(fn):
    """Run ``fn`` with one torch intra-op thread, restoring the previous setting afterwards.

    The ray caster and the voxel carving issue many small tensor operations; on a busy 2-core
    machine (CI running tests in parallel) OpenMP's worker threads then spin against each other
    and the work runs 10x slower (measured: synth default 113 s with 2 threads vs 11 s with 1 under
    load, about 3-4 s either way when idle).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)

    return wrapper
