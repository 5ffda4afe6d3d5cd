"""The local-rigidity losses of Dynamic 3D Gaussians in pure PyTorch: the twin of `tritonsplat/ops/rigidity.py`.

Luiten et al., "Dynamic 3D Gaussians: Tracking by Persistent Dynamic View Synthesis" (3DV 2024), Eq. 2-4,
in the original code's forms (the neighbour weight inside the square root). For foreground Gaussian i
(row i of `fg_index`) with neighbours j (found at t = 0) and q_rel,i = q_i,t (x) conj(q_i,t-1):

- rigid = mean_ij sqrt(w_ij |R(q_rel,i)^T (mu_j,t - mu_i,t) - (mu_j,t-1 - mu_i,t-1)|^2 + 1e-20)
- rot   = mean_ij sqrt(w_ij |q_rel,j - q_rel,i|^2 + 1e-20)
- iso   = mean_ij sqrt(w_ij (|mu_j,t - mu_i,t| - d_ij,0)^2 + 1e-20), |v| = sqrt(|v|^2 + 1e-20)

R(q) normalises q first (eps 1e-12, as `F.normalize`). Quaternions are (w, x, y, z), Hamilton product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SQRT_EPS = 1e-20  # inside the square roots, as in the original
NORMALIZE_EPS = 1e-12  # F.normalize's default


@dataclass(frozen=True)
class NeighbourCSR:
    """The neighbour table transposed, for a fixed-order gradient gather: the entries e = i K + k of
    `neighbour_indices` sorted by destination row (stable: increasing e within a row).

    order: [F K] int32 entries sorted by neighbour_indices.flatten()[e];
    offsets: [F + 1] int32, row n's entries are order[offsets[n]:offsets[n + 1]].
    """

    order: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def build(cls, neighbour_indices: torch.Tensor) -> NeighbourCSR:
        """From neighbour_indices [F, K] int64 (rows of the F foreground Gaussians). Once per fit."""
        flat = neighbour_indices.reshape(-1)
        n_rows = neighbour_indices.shape[0]
        counts = torch.bincount(flat, minlength=n_rows)
        offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(torch.argsort(flat, stable=True).to(torch.int32), offsets.to(torch.int32))


def _quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _rotation_matrices(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = F.normalize(q, dim=-1, eps=NORMALIZE_EPS).unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1
                       ).reshape(*q.shape[:-1], 3, 3)


def check_rigidity_inputs(means, quats, prev_quats, fg_index, neighbour_indices, neighbour_weights,
                          initial_distances, prev_offsets) -> None:
    """ValueError naming the first argument whose shape does not fit the others."""
    n_fg, k = neighbour_indices.shape if neighbour_indices.dim() == 2 else (-1, -1)
    expected = {
        "means": (means, (means.shape[0], 3)), "quats": (quats, (means.shape[0], 4)),
        "prev_quats": (prev_quats, (n_fg, 4)), "fg_index": (fg_index, (n_fg,)),
        "neighbour_weights": (neighbour_weights, (n_fg, k)), "initial_distances": (initial_distances, (n_fg, k)),
        "prev_offsets": (prev_offsets, (n_fg, k, 3)),
    }
    if neighbour_indices.dim() != 2:
        raise ValueError(f"neighbour_indices: expected [F, K], got {tuple(neighbour_indices.shape)}")
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")


def rigidity_losses(means: torch.Tensor, quats: torch.Tensor, prev_quats: torch.Tensor, fg_index: torch.Tensor,
                    neighbour_indices: torch.Tensor, neighbour_weights: torch.Tensor,
                    initial_distances: torch.Tensor, prev_offsets: torch.Tensor,
                    csr: NeighbourCSR | None = None) -> torch.Tensor:
    """(rigid, rot, iso) as one tensor [3], differentiable in `means` and `quats` (autograd).

    Args:
        means: [N, 3] positions of every Gaussian at t.
        quats: [N, 4] normalised rotations of every Gaussian at t.
        prev_quats: [F, 4] normalised rotations of the foreground Gaussians at t - 1 (data).
        fg_index: [F] int64 rows of the foreground Gaussians in means / quats.
        neighbour_indices: [F, K] int64 neighbours j of foreground row i, as foreground rows.
        neighbour_weights: [F, K] w_ij.
        initial_distances: [F, K] d_ij,0.
        prev_offsets: [F, K, 3] mu_j,t-1 - mu_i,t-1 (data).
        csr: unused here (the Triton backward's gather table; same signature as the twin).
    """
    check_rigidity_inputs(means, quats, prev_quats, fg_index, neighbour_indices, neighbour_weights,
                          initial_distances, prev_offsets)
    fg_means, fg_quats = means[fg_index], quats[fg_index]  # [F, 3], [F, 4]
    conj = prev_quats * prev_quats.new_tensor([1.0, -1.0, -1.0, -1.0])
    rel = _quat_multiply(fg_quats, conj)  # [F, 4]
    offsets = fg_means[neighbour_indices] - fg_means[:, None]  # [F, K, 3]
    rotation = _rotation_matrices(rel)  # [F, 3, 3]
    unrotated = (rotation[:, None, :, :] * offsets[:, :, :, None]).sum(-2)  # R^T v, [F, K, 3]
    rigid = torch.sqrt(((unrotated - prev_offsets) ** 2).sum(-1) * neighbour_weights + SQRT_EPS).mean()
    rot = torch.sqrt(((rel[neighbour_indices] - rel[:, None]) ** 2).sum(-1) * neighbour_weights + SQRT_EPS).mean()
    distances = torch.sqrt((offsets**2).sum(-1) + SQRT_EPS)
    iso = torch.sqrt((distances - initial_distances) ** 2 * neighbour_weights + SQRT_EPS).mean()
    return torch.stack([rigid, rot, iso])
