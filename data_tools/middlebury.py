"""Middlebury multi-view stereo ``*_par.txt``: first line the image count, then per image
``name k11..k33 r11..r33 t1 t2 t3`` with ``x ~ K (R X + t)`` (OpenCV convention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cameras import make_camera
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence, _header_size, single_frame_sequence


def find_par_file(path: Path) -> Path | None:
    """The ``*_par.txt`` file of a Middlebury dataset given as the file or its folder."""
    if path.is_file():
        return path if path.name.endswith("_par.txt") else None
    pars = sorted(path.glob("*_par.txt"))
    if len(pars) > 1:
        raise DataError(path, f"holds several Middlebury parameter files ({', '.join(p.name for p in pars)}); pass one")
    return pars[0] if pars else None


def parse_par_file(par: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(image name, K [3,3], R [3,3], t [3])] in file order."""
    try:
        lines = [ln.split() for ln in par.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise DataError(par, f"cannot read ({exc.strerror})") from None
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise DataError(par, "first line must be the image count")
    count = int(lines[0][0])
    rows = lines[1:]
    if len(rows) != count:
        raise DataError(par, f"first line says {count} images but {len(rows)} camera lines follow")
    out = []
    for i, row in enumerate(rows, start=2):
        if len(row) != 22:
            raise DataError(par, f"line {i}: expected 'name' and 21 numbers, got {len(row)} fields")
        try:
            vals = np.array([float(v) for v in row[1:]])
        except ValueError:
            raise DataError(par, f"line {i}: non-numeric camera parameter") from None
        out.append((row[0], vals[:9].reshape(3, 3), vals[9:18].reshape(3, 3), vals[18:21]))
    return out


def load_middlebury(path: Path, options: LoadOptions) -> Sequence:
    par = find_par_file(path)
    if par is None:
        raise DataError(path, "no *_par.txt file")
    root = par.parent
    cams, files = [], {}
    for i, (name, K, R, t) in enumerate(parse_par_file(par)):
        file = root / name
        if not file.is_file():
            raise DataError(file, f"image listed in {par.name} not found")
        w, h = _header_size(file)
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R, t
        cams.append(make_camera(i, K, w2c, w, h, par, f"image {name}"))
        files[i] = file
    return single_frame_sequence(path, "middlebury", cams, files, options, par)


FORMAT = DatasetFormat(
    name="middlebury",
    detect=lambda path: find_par_file(path) is not None,
    detect_file=lambda name: name.endswith("_par.txt"),
    load=load_middlebury,
    expects="*_par.txt (Middlebury)",
    loads_file=True,
)
