"""The in-memory view of a multi-view (dynamic) dataset: cameras plus lazily loaded images and masks."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as _Seq
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._common import select_and_scale
from .cameras import Camera, scene_radius
from .errors import DataError

Background = tuple[float, float, float]


def resolve_frames(frames, n_source: int, source: str | Path) -> list[int]:
    """0-based indices into the source frame list from a slice, range, list of ints or None (all).

    Raises:
        DataError: when an index is out of range or the selection is empty.
    """
    if frames is None:
        return list(range(n_source))
    if isinstance(frames, slice):
        for end in (frames.start, frames.stop):
            if end is not None and not -n_source <= end <= n_source:
                raise DataError(
                    source, f"frame range {end} is out of range: the source has {n_source} frame(s)"
                )
        idx = list(range(n_source))[frames]
    elif isinstance(frames, range | _Seq | np.ndarray) and not isinstance(frames, str | bytes):
        idx = [int(i) for i in frames]
    else:
        raise TypeError(f"frames must be a slice, range or list of indices, got {type(frames).__name__}")
    bad = [i for i in idx if not 0 <= i < n_source]
    if bad:
        raise DataError(source, f"frame index {bad[0]} is out of range: the source has {n_source} frame(s)")
    if not idx:
        raise DataError(source, f"the frame selection {frames!r} is empty (the source has {n_source} frames)")
    return idx


def parse_background(background) -> Background | None:
    """'white' | 'black' | RGB triple in [0, 1] | None -> RGB float tuple or None."""
    if background is None:
        return None
    if isinstance(background, str):
        named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
        if background not in named:
            raise ValueError(f"background must be 'white', 'black' or an RGB triple, got {background!r}")
        return named[background]
    rgb = tuple(float(c) for c in background)
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"background must be three numbers in [0, 1], got {background!r}")
    return rgb


def read_mask_array(img: Image.Image) -> np.ndarray:
    """bool [H, W] from a mask PNG: mode "1", 0/1 values (the original layout) or 0/255."""
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    arr = np.asarray(img.convert("L"))
    # 0/1 masks (read unscaled by the original code) and 0/255 masks are both accepted.
    return arr > 0 if arr.max(initial=0) <= 1 else arr >= 128


class Sequence:
    """A multi-view sequence with fixed cameras; images and masks are read lazily.

    Attributes:
        path: the dataset path given to :func:`data_tools.load`.
        format: one of ``panoptic | blender | middlebury | colmap | llff``.
        train_cameras, test_cameras: lists of :class:`Camera` (already scaled by ``downscale``).
        n_frames: number of frames after the ``frames`` selection (1 for static formats).
        source_frames: int list, for each frame its 0-based index into the source's frame list.
        background: RGB float tuple in [0, 1], or None when the data does not define one.

    Frames ``t`` are 0-based indices after the selection. Cameras are given as a :class:`Camera`
    or as a camera id. Decoded images are kept in a small LRU cache (``cache_size`` images).
    """

    def __init__(
        self,
        *,
        path: str | Path,
        format: str,
        train_cameras: list[Camera],
        test_cameras: list[Camera],
        source_frames: list[int],
        image_path: Callable[[int, int], Path],
        mask_path: Callable[[int, int], Path | None] | None = None,
        file_sizes: dict[int, tuple[int, int]] | None = None,
        mask_from_alpha: bool = False,
        background: Background | None = None,
        init_points: Callable[[], np.ndarray | None] | np.ndarray | None = None,
        cache_size: int = 64,
    ):
        self.path = Path(path)
        self.format = format
        self.train_cameras = list(train_cameras)
        self.test_cameras = list(test_cameras)
        self.source_frames = list(source_frames)
        self.background = background
        self._image_path = image_path
        self._mask_path = mask_path
        self._mask_from_alpha = mask_from_alpha
        # Size of the files on disk per camera id (before downscaling); defaults to the camera size.
        self._file_sizes = dict(file_sizes or {})
        self._init_points = init_points
        #: Extra metadata of the source (for the Panoptic layout: train_meta.json, e.g. its "synth" key).
        self.meta: dict = {}
        self._cache: OrderedDict[tuple, np.ndarray | None] = OrderedDict()
        self.cache_size = int(cache_size)
        self._by_id: dict[int, Camera] = {}
        for cam in self.train_cameras + self.test_cameras:
            if cam.id in self._by_id:
                raise DataError(self.path, f"camera id {cam.id} appears twice")
            self._by_id[cam.id] = cam

    # ------------------------------------------------------------------ cameras
    @property
    def n_frames(self) -> int:
        return len(self.source_frames)

    @property
    def cameras(self) -> list[Camera]:
        """Training then test cameras."""
        return self.train_cameras + self.test_cameras

    def camera(self, cam: Camera | int) -> Camera:
        """The camera with this id (or the given Camera after checking it belongs here)."""
        cam_id = cam.id if isinstance(cam, Camera) else int(cam)
        try:
            return self._by_id[cam_id]
        except KeyError:
            raise KeyError(f"no camera with id {cam_id} in {self.path}") from None

    def is_test(self, cam: Camera | int) -> bool:
        cam_id = self.camera(cam).id
        return any(c.id == cam_id for c in self.test_cameras)

    @property
    def width(self) -> int | None:
        """Common image width, or None when cameras differ."""
        sizes = {c.width for c in self.cameras}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def height(self) -> int | None:
        """Common image height, or None when cameras differ."""
        sizes = {c.height for c in self.cameras}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def scene_radius(self) -> float:
        """1.1 x the largest distance of a training-camera centre from their mean (the original's)."""
        return scene_radius(self.train_cameras or self.test_cameras)

    # ------------------------------------------------------------------ pixels
    def image_path(self, t: int, cam: Camera | int) -> Path:
        """Path of the image file of frame ``t`` seen by ``cam``."""
        self._check_t(t)
        return self._image_path(t, self.camera(cam).id)

    def mask_path(self, t: int, cam: Camera | int) -> Path | None:
        """Path of the mask file, None when this camera has no separate mask file."""
        self._check_t(t)
        if self._mask_path is None:
            return None
        return self._mask_path(t, self.camera(cam).id)

    def image(self, t: int, cam: Camera | int) -> np.ndarray:
        """float32 [H, W, 3] in [0, 1]; RGBA sources are composited onto :attr:`background`."""
        cam = self.camera(cam)
        pix = self._read_image(t, cam)
        if pix.shape[2] == 4:
            rgb = pix[..., :3].astype(np.float32) / 255.0
            alpha = pix[..., 3:].astype(np.float32) / 255.0
            bg = np.asarray(self.background if self.background is not None else (0.0, 0.0, 0.0), np.float32)
            return rgb * alpha + bg * (1.0 - alpha)
        return pix.astype(np.float32) / 255.0

    def mask(self, t: int, cam: Camera | int) -> np.ndarray | None:
        """bool [H, W] foreground mask, or None when this camera has none."""
        cam = self.camera(cam)
        if self._mask_from_alpha:
            pix = self._read_image(t, cam)
            return pix[..., 3] >= 128 if pix.shape[2] == 4 else None
        path = self.mask_path(t, cam)
        if path is None:
            return None
        key = ("mask", t, cam.id)
        if key not in self._cache:
            self._store(key, self._load_mask(path, t, cam))
        self._cache.move_to_end(key)
        return self._cache[key].copy()

    def has_masks(self) -> bool:
        """True when every training camera has a mask at frame 0."""
        return bool(self.train_cameras) and all(
            self._mask_from_alpha or self.mask_path(0, c) is not None for c in self.train_cameras
        )

    def init_points(self) -> np.ndarray | None:
        """float32 [N, 7] (xyz, rgb in [0, 1], seg) shipped with the data, or None."""
        pts = self._init_points() if callable(self._init_points) else self._init_points
        return None if pts is None else np.asarray(pts, dtype=np.float32).copy()

    def check_files(self, frames: list[int] | None = None) -> None:
        """Open the headers of the images and masks of the given frames (default: the first) and check
        that they exist and have the expected size. Raises DataError naming the first bad file."""
        for t in frames if frames is not None else [0]:
            for cam in self.cameras:
                expected = self._file_sizes.get(cam.id, cam.size)
                path = self.image_path(t, cam)
                size = _header_size(path)
                if size != expected:
                    raise DataError(path, f"image is {size[0]}x{size[1]}, expected {expected[0]}x{expected[1]}")
                mpath = self.mask_path(t, cam)
                if mpath is not None:
                    msize = _header_size(mpath)
                    if msize != size:
                        raise DataError(
                            mpath, f"mask is {msize[0]}x{msize[1]} but its image {path.name} is {size[0]}x{size[1]}"
                        )

    # ------------------------------------------------------------------ internals
    def _check_t(self, t: int) -> None:
        if not 0 <= int(t) < self.n_frames:
            raise IndexError(f"frame {t} out of range: the sequence has {self.n_frames} frame(s)")

    def _store(self, key, value) -> None:
        self._cache[key] = value
        while len(self._cache) > max(self.cache_size, 1):
            self._cache.popitem(last=False)

    def _read_image(self, t: int, cam: Camera) -> np.ndarray:
        """uint8 [H, W, 3 or 4] at the camera's (possibly downscaled) size, cached."""
        key = ("image", t, cam.id)
        if key not in self._cache:
            path = self.image_path(t, cam)
            img = _open(path)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
            else:
                img = img.convert("RGB")
            expected = self._file_sizes.get(cam.id, cam.size)
            if img.size != expected:
                raise DataError(path, f"image is {img.size[0]}x{img.size[1]}, expected {expected[0]}x{expected[1]}")
            if img.size != cam.size:
                img = img.resize(cam.size, Image.Resampling.BOX)  # area average for any ratio
            self._store(key, np.asarray(img))
        self._cache.move_to_end(key)
        return self._cache[key]

    def _load_mask(self, path: Path, t: int, cam: Camera) -> np.ndarray:
        img = _open(path)
        expected = self._file_sizes.get(cam.id, cam.size)
        if img.size != expected:
            raise DataError(
                path,
                f"mask is {img.size[0]}x{img.size[1]} but its image {self.image_path(t, cam).name} "
                f"is {expected[0]}x{expected[1]}",
            )
        mask = read_mask_array(img)
        if img.size != cam.size:
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize(cam.size, Image.Resampling.BOX)
            mask = np.asarray(small) >= 128
        return mask

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}" if self.width else "mixed sizes"
        return (
            f"Sequence({self.format}, {self.path}, {len(self.train_cameras)} train + "
            f"{len(self.test_cameras)} test cameras, {self.n_frames} frame(s), {size})"
        )


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(path, f"cannot read image ({exc})") from None


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(path, f"cannot read image ({exc})") from None


def split_every(cameras: list[Camera], test_every: int | None) -> tuple[list[Camera], list[Camera]]:
    """LLFF-style split: cameras whose source index % test_every == 0 are test cameras."""
    if not test_every:
        return list(cameras), []
    train = [c for i, c in enumerate(cameras) if i % test_every != 0]
    test = [c for i, c in enumerate(cameras) if i % test_every == 0]
    if not train:
        warnings.warn("test_every leaves no training camera; using all cameras for training", stacklevel=3)
        return list(cameras), []
    return train, test


def single_frame_sequence(path: Path, format: str, cameras: list[Camera], files: dict[int, Path], options,
                          source: Path, init_points: np.ndarray | None = None) -> Sequence:
    """A one-frame `Sequence` of the images `files` (camera id -> path) from the still-scene readers (COLMAP,
    LLFF, Middlebury): split by `options.test_every`, cameras selected and downscaled as `options` say
    (a `LoadOptions`); `source` is the file named in errors."""
    train, test = split_every(cameras, options.test_every)
    resolve_frames(options.frames, 1, source)
    train, test, native = select_and_scale(train, test, options.cameras, options.downscale, source)
    return Sequence(
        path=path,
        format=format,
        train_cameras=train,
        test_cameras=test,
        source_frames=[0],
        image_path=lambda t, cam_id: files[cam_id],
        file_sizes=native,
        background=parse_background(options.background),
        init_points=init_points,
        cache_size=options.cache_size,
    )
