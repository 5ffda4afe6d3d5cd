"""COLMAP sparse models (text or binary): ``cameras``, ``images``, ``points3D``.

Layouts found: ``DIR/sparse/0/``, ``DIR/sparse/`` or the model folder itself, with the images in
``DIR/images/``. COLMAP puts pixel centres at +0.5 like us, so K is used as-is. Radial distortion
parameters are ignored with a warning (undistort with ``colmap image_undistorter`` for exact results).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from .cameras import make_camera
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence, _header_size, single_frame_sequence

# model id -> (name, number of parameters)
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
}
_MODEL_IDS = {name: (mid, n) for mid, (name, n) in CAMERA_MODELS.items()}
# Models whose distortion can be ignored (perspective with small radial/tangential terms).
_RADIAL = {"SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"}


def find_model_dir(path: Path) -> Path | None:
    """The folder holding cameras.{bin,txt}: ``path``, ``path/sparse/0`` or ``path/sparse``."""
    for cand in (path, path / "sparse" / "0", path / "sparse"):
        if (cand / "cameras.bin").is_file() or (cand / "cameras.txt").is_file():
            return cand
    return None


def _find_images_dir(root: Path, model: Path) -> Path:
    for cand in (root / "images", model / "images", model.parent / "images", model.parent.parent / "images"):
        if cand.is_dir():
            return cand
    raise DataError(root, "COLMAP model found but no 'images' folder beside it")


def _intrinsics(model: str, params: list[float], source: Path, cam_id: int) -> np.ndarray:
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        f, cx, cy = params[:3]
        fx = fy = f
    elif model in ("PINHOLE", "OPENCV", "FULL_OPENCV"):
        fx, fy, cx, cy = params[:4]
    else:
        raise DataError(
            source, f"camera {cam_id}: model {model} is not supported (undistort the images to PINHOLE first)"
        )
    if model in _RADIAL:
        n_pin = 3 if model.startswith("SIMPLE") or model == "RADIAL" else 4
        dist = params[n_pin:]
        if any(abs(d) > 0 for d in dist):
            warnings.warn(
                f"{source}: camera {cam_id} is {model} with distortion {dist}; distortion is ignored "
                "(undistort the images for exact geometry)",
                stacklevel=4,
            )
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def qvec_to_rotmat(q) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation (the COLMAP/Hamilton convention)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


# ----------------------------------------------------------------------------- text
def _data_lines(file: Path) -> list[str]:
    try:
        return [ln for ln in file.read_text().splitlines() if not ln.startswith("#")]
    except OSError as exc:
        raise DataError(file, f"cannot read ({exc.strerror})") from None


def _read_cameras_txt(file: Path) -> dict[int, tuple[str, int, int, list[float]]]:
    out = {}
    for line in _data_lines(file):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cam_id, model, w, h = int(parts[0]), parts[1], int(parts[2]), int(parts[3])
            params = [float(p) for p in parts[4:]]
        except (ValueError, IndexError):
            raise DataError(file, f"bad camera line {line!r}") from None
        if model not in _MODEL_IDS:
            raise DataError(file, f"unknown camera model {model!r}")
        if len(params) != _MODEL_IDS[model][1]:
            n_needed = _MODEL_IDS[model][1]
            raise DataError(file, f"camera {cam_id}: {model} needs {n_needed} parameters, got {len(params)}")
        out[cam_id] = (model, w, h, params)
    return out


def _read_images_txt(file: Path) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    lines = _data_lines(file)
    out, i = [], 0
    # Two lines per image: the pose line, then the 2D points line (which may be empty).
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        parts = lines[i].split()
        try:
            q = [float(v) for v in parts[1:5]]
            tvec = [float(v) for v in parts[5:8]]
            cam_id = int(parts[8])
            name = " ".join(parts[9:])
        except (ValueError, IndexError):
            raise DataError(file, f"bad image line {lines[i]!r}") from None
        if not name:
            raise DataError(file, f"image line without a name: {lines[i]!r}")
        out.append((name, np.array(q), np.array(tvec), cam_id))
        i += 2
    return out


def _read_points_txt(file: Path) -> np.ndarray:
    rows = []
    for line in _data_lines(file):
        parts = line.split()
        if len(parts) < 8:
            continue
        rows.append([float(v) for v in parts[1:7]])
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


# ----------------------------------------------------------------------------- binary
class _Reader:
    def __init__(self, file: Path):
        self.file = file
        try:
            self.buf = file.read_bytes()
        except OSError as exc:
            raise DataError(file, f"cannot read ({exc.strerror})") from None
        self.pos = 0

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise DataError(self.file, "truncated binary file")
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return vals

    def skip(self, n_bytes: int):
        if self.pos + n_bytes > len(self.buf):
            raise DataError(self.file, "truncated binary file")
        self.pos += n_bytes

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise DataError(self.file, "truncated binary file (unterminated image name)")
        s = self.buf[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return s


def _read_cameras_bin(file: Path) -> dict[int, tuple[str, int, int, list[float]]]:
    r = _Reader(file)
    (n,) = r.read("Q")
    out = {}
    for _ in range(n):
        cam_id, model_id, w, h = r.read("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise DataError(file, f"camera {cam_id}: unknown model id {model_id}")
        model, n_params = CAMERA_MODELS[model_id]
        out[cam_id] = (model, w, h, list(r.read("d" * n_params)))
    return out


def _read_images_bin(file: Path) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    r = _Reader(file)
    (n,) = r.read("Q")
    out = []
    for _ in range(n):
        vals = r.read("I7dI")
        name = r.cstring()
        (n_pts,) = r.read("Q")
        r.skip(24 * n_pts)  # x, y (double) and point3D id (int64) per 2D point
        out.append((name, np.array(vals[1:5]), np.array(vals[5:8]), vals[8]))
    return out


def _read_points_bin(file: Path) -> np.ndarray:
    r = _Reader(file)
    (n,) = r.read("Q")
    rows = np.empty((n, 6))
    for i in range(n):
        vals = r.read("Q3d3BdQ")
        rows[i, :3] = vals[1:4]
        rows[i, 3:] = vals[4:7]
        r.skip(8 * vals[8])  # track: (image id int32, point2D index int32) pairs
    return rows


def read_model(model_dir: Path):
    """(cameras, images, points) of a COLMAP model; binary preferred when both exist.

    cameras: {camera_id: (model, width, height, params)}; images: [(name, qvec, tvec, camera_id)];
    points: float64 [N, 6] xyz and rgb in 0..255, or None when points3D is absent.
    """
    if (model_dir / "cameras.bin").is_file():
        ext, rc, ri, rp = "bin", _read_cameras_bin, _read_images_bin, _read_points_bin
    else:
        ext, rc, ri, rp = "txt", _read_cameras_txt, _read_images_txt, _read_points_txt
    images_file = model_dir / f"images.{ext}"
    if not images_file.is_file():
        raise DataError(images_file, "file not found (a COLMAP model needs cameras, images and points3D)")
    cams = rc(model_dir / f"cameras.{ext}")
    images = ri(images_file)
    pts_file = model_dir / f"points3D.{ext}"
    points = rp(pts_file) if pts_file.is_file() else None
    return cams, images, points


def load_colmap(path: Path, options: LoadOptions) -> Sequence:
    model_dir = find_model_dir(path)
    if model_dir is None:
        raise DataError(path, "no COLMAP model (cameras.bin/.txt) found")
    images_dir = _find_images_dir(path, model_dir)
    intr, images, points = read_model(model_dir)
    ext = "bin" if (model_dir / "cameras.bin").is_file() else "txt"
    images_file = model_dir / f"images.{ext}"
    if not images:
        raise DataError(images_file, "lists no images")
    cams, files = [], {}
    for i, (name, q, tvec, cam_id) in enumerate(sorted(images, key=lambda im: im[0])):
        if cam_id not in intr:
            raise DataError(images_file, f"image {name} uses camera {cam_id}, which cameras.{ext} does not define")
        model, w, h, params = intr[cam_id]
        K = _intrinsics(model, params, model_dir / f"cameras.{ext}", cam_id)
        file = images_dir / name
        if not file.is_file():
            raise DataError(file, f"image listed in {images_file.name} not found")
        fw, fh = _header_size(file)
        if (fw, fh) != (w, h):
            raise DataError(file, f"image is {fw}x{fh} but camera {cam_id} in cameras.{ext} is {w}x{h}")
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = qvec_to_rotmat(q), tvec
        cams.append(make_camera(i, K, w2c, w, h, images_file, f"image {name}"))
        files[i] = file
    init = None
    if points is not None and len(points):
        init = np.concatenate(
            [points[:, :3], points[:, 3:6] / 255.0, np.zeros((len(points), 1))], axis=1
        ).astype(np.float32)  # a static reconstruction: everything is background (seg = 0)
    return single_frame_sequence(path, "colmap", cams, files, options, path, init_points=init)


FORMAT = DatasetFormat(
    name="colmap",
    detect=lambda path: find_model_dir(path) is not None,
    detect_file=lambda name: name in ("cameras.bin", "cameras.txt"),
    load=load_colmap,
    expects="sparse/ or cameras.bin/.txt (COLMAP)",
)
