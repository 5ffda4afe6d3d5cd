"""What a fit is fitted to: the dataset, its initial points, and per-frame targets on the device.

Per frame, the training images and segmentation targets are loaded once and stacked ([C, 3, H, W]
when every camera has the same size), so a step selects its views with one index on the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TrackingError
from .store import DataSpec


def open_data(data, downscale: float = 1.0, frames=None):
    """(Sequence, DataSpec) from a dataset path or an existing data_tools.Sequence."""
    import data_tools

    if isinstance(data, str | Path):
        seq = data_tools.load(data, downscale=downscale, frames=frames)
        spec = DataSpec(path=str(Path(data).resolve()), format=seq.format, downscale=float(downscale),
                        source_frames=[int(i) for i in seq.source_frames])
    else:
        seq = data
        if frames is not None or downscale != 1:
            raise ValueError("downscale and frames apply to a dataset path, not to a loaded Sequence")
        full = _full_width(seq)
        factor = full / seq.width if (full and seq.width) else 1.0
        spec = DataSpec(path=str(Path(seq.path).resolve()), format=seq.format, downscale=float(factor),
                        source_frames=[int(i) for i in getattr(seq, "source_frames", range(seq.n_frames))])
    return seq, spec


def _full_width(seq) -> int | None:
    """Image width of the sequence's files at full size (to record its downscale factor)."""
    import data_tools

    try:
        return data_tools.load(seq.path).width
    except Exception:
        return None


def check_sequence(seq) -> bool:
    """Validate the data for tracking; returns whether training masks exist (warns when not).

    Raises:
        TrackingError: fewer than 2 training cameras, or a missing/mis-sized image or mask in any frame.
    """
    n_train = len(seq.train_cameras)
    if n_train < 2:
        raise TrackingError(f"{seq.path}: Dynamic 3D Gaussians needs at least 2 training cameras, found {n_train}")
    if seq.n_frames < 1:
        raise TrackingError(f"{seq.path}: no frames")
    seq.check_files(list(range(seq.n_frames)))
    has_masks = bool(seq.has_masks())
    if not has_masks:
        warnings.warn(f"{seq.path}: no foreground masks for the training cameras: the segmentation loss is off "
                      "and every Gaussian of the initial cloud keeps its label", stacklevel=3)
    return has_masks


def initial_points(seq, out_dir: Path, init_points_file: str | Path | None) -> tuple[np.ndarray, str]:
    """float32 [N, 7] initial cloud and where it came from: DATA/init_pt_cld.npz if present, else
    `init_points_file`, else built from the masks of frame 0 with data_tools into OUT/init_pt_cld.npz."""
    import data_tools

    shipped = seq.init_points()
    if shipped is not None:
        if init_points_file is not None:
            warnings.warn(f"--init-points {init_points_file} ignored: the data ships init_pt_cld.npz", stacklevel=3)
        return _check_points(shipped, Path(seq.path) / "init_pt_cld.npz"), "data"
    if init_points_file is not None:
        path = Path(init_points_file)
        try:
            with np.load(path) as z:
                pts = z["data"] if "data" in z.files else z[z.files[0]]
        except FileNotFoundError:
            raise TrackingError(f"{path}: initial point cloud not found") from None
        except Exception as exc:
            raise TrackingError(f"{path}: cannot read the initial point cloud ({exc})") from None
        return _check_points(pts, path), str(path)
    built = out_dir / "init_pt_cld.npz"
    if built.exists():
        try:
            with np.load(built) as z:
                return _check_points(z["data"], built), str(built)
        except Exception:
            built.unlink()
    pts = data_tools.build_init_points(seq, 0)
    data_tools.write_init_points(pts, built)
    return _check_points(pts, built), str(built)


def _check_points(pts, source) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 7:
        raise TrackingError(f"{source}: initial points must be [N, 7] (xyz, rgb, seg), got shape {pts.shape}")
    if len(pts) < 4:
        raise TrackingError(f"{source}: only {len(pts)} initial points")
    if not np.isfinite(pts).all():
        raise TrackingError(f"{source}: initial points contain NaN or Inf")
    return pts


@dataclass
class Views:
    """Training cameras as tensors on the device."""

    viewmats: torch.Tensor  # [C, 4, 4]
    Ks: torch.Tensor  # [C, 3, 3]
    sizes: list[tuple[int, int]]  # (W, H) per camera
    background: torch.Tensor  # [6]: RGB background, then the segmentation channels' (black or blue)

    @classmethod
    def build(cls, cameras, background, device, uncovered_is_background: bool = False) -> Views:
        vm = torch.tensor(np.stack([c.w2c for c in cameras]), dtype=torch.float32, device=device)
        Ks = torch.tensor(np.stack([c.K for c in cameras]), dtype=torch.float32, device=device)
        bg = torch.zeros(6, device=device)
        if background is not None:
            bg[:3] = torch.tensor(background, dtype=torch.float32)
        if uncovered_is_background:
            bg[5] = 1.0  # segmentation colour of background: blue (0, 0, 1)
        return cls(vm, Ks, [(c.width, c.height) for c in cameras], bg)

    @property
    def same_size(self) -> bool:
        return len(set(self.sizes)) == 1

    def check_batch(self, cameras_per_step: int, names: list[str]) -> None:
        """ValueError unless `cameras_per_step` views can share one render (same image size)."""
        if cameras_per_step > len(self.sizes):
            raise ValueError(f"cameras_per_step: {cameras_per_step} views per step need as many training cameras, "
                             f"the data has {len(self.sizes)}")
        if cameras_per_step > 1 and not self.same_size:
            sizes = ", ".join(f"{n}: {w}x{h}" for n, (w, h) in zip(names, self.sizes))
            raise ValueError(f"cameras_per_step: {cameras_per_step} views are rendered in one call, which needs one "
                             f"image size for every training camera; got {sizes}")


@dataclass
class FrameTargets:
    """Frame t's training targets: per camera c, images[c] [3, H, W] and segs[c] [3, H, W] = (m, 0, 1 - m)
    or None; stacked [C, 3, H, W] (`image_stack`, `seg_stack`) when all cameras share a size."""

    images: list[torch.Tensor]
    segs: list[torch.Tensor | None]
    image_stack: torch.Tensor | None = None
    seg_stack: torch.Tensor | None = None

    def batch(self, index: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, 3, H, W] images, [B, 3, H, W] segmentation targets or None) of the cameras in `index`
        (a list, or a [B] int64 device tensor: picked from the stacks on the device)."""
        if isinstance(index, torch.Tensor):
            segs = None if self.seg_stack is None else self.seg_stack.index_select(0, index)
            return self.image_stack.index_select(0, index), segs
        if len(index) == 1:
            c = index[0]
            seg = self.segs[c]
            return self.images[c][None], None if seg is None else seg[None]
        rows = torch.tensor(index, device=self.image_stack.device)
        segs = None if self.seg_stack is None else self.seg_stack.index_select(0, rows)
        return self.image_stack.index_select(0, rows), segs


def load_targets(seq, t: int, cameras, has_masks: bool, device) -> FrameTargets:
    """Images [3, H, W] and segmentation targets [3, H, W] = (m, 0, 1 - m) of frame t per camera."""
    images, segs = [], []
    for cam in cameras:
        images.append(torch.from_numpy(np.ascontiguousarray(seq.image(t, cam))).permute(2, 0, 1).contiguous()
                      .to(device))
        seg = None
        if has_masks:
            m = seq.mask(t, cam)
            if m is not None:
                mt = torch.from_numpy(m.astype(np.float32))
                seg = torch.stack([mt, torch.zeros_like(mt), 1 - mt]).to(device)
        segs.append(seg)
    targets = FrameTargets(images, segs)
    if len({tuple(im.shape) for im in images}) == 1:
        targets.image_stack = torch.stack(images)
        if all(s is not None for s in segs):
            targets.seg_stack = torch.stack(segs)
    return targets
