"""Quaternion helpers, (w, x, y, z) order, Hamilton product (as in Dynamic 3D Gaussians)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of quaternions [..., 4] (w, x, y, z); broadcasts leading dimensions."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    """(w, -x, -y, -z): the inverse of a unit quaternion. q [..., 4]."""
    # Negation, not a product with a new [1, -1, -1, -1] tensor: the same bits, and no host-to-device copy
    # (which a CUDA-graph capture forbids).
    return torch.cat([q[..., :1], -q[..., 1:]], -1)


def quat_normalize(q: torch.Tensor) -> torch.Tensor:
    """q / |q| for q [..., 4] (F.normalize, eps 1e-12, as the original's activation)."""
    return F.normalize(q, dim=-1)


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of quaternions [..., 4] (normalised first), R v = q v q^-1."""
    w, x, y, z = quat_normalize(q).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (w >= 0) of rotation matrices [..., 3, 3] (Shepperd's method)."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cand = torch.stack(
        [
            torch.stack([1 + tr, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
            torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + 2 * m[:, 0, 0] - tr, m[:, 0, 1] + m[:, 1, 0],
                         m[:, 0, 2] + m[:, 2, 0]], -1),
            torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 + 2 * m[:, 1, 1] - tr,
                         m[:, 1, 2] + m[:, 2, 1]], -1),
            torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                         1 + 2 * m[:, 2, 2] - tr], -1),
        ],
        1,
    )  # [M, 4 candidates, 4]; candidate k has component k equal to 4 q_k^2
    diag = torch.stack([1 + tr, 1 + 2 * m[:, 0, 0] - tr, 1 + 2 * m[:, 1, 1] - tr, 1 + 2 * m[:, 2, 2] - tr], -1)
    best = diag.argmax(-1)
    q = cand[torch.arange(len(m)), best]
    q = F.normalize(q, dim=-1)
    q = torch.where(q[:, :1] < 0, -q, q)
    return q.reshape(*R.shape[:-2], 4)
