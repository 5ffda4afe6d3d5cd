"""The dataset-format registry's two types: what a format declares, and the options of one load.

Each format module (``panoptic.py``, ``blender.py``, ...) declares one :class:`DatasetFormat`;
``loader.py`` lists them and builds format detection, its error message and dispatch from that list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass(frozen=True)
class LoadOptions:
    """The options of :func:`data_tools.load`, passed to every format's loader.

    Attributes:
        downscale: divide the image size by this factor; K is scaled by the exact size ratio.
        cameras: camera ids to keep (train and test alike); None keeps all.
        frames: a slice, range or list of 0-based indices into the source frame list; None keeps all.
        background: 'white' | 'black' | RGB in [0, 1], or None for the format's default.
        test_every: for sources without a train/test split, cameras with index % test_every == 0
            are test cameras; 0/None keeps all cameras for training.
        cache_size: decoded images kept in memory.
    """

    downscale: float = 1
    cameras: object = None
    frames: object = None
    background: object = None
    test_every: int | None = 8
    cache_size: int = 64


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format.

    Attributes:
        name: the format's name (``Sequence.format``).
        detect: True when a folder holds a dataset of this format.
        detect_file: True when a file name is this format's dataset file (``train_meta.json``, ...).
        load: (dataset folder, or the file itself when ``loads_file``; options) -> Sequence.
        expects: what a folder of this format holds, for the "not a dataset" error message.
        loads_file: ``load`` takes the dataset file itself rather than its folder.
        default_background: the background used when the options give none.
    """

    name: str
    detect: Callable[[Path], bool]
    detect_file: Callable[[str], bool]
    load: Callable[[Path, LoadOptions], Sequence]
    expects: str
    loads_file: bool = False
    default_background: str | None = None
