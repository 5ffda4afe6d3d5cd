"""Format detection and the :func:`load` entry point, both built from the format registry."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from . import blender, colmap, llff, middlebury, panoptic
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence

# Every supported format, in detection order: a folder is the first format whose `detect` accepts
# it. LLFF comes before COLMAP: poses_bounds.npy wins over a (possibly incomplete) sparse/ beside it.
REGISTRY: tuple[DatasetFormat, ...] = (panoptic.FORMAT, blender.FORMAT, llff.FORMAT, colmap.FORMAT, middlebury.FORMAT)
FORMATS = tuple(f.name for f in REGISTRY)
_BY_NAME = {f.name: f for f in REGISTRY}


def _expected_contents() -> str:
    expects = [f.expects for f in REGISTRY]
    return ", ".join(expects[:-1]) + " or " + expects[-1]


def detect_format(path: str | Path) -> str:
    """The name of the format (one of :data:`FORMATS`) of a dataset folder (or file).

    Raises:
        DataError: when the path does not exist or matches no format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_file():
        for fmt in REGISTRY:
            if fmt.detect_file(path.name):
                return fmt.name
        raise DataError(path, "unrecognised dataset file")
    for fmt in REGISTRY:
        if fmt.detect(path):
            return fmt.name
    subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and _looks_like_dataset(p))
    hint = f"; it holds datasets: {', '.join(subsets)}" if subsets else ""
    raise DataError(path, f"not a dataset: expected {_expected_contents()}{hint}")


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
        stacklevel=4,  # the caller of load()
    )
    return subsets[0]


def _looks_like_dataset(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except DataError:
        return False


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
    return load_with(path, LoadOptions(downscale=downscale, cameras=cameras, frames=frames, background=background,
                                       test_every=test_every, cache_size=cache_size))


def load_with(path: str | Path, options: LoadOptions) -> Sequence:
    """:func:`load` with its options as one :class:`LoadOptions`."""
    path = Path(path)
    member = _collection_member(path)
    if member is not None:
        return load_with(member, options)
    fmt = _BY_NAME[detect_format(path)]
    if path.is_file() and not fmt.loads_file:
        path = path.parent
    if options.background is None and fmt.default_background is not None:
        options = replace(options, background=fmt.default_background)
    seq = fmt.load(path, options)
    seq.check_files([0])  # cheap (headers only): catches size mismatches before any real work
    return seq
