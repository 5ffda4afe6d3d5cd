"""Exports of a run: per-frame PLY (standard 3DGS layout) or .splat, the original's params.npz, depth maps,
tracks as npz, renders as PNG and GIF/MP4.

PLY layout (Kerbl et al. 2023, read by common 3DGS viewers): binary little-endian vertices with float
properties x y z, nx ny nz (zeros), f_dc_0..2 = (rgb - 0.5) / C0 with C0 = 0.28209479 (the degree-0
SH basis constant, so that viewers' 0.5 + C0 f_dc gives back rgb), then with sh_degree 3 the 45
f_rest_0..44 (zeros: colours are plain RGB, as in Dynamic 3D Gaussians; Inria's loader asserts
3 (d + 1)^2 - 3 of them for its max SH degree d, 3 by default), opacity as a logit, scale_0..2 as logs,
rot_0..3 = the normalised quaternion (w, x, y, z). With sh_degree 0 there is no f_rest.

.splat (antimatter15/splat): 32 bytes per Gaussian, no header: position float32 x 3, scale float32 x 3
(activated, exp), colour uint8 x 4 (rgb x 255 and sigmoid(opacity) x 255, truncated), rotation uint8 x 4
((w, x, y, z) / |q| x 128 + 128, truncated); Gaussians ordered by decreasing exp(sum log scales) x opacity,
as its converter does (the order is the same for every frame: scales and opacities are fixed after t = 0).

Depth maps: per camera and frame, the expected and the median camera z (see tritonsplat.RasterizeOutput),
float32 .npy in data units and uint16 PNG in millimetres, round(z x metres_per_unit x 1000) clipped to
[1, 65535]; 0 = no coverage in both (expected: alpha = 0; median: transmittance never below 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .result import TrackingResult
from .store import atomic_path

SH_C0 = 0.28209479177387814  # Y_0^0 = 1 / (2 sqrt(pi))
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1",
                  "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
SH_DEGREES = (0, 3)  # what `export --sh-degree` writes (f_rest are zeros; 3 is Inria's default max degree)
EXPORT_FORMATS = ("ply", "d3dgs", "splat")
SPLAT_RECORD = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
DEPTH_KINDS = ("expected", "median")
DEPTH_PNG_MAX_MM = 65535  # uint16


def ply_properties(sh_degree: int = 0) -> tuple[str, ...]:
    """Vertex property names in Inria's save_ply order; 3 (d + 1)^2 - 3 f_rest_* after f_dc for degree d."""
    if sh_degree not in SH_DEGREES:
        raise ValueError(f"sh_degree must be one of {SH_DEGREES}, got {sh_degree!r}")
    rest = tuple(f"f_rest_{i}" for i in range(3 * (sh_degree + 1) ** 2 - 3))
    return PLY_PROPERTIES[:9] + rest + PLY_PROPERTIES[9:]


def gaussians_to_ply_rows(means, quats, log_scales, logit_opacities, rgb, sh_degree: int = 0) -> np.ndarray:
    """float32 [N, P] rows in ply_properties(sh_degree) order. quats (w, x, y, z) of any norm;
    logit_opacities [N] or [N, 1]."""
    names = ply_properties(sh_degree)
    means = np.asarray(means, np.float32).reshape(-1, 3)
    n = len(means)
    q = np.asarray(quats, np.float64).reshape(n, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    rows = np.zeros((n, len(names)), np.float32)
    rows[:, 0:3] = means
    rows[:, 6:9] = (np.asarray(rgb, np.float32).reshape(n, 3) - 0.5) / SH_C0
    k = names.index("opacity")
    rows[:, k] = np.asarray(logit_opacities, np.float32).reshape(n)
    rows[:, k + 1:k + 4] = np.asarray(log_scales, np.float32).reshape(n, 3)
    rows[:, k + 4:k + 8] = q
    return rows


def write_ply(path: str | Path, means, quats, log_scales, logit_opacities, rgb, sh_degree: int = 0) -> Path:
    """Write Gaussians as a 3DGS PLY (binary little endian), atomically; sh_degree 3 adds zero f_rest_*."""
    rows = gaussians_to_ply_rows(means, quats, log_scales, logit_opacities, rgb, sh_degree)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    header += [f"property float {name}" for name in ply_properties(sh_degree)]
    header += ["end_header"]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rows.astype("<f4").tobytes())
    return path


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian PLY of float/double/uchar/int vertex properties -> {name: [N]}."""
    sizes = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
             "char": "i1", "int": "i4", "int32": "i4", "uint": "u4", "short": "i2", "ushort": "u2"}
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or "binary_little_endian" not in lines[1]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n, props = 0, []
    for line in lines:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            n = int(parts[2])
        elif parts and parts[0] == "property":
            props.append((parts[2], "<" + sizes[parts[1]]))
    arr = np.frombuffer(data[end:end + n * np.dtype(props).itemsize], dtype=np.dtype(props), count=n)
    return {name: arr[name].copy() for name, _ in props}


def splat_records(means, quats, log_scales, logit_opacities, rgb) -> np.ndarray:
    """The .splat records (SPLAT_RECORD [N]) in the file's order (see the module docstring)."""
    means = np.asarray(means, np.float32).reshape(-1, 3)
    n = len(means)
    log_scales = np.asarray(log_scales, np.float32).reshape(n, 3)
    logit = np.asarray(logit_opacities, np.float32).reshape(n)
    opacity = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
    order = np.argsort(-np.exp(log_scales.astype(np.float64).sum(1)) * opacity, kind="stable")
    q = np.asarray(quats, np.float64).reshape(n, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    rec = np.zeros(n, SPLAT_RECORD)
    rec["position"] = means
    rec["scale"] = np.exp(log_scales)
    rgba = np.concatenate([np.asarray(rgb, np.float64).reshape(n, 3), opacity[:, None]], 1)
    rec["rgba"] = (rgba * 255).clip(0, 255).astype(np.uint8)
    rec["rot"] = (q * 128 + 128).clip(0, 255).astype(np.uint8)
    return rec[order]


def write_splat(path: str | Path, means, quats, log_scales, logit_opacities, rgb) -> Path:
    """Write Gaussians as an antimatter15 .splat (32 bytes each, no header), atomically."""
    rec = splat_records(means, quats, log_scales, logit_opacities, rgb)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(rec.tobytes())
    return path


def read_splat(path: str | Path) -> np.ndarray:
    """A .splat file -> SPLAT_RECORD [N] (fields position, scale, rgba, rot)."""
    data = Path(path).read_bytes()
    if len(data) % SPLAT_RECORD.itemsize:
        raise ValueError(f"{path}: {len(data)} bytes is not a multiple of the {SPLAT_RECORD.itemsize}-byte record")
    return np.frombuffer(data, SPLAT_RECORD).copy()


def depth_to_mm(depth, metres_per_unit: float) -> np.ndarray:
    """uint16 millimetres: round(depth x metres_per_unit x 1000) clipped to [1, 65535]; 0 where depth is 0."""
    depth = np.asarray(depth, np.float64)
    mm = np.rint(depth * float(metres_per_unit) * 1000.0).clip(1, DEPTH_PNG_MAX_MM)
    return np.where(depth > 0, mm, 0).astype(np.uint16)


def write_depth(folder: Path, kind: str, t: int, depth: np.ndarray, metres_per_unit: float) -> dict[str, Path]:
    """folder/<kind>_NNNNNN.npy (float32 [H, W], data units) and .png (uint16 mm), atomically."""
    from PIL import Image

    stem = f"{kind}_{t:06d}"
    npy, png = folder / f"{stem}.npy", folder / f"{stem}.png"
    with atomic_path(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(depth, np.float32))
    with atomic_path(png) as tmp:
        Image.fromarray(depth_to_mm(depth, metres_per_unit)).save(tmp, format="PNG")
    return {"npy": npy, "png": png}


def _progress(iterable, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="frame", leave=False)


def export_depth(out_dir: str | Path, frames=None, *, device=None, progress: bool = False) -> Path:
    """OUT/export/depth/<camera id>/{expected,median}_NNNNNN.{npy,png} for every training and test camera."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = TrackingResult(out_dir)
    base = result.out_dir / "export" / "depth"
    ts = range(result.n_frames) if frames is None else frames
    mpu = result.config.metres_per_unit
    for t in _progress(ts, "depth maps", progress):
        for cam in result.train_cameras + result.test_cameras:
            out = result.render_output(t, cam, device=device)
            folder = base / str(cam.id)
            write_depth(folder, "expected", t, out.depths[0, ..., 0].cpu().numpy(), mpu)
            write_depth(folder, "median", t, out.median_depths[0, ..., 0].cpu().numpy(), mpu)
    return base


def export_run(out_dir: str | Path, frames=None, progress: bool = False, *, fmt: str = "ply", sh_degree: int = 0,
               depth: bool = False, device=None) -> dict[str, Path]:
    """Export a run into OUT/export/.

    fmt "ply": ply/NNNNNN.ply per frame (sh_degree 0 or 3) and tracks.npz: centres float32 [T, N, 3],
    quats float32 [T, N, 4] normalised (w, x, y, z), colours [T, N, 3], foreground bool [N], scales
    [N, 3], opacities [N], birth_frame int64 [N] (rows of Gaussians not yet born at t are NaN; each
    frame's ply / splat holds only the Gaussians alive at t). fmt "splat": splat/NNNNNN.splat per frame.
    fmt "d3dgs": params.npz in the original's layout (tracking.d3dgs).
    depth: also depth/<camera id>/{expected,median}_NNNNNN.{npy,png}.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if sh_degree not in SH_DEGREES:
        raise ValueError(f"sh_degree must be one of {SH_DEGREES}, got {sh_degree!r}")
    if sh_degree and fmt != "ply":
        raise ValueError(f"sh_degree applies to the ply format only, got format {fmt!r}")
    result = TrackingResult(out_dir)
    base = result.out_dir / "export"
    ts = range(result.n_frames) if frames is None else frames
    written: dict[str, Path] = {}
    if fmt == "d3dgs":
        from .d3dgs import export_params_npz

        written["params"] = export_params_npz(result.out_dir, base / "params.npz")
    else:
        for t in _progress(ts, f"exporting {fmt}", progress):
            p = result.params(t)   # the Gaussians alive at t
            args = (p["means"], p["quats"], p["log_scales"], p["logit_opacities"], p["rgb"])
            if fmt == "ply":
                write_ply(base / "ply" / f"{t:06d}.ply", *args, sh_degree=sh_degree)
            else:
                write_splat(base / "splat" / f"{t:06d}.splat", *args)
        written[fmt] = base / fmt
    if fmt == "ply":
        centres = result.means.stack().numpy()
        quats = result.quats.stack().numpy()
        colours = result.colours.stack().numpy()
        tracks = base / "tracks.npz"
        with atomic_path(tracks) as tmp, open(tmp, "wb") as f:
            np.savez(f, centres=centres.astype(np.float32), quats=quats.astype(np.float32),
                     colours=colours.astype(np.float32), foreground=result.fg.numpy(),
                     scales=result.scales.numpy().astype(np.float32),
                     opacities=result.opacities.numpy().astype(np.float32),
                     birth_frame=result.birth_frame.numpy().astype(np.int64))
        written["tracks"] = tracks
    if depth:
        written["depth"] = export_depth(result.out_dir, ts, device=device, progress=progress)
    return written


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8."""
    return (image.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def render_run(out_dir: str | Path, camera: int | None = None, fmt: str = "gif", *, fps: int = 10,
               device=None, progress: bool = False) -> dict[str, Path]:
    """Render every frame seen by a camera (default: the first test camera, else the first training
    camera) to OUT/renders/cam<ID>/NNNNNN.png, plus OUT/renders/cam<ID>.gif (fmt "gif") or .mp4
    (fmt "mp4", needs the `video` extra: imageio + imageio-ffmpeg)."""
    from PIL import Image

    if fmt not in ("gif", "mp4", "png"):
        raise ValueError(f"format must be gif, mp4 or png, got {fmt!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = TrackingResult(out_dir)
    if camera is None:
        cam = (result.test_cameras or result.train_cameras)[0]
    else:
        cam = result.camera(int(camera))
    folder = result.out_dir / "renders" / f"cam{cam.id}"
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    iterator = range(result.n_frames)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"rendering camera {cam.id}", unit="frame", leave=False)
    for t in iterator:
        img = to_uint8(result.render(t, cam, device=device))
        frames.append(img)
        png = folder / f"{t:06d}.png"
        with atomic_path(png) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    written = {"png": folder}
    if fmt == "gif":
        gif = folder.parent / f"cam{cam.id}.gif"
        with atomic_path(gif) as tmp:
            ims = [Image.fromarray(f) for f in frames]
            ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
        written["gif"] = gif
    elif fmt == "mp4":
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise RuntimeError("MP4 export needs the `video` extra (pip install imageio imageio-ffmpeg); "
                               "use --format gif or png") from None
        mp4 = folder.parent / f"cam{cam.id}.mp4"
        with atomic_path(mp4) as tmp:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, macro_block_size=1) as w:
                for f in frames:
                    w.append_data(f)
        written["mp4"] = mp4
    return written
