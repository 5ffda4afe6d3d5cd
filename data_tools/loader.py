"""Format detection and the :func:`load` entry point."""

from __future__ import annotations

import warnings
from pathlib import Path

from .blender import is_blender, load_blender
from .colmap import find_model_dir, load_colmap
from .errors import DataError
from .llff import is_llff, load_llff
from .middlebury import find_par_file, load_middlebury
from .panoptic import is_panoptic, load_panoptic
from .sequence import Sequence


def detect_format(path: str | Path) -> str:
    """One of ``panoptic | blender | middlebury | colmap | llff`` for a dataset folder (or file).

    Raises:
        DataError: when the path does not exist or matches no format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_file():
        name = path.name
        if name.endswith("_par.txt"):
            return "middlebury"
        if name == "poses_bounds.npy":
            return "llff"
        if name in ("train_meta.json", "test_meta.json"):
            return "panoptic"
        if name.startswith("transforms") and name.endswith(".json"):
            return "blender"
        if name in ("cameras.bin", "cameras.txt"):
            return "colmap"
        raise DataError(path, "unrecognised dataset file")
    if is_panoptic(path):
        return "panoptic"
    if is_blender(path):
        return "blender"
    # poses_bounds.npy wins over a (possibly incomplete) sparse/ beside it.
    if is_llff(path):
        return "llff"
    if find_model_dir(path) is not None:
        return "colmap"
    if find_par_file(path) is not None:
        return "middlebury"
    subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and _looks_like_dataset(p))
    hint = f"; it holds datasets: {', '.join(subsets)}" if subsets else ""
    raise DataError(
        path,
        "not a dataset: expected train_meta.json (Panoptic), transforms_*.json (Blender), poses_bounds.npy "
        f"(LLFF), sparse/ or cameras.bin/.txt (COLMAP) or *_par.txt (Middlebury){hint}",
    )


def _collection_member(path: Path) -> Path | None:
    """For a folder that is not a dataset but holds datasets of one format (like Middlebury's
    templeSparseRing and dinoSparseRing side by side), the first of them, with a warning."""
    if not path.is_dir():
        return None
    try:
        detect_format(path)
        return None
    except DataError:
        pass
    subsets = sorted(p for p in path.iterdir() if p.is_dir() and _looks_like_dataset(p))
    if not subsets or len({detect_format(p) for p in subsets}) != 1:
        return None
    warnings.warn(
        f"{path} holds {len(subsets)} datasets ({', '.join(p.name for p in subsets)}); loading {subsets[0].name}",
        stacklevel=3,
    )
    return subsets[0]


def _looks_like_dataset(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except DataError:
        return False


_LOADERS = {
    "panoptic": load_panoptic,
    "blender": load_blender,
    "middlebury": load_middlebury,
    "colmap": load_colmap,
    "llff": load_llff,
}


def load(
    path: str | Path,
    *,
    downscale: float = 1,
    cameras=None,
    frames=None,
    background=None,
    test_every: int | None = 8,
    cache_size: int = 64,
) -> Sequence:
    """Load a multi-view dataset of any supported format.

    Args:
        path: dataset folder (or its ``train_meta.json`` / ``transforms_*.json`` / ``*_par.txt`` /
            ``poses_bounds.npy``).
        downscale: divide the image size by this factor; K is scaled by the exact size ratio.
        cameras: camera ids to keep (train and test alike); None keeps all.
        frames: a slice, range or list of 0-based indices into the source frame list; None keeps all.
        background: 'white' | 'black' | RGB in [0, 1]. Blender composites RGBA onto it (default white);
            other formats just report it (Panoptic meta written by data_tools stores one).
        test_every: for sources without a train/test split (Middlebury, COLMAP, LLFF, single
            transforms.json), cameras with index % test_every == 0 are test cameras; 0/None keeps all
            cameras for training.
        cache_size: decoded images kept in memory.

    Returns:
        a :class:`Sequence`.
    """
    path = Path(path)
    fmt = _collection_member(path)
    if fmt is not None:
        return load(fmt, downscale=downscale, cameras=cameras, frames=frames, background=background,
                    test_every=test_every, cache_size=cache_size)
    fmt = detect_format(path)
    if path.is_file() and fmt != "middlebury":
        path = path.parent
    kwargs = dict(downscale=downscale, cameras=cameras, frames=frames, background=background, cache_size=cache_size)
    if fmt not in ("panoptic",):
        kwargs["test_every"] = test_every
    if fmt == "blender" and background is None:
        kwargs["background"] = "white"
    seq = _LOADERS[fmt](path, **kwargs)
    seq.check_files([0])  # cheap (headers only): catches size mismatches before any real work
    return seq
