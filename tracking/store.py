"""The resumable run store: ``OUT/run.h5`` plus one ``OUT/frames/NNNNNN.h5`` per completed frame.

``run.h5`` (written once, when t = 0 completes): the config, the data it was fitted on, the
cameras, all t = 0 parameters, the foreground mask and neighbour graph used by the rigidity losses.

``frames/NNNNNN.h5`` (one per completed frame t, including t = 0): the raw parameters that change
per frame (means, unnormalised quaternions, rgb colours), the Adam state that carries over (the
colours' moments, and every group's step counter), the loss/PSNR curves and the timings.

The number of Gaussians may grow (`TrackingConfig.spawn_new`): Gaussians are only ever appended, so
frame t holds the N_t Gaussians alive at t, rows 0..N_t - 1 of the run's numbering. ``birth_frame``
[N_t] int64 says at which frame each was born (0: from t = 0; absent in runs written before it
existed, read as zeros), and a frame at which Gaussians were born has a group ``born`` with their fixed
parameters (log_scales [M, 3], logit_opacities [M, 1], seg [M, 3]) and their rigidity neighbours
(nb_indices [M, K] into the foreground subset of the N_t Gaussians, nb_weights, nb_distances [M, K]).

Every file is written to a temporary name in the same folder, flushed and fsynced, then renamed with
`os.replace` (atomic on POSIX), and the folder is fsynced: a frame file exists completely or not at
all, whenever the process is killed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .config import TrackingConfig
from .errors import StorageError, fault_at

FORMAT_VERSION = 1
RUN_FILE = "run.h5"
FRAMES_DIR = "frames"
# Files and folders a run owns in OUT (removed by --overwrite; OUT/data of the demo is never touched).
RUN_OUTPUTS = (RUN_FILE, FRAMES_DIR, "metrics.json", "config.json", "plots", "export", "renders",
               "init_pt_cld.npz")


@dataclass
class DataSpec:
    """Which data a run was fitted on: enough for `eval OUT` to reload it."""

    path: str
    format: str
    downscale: float
    source_frames: list[int]

    def identity(self) -> dict:
        """What must match to resume (the frame list is checked frame by frame: it may grow)."""
        return {"path": str(Path(self.path).resolve()), "downscale": float(self.downscale)}


@dataclass
class CameraRecord:
    """A camera as stored: id, K [3, 3], w2c [4, 4], width, height."""

    id: int
    K: np.ndarray
    w2c: np.ndarray
    width: int
    height: int

    def to_camera(self):
        from data_tools import Camera

        return Camera(self.id, self.K, self.w2c, self.width, self.height)

    @classmethod
    def from_camera(cls, cam) -> CameraRecord:
        return cls(int(cam.id), np.asarray(cam.K, np.float64), np.asarray(cam.w2c, np.float64), int(cam.width),
                   int(cam.height))


@dataclass
class FrameRecord:
    """What frame t leaves behind (arrays are numpy float32 unless stated).

    means [N, 3], quats [N, 4] (raw, unnormalised), rgb [N, 3];
    adam: {"rgb": {"exp_avg", "exp_avg_sq", "step"}, "means": {"step"}, "quats": {"step"}};
    curves: {"loss": [steps], "psnr": [steps], ...}; stats: scalar metrics (with "source_frame", the
    frame's index in the data source); seconds: wall time.
    birth_frame: int64 [N] (None: all 0); born: the fixed parameters and neighbours of the Gaussians born
    at this frame (see BORN_KEYS and the module docstring), None when none were.
    """

    t: int
    means: np.ndarray
    quats: np.ndarray
    rgb: np.ndarray
    adam: dict[str, dict[str, np.ndarray | int]]
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    birth_frame: np.ndarray | None = None
    born: dict[str, np.ndarray] | None = None

    def births(self) -> np.ndarray:
        """int64 [N]: the birth frame of each Gaussian (zeros when not stored)."""
        if self.birth_frame is None:
            return np.zeros(len(self.means), np.int64)
        return np.asarray(self.birth_frame, np.int64)


BORN_KEYS = ("log_scales", "logit_opacities", "seg", "nb_indices", "nb_weights", "nb_distances")


@dataclass
class RunRecord:
    """Contents of run.h5.

    params0: every parameter at t = 0 (see tracking.params), numpy float32.
    fg: bool [N]; neighbour_indices int64 [N_fg, K] (into the foreground subset); neighbour_weights,
    neighbour_distances float32 [N_fg, K].
    """

    config: TrackingConfig
    data: DataSpec
    train_cameras: list[CameraRecord]
    test_cameras: list[CameraRecord]
    scene_radius: float
    params0: dict[str, np.ndarray]
    fg: np.ndarray
    neighbour_indices: np.ndarray
    neighbour_weights: np.ndarray
    neighbour_distances: np.ndarray
    background: list[float] | None = None
    has_masks: bool = True
    extra: dict = field(default_factory=dict)


def frame_path(out_dir: str | Path, t: int) -> Path:
    return Path(out_dir) / FRAMES_DIR / f"{t:06d}.h5"


@contextmanager
def atomic_path(path: Path, t_fault: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it, rename it to `path` and fsync the
    folder. On any failure the temporary file is removed and `path` is untouched. A full disk or
    missing permission becomes a StorageError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if t_fault is not None:
            fault_at(t_fault, "write")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _unlink(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise StorageError(f"cannot write {path}: {os.strerror(exc.errno)}; completed frames are kept, "
                               "free space (or fix permissions) and run the same command to resume") from None
        raise
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_cameras(group: h5py.Group, cams: list[CameraRecord]) -> None:
    group.create_dataset("ids", data=np.array([c.id for c in cams], np.int64))
    group.create_dataset("K", data=np.array([c.K for c in cams], np.float64).reshape(-1, 3, 3))
    group.create_dataset("w2c", data=np.array([c.w2c for c in cams], np.float64).reshape(-1, 4, 4))
    group.create_dataset("size", data=np.array([[c.width, c.height] for c in cams], np.int64).reshape(-1, 2))


def _read_cameras(group: h5py.Group) -> list[CameraRecord]:
    ids, Ks, w2cs, sizes = group["ids"][()], group["K"][()], group["w2c"][()], group["size"][()]
    return [CameraRecord(int(i), K, w, int(s[0]), int(s[1])) for i, K, w, s in zip(ids, Ks, w2cs, sizes)]


def write_run(out_dir: str | Path, run: RunRecord) -> Path:
    """Write run.h5 atomically."""
    path = Path(out_dir) / RUN_FILE
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = run.config.to_json()
        f.attrs["data"] = json.dumps(run.data.__dict__)
        f.attrs["scene_radius"] = float(run.scene_radius)
        f.attrs["background"] = json.dumps(run.background)
        f.attrs["has_masks"] = bool(run.has_masks)
        f.attrs["extra"] = json.dumps(run.extra)
        _write_cameras(f.create_group("train_cameras"), run.train_cameras)
        _write_cameras(f.create_group("test_cameras"), run.test_cameras)
        g = f.create_group("params0")
        for k, v in run.params0.items():
            g.create_dataset(k, data=v)
        f.create_dataset("fg", data=run.fg.astype(bool))
        nb = f.create_group("neighbours")
        nb.create_dataset("indices", data=run.neighbour_indices.astype(np.int64))
        nb.create_dataset("weights", data=run.neighbour_weights)
        nb.create_dataset("distances", data=run.neighbour_distances)
    return path


def read_run(out_dir: str | Path) -> RunRecord:
    """Read run.h5 (raises FileNotFoundError when absent)."""
    path = Path(out_dir) / RUN_FILE
    with h5py.File(path, "r") as f:
        version = int(f.attrs.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: run format version {version}, this tritonsplat reads {FORMAT_VERSION}")
        data = DataSpec(**json.loads(f.attrs["data"]))
        nb = f["neighbours"]
        return RunRecord(
            config=TrackingConfig.from_json(f.attrs["config"]),
            data=data,
            train_cameras=_read_cameras(f["train_cameras"]),
            test_cameras=_read_cameras(f["test_cameras"]),
            scene_radius=float(f.attrs["scene_radius"]),
            params0={k: f["params0"][k][()] for k in f["params0"]},
            fg=f["fg"][()],
            neighbour_indices=nb["indices"][()],
            neighbour_weights=nb["weights"][()],
            neighbour_distances=nb["distances"][()],
            background=json.loads(f.attrs["background"]),
            has_masks=bool(f.attrs["has_masks"]),
            extra=json.loads(f.attrs["extra"]),
        )


def read_run_identity(out_dir: str | Path) -> tuple[dict, dict] | None:
    """(config identity, data identity) of OUT's run.h5, or None when absent or unreadable."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        config = TrackingConfig.from_json(f.attrs["config"])
        data = DataSpec(**json.loads(f.attrs["data"]))
    return config.identity(), data.identity()


def write_frame(out_dir: str | Path, rec: FrameRecord) -> Path:
    """Write frames/NNNNNN.h5 atomically (fault point "T:write" between write and rename)."""
    path = frame_path(out_dir, rec.t)
    with atomic_path(path, t_fault=rec.t) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["t"] = rec.t
            f.attrs["seconds"] = float(rec.seconds)
            f.attrs["stats"] = json.dumps(rec.stats)
            f.create_dataset("means", data=rec.means)
            f.create_dataset("quats", data=rec.quats)
            f.create_dataset("rgb", data=rec.rgb)
            f.create_dataset("birth_frame", data=rec.births())
            if rec.born is not None:
                born = f.create_group("born")
                for k in BORN_KEYS:
                    born.create_dataset(k, data=rec.born[k])
            adam = f.create_group("adam")
            for group_name, state in rec.adam.items():
                g = adam.create_group(group_name)
                for k, v in state.items():
                    g.create_dataset(k, data=v)
            curves = f.create_group("curves")
            for k, v in rec.curves.items():
                curves.create_dataset(k, data=np.asarray(v, np.float32))
    return path


def read_frame(out_dir: str | Path, t: int, *, arrays: bool = True) -> FrameRecord:
    """Read frames/NNNNNN.h5 (with arrays=False only stats, curves and timings)."""
    path = frame_path(out_dir, t)
    with h5py.File(path, "r") as f:
        empty = np.zeros((0,), np.float32)
        get = (lambda k: f[k][()]) if arrays else (lambda k: empty)
        adam = {}
        birth_frame = born = None
        if arrays:
            adam = {g: {k: f["adam"][g][k][()] for k in f["adam"][g]} for g in f["adam"]}
            birth_frame = f["birth_frame"][()] if "birth_frame" in f else None
            born = {k: f["born"][k][()] for k in BORN_KEYS} if "born" in f else None
        return FrameRecord(
            t=int(f.attrs["t"]),
            means=get("means"),
            quats=get("quats"),
            rgb=get("rgb"),
            adam=adam,
            curves={k: f["curves"][k][()] for k in f["curves"]},
            stats=json.loads(f.attrs["stats"]),
            seconds=float(f.attrs["seconds"]),
            birth_frame=birth_frame,
            born=born,
        )


def read_born(out_dir: str | Path, t: int) -> dict[str, np.ndarray] | None:
    """The ``born`` group of frame t (Gaussians born at t), or None."""
    with h5py.File(frame_path(out_dir, t), "r") as f:
        return {k: f["born"][k][()] for k in BORN_KEYS} if "born" in f else None


def read_birth_frame(out_dir: str | Path, t: int) -> np.ndarray | None:
    """int64 [N_t] birth frames of frame t's Gaussians, or None when the file predates them."""
    with h5py.File(frame_path(out_dir, t), "r") as f:
        return f["birth_frame"][()].astype(np.int64) if "birth_frame" in f else None


def frame_is_valid(out_dir: str | Path, t: int) -> bool:
    """True when frames/NNNNNN.h5 exists and opens with the arrays a resume needs."""
    path = frame_path(out_dir, t)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return all(k in f for k in ("means", "quats", "rgb", "adam")) and int(f.attrs["t"]) == t
    except Exception:
        return False


def completed_frames(out_dir: str | Path) -> int:
    """Number of consecutive complete frames 0, 1, ... in OUT (0 without run.h5)."""
    if not (Path(out_dir) / RUN_FILE).exists():
        return 0
    t = 0
    while frame_is_valid(out_dir, t):
        t += 1
    return t


def clean_temporaries(out_dir: str | Path) -> None:
    """Remove temporary files left by a killed process."""
    for folder in (Path(out_dir), Path(out_dir) / FRAMES_DIR):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                _unlink(p)


def remove_run(out_dir: str | Path) -> None:
    """Delete what a run owns in OUT (RUN_OUTPUTS); other files (e.g. the demo's OUT/data) stay."""
    out = Path(out_dir)
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    clean_temporaries(out)


def write_json_atomic(path: str | Path, obj) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
