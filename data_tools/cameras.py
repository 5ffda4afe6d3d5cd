"""Pinhole cameras in the OpenCV convention, and conversions from other conventions.

Conventions (shared with ``tritonsplat.rasterize``):

- world-to-camera ``w2c`` maps world points to a camera frame with x right, y down, z forward;
- ``K`` maps camera points to pixels as ``u = fx X / Z + cx``, ``v = fy Y / Z + cy``, where pixel
  ``(i, j)`` (column i, row j) covers ``[i, i + 1) x [j, j + 1)`` and has its centre at
  ``(i + 0.5, j + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

#: Largest allowed deviation of ``R^T R`` from the identity and of ``det R`` from +1.
RIGID_TOL = 1e-4

# OpenGL/Blender camera axes (x right, y up, z backward) -> OpenCV (x right, y down, z forward).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def check_intrinsics(K, source: str | Path | None = None, what: str = "K") -> np.ndarray:
    """Validate a 3x3 pinhole matrix and return it as float64.

    Raises:
        DataError: naming ``source`` when K is not 3x3, not finite, has a bottom row other than
            (0, 0, 1), or a non-positive (singular) focal length.
    """
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(source, f"{what} is not a 3x3 numeric matrix") from None
    if K.shape != (3, 3):
        raise DataError(source, f"{what} must be 3x3, got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise DataError(source, f"{what} has non-finite entries")
    if not np.allclose(K[2], [0.0, 0.0, 1.0], atol=1e-9) or abs(K[1, 0]) > 1e-9:
        raise DataError(source, f"{what} is not an upper-triangular pinhole matrix with bottom row (0, 0, 1)")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise DataError(source, f"{what} is singular or mirrored (fx={K[0, 0]:g}, fy={K[1, 1]:g})")
    return K


def check_rigid(w2c, source: str | Path | None = None, what: str = "w2c") -> np.ndarray:
    """Validate a 4x4 rigid transform and return it as float64 with an exactly orthonormal rotation.

    The rotation is re-orthonormalised (nearest rotation, by SVD) after the check so that tiny
    rounding in text files does not accumulate downstream.

    Raises:
        DataError: naming ``source`` when the matrix is not 4x4 (or 3x4), not finite, its last row
            is not (0, 0, 0, 1), or the rotation part is not orthonormal with det +1 within 1e-4.
    """
    try:
        M = np.asarray(w2c, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(source, f"{what} is not a 4x4 numeric matrix") from None
    if M.shape == (3, 4):
        M = np.vstack([M, [0.0, 0.0, 0.0, 1.0]])
    if M.shape != (4, 4):
        raise DataError(source, f"{what} must be 4x4, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise DataError(source, f"{what} has non-finite entries")
    if not np.allclose(M[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise DataError(source, f"{what} last row is {M[3].tolist()}, expected [0, 0, 0, 1]")
    R = M[:3, :3]
    ortho_err = np.abs(R.T @ R - np.eye(3)).max()
    det = np.linalg.det(R)
    if ortho_err > RIGID_TOL or abs(det - 1.0) > RIGID_TOL:
        raise DataError(
            source,
            f"{what} is not rigid: rotation part has |R^T R - I| = {ortho_err:.2e} and det = {det:.6f} "
            f"(need an orthonormal rotation with det +1 within {RIGID_TOL:g})",
        )
    U, _, Vt = np.linalg.svd(R)
    M = M.copy()
    M[:3, :3] = U @ Vt
    return M


def rigid_inverse(M: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform [R t; 0 1] -> [R^T -R^T t; 0 1]."""
    R, t = M[:3, :3], M[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def opengl_c2w_to_w2c(c2w_gl, source: str | Path | None = None, what: str = "transform_matrix") -> np.ndarray:
    """Blender/NeRF camera-to-world (camera x right, y up, z backward) -> OpenCV world-to-camera."""
    c2w = check_rigid(c2w_gl, source, what)
    return rigid_inverse(c2w @ _GL_TO_CV)


def look_at_w2c(eye, target, down=(0.0, 1.0, 0.0)) -> np.ndarray:
    """World-to-camera matrix of a camera at ``eye`` looking at ``target``.

    ``down`` is the world direction that should appear downwards in the image
    (+y for the y-down worlds of the Panoptic layout).
    """
    eye, target, down = (np.asarray(v, dtype=np.float64) for v in (eye, target, down))
    z = target - eye
    z /= np.linalg.norm(z)
    y = down - (down @ z) * z
    if np.linalg.norm(y) < 1e-8:
        raise ValueError("look_at: viewing direction is parallel to the down vector")
    y /= np.linalg.norm(y)
    x = np.cross(y, z)  # x = y cross z keeps the camera frame right-handed
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, z])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera (OpenCV convention, see the module docstring).

    Attributes:
        id: Panoptic ``cam_id``; for other formats the camera's index in the source.
        K: float64 [3, 3] intrinsics.
        w2c: float64 [4, 4] rigid world-to-camera transform.
        width, height: image size in pixels.
    """

    id: int
    K: np.ndarray = field(repr=False)
    w2c: np.ndarray = field(repr=False)
    width: int
    height: int

    def __post_init__(self):
        object.__setattr__(self, "id", int(self.id))
        object.__setattr__(self, "K", check_intrinsics(self.K, what=f"camera {self.id} K"))
        object.__setattr__(self, "w2c", check_rigid(self.w2c, what=f"camera {self.id} w2c"))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        if self.width <= 0 or self.height <= 0:
            raise DataError(None, f"camera {self.id} has a non-positive size {self.width}x{self.height}")

    @property
    def c2w(self) -> np.ndarray:
        """float64 [4, 4] camera-to-world transform."""
        return rigid_inverse(self.w2c)

    @property
    def R(self) -> np.ndarray:
        """float64 [3, 3] world-to-camera rotation."""
        return self.w2c[:3, :3]

    @property
    def t(self) -> np.ndarray:
        """float64 [3] world-to-camera translation."""
        return self.w2c[:3, 3]

    @property
    def center(self) -> np.ndarray:
        """float64 [3] camera centre in world coordinates."""
        return -self.R.T @ self.t

    @property
    def forward(self) -> np.ndarray:
        """float64 [3] unit optical axis (camera +z) in world coordinates."""
        return self.R[2].copy()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height

    def project(self, points) -> tuple[np.ndarray, np.ndarray]:
        """Project world points to pixels.

        Args:
            points: [N, 3] world points.

        Returns:
            uv: float64 [N, 2] pixel coordinates (``u = fx X / Z + cx``; pixel i has centre i + 0.5).
            z: float64 [N] camera-frame depth (points behind the camera have z <= 0; their uv is
               still computed but meaningless).
        """
        X = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ self.R.T + self.t
        z = X[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = X[:, :2] / z[:, None] * np.diag(self.K)[:2] + self.K[:2, 2]
            uv[:, 0] += self.K[0, 1] * X[:, 1] / z  # skew, zero for almost every camera
        return uv, z

    def in_image(self, uv: np.ndarray, z: np.ndarray) -> np.ndarray:
        """bool [N]: in front of the camera and inside ``[0, width) x [0, height)``."""
        return (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < self.width) & (uv[:, 1] >= 0) & (uv[:, 1] < self.height)

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """World rays through all pixel centres.

        Returns:
            origin: float64 [3] camera centre.
            dirs: float64 [H, W, 3] unit directions, row j / column i through pixel (i + 0.5, j + 0.5).
        """
        u = np.arange(self.width) + 0.5
        v = np.arange(self.height) + 0.5
        uu, vv = np.meshgrid(u, v)
        pix = np.stack([uu, vv, np.ones_like(uu)], axis=-1)
        d_cam = pix @ np.linalg.inv(self.K).T
        d = d_cam @ self.R  # camera -> world rotation is R^T, applied to row vectors as @ R
        return self.center, d / np.linalg.norm(d, axis=-1, keepdims=True)

    def scaled(self, factor: float) -> Camera:
        """This camera with its image scaled by ``factor`` (0.25 shrinks 4x).

        The new size is ``round(width * factor)`` x ``round(height * factor)`` and K is scaled by the
        exact size ratio per axis, so that pixel edges map to pixel edges (pixel-centre convention).
        """
        new_w = max(1, int(round(self.width * factor)))
        new_h = max(1, int(round(self.height * factor)))
        return self.resized(new_w, new_h)

    def resized(self, new_width: int, new_height: int) -> Camera:
        """This camera for the image resized to ``new_width`` x ``new_height`` (K scaled exactly)."""
        sx, sy = new_width / self.width, new_height / self.height
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
        return Camera(self.id, K, self.w2c.copy(), new_width, new_height)

    def __repr__(self) -> str:
        fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
        c = np.round(self.center, 3).tolist()
        return (
            f"Camera(id={self.id}, {self.width}x{self.height}, f=({fx:.1f}, {fy:.1f}), "
            f"c=({cx:.1f}, {cy:.1f}), center={c})"
        )


def make_camera(cam_id, K, w2c, width, height, source: str | Path, what: str) -> Camera:
    """Build a Camera from file data, raising DataError that names ``source`` on invalid matrices."""
    K = check_intrinsics(K, source, f"{what} intrinsics")
    w2c = check_rigid(w2c, source, f"{what} extrinsics")
    return Camera(cam_id, K, w2c, width, height)


def scene_radius(cameras: list[Camera]) -> float:
    """1.1 x the largest distance of a camera centre from the mean centre (Dynamic 3D Gaussians)."""
    if not cameras:
        return 0.0
    centres = np.stack([c.center for c in cameras])
    return 1.1 * float(np.linalg.norm(centres - centres.mean(0), axis=1).max())


def axes_focus(cameras: list[Camera]) -> np.ndarray:
    """float64 [3]: the point closest (least squares) to all optical axes, i.e. where cameras look."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for cam in cameras:
        d = cam.forward
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ cam.center
    if np.linalg.cond(A) > 1e8:  # all axes parallel: fall back to a point in front of the cameras
        return np.mean([c.center + c.forward for c in cameras], axis=0)
    return np.linalg.solve(A, b)
