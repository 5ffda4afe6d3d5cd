"""data_tools: load real multi-view data, build initial point clouds, make synthetic scenes.

Public API::

    seq = data_tools.load(path, downscale=1, cameras=None, frames=None)   # any supported format
    seq.train_cameras, seq.test_cameras, seq.n_frames, seq.image(t, cam), seq.mask(t, cam)
    pts = data_tools.build_init_points(seq, frame=0)                      # float32 [N, 7]
    data_tools.write_panoptic(seq, out_dir)                               # Panoptic layout
    data_tools.make_synthetic_scene(out_dir, cameras=12, ...)             # with gt_tracks.npz
"""

from .cameras import Camera, look_at_w2c, opengl_c2w_to_w2c
from .errors import DataError
from .formats import DatasetFormat, LoadOptions
from .init_points import build_init_points, write_init_points
from .loader import FORMATS, REGISTRY, detect_format, load, load_with
from .sequence import Sequence
from .synthetic import SynthConfig, make_synthetic_scene
from .writer import write_panoptic

__all__ = [
    "FORMATS",
    "Camera",
    "DataError",
    "DatasetFormat",
    "LoadOptions",
    "REGISTRY",
    "Sequence",
    "SynthConfig",
    "build_init_points",
    "detect_format",
    "load",
    "load_with",
    "look_at_w2c",
    "make_synthetic_scene",
    "opengl_c2w_to_w2c",
    "write_init_points",
    "write_panoptic",
]
