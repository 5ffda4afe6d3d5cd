"""Exports of a run: per-frame PLY (standard 3DGS layout), tracks as npz, renders as PNG and GIF/MP4.

PLY layout (Kerbl et al. 2023, read by common 3DGS viewers): binary little-endian vertices with float
properties x y z, nx ny nz (zeros), f_dc_0..2 = (rgb - 0.5) / C0 with C0 = 0.28209479 (the degree-0
SH basis constant, so that viewers' 0.5 + C0 f_dc gives back rgb), opacity as a logit, scale_0..2 as
logs, rot_0..3 = the normalised quaternion (w, x, y, z). No f_rest: colours are plain RGB (sh_degree
0), as in Dynamic 3D Gaussians.
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


def gaussians_to_ply_rows(means, quats, log_scales, logit_opacities, rgb) -> np.ndarray:
    """float32 [N, 17] rows in PLY_PROPERTIES order. quats (w, x, y, z) of any norm; logit_opacities [N] or [N, 1]."""
    means = np.asarray(means, np.float32).reshape(-1, 3)
    n = len(means)
    q = np.asarray(quats, np.float64).reshape(n, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    rows = np.zeros((n, len(PLY_PROPERTIES)), np.float32)
    rows[:, 0:3] = means
    rows[:, 6:9] = (np.asarray(rgb, np.float32).reshape(n, 3) - 0.5) / SH_C0
    rows[:, 9] = np.asarray(logit_opacities, np.float32).reshape(n)
    rows[:, 10:13] = np.asarray(log_scales, np.float32).reshape(n, 3)
    rows[:, 13:17] = q
    return rows


def write_ply(path: str | Path, means, quats, log_scales, logit_opacities, rgb) -> Path:
    """Write Gaussians as a 3DGS PLY (binary little endian), atomically."""
    rows = gaussians_to_ply_rows(means, quats, log_scales, logit_opacities, rgb)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    header += [f"property float {name}" for name in PLY_PROPERTIES]
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


def export_run(out_dir: str | Path, frames=None, progress: bool = False) -> dict[str, Path]:
    """OUT/export/ply/NNNNNN.ply per frame and OUT/export/tracks.npz.

    tracks.npz: centres float32 [T, N, 3], quats float32 [T, N, 4] normalised (w, x, y, z), colours
    [T, N, 3], foreground bool [N], scales [N, 3], opacities [N].
    """
    result = TrackingResult(out_dir)
    base = result.out_dir / "export"
    ts = range(result.n_frames) if frames is None else frames
    p0 = result.params(0)
    iterator = ts
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ts, desc="exporting", unit="frame", leave=False)
    for t in iterator:
        p = result.params(t)
        write_ply(base / "ply" / f"{t:06d}.ply", p["means"], p["quats"], p0["log_scales"], p0["logit_opacities"],
                  p["rgb"])
    centres = result.means.stack().numpy()
    quats = result.quats.stack().numpy()
    colours = result.colours.stack().numpy()
    tracks = base / "tracks.npz"
    with atomic_path(tracks) as tmp, open(tmp, "wb") as f:
        np.savez(f, centres=centres.astype(np.float32), quats=quats.astype(np.float32),
                 colours=colours.astype(np.float32), foreground=result.fg.numpy(),
                 scales=result.scales.numpy().astype(np.float32), opacities=result.opacities.numpy().astype(np.float32))
    return {"ply": base / "ply", "tracks": tracks}


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
