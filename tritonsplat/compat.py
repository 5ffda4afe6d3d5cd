"""Drop-in replacement for `diff_gaussian_rasterization` (the `-w-depth` fork that Dynamic 3D
Gaussians, SplaTAM and others pin at cb65e4b): change only the import.

    from tritonsplat.compat import GaussianRasterizationSettings, GaussianRasterizer

Written against the published Python API; none of the original (non-commercial licence) is copied.
It reproduces the original's numbers by running tritonsplat's stages with its conventions:
- the matrices are read as the CUDA original reads them: their 16 values in order, whatever the
  tensor's shape ([4, 4], the [1, 4, 4] that Dynamic 3D Gaussians' `setup_camera` builds, [16]),
  dtype or device; viewmatrix holds w2c^T and projmatrix (P w2c)^T (row-vector convention);
- pixel x = fx X/Z + cx - 0.5 at integer pixel centres, which is tritonsplat's +0.5 convention with
  the same K (recovered from `projmatrix`);
- the 3D covariance R(q) diag(s)^2 R(q)^T with R(q) the rotation-matrix formula applied to the
  quaternion as given: the original does not normalise `rotations` (its callers do), so a
  non-unit quaternion gives a covariance that is not a rotated diagonal, as there;
- `scale_modifier` multiplies `scales`, never `cov3D_precomp`;
- Jacobian clamp of x/z and y/z at +-1.3 tan(fov); near cull z <= 0.2; alpha cap 0.99; no opacity cull;
- radius ceil(3 sqrt(lambda_max)), lambda = mid + sqrt(max(0.1, mid^2 - det)), and blending only in
  the 16x16 tiles of its tile rectangle (this truncation is part of its images);
- returns the tuple (color [D, H, W], radii [N] int32, depth [1, H, W]); `depth` is the median
  depth (camera z of the Gaussian at which transmittance first falls below 0.5, 15.0 where it
  never does);
- `markVisible(positions)` is the original's frustum test, camera z > 0.2.

Deliberate differences (each a superset of, or a clearer failure than, the original's behaviour):
- Gradients are exact derivatives of the forward above. Where the CUDA original approximates: it
  ignores the alpha cap in the opacity gradient, zeroes the Jacobian-clamp terms instead of moving
  them to z, and returns the `scales` gradient with respect to scale_modifier * scales (missing the
  factor scale_modifier when it is not 1); tritonsplat differentiates all of these exactly.
- `depth` is returned detached: the original also ignores the depth gradient, but silently (a
  loss on depth alone backpropagates zeros there, and raises here).
- `prefiltered=True` promises that no Gaussian is behind the near plane; where one is, the original
  stops the GPU with a device trap, this raises a ValueError naming `prefiltered`.
- `debug=True` (the field exists in the upstream Inria renderer, not in the -w-depth fork, so it is
  optional here) changes no number; when the forward fails it writes the inputs to
  `snapshot_fw.dump` in the working directory before re-raising, as upstream does (there is no
  backward snapshot).
- Any number of colour channels (with `bg` holding as many values), float64 inputs (computed in
  float64 on the torch backend), CPU tensors, and `means2D=None` are accepted.
The gradient written to `means2D` is the screen-space gradient in NDC units (pixel gradient x
(W/2, H/2)), with 0 in a third column, the quantity the original's densification thresholds at 0.0002.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import NamedTuple

import torch

from . import constants
from .backends import render, resolve_backend
from .settings import RenderSettings
from .types import RenderOptions
from .validation import RasterizeInputs, check_values, finite_check, require_tensor

SNAPSHOT_FILE = "snapshot_fw.dump"


class GaussianRasterizationSettings(NamedTuple):
    """Settings of one camera, with the original's exact fields.

    viewmatrix is w2c^T and projmatrix is (P w2c)^T (row-vector convention), as 3DGS / Dynamic 3D
    Gaussians build them: any tensor holding those 16 values in order ([4, 4], [1, 4, 4], [16]).
    bg holds one value per colour channel and campos the camera centre (3 values), in any shape.
    """

    image_height: int
    image_width: int
    tanfovx: float
    tanfovy: float
    bg: torch.Tensor
    scale_modifier: float
    viewmatrix: torch.Tensor
    projmatrix: torch.Tensor
    sh_degree: int
    campos: torch.Tensor
    prefiltered: bool
    debug: bool = False


def _values(name: str, value, count: int, expected: str) -> torch.Tensor:
    """The `count` values of a settings tensor in memory order, detached, float64, on its device."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor holding {expected}, got {type(value).__name__}")
    if value.numel() != count or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name}: expected a real tensor holding {expected} ({count} values), got shape "
                         f"{tuple(value.shape)}, dtype {value.dtype}")
    values = value.detach().reshape(count).to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: expected only finite values, found NaN or Inf")
    return values


_MATRIX = "a 4x4 matrix in row-vector order ([4, 4], [1, 4, 4] or any shape with 16 values)"


def view_and_full_matrices(settings: GaussianRasterizationSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(w2c [4, 4], P w2c [4, 4]) float64 from the settings' transposed matrices, any layout."""
    view = _values("viewmatrix", settings.viewmatrix, 16, _MATRIX).reshape(4, 4).T
    full = _values("projmatrix", settings.projmatrix, 16, _MATRIX).reshape(4, 4).T
    return view, full


def intrinsics_from_matrices(settings: GaussianRasterizationSettings, matrices=None) -> torch.Tensor:
    """K [3, 3] such that tritonsplat's +0.5 pixel convention reproduces the original's pixels.

    The original maps ndc to pixels with ((ndc + 1) S - 1) / 2; with P = (P w2c) w2c^-1
    (P[3] = [0, 0, 1, 0]) that is fx X/Z + cx - 0.5 with fx = P00 W/2, cx = W (1 + P02) / 2.
    `matrices`: view_and_full_matrices(settings) when already computed.
    """
    w2c, full = matrices if matrices is not None else view_and_full_matrices(settings)
    projection = full @ torch.linalg.inv(w2c)
    width, height = settings.image_width, settings.image_height
    fx = projection[0, 0] * width / 2
    fy = projection[1, 1] * height / 2
    cx = width * (1 + projection[0, 2]) / 2
    cy = height * (1 + projection[1, 2]) / 2
    focal_from_fov = width / (2 * settings.tanfovx)
    if abs(float(fx) - focal_from_fov) > 1e-3 * focal_from_fov:
        warnings.warn(f"projmatrix focal {float(fx):.3f} differs from image_width / (2 tanfovx) = "
                      f"{focal_from_fov:.3f}; tritonsplat uses the projmatrix one for both the mean "
                      f"and the Jacobian", stacklevel=3)
    K = torch.zeros(3, 3, dtype=torch.float64, device=w2c.device)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[2, 2] = fx, fy, cx, cy, 1.0
    return K


def covariance_as_given(rotations: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[N, 6] upper triangle (xx, xy, xz, yy, yz, zz) of R(q) diag(scales)^2 R(q)^T.

    R(q) is the unit-quaternion rotation formula evaluated on q = (w, x, y, z) as given, without
    normalising: for |q| != 1 it is not a rotation, as in the original's covariance (3DGS Eq. 6).
    """
    w, x, y, z = torch.unbind(rotations, dim=-1)
    rows = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], dim=-1).reshape(-1, 3, 3)
    rotation_scale = rows * scales[:, None, :]
    cov = rotation_scale @ rotation_scale.transpose(1, 2)
    return torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], -1)


def _inria_settings(settings: GaussianRasterizationSettings) -> RenderSettings:
    return RenderSettings(width=int(settings.image_width), height=int(settings.image_height),
                          tile_size=constants.TILE_SIZE, near=constants.INRIA_NEAR_PLANE,
                          far=constants.FAR_PLANE, eps2d=constants.EPS2D, alpha_cap=constants.ALPHA_CAP,
                          radius_rule="inria", tile_rule="rectangle")


def _write_snapshot(arguments: dict) -> None:
    """torch.save the forward's inputs (CPU copies) to SNAPSHOT_FILE, atomically."""
    copies = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    directory = os.path.abspath(os.getcwd())
    handle, temporary = tempfile.mkstemp(prefix=".snapshot_fw.", dir=directory)
    os.close(handle)
    try:
        torch.save(copies, temporary)
        os.replace(temporary, os.path.join(directory, SNAPSHOT_FILE))
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class GaussianRasterizer(torch.nn.Module):
    """`GaussianRasterizer(raster_settings=...)(means3D, means2D, opacities, ...)` as the original.

    Runs on the backend chosen by `backend` ("auto": Triton on CUDA, torch elsewhere).
    """

    def __init__(self, raster_settings: GaussianRasterizationSettings, backend: str = "auto"):
        super().__init__()
        self.raster_settings = raster_settings
        self.backend = backend

    def markVisible(self, positions: torch.Tensor) -> torch.Tensor:  # noqa: N802 - original's name
        """[N] bool on the positions' device: camera z > 0.2 (the original's frustum test)."""
        positions = require_tensor("positions", positions, "[N, 3]")
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError(f"positions: expected [N, 3], got shape {tuple(positions.shape)}")
        with torch.no_grad():
            w2c, _ = view_and_full_matrices(self.raster_settings)
            return self._camera_z(positions, w2c) > constants.INRIA_NEAR_PLANE

    @staticmethod
    def _camera_z(positions: torch.Tensor, w2c: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
        row = w2c[2].to(device=positions.device, dtype=dtype)
        return positions.detach().to(dtype) @ row[:3] + row[3]

    def forward(self, means3D, means2D, opacities, shs=None, colors_precomp=None, scales=None,  # noqa: N803
                rotations=None, cov3D_precomp=None):
        """Render one camera.

        Args:
            means3D: [N, 3].  means2D: [N, 2] or [N, 3] tensor with requires_grad (or None),
                receiving the screen-space gradient in NDC units.  opacities: [N, 1] or [N] in [0, 1].
            shs: [N, K, 3] SH coefficients (degree raster_settings.sh_degree) or None.
            colors_precomp: [N, D] colours or None (exactly one of shs / colors_precomp).
            scales: [N, 3], rotations: [N, 4] (w, x, y, z), used as given (not normalised), or
                cov3D_precomp: [N, 6] upper triangle (xx, xy, xz, yy, yz, zz) (exactly one of the two forms).
        Returns:
            (color [D, H, W], radii [N] int32, depth [1, H, W] detached).
        """
        if not getattr(self.raster_settings, "debug", False):
            return self._forward(means3D, means2D, opacities, shs, colors_precomp, scales, rotations, cov3D_precomp)
        try:
            return self._forward(means3D, means2D, opacities, shs, colors_precomp, scales, rotations, cov3D_precomp)
        except Exception:
            _write_snapshot(dict(means3D=means3D, means2D=means2D, opacities=opacities, shs=shs,
                                 colors_precomp=colors_precomp, scales=scales, rotations=rotations,
                                 cov3D_precomp=cov3D_precomp, **self.raster_settings._asdict()))
            print(f"\nAn error occurred in forward. Please forward {SNAPSHOT_FILE} for debugging.")
            raise

    def _forward(self, means3D, means2D, opacities, shs, colors_precomp, scales, rotations,  # noqa: N803
                 cov3D_precomp):
        s = self.raster_settings
        if (shs is None) == (colors_precomp is None):
            raise ValueError("shs, colors_precomp: please provide exactly one of either SHs or "
                             "precomputed colors")
        if ((scales is None or rotations is None) and cov3D_precomp is None) or (
                (scales is not None or rotations is not None) and cov3D_precomp is not None):
            raise ValueError("scales/rotations, cov3D_precomp: please provide exactly one of either "
                             "scale/rotation pair or precomputed 3D covariance")
        means3D = require_tensor("means3D", means3D, "[N, 3]")
        if means3D.dim() != 2 or means3D.shape[1] != 3:
            raise ValueError(f"means3D: expected [N, 3], got shape {tuple(means3D.shape)}")
        n = means3D.shape[0]
        opacities = require_tensor("opacities", opacities, f"[N={n}, 1]")
        if opacities.shape not in ((n, 1), (n,)):
            raise ValueError(f"opacities: expected [N={n}, 1] or [N={n}], got shape {tuple(opacities.shape)}")
        opacities = opacities.reshape(n)
        if means2D is not None and (not isinstance(means2D, torch.Tensor) or means2D.dim() != 2
                                    or means2D.shape[0] != n or means2D.shape[1] < 2):
            shape = tuple(means2D.shape) if isinstance(means2D, torch.Tensor) else type(means2D).__name__
            raise ValueError(f"means2D: expected [N={n}, 2] or [N={n}, 3], got {shape}")
        if cov3D_precomp is not None:
            require_tensor("cov3D_precomp", cov3D_precomp, f"[N={n}, 6]")
            if cov3D_precomp.shape != (n, 6):
                raise ValueError(f"cov3D_precomp: expected [N={n}, 6], got {tuple(cov3D_precomp.shape)}")
        else:
            require_tensor("scales", scales, f"[N={n}, 3]")
            require_tensor("rotations", rotations, f"[N={n}, 4]")
            if scales.shape != (n, 3) or rotations.shape != (n, 4):
                raise ValueError(f"scales, rotations: expected [N={n}, 3] and [N={n}, 4], got "
                                 f"{tuple(scales.shape)} and {tuple(rotations.shape)}")

        device = means3D.device
        dtype = torch.float64 if means3D.dtype == torch.float64 else torch.float32
        width, height = int(s.image_width), int(s.image_height)
        settings = _inria_settings(s)
        matrices = view_and_full_matrices(s)
        w2c = matrices[0]
        K = intrinsics_from_matrices(s, matrices).to(device=device, dtype=dtype)[None]
        viewmat = w2c.to(device=device, dtype=dtype)[None]
        campos = _values("campos", s.campos, 3, "the camera centre (3 values)").to(device=device, dtype=dtype)
        limits = torch.tensor([-constants.INRIA_CLAMP_TANFOV * s.tanfovx, constants.INRIA_CLAMP_TANFOV * s.tanfovx,
                               -constants.INRIA_CLAMP_TANFOV * s.tanfovy, constants.INRIA_CLAMP_TANFOV * s.tanfovy],
                              device=device, dtype=dtype)[None]
        means = means3D.to(dtype)
        if shs is not None:
            from .reference.projection import evaluate_sh_colors
            require_tensor("shs", shs, f"[N={n}, K, 3]")
            degree = s.sh_degree
            if isinstance(degree, bool) or not isinstance(degree, int) or not 0 <= degree <= constants.MAX_SH_DEGREE:
                raise ValueError(f"sh_degree: expected an int in 0..{constants.MAX_SH_DEGREE} with shs, got {degree!r}")
            if shs.dim() != 3 or shs.shape[0] != n or shs.shape[2] != 3 or shs.shape[1] < (degree + 1) ** 2:
                raise ValueError(f"shs: expected [N={n}, K>={(degree + 1) ** 2}, 3] for sh_degree={degree}, "
                                 f"got shape {tuple(shs.shape)}")
            colors = evaluate_sh_colors(shs.to(dtype), means, campos.reshape(1, 3), degree)
        else:
            colors = require_tensor("colors_precomp", colors_precomp, f"[N={n}, D]")
            if colors.dim() != 2 or colors.shape[0] != n:
                raise ValueError(f"colors_precomp: expected [N={n}, D], got shape {tuple(colors.shape)}")
            colors = colors.to(dtype)[None]
        n_channels = colors.shape[-1]
        bg = _values("bg", s.bg, n_channels, f"one value per colour channel ({n_channels})").to(device=device,
                                                                                              dtype=dtype)
        if cov3D_precomp is not None:
            covars = cov3D_precomp.to(dtype)  # the original applies no scale_modifier here
        else:
            covars = covariance_as_given(rotations.to(dtype), scales.to(dtype) * s.scale_modifier)
        # Unused with covars; the pipeline still takes them (and validates nothing in them).
        quats = torch.ones(n, 4, device=device, dtype=dtype)
        scales_used = torch.ones(n, 3, device=device, dtype=dtype)
        checks = [finite_check("means3D", means), finite_check("opacities", opacities),
                  finite_check("shs" if shs is not None else "colors_precomp", colors)]
        if cov3D_precomp is not None:
            checks.append(finite_check("cov3D_precomp", covars))
        else:
            checks += [finite_check("scales", scales), finite_check("rotations", rotations)]
        if s.prefiltered:
            checks.append(("prefiltered", (self._camera_z(means, w2c) > constants.INRIA_NEAR_PLANE).all(),
                           "True promises every Gaussian has camera z > 0.2, but some do not (the original "
                           "stops with a device error here); pass prefiltered=False to cull them"))
        check_values(checks)
        inputs = RasterizeInputs(means=means, quats=quats, scales=scales_used, opacities=opacities.to(dtype),
                                 colors=colors.expand(1, n, n_channels), viewmats=viewmat, Ks=K,
                                 backgrounds=bg[None], n_cameras=1, n_gaussians=n, n_channels=n_channels,
                                 sh_degree=None)

        def route_ndc_gradient(means2d):
            # Forward value unchanged; the gradient reaching means2D is the pixel one x (W/2, H/2).
            if means2D is None or not means2D.requires_grad:
                return means2d
            handle = means2D[:, :2].to(dtype)
            ndc_scale = torch.tensor([width / 2, height / 2], device=device, dtype=dtype)
            return means2d + ((handle - handle.detach()) * ndc_scale)[None]

        # The original reads only its median depth and the image: the other outputs cost nothing.
        options = RenderOptions(outputs=("colors", "median_depths"))
        out = render(resolve_backend(self.backend, device), inputs, settings, options, clamp_limits=limits,
                     covars=covars, means2d_hook=route_ndc_gradient)
        color = out.colors[0].permute(2, 0, 1)
        median = out.median_depths[0].permute(2, 0, 1)
        depth = torch.where(median > 0, median, torch.full_like(median, constants.INRIA_EMPTY_DEPTH))
        return color, out.radii[0], depth.detach()
