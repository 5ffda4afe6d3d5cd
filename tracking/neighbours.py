"""k nearest neighbours of 3D points: PyKeOps (GPU and CPU) with an exact torch fallback.

The original (Luiten et al. 2024) asks an Open3D KD-tree for K + 1 neighbours and drops the point
itself. Here both paths return the K nearest *other* points by squared Euclidean distance.
"""

from __future__ import annotations

import os
import warnings

import torch

# Query rows per block in the torch path: a [rows, N] float32 distance block of at most ~64 MB.
_TORCH_BLOCK_ELEMENTS = 1 << 24
# Below this many points the torch path is used by "auto" on CPU: KeOps' first call compiles C++
# (seconds), which a small cdist beats (measured: 2,000 points, 2 CPU cores, 5.6 s first KeOps call).
_AUTO_TORCH_BELOW_ON_CPU = 200_000

_keops_state: dict[str, object] = {"failed": False, "warned": False}


def keops_available() -> bool:
    """True when pykeops imports and has not failed to compile in this process."""
    if _keops_state["failed"]:
        return False
    try:
        import pykeops  # noqa: F401
    except Exception:
        return False
    return True


def knn(points: torch.Tensor, k: int, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest other points of every point.

    Args:
        points: [N, 3] float positions (any device).
        k: neighbours per point, 1 <= k < N.
        backend: "keops" (PyKeOps; falls back to torch with a warning, once, if it cannot compile),
            "torch" (exact, blockwise cdist + topk) or "auto" (KeOps on CUDA or for large N on CPU,
            else torch). The environment variable TRITONSPLAT_KNN_BACKEND overrides "auto".

    Returns:
        indices: [N, k] int64, nearest first, never the point itself.
        squared_distances: [N, k] float32 (points' dtype), ascending.

    Raises:
        ValueError: for a bad shape, k out of range or an unknown backend.
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"knn: points must be [N, 3], got {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn: k must be in 1..N-1 = 1..{n - 1}, got {k}")
    if backend == "auto":
        backend = os.environ.get("TRITONSPLAT_KNN_BACKEND", "auto")
    if backend not in ("auto", "keops", "torch"):
        raise ValueError(f"knn: backend must be auto, keops or torch, got {backend!r}")
    if backend == "auto":
        use_keops = points.is_cuda or n >= _AUTO_TORCH_BELOW_ON_CPU
        backend = "keops" if use_keops and keops_available() else "torch"
    if backend == "keops":
        try:
            return _knn_keops(points, k)
        except Exception as exc:  # compile errors, missing compiler, unwritable cache, ...
            _keops_state["failed"] = True
            if not _keops_state["warned"]:
                _keops_state["warned"] = True
                warnings.warn(f"PyKeOps kNN unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                              "using the exact torch fallback", stacklevel=2)
    return _knn_torch(points, k)


def _knn_keops(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KeOps Kmin_argKmin over the symmetric distance matrix, asking for k + 1 and dropping self."""
    from pykeops.torch import LazyTensor

    x = points.detach().contiguous().float()
    x_i = LazyTensor(x[:, None, :])
    x_j = LazyTensor(x[None, :, :])
    d2 = ((x_i - x_j) ** 2).sum(-1)
    dist, idx = d2.Kmin_argKmin(K=k + 1, dim=1)
    return _drop_self(idx.long(), dist, k)


def _knn_torch(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact blockwise search: [rows, N] squared distances, self masked with +inf, topk."""
    x = points.detach().float()
    n = x.shape[0]
    rows = max(1, _TORCH_BLOCK_ELEMENTS // n)
    out_idx, out_d2 = [], []
    for start in range(0, n, rows):
        q = x[start:start + rows]
        # |q - x|^2 by direct differences for accuracy (cdist's matmul form loses digits near 0).
        d2 = torch.cdist(q, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        ar = torch.arange(q.shape[0], device=x.device)
        d2[ar, ar + start] = float("inf")
        vals, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        out_idx.append(idx)
        out_d2.append(vals)
    return torch.cat(out_idx), torch.cat(out_d2).to(points.dtype)


def _drop_self(idx: torch.Tensor, dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From k + 1 candidates per row, remove the row's own index (or the last one, for duplicates
    that sorted ahead of self)."""
    n = idx.shape[0]
    own = torch.arange(n, device=idx.device)[:, None]
    is_self = idx == own
    # Rows where self is absent (k + 1 exact duplicates): drop the last candidate instead.
    no_self = ~is_self.any(1)
    is_self[no_self, -1] = True
    # Keep the first occurrence of "self" only.
    first = torch.cumsum(is_self.int(), 1) == 1
    drop = is_self & first
    keep = ~drop
    return idx[keep].reshape(n, k), dist[keep].reshape(n, k)
