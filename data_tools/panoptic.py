"""Dynamic 3D Gaussians / CMU Panoptic layout.

    train_meta.json, test_meta.json   w, h, k[T][C], w2c[T][C], fn[T][C], cam_id[T][C] (+ background)
    ims/<fn>                          images
    seg/<fn with .png>                foreground masks (1-bit or 0/1 or 0/255), optional per camera
    init_pt_cld.npz                   optional, key "data": float32 [N, 7] xyz, rgb, seg
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ._common import read_json, require_file, select_and_scale
from .cameras import Camera, make_camera
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence, parse_background, resolve_frames

META_KEYS = ("k", "w2c", "fn", "cam_id")


def is_panoptic(path: Path) -> bool:
    return (path / "train_meta.json").is_file()


def _read_meta(path: Path) -> dict:
    meta = read_json(path)
    for key in ("w", "h", *META_KEYS):
        if key not in meta:
            raise DataError(path, f"missing key '{key}'")
    n_t = len(meta["fn"])
    if n_t == 0:
        raise DataError(path, "'fn' lists no frames")
    for key in META_KEYS:
        if len(meta[key]) != n_t:
            raise DataError(path, f"'{key}' has {len(meta[key])} frames but 'fn' has {n_t}")
        for t, row in enumerate(meta[key]):
            if len(row) != len(meta["fn"][0]):
                raise DataError(
                    path, f"'{key}'[{t}] lists {len(row)} cameras but 'fn'[0] lists {len(meta['fn'][0])}"
                )
    for t in range(n_t):
        if list(meta["cam_id"][t]) != list(meta["cam_id"][0]):
            raise DataError(path, f"camera order changes at frame {t} ('cam_id'[{t}] != 'cam_id'[0])")
    return meta


def _cameras(meta: dict, t: int, source: Path) -> list[Camera]:
    w, h = int(meta["w"]), int(meta["h"])
    return [
        make_camera(cid, meta["k"][t][c], meta["w2c"][t][c], w, h, source, f"frame {t} camera {cid}")
        for c, cid in enumerate(meta["cam_id"][t])
    ]


def load_panoptic(path: Path, options: LoadOptions) -> Sequence:
    train_file = path / "train_meta.json"
    test_file = path / "test_meta.json"
    train_meta = _read_meta(train_file)
    test_meta = _read_meta(test_file) if test_file.exists() else None
    n_source = len(train_meta["fn"])
    if test_meta is not None and len(test_meta["fn"]) != n_source:
        raise DataError(
            test_file, f"lists {len(test_meta['fn'])} frames but {train_file.name} lists {n_source}"
        )
    source_frames = resolve_frames(options.frames, n_source, train_file)

    metas = [(train_file, train_meta)] + ([(test_file, test_meta)] if test_meta else [])
    t0 = source_frames[0]
    cams_by_split = []
    for file, meta in metas:
        cams = _cameras(meta, t0, file)
        # The layout repeats static cameras per frame; a Sequence has fixed cameras, so check that.
        for t in source_frames[1:]:
            if not (np.allclose(meta["k"][t], meta["k"][t0]) and np.allclose(meta["w2c"][t], meta["w2c"][t0])):
                warnings.warn(f"{file}: cameras move at frame {t}; using those of frame {t0}", stacklevel=3)
                break
        cams_by_split.append(cams)
    train, test = cams_by_split[0], (cams_by_split[1] if len(cams_by_split) > 1 else [])
    train, test, native = select_and_scale(train, test, options.cameras, options.downscale, path)

    # fn lookup by (sequence frame, camera id); every listed image must exist.
    fn: dict[tuple[int, int], str] = {}
    for file, meta in metas:
        col = {cid: c for c, cid in enumerate(meta["cam_id"][0])}
        for cam in train + test:
            if cam.id not in col:
                continue
            for t, src_t in enumerate(source_frames):
                name = meta["fn"][src_t][col[cam.id]]
                if not (path / "ims" / name).is_file():
                    raise DataError(
                        path / "ims" / name,
                        f"image listed in {file.name} (frame {src_t}, camera {cam.id}) not found",
                    )
                fn[(t, cam.id)] = name

    # A camera has masks when the seg file of its first frame exists; then every frame must have one.
    masked: set[int] = set()
    for cam in train + test:
        if (path / "seg" / _seg_name(fn[(0, cam.id)])).is_file():
            masked.add(cam.id)
            for t in range(len(source_frames)):
                require_file(path / "seg" / _seg_name(fn[(t, cam.id)]), "mask")

    def image_path(t: int, cam_id: int) -> Path:
        return path / "ims" / fn[(t, cam_id)]

    def mask_path(t: int, cam_id: int) -> Path | None:
        return path / "seg" / _seg_name(fn[(t, cam_id)]) if cam_id in masked else None

    bg = parse_background(options.background) if options.background is not None else None
    if bg is None and "background" in train_meta:
        try:
            bg = parse_background(train_meta["background"])
        except ValueError as exc:
            raise DataError(train_file, f"bad 'background': {exc}") from None

    def init_points() -> np.ndarray | None:
        file = path / "init_pt_cld.npz"
        return read_init_points(file) if file.is_file() else None

    seq = Sequence(
        path=path,
        format="panoptic",
        train_cameras=train,
        test_cameras=test,
        source_frames=source_frames,
        image_path=image_path,
        mask_path=mask_path,
        file_sizes=native,
        background=bg,
        init_points=init_points,
        cache_size=options.cache_size,
    )
    seq.meta = train_meta  # extra keys (e.g. "synth") for callers that want them
    return seq


def _seg_name(fn: str) -> str:
    return str(Path(fn).with_suffix(".png"))


def read_init_points(file: Path) -> np.ndarray:
    """float32 [N, 7] from an ``init_pt_cld.npz`` (key ``data``)."""
    try:
        with np.load(file) as npz:
            if "data" not in npz:
                raise DataError(file, f"missing array 'data' (has {list(npz.keys())})")
            data = np.asarray(npz["data"], dtype=np.float32)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(file, f"cannot read ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 7:
        raise DataError(file, f"'data' must be [N, 7] (xyz, rgb, seg), got shape {list(data.shape)}")
    return data


FORMAT = DatasetFormat(
    name="panoptic",
    detect=is_panoptic,
    detect_file=lambda name: name in ("train_meta.json", "test_meta.json"),
    load=load_panoptic,
    expects="train_meta.json (Panoptic)",
)
