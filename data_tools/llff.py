"""LLFF ``poses_bounds.npy``: per image 17 numbers, a 3x5 matrix then near and far depth bounds.

The 3x5 matrix is ``[down | right | back | centre | (H, W, f)]`` in camera-to-world, so the OpenCV
rotation (columns right, down, forward) is ``[right, down, -back]``. Images come from ``images/``
or, if absent, from the first ``images_*`` folder; f is scaled by (actual width / W) and the
principal point is the image centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import list_images
from .cameras import Camera, check_intrinsics, check_rigid, rigid_inverse
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence, _header_size, single_frame_sequence


def is_llff(path: Path) -> bool:
    return (path / "poses_bounds.npy").is_file()


def _images_dir(path: Path) -> Path:
    if (path / "images").is_dir():
        return path / "images"
    cands = sorted(p for p in path.glob("images*") if p.is_dir())
    if not cands:
        raise DataError(path, "poses_bounds.npy found but no images* folder")
    return cands[0]


def load_llff(path: Path, options: LoadOptions) -> Sequence:
    file = path / "poses_bounds.npy"
    try:
        arr = np.load(file)
    except (OSError, ValueError) as exc:
        raise DataError(file, f"cannot read ({exc})") from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DataError(file, f"expected an [N, 17] array, got shape {list(arr.shape)}")
    images_dir = _images_dir(path)
    names = list_images(images_dir)
    if len(names) != len(arr):
        raise DataError(images_dir, f"holds {len(names)} images but {file.name} has {len(arr)} poses")
    poses = arr[:, :15].reshape(-1, 3, 5).astype(np.float64)
    self_bounds = arr[:, 15:17]
    cams, files = [], {}
    for i, (pose, img) in enumerate(zip(poses, names)):
        H, W, f = pose[:, 4]
        w, h = _header_size(img)
        scale = w / W
        if abs(h - H * scale) > 1.0:
            raise DataError(img, f"image is {w}x{h}, which is not {W:g}x{H:g} scaled uniformly")
        c2w = np.eye(4)
        c2w[:3, 0] = pose[:, 1]  # right
        c2w[:3, 1] = pose[:, 0]  # down
        c2w[:3, 2] = -pose[:, 2]  # forward = -back
        c2w[:3, 3] = pose[:, 3]
        c2w = check_rigid(c2w, file, f"pose {i}")
        K = check_intrinsics([[f * scale, 0, w / 2], [0, f * scale, h / 2], [0, 0, 1]], file, f"pose {i} focal")
        cams.append(Camera(i, K, rigid_inverse(c2w), w, h))
        files[i] = img
    seq = single_frame_sequence(path, "llff", cams, files, options, path)
    seq.meta = {"bounds": self_bounds.tolist()}
    return seq


FORMAT = DatasetFormat(
    name="llff",
    detect=is_llff,
    detect_file=lambda name: name == "poses_bounds.npy",
    load=load_llff,
    expects="poses_bounds.npy (LLFF)",
)
