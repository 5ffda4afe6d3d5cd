"""Blender / NeRF-synthetic layout: ``transforms_{train,test}.json`` with RGBA images.

Each frame's ``transform_matrix`` is camera-to-world in OpenGL axes (x right, y up, z backward);
the focal length is ``0.5 W / tan(0.5 camera_angle_x)`` unless ``fl_x``/``fl_y`` are given
(instant-ngp style), and the principal point is the image centre unless ``cx``/``cy`` are given.
Alpha is the foreground mask; RGB is composited onto the chosen background colour.
"""

from __future__ import annotations

import math
from pathlib import Path

from ._common import IMAGE_SUFFIXES, read_json, select_and_scale
from .cameras import Camera, check_intrinsics, opengl_c2w_to_w2c
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .sequence import Sequence, _header_size, parse_background, resolve_frames, split_every

SPLITS = ("train", "test")


def is_blender(path: Path) -> bool:
    return (path / "transforms_train.json").is_file() or (path / "transforms.json").is_file()


def _image_file(root: Path, file_path: str, source: Path) -> Path:
    base = root / file_path
    if base.suffix.lower() in IMAGE_SUFFIXES and base.is_file():
        return base
    for suffix in (".png", ".jpg", ".jpeg"):
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    raise DataError(base, f"image listed in {source.name} not found")


def _split_cameras(path: Path, json_file: Path, first_id: int) -> tuple[list[Camera], dict[int, Path]]:
    meta = read_json(json_file)
    if "frames" not in meta or not isinstance(meta["frames"], list):
        raise DataError(json_file, "missing list 'frames'")
    cams, files = [], {}
    for i, frame in enumerate(meta["frames"]):
        if "file_path" not in frame or "transform_matrix" not in frame:
            raise DataError(json_file, f"frames[{i}] lacks 'file_path' or 'transform_matrix'")
        file = _image_file(path, frame["file_path"], json_file)
        w, h = _header_size(file)
        w = int(frame.get("w", meta.get("w", w)))
        h = int(frame.get("h", meta.get("h", h)))
        fx = frame.get("fl_x", meta.get("fl_x"))
        if fx is None:
            angle = frame.get("camera_angle_x", meta.get("camera_angle_x"))
            if angle is None:
                raise DataError(json_file, "neither 'camera_angle_x' nor 'fl_x' is given")
            fx = 0.5 * w / math.tan(0.5 * float(angle))
        fy = frame.get("fl_y", meta.get("fl_y"))
        if fy is None:
            angle_y = frame.get("camera_angle_y", meta.get("camera_angle_y"))
            fy = 0.5 * h / math.tan(0.5 * float(angle_y)) if angle_y is not None else fx
        cx = float(frame.get("cx", meta.get("cx", w / 2)))
        cy = float(frame.get("cy", meta.get("cy", h / 2)))
        K = check_intrinsics([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], json_file, f"frames[{i}] intrinsics")
        w2c = opengl_c2w_to_w2c(frame["transform_matrix"], json_file, f"frames[{i}].transform_matrix")
        cam_id = first_id + i
        cams.append(Camera(cam_id, K, w2c, w, h))
        files[cam_id] = file
    return cams, files


def load_blender(path: Path, options: LoadOptions) -> Sequence:
    # Ids number the cameras of train then test in file order, so they are unique across splits.
    files: dict[int, Path] = {}
    splits: dict[str, list[Camera]] = {}
    if (path / "transforms_train.json").is_file():
        next_id = 0
        for split in SPLITS:
            json_file = path / f"transforms_{split}.json"
            if split == "test" and not json_file.exists():
                splits[split] = []
                continue
            cams, f = _split_cameras(path, json_file, next_id)
            splits[split] = cams
            files.update(f)
            next_id += len(cams)
        train, test = splits["train"], splits["test"]
    else:  # a single transforms.json (no split): hold out every test_every-th camera
        cams, files = _split_cameras(path, path / "transforms.json", 0)
        train, test = split_every(cams, options.test_every)
    resolve_frames(options.frames, 1, path)
    train, test, native = select_and_scale(train, test, options.cameras, options.downscale, path)
    bg = parse_background(options.background if options.background is not None else "white")
    return Sequence(
        path=path,
        format="blender",
        train_cameras=train,
        test_cameras=test,
        source_frames=[0],
        image_path=lambda t, cam_id: files[cam_id],
        mask_path=None,
        mask_from_alpha=True,
        file_sizes=native,
        background=bg,
        init_points=None,
        cache_size=options.cache_size,
    )


FORMAT = DatasetFormat(
    name="blender",
    detect=is_blender,
    detect_file=lambda name: name.startswith("transforms") and name.endswith(".json"),
    load=load_blender,
    expects="transforms_*.json (Blender)",
    default_background="white",
)
