"""Writing the Panoptic (Dynamic 3D Gaussians) layout, atomically.

Everything is written under a sibling temporary folder ``DST.tmp-<random>`` that is renamed to
``DST`` only at the end, so an interrupted command never leaves a dataset that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .sequence import Sequence


def is_writable_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder we may write into.

    Besides ``os.access`` this honours the permission bits even for root (which ``os.access``
    ignores), so read-only shared data with mode r-x is never written to.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK) and bool(mode & 0o222)


def _default_mode(mode: int) -> int:
    """``mode`` filtered by the process umask (mkdtemp/mkstemp create private 0700/0600 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _check_writable(folder: Path) -> None:
    if not is_writable_dir(folder):
        raise DataError(folder, "is not writable")


@contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``dst`` when the block exits normally.

    Raises:
        DataError: when ``dst`` exists and is not an empty folder (and ``overwrite`` is False), or its
            parent cannot be written.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(dst, "already exists and is not empty; choose another output or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _check_writable(dst.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".tmp-", dir=dst.parent))
    except OSError as exc:
        raise DataError(dst.parent, f"cannot write here ({exc.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))
        if dst.exists():
            old = dst.with_name(dst.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
            os.replace(dst, old)
            os.replace(tmp, dst)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    _check_writable(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    except OSError as exc:
        raise DataError(path.parent, f"cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def npz_bytes(**arrays) -> bytes:
    """The bytes of ``np.savez(file, **arrays)``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_npz_atomic(path: str | Path, **arrays) -> None:
    atomic_write_bytes(path, npz_bytes(**arrays))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8, rounded."""
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def save_mask_png(path: Path, mask: np.ndarray) -> None:
    """A 1-bit PNG whose foreground reads as 1 (what the original code expects)."""
    Image.fromarray(np.asarray(mask, dtype=bool)).convert("1").save(path, optimize=False)


def panoptic_meta(
    cams, n_t: int, fn_ext: str, width: int, height: int, background=None, extra: dict | None = None
) -> dict:
    """The train/test_meta.json dict for static ``cams`` over ``n_t`` frames (fn ``<id>/<t:06d>.<ext>``)."""
    meta = {
        "w": int(width),
        "h": int(height),
        "k": [[c.K.tolist() for c in cams] for _ in range(n_t)],
        "w2c": [[c.w2c.tolist() for c in cams] for _ in range(n_t)],
        "fn": [[f"{c.id}/{t:06d}.{fn_ext}" for c in cams] for t in range(n_t)],
        "cam_id": [[c.id for c in cams] for _ in range(n_t)],
    }
    if background is not None:
        meta["background"] = [float(v) for v in background]
    if extra:
        meta.update(extra)
    return meta


def write_panoptic(
    seq: Sequence,
    dst: str | Path,
    *,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    init_points: np.ndarray | None = None,
    train_extra: dict | None = None,
    overwrite: bool = False,
    progress: bool = False,
    finalize=None,
) -> Path:
    """Write ``seq`` in the Panoptic layout (train_meta.json, test_meta.json, ims/, seg/, init_pt_cld.npz).

    Frames are renumbered 0..n_frames-1; file names are ``<cam_id>/<t:06d>.<ext>``; masks are written
    for every camera that has one. ``init_points`` (float32 [N, 7]) defaults to the sequence's own.
    ``train_extra`` adds keys to train_meta.json. ``finalize(tmp_dir)`` may add files before the
    rename (used by :func:`data_tools.make_synthetic_scene`).

    Raises:
        DataError: when cameras have different sizes (the layout has one w, h), on unreadable input,
            or when ``dst`` exists and is not empty.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if seq.width is None or seq.height is None:
        raise DataError(seq.path, "cameras have different image sizes; the Panoptic layout needs one size")
    dst = Path(dst)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        jobs = [(t, c) for t in range(seq.n_frames) for c in seq.cameras]
        for t, cam in tqdm(jobs, desc=f"writing {dst.name}", unit="img", disable=not progress):
            rel = Path(str(cam.id)) / f"{t:06d}.{image_format}"
            (tmp / "ims" / rel.parent).mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(to_uint8(seq.image(t, cam)))
            if image_format == "jpg":
                img.save(tmp / "ims" / rel, quality=jpeg_quality)
            else:
                img.save(tmp / "ims" / rel)
            mask = seq.mask(t, cam)
            if mask is not None:
                (tmp / "seg" / rel.parent).mkdir(parents=True, exist_ok=True)
                save_mask_png(tmp / "seg" / rel.with_suffix(".png"), mask)
        for name, cams, extra in (
            ("train_meta.json", seq.train_cameras, train_extra),
            ("test_meta.json", seq.test_cameras, None),
        ):
            meta = panoptic_meta(cams, seq.n_frames, image_format, seq.width, seq.height, seq.background, extra)
            (tmp / name).write_text(json.dumps(meta))
        pts = seq.init_points() if init_points is None else init_points
        if pts is not None:
            np.savez(tmp / "init_pt_cld.npz", data=np.asarray(pts, dtype=np.float32))
        if finalize is not None:
            finalize(tmp)
    return dst
