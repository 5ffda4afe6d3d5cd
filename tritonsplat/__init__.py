"""tritonsplat: differentiable 3D Gaussian splatting in Triton and PyTorch.

    out = tritonsplat.rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height)

See `tritonsplat.rasterize` for the full contract, `tritonsplat.compat` for a drop-in replacement
of the original `diff_gaussian_rasterization` API.
"""

from ._version import __version__
from .backends import available_backends
from .rendering import RasterizeOutput, rasterize

__all__ = ["__version__", "available_backends", "rasterize", "RasterizeOutput"]
