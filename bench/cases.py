"""Benchmark case registry: name -> scene inputs for `tritonsplat.rasterize`.

`random` (the foundation issue's definition): Gaussians uniform in the camera frustum at 2-6 m,
log-uniform world scales chosen so that the mean 3-sigma screen radius is about 4 px at any
resolution, random rotations, opacity U(0.05, 1), RGB colours U(0, 1), seed 0. One camera at the
origin looking down +z with fx = fy = 0.8 W and the principal point at the image centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}

# World scale range as a multiple of (mean depth / focal): screen sigma is then log-uniform in about
# [0.2, 2.0] px, which gives a mean 3-sigma radius of 4.1 px at 640x360 (measured by
# tests/bench/test_cases.py with the torch projection, including the 0.3 px^2 dilation).
SCALE_RANGE_PX = (0.2, 2.0)
MEAN_DEPTH = 4.0


@dataclass
class SceneInputs:
    """Positional inputs of `rasterize()` plus a description."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_gaussians(self) -> int:
        return self.means.shape[0]

    def args(self):
        return (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats,
                self.Ks, self.width, self.height)

    def to(self, device) -> SceneInputs:
        moved = {k: getattr(self, k).to(device) for k in
                 ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")}
        return SceneInputs(**moved, width=self.width, height=self.height, description=self.description,
                           extra=self.extra)

    def requires_grad_(self) -> SceneInputs:
        for name in ("means", "quats", "scales", "opacities", "colors"):
            getattr(self, name).requires_grad_(True)
        return self


def pinhole(width: int, height: int, n_cameras: int = 1, dtype=torch.float32):
    """Identity view matrices and K with fx = fy = 0.8 W, principal point at the centre."""
    focal = 0.8 * width
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)
    return torch.eye(4, dtype=dtype).expand(n_cameras, 4, 4).clone(), K.expand(n_cameras, 3, 3).clone()


def random_scene(n_gaussians: int, width: int = 640, height: int = 360, *, n_channels: int = 3,
                 seed: int = 0, device="cpu", dtype=torch.float32) -> SceneInputs:
    """The `random` case (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    viewmats, Ks = pinhole(width, height, dtype=torch.float64)
    focal = Ks[0, 0, 0]
    depth = uniform(n_gaussians, low=2.0, high=6.0)
    # Uniform in the frustum: pixel position uniform over the image at each depth.
    u = uniform(n_gaussians, low=0.0, high=width)
    v = uniform(n_gaussians, low=0.0, high=height)
    means = torch.stack([(u - width / 2) / focal * depth, (v - height / 2) / focal * depth, depth], -1)
    low, high = (math.log(s * MEAN_DEPTH / focal) for s in SCALE_RANGE_PX)
    scales = torch.exp(uniform(n_gaussians, 3, low=low, high=high))
    quats = torch.randn(n_gaussians, 4, generator=generator, dtype=torch.float64)
    opacities = uniform(n_gaussians, low=0.05, high=1.0)
    colors = uniform(n_gaussians, n_channels)
    tensors = [t.to(device=device, dtype=dtype) for t in (means, quats, scales, opacities, colors,
                                                           viewmats, Ks)]
    return SceneInputs(*tensors, width=width, height=height,
                       description=f"random: {n_gaussians} Gaussians, {width}x{height}, seed {seed}")


def original_scene(device="cpu", dtype=torch.float32) -> SceneInputs:
    """The original paper's setting: 300k Gaussians at 640x360 (850 fps on an RTX 3090)."""
    scene = random_scene(300_000, 640, 360, device=device, dtype=dtype)
    scene.description = "original: 300k random Gaussians at 640x360 (paper: 850 fps, RTX 3090)"
    return scene


CASES: dict[str, Callable[..., SceneInputs]] = {
    "random": random_scene,
    "original": lambda n_gaussians=300_000, width=640, height=360, **kw: original_scene(**kw),
}


def make_case(name: str, n_gaussians: int, width: int, height: int, *, device="cpu") -> SceneInputs:
    """Build a registered case; raises ValueError naming the known cases."""
    if name not in CASES:
        raise ValueError(f"case: expected one of {sorted(CASES)}, got {name!r}")
    return CASES[name](n_gaussians=n_gaussians, width=width, height=height, device=device)
