"""The original Dynamic 3D Gaussians `params.npz`, in and out (Luiten et al. 2024, `train.py` `save_params`).

Layout (uncompressed `np.savez`, float32, keys in this order):

| key | shape | activation | our name |
|---|---|---|---|
| means3D | [T, N, 3] | none | means |
| rgb_colors | [T, N, 3] | none | rgb |
| seg_colors | [N, 3] | none (foreground: red channel > 0.5) | seg |
| unnorm_rotations | [T, N, 4] | normalise, (w, x, y, z) | quats |
| logit_opacities | [N, 1] | sigmoid | logit_opacities |
| log_scales | [N, 3] | exp | log_scales |
| cam_m | [50, 3] | exp (per-channel gain) | cam_m (first C rows) |
| cam_c | [50, 3] | none (per-channel offset) | cam_c (first C rows) |

Rows of `cam_m` / `cam_c` are indexed by position in the training-camera list; the original allocates 50
(`max_cams`) and rows past the last training camera stay at their initial 0 (they never get a gradient).
Our parameters are stored raw with the same activations, so the conversion copies values unchanged.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .store import (
    RUN_FILE,
    CameraRecord,
    FrameRecord,
    RunRecord,
    atomic_path,
    read_frame,
    read_run,
    remove_run,
    write_frame,
    write_json_atomic,
    write_run,
)

MAX_CAMS = 50  # rows of cam_m / cam_c in the original (`max_cams` of train.py)
DYNAMIC = {"means3D": "means", "rgb_colors": "rgb", "unnorm_rotations": "quats"}  # [T, N, D] per timestep
STATIC = {"seg_colors": "seg", "logit_opacities": "logit_opacities", "log_scales": "log_scales",
          "cam_m": "cam_m", "cam_c": "cam_c"}
KEY_ORDER = ("means3D", "rgb_colors", "seg_colors", "unnorm_rotations", "logit_opacities", "log_scales", "cam_m",
             "cam_c")  # the insertion order of the original's params dict
# The original records no optimisation curves; empty ones keep `eval`'s loss plot working.
NO_CURVES = {"loss": np.zeros(0, np.float32), "psnr": np.zeros(0, np.float32)}
LAST_DIM = {"means3D": 3, "rgb_colors": 3, "unnorm_rotations": 4, "seg_colors": 3, "logit_opacities": 1,
            "log_scales": 3, "cam_m": 3, "cam_c": 3}


# ----------------------------------------------------------------------------- ours -> params.npz
def _write_npz_streamed(path: Path, header_arrays: dict[str, tuple[tuple[int, ...], object]]) -> None:
    """An uncompressed .npz as np.savez writes it, each member streamed: {key: (shape, chunks)} where
    chunks yields C-contiguous float32 arrays that together fill `shape` (so T frames never sit in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (shape, chunks) in header_arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": tuple(shape)})
                written = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype="<f4")
                    f.write(chunk.tobytes())
                    written += chunk.size
                if written != int(np.prod(shape)):
                    raise RuntimeError(f"{key}: wrote {written} values, expected {int(np.prod(shape))}")


def export_params_npz(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write a run in the original's params.npz layout (default OUT/export/params.npz), atomically.

    cam_m / cam_c are padded with zeros to 50 rows, in training-camera order.

    Raises:
        ValueError: the run has more than 50 training cameras (the original's table has 50 rows), or
            Gaussians born after t = 0 (`TrackingConfig.spawn_new`; the layout has one set for all frames).
    """
    from .store import completed_frames, read_birth_frame

    out = Path(out_dir)
    run = read_run(out)
    n_frames = completed_frames(out)
    p0 = run.params0
    n = p0["means"].shape[0]
    n_cams = p0["cam_m"].shape[0]
    if n_cams > MAX_CAMS:
        raise ValueError(f"{out}: {n_cams} training cameras, but the original's cam_m/cam_c hold {MAX_CAMS} rows")
    births = read_birth_frame(out, n_frames - 1) if n_frames else None
    if births is not None and len(births) != n:
        raise ValueError(f"{out}: {len(births) - n} Gaussians were born after t = 0 (spawn_new), but the original's "
                         "params.npz holds one set of Gaussians for every frame: export ply or splat instead")
    path = Path(path) if path is not None else out / "export" / "params.npz"

    def frames(ours: str):
        for t in range(n_frames):
            yield getattr(read_frame(out, t), ours)

    def padded(ours: str):
        table = np.zeros((MAX_CAMS, 3), np.float32)
        table[:n_cams] = p0[ours]
        yield table

    members = {}
    for key in KEY_ORDER:
        if key in DYNAMIC:
            members[key] = ((n_frames, n, LAST_DIM[key]), frames(DYNAMIC[key]))
        elif key in ("cam_m", "cam_c"):
            members[key] = ((MAX_CAMS, 3), padded(key))
        else:
            members[key] = ((n, LAST_DIM[key]), iter([p0[STATIC[key]].reshape(n, LAST_DIM[key])]))
    with atomic_path(path) as tmp:
        _write_npz_streamed(tmp, members)
    return path


# ----------------------------------------------------------------------------- params.npz -> ours
def check_params(arrays: dict[str, np.ndarray], n_frames: int | None, n_train_cameras: int | None,
                 source: str = "params.npz") -> tuple[int, int]:
    """Validate the original's arrays; returns (T, N).

    Raises:
        ValueError naming the key and the expected shape (missing key, wrong rank or size, a frame count
        other than `n_frames`, fewer cam_m/cam_c rows than training cameras, non-float or non-finite values).
    """
    missing = [k for k in KEY_ORDER if k not in arrays]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)} (the original's save_params writes "
                         f"{', '.join(KEY_ORDER)})")
    means = arrays["means3D"]
    if means.ndim != 3 or means.shape[-1] != 3:
        raise ValueError(f"{source}: means3D must be [T, N, 3], got shape {list(means.shape)}")
    t_count, n = int(means.shape[0]), int(means.shape[1])
    expected = {"means3D": (t_count, n, 3), "rgb_colors": (t_count, n, 3), "unnorm_rotations": (t_count, n, 4),
                "seg_colors": (n, 3), "logit_opacities": (n, 1), "log_scales": (n, 3)}
    names = {"means3D": "[T, N, 3]", "rgb_colors": "[T, N, 3]", "unnorm_rotations": "[T, N, 4]",
             "seg_colors": "[N, 3]", "logit_opacities": "[N, 1]", "log_scales": "[N, 3]"}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"{source}: {key} must be {names[key]} = {list(shape)} (T = {t_count}, N = {n} from "
                             f"means3D), got shape {list(arrays[key].shape)}")
    for key in ("cam_m", "cam_c"):
        a = arrays[key]
        if a.ndim != 2 or a.shape[1] != 3:
            raise ValueError(f"{source}: {key} must be [{MAX_CAMS}, 3], got shape {list(a.shape)}")
        if n_train_cameras is not None and a.shape[0] < n_train_cameras:
            raise ValueError(f"{source}: {key} has {a.shape[0]} rows, fewer than the data's {n_train_cameras} "
                             "training cameras (rows are indexed by position in the training-camera list)")
    if n < 1:
        raise ValueError(f"{source}: means3D holds no Gaussians (shape {list(means.shape)})")
    if n_frames is not None and t_count != n_frames:
        raise ValueError(f"{source}: means3D has {t_count} timestep(s) but DATA has {n_frames} frame(s); "
                         "the frame counts must match")
    for key in KEY_ORDER:
        a = arrays[key]
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{source}: {key} must be floating point (float32), got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"{source}: {key} holds NaN or Inf values")
    return t_count, n


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz archive (no zip structure)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from None


def import_original(params_path: str | Path, data: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                    config=None) -> Path:
    """Turn the original's params.npz (fitted on DATA) into a run folder that eval, render, export and view read.

    DATA gives the cameras (training-camera order = the rows of cam_m / cam_c), the scene radius and the
    background; its frame count must equal the npz's T. Values are copied bit for bit (float32). The
    foreground neighbour graph is recomputed as `fit` does, so the run looks like a fitted one; the Adam
    state of every frame is empty.

    Everything is validated before anything is written, the run is assembled in a temporary folder beside
    OUT and moved in only when complete: a failure leaves OUT as it was.

    Raises:
        ValueError: a bad npz (naming the key or shape) or an OUT that already holds a run (without overwrite).
    """
    import torch

    from .config import TrackingConfig
    from .fit import neighbour_graph, open_data

    params_path, out = Path(params_path), Path(out_dir)
    if (out / RUN_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a run ({RUN_FILE}); use --overwrite or another OUT")
    arrays = _load_npz(params_path)
    seq, spec = open_data(data)
    t_count, n = check_params(arrays, seq.n_frames, len(seq.train_cameras), str(params_path))
    config = (config or TrackingConfig()).validate()
    f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items() if k in KEY_ORDER}
    n_cams = len(seq.train_cameras)
    params0 = {"means": f32["means3D"][0], "rgb": f32["rgb_colors"][0], "seg": f32["seg_colors"],
               "quats": f32["unnorm_rotations"][0], "logit_opacities": f32["logit_opacities"],
               "log_scales": f32["log_scales"], "cam_m": f32["cam_m"][:n_cams].copy(),
               "cam_c": f32["cam_c"][:n_cams].copy()}
    fg = f32["seg_colors"][:, 0] > config.fg_threshold
    nb_idx, nb_w, nb_d = neighbour_graph(torch.from_numpy(params0["means"]), torch.from_numpy(fg), config)
    run = RunRecord(
        config=config, data=spec, train_cameras=[CameraRecord.from_camera(c) for c in seq.train_cameras],
        test_cameras=[CameraRecord.from_camera(c) for c in seq.test_cameras], scene_radius=float(seq.scene_radius),
        params0=params0, fg=fg, neighbour_indices=nb_idx, neighbour_weights=nb_w, neighbour_distances=nb_d,
        background=list(seq.background) if seq.background is not None else None, has_masks=bool(seq.has_masks()),
        extra={"imported_from": str(params_path.resolve())})

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        write_run(stage, run)
        for t in range(t_count):
            adam = {"means": {"step": np.int64(0)}, "quats": {"step": np.int64(0)},
                    "rgb": {"step": np.int64(0), "exp_avg": np.zeros((n, 3), np.float32),
                            "exp_avg_sq": np.zeros((n, 3), np.float32)}}
            write_frame(stage, FrameRecord(t=t, means=f32["means3D"][t], quats=f32["unnorm_rotations"][t],
                                           rgb=f32["rgb_colors"][t], adam=adam, curves=NO_CURVES,
                                           stats={"source_frame": int(spec.source_frames[t]), "imported": 1}))
        write_json_atomic(stage / "config.json", {"config": config.to_dict(), "data": spec.__dict__,
                                                  "imported_from": str(params_path.resolve())})
        out.mkdir(parents=True, exist_ok=True)
        if overwrite or not (out / RUN_FILE).exists():
            remove_run(out)  # the old run, or what a run killed before t = 0 left (frames without run.h5)
        for item in ("frames", "config.json", RUN_FILE):  # run.h5 last: a run exists only once complete
            os.replace(stage / item, out / item)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
