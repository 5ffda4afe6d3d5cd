"""The ``data-tools`` command line: info, convert, init-points, synth."""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path

import click
import numpy as np

from tritonsplat.cli import user_errors

from .cameras import axes_focus
from .init_points import build_init_points, default_init_points_path, write_init_points
from .loader import load
from .synthetic import SynthConfig, make_synthetic_scene
from .writer import is_writable_dir, write_panoptic


def _friendly_errors(fn):
    """Data errors and unreadable files as one-line errors (tritonsplat.cli.user_errors); user warnings
    printed as one line each."""

    @user_errors
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                return fn(*args, **kwargs)
            finally:
                for w in caught:
                    if issubclass(w.category, UserWarning):
                        click.echo(f"warning: {w.message}", err=True)

    return wrapper


def parse_frames(text: str | None) -> slice | None:
    """'A:B' (half-open, 0-based, either end optional, optional ':STEP') or 'A' -> slice."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) == 1:
            a = int(parts[0])
            return slice(a, a + 1)
        if len(parts) in (2, 3):
            vals = [int(p) if p.strip() else None for p in parts]
            return slice(*vals)
    except ValueError:
        pass
    raise click.BadParameter(f"expected A:B (e.g. 0:30), got {text!r}", param_hint="--frames")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Load, convert and make multi-view (dynamic) datasets for tritonsplat.

    Formats: Panoptic / Dynamic 3D Gaussians, Blender (NeRF synthetic), Middlebury, COLMAP, LLFF.
    """


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly_errors
def info(path: Path, as_json: bool):
    """Show the format, cameras, frames, image size and scene bounds of a dataset."""
    seq = load(path)
    seq.check_files([0])
    centres = np.stack([c.center for c in seq.cameras])
    pts = seq.init_points()
    fg = pts[pts[:, 6] > 0.5, :3].astype(np.float64) if pts is not None else None
    focus = axes_focus(seq.train_cameras or seq.test_cameras)
    out = {
        "path": str(path),
        "format": seq.format,
        "n_train_cameras": len(seq.train_cameras),
        "n_test_cameras": len(seq.test_cameras),
        "n_frames": seq.n_frames,
        "width": seq.width,
        "height": seq.height,
        "train_camera_ids": [c.id for c in seq.train_cameras],
        "test_camera_ids": [c.id for c in seq.test_cameras],
        "has_masks": seq.has_masks(),
        "background": list(seq.background) if seq.background is not None else None,
        "scene_radius": round(seq.scene_radius, 6),
        "camera_bounds": [centres.min(0).round(6).tolist(), centres.max(0).round(6).tolist()],
        "look_at": focus.round(6).tolist(),
        "init_points": None if pts is None else int(len(pts)),
        "scene_bounds": None
        if fg is None or not len(fg)
        else [fg.min(0).round(6).tolist(), fg.max(0).round(6).tolist()],
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    size = f"{seq.width}x{seq.height}" if seq.width else "mixed sizes"
    click.echo(f"{path}: {seq.format}")
    n_train, n_test = out["n_train_cameras"], out["n_test_cameras"]
    click.echo(f"  cameras   {n_train} train, {n_test} test  (test ids: {out['test_camera_ids']})")
    click.echo(f"  frames    {seq.n_frames}")
    click.echo(f"  size      {size}")
    click.echo(f"  masks     {'yes' if out['has_masks'] else 'no'}; background {out['background']}")
    lo, hi = out["camera_bounds"]
    click.echo(f"  cameras   centres in {np.round(lo, 3).tolist()} .. {np.round(hi, 3).tolist()}; "
               f"scene radius {seq.scene_radius:.3f}; looking at {np.round(focus, 3).tolist()}")
    if out["scene_bounds"]:
        lo, hi = out["scene_bounds"]
        click.echo(f"  scene     foreground points in {np.round(lo, 3).tolist()} .. {np.round(hi, 3).tolist()}")
    click.echo(f"  points    {out['init_points'] if pts is not None else 'no init_pt_cld'}")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--downscale", type=float, default=1.0, show_default=True, help="Divide the image size by F.")
@click.option("--frames", "frames", default=None, help="A:B, half-open 0-based indices into the source frames.")
@click.option("--test-every", type=int, default=8, show_default=True,
              help="For sources without a split: cameras with index % N == 0 are test cameras (0: none).")
@click.option("--background", type=click.Choice(["white", "black"]), default=None,
              help="Background for RGBA sources (Blender; default white).")
@click.option("--image-format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@_friendly_errors
def convert(src, dst, downscale, frames, test_every, background, image_format, overwrite):
    """Convert any supported dataset SRC into the Panoptic layout at DST.

    The world frame and scale of the source are kept. The output is written to a temporary folder
    that is renamed to DST at the end.
    """
    if downscale <= 0:
        raise click.BadParameter("must be positive", param_hint="--downscale")
    seq = load(src, downscale=downscale, frames=parse_frames(frames), test_every=test_every, background=background)
    seq.check_files(list(range(seq.n_frames)))
    t0 = time.perf_counter()
    write_panoptic(seq, dst, image_format=image_format, overwrite=overwrite, progress=True)
    click.echo(
        f"wrote {dst}: {len(seq.train_cameras)} train + {len(seq.test_cameras)} test cameras, "
        f"{seq.n_frames} frame(s), {seq.width}x{seq.height} ({time.perf_counter() - t0:.1f} s)"
    )
    if seq.init_points() is None and seq.has_masks():
        click.echo(f"no initial point cloud in the source: run `data-tools init-points {dst}`")


@main.command("init-points")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output .npz (default: DATA/init_pt_cld.npz).")
@click.option("--frame", type=int, default=0, show_default=True, help="Frame whose masks are carved.")
@click.option("--voxel-size", type=float, default=None, help="Voxel edge in metres (default: automatic).")
@click.option("--min-views", type=int, default=3, show_default=True, help="Cameras that must see a voxel.")
@click.option("--floor/--no-floor", default=None, help="Add floor points on y = 0 (default: Panoptic only).")
@click.option("--shell/--no-shell", default=None, help="Add a far background shell (default: Panoptic only).")
@_friendly_errors
def init_points(data, out, frame, voxel_size, min_views, floor, shell):
    """Build an initial point cloud (visual hull + floor + far shell) from the masks of DATA."""
    seq = load(data)
    if out is None:
        out = default_init_points_path(seq.path)
        if not is_writable_dir(out.parent):
            raise click.ClickException(f"{out.parent} is not writable: give an output file with --out FILE")
    if not 0 <= frame < seq.n_frames:
        raise click.BadParameter(f"{frame} is not in 0..{seq.n_frames - 1}", param_hint="--frame")
    t0 = time.perf_counter()
    pts, hull = build_init_points(
        seq, frame, voxel_size=voxel_size, min_views=min_views, floor=floor, shell=shell,
        progress=True, return_hull=True,
    )
    write_init_points(pts, out, voxel_size=hull.voxel_size)
    n_fg = int((pts[:, 6] > 0.5).sum())
    click.echo(
        f"wrote {out}: {len(pts)} points ({n_fg} foreground, {len(pts) - n_fg} background), "
        f"voxel {hull.voxel_size:.4f}, {time.perf_counter() - t0:.1f} s"
    )


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cameras", type=click.IntRange(3), default=12, show_default=True, help="Training cameras.")
@click.option("--test-cameras", type=click.IntRange(0), default=2, show_default=True, help="Held-out cameras.")
@click.option("--width", type=click.IntRange(8), default=160, show_default=True)
@click.option("--height", type=click.IntRange(8), default=120, show_default=True)
@click.option("--frames", type=click.IntRange(1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--enter-at", type=click.IntRange(1), default=None,
              help="Add a sphere ('visitor') that enters the scene at this frame (absent before; its ground-truth "
                   "tracks start there, gt_tracks.npz 'entry_frame').")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_friendly_errors
def synth(out, cameras, test_cameras, width, height, frames, seed, enter_at, overwrite):
    """Render a synthetic dynamic scene with ground-truth tracks (gt_tracks.npz) into OUT."""
    if enter_at is not None and enter_at >= frames:
        raise click.BadParameter(f"must be a frame before --frames ({frames}), got {enter_at}",
                                 param_hint="'--enter-at'")
    cfg = SynthConfig(cameras=cameras, test_cameras=test_cameras, width=width, height=height, frames=frames, seed=seed,
                      enter_at=enter_at)
    t0 = time.perf_counter()
    make_synthetic_scene(out, cfg, progress=True, overwrite=overwrite)
    with np.load(Path(out) / "gt_tracks.npz") as gt:
        n_pts, extent = gt["points"].shape[1], float(gt["extent"])
    click.echo(
        f"wrote {out}: {cameras} train + {test_cameras} test cameras, {frames} frames, {width}x{height}, "
        f"{n_pts} tracked points (extent {extent:.2f} m), {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
