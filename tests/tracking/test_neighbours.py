"""k nearest neighbours: torch and KeOps paths vs brute force.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| torch path vs float64 brute force | rel 1e-5, abs 1e-9 | float32 differences of float32 coordinates |
| KeOps vs torch sorted distances | rel 1e-5, abs 1e-7 | both float32; KeOps expands (x - y)^2 in its own order |
"""

from __future__ import annotations

import pytest
import torch

from tracking import neighbours


def brute_force(points: torch.Tensor, k: int):
    p = points.double()
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    d2.fill_diagonal_(float("inf"))
    return torch.topk(d2, k, largest=False)


@pytest.mark.parametrize("n,k", [pytest.param(37, 5, id="n37-k5"), pytest.param(513, 20, id="n513-k20")])
def test_torch_knn_matches_brute_force(n, k):
    pts = torch.randn(n, 3)
    idx, d2 = neighbours.knn(pts, k, backend="torch")
    ref_d2, ref_idx = brute_force(pts, k)
    assert idx.shape == (n, k) and idx.dtype == torch.int64
    assert not (idx == torch.arange(n)[:, None]).any(), "self must be excluded"
    torch.testing.assert_close(d2.double(), ref_d2, rtol=1e-5, atol=1e-9)
    # Distances of the returned indices are the returned distances.
    recomputed = ((pts[:, None] - pts[idx]) ** 2).sum(-1)
    torch.testing.assert_close(recomputed, d2, rtol=1e-5, atol=1e-9)


def test_torch_knn_blocks(monkeypatch):
    """Several query blocks give the same answer as one."""
    pts = torch.randn(300, 3)
    one = neighbours.knn(pts, 4, backend="torch")
    monkeypatch.setattr(neighbours, "_TORCH_BLOCK_ELEMENTS", 300 * 7)
    many = neighbours.knn(pts, 4, backend="torch")
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_drop_self_with_duplicates():
    idx = torch.tensor([[1, 0, 2], [0, 1, 2], [0, 1, 3]])  # row 2: self absent (duplicates ahead of it)
    dist = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    out_idx, out_d = neighbours._drop_self(idx, dist, 2)
    assert out_idx.tolist() == [[1, 2], [0, 2], [0, 1]]
    assert out_d.shape == (3, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="points"):
        neighbours.knn(torch.randn(5, 2), 2)
    with pytest.raises(ValueError, match="k must be"):
        neighbours.knn(torch.randn(5, 3), 5)
    with pytest.raises(ValueError, match="backend"):
        neighbours.knn(torch.randn(5, 3), 2, backend="faiss")


def _keops_or_skip():
    try:
        from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"PyKeOps is not importable here ({type(exc).__name__}: {exc})")


def test_keops_matches_torch():
    _keops_or_skip()
    pts = torch.randn(2000, 3)
    try:
        k_idx, k_d2 = neighbours._knn_keops(pts, 8)
    except Exception as exc:  # pragma: no cover - depends on the compiler
        pytest.skip(f"PyKeOps cannot compile here ({type(exc).__name__}: {str(exc)[:200]})")
    t_idx, t_d2 = neighbours.knn(pts, 8, backend="torch")
    torch.testing.assert_close(k_d2.sort(1).values, t_d2.sort(1).values, rtol=1e-5, atol=1e-7)
    assert not (k_idx == torch.arange(2000)[:, None]).any()


def test_keops_failure_falls_back_once(monkeypatch):
    def broken(points, k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(neighbours, "_knn_keops", broken)
    monkeypatch.setitem(neighbours._keops_state, "failed", False)
    monkeypatch.setitem(neighbours._keops_state, "warned", False)
    pts = torch.randn(50, 3)
    with pytest.warns(UserWarning, match="fallback"):
        idx, _ = neighbours.knn(pts, 3, backend="keops")
    ref = neighbours.knn(pts, 3, backend="torch")[0]
    assert torch.equal(idx, ref)
    assert not neighbours.keops_available()
