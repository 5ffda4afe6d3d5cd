"""Fused rigidity losses: Triton (interpreter) vs its torch twin, the twin vs a float64 brute force.

The brute force shares no code with either: a Python loop over (i, k) entries, R(u)^T o as the sandwich
product conj(u) o u, and |.| by math.sqrt.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| twin vs brute force (float64) | abs 1e-12 | same sums in another order |
| twin gradcheck (float64) | torch defaults (eps 1e-6, atol 1e-5) | finite differences of a smooth map |
| Triton vs twin, losses (float32) | abs 1e-6 + rel 1e-5 | float32 products and sqrt, other order |
| Triton vs twin, gradients (float32) | abs 1e-6 + rel 1e-4 of the largest entry | same, through 1/s factors |
| Triton gradient, run twice | exact | fixed-order sums, no atomics |
"""

from __future__ import annotations

import math

import pytest
import torch

from tritonsplat.reference import rigidity as ref

pytestmark = pytest.mark.interpreter


def _scene(n=40, n_fg=29, k=5, seed=0, dtype=torch.float64, hub=True):
    """N Gaussians of which n_fg are foreground (shuffled rows), K neighbours among the foreground."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=dtype), dim=-1)
    fg = torch.randperm(n, generator=g)[:n_fg]
    prev = torch.nn.functional.normalize(quats[fg] + 0.2 * torch.randn(n_fg, 4, generator=g, dtype=dtype), dim=-1)
    nb = torch.stack([torch.randperm(n_fg - 1, generator=g)[:k] for _ in range(n_fg)])
    nb = nb + (nb >= torch.arange(n_fg)[:, None]).long()  # never the row itself
    if hub:
        nb[1:, 0] = torch.where(torch.arange(1, n_fg) == 3, nb[1:, 0], torch.full((n_fg - 1,), 3))
    weights = torch.rand(n_fg, k, generator=g, dtype=dtype) + 0.1
    dist0 = torch.rand(n_fg, k, generator=g, dtype=dtype) + 0.5
    prev_means = means[fg] + 0.1 * torch.randn(n_fg, 3, generator=g, dtype=dtype)
    prev_offsets = prev_means[nb] - prev_means[:, None]
    return means, quats, prev, fg, nb, weights, dist0, prev_offsets


def _quat_mul(a, b):
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return (aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw)


def brute_force(means, quats, prev, fg, nb, weights, dist0, prev_offsets):
    m, q, p = means.tolist(), quats.tolist(), prev.tolist()
    fg, nb, w, d0, po = fg.tolist(), nb.tolist(), weights.tolist(), dist0.tolist(), prev_offsets.tolist()

    def rel(row):
        pw, px, py, pz = p[row]
        return _quat_mul(q[fg[row]], (pw, -px, -py, -pz))

    sums = [0.0, 0.0, 0.0]
    count = 0
    for i in range(len(fg)):
        r = rel(i)
        norm = math.sqrt(sum(c * c for c in r))
        u = tuple(c / norm for c in r)
        for k, j in enumerate(nb[i]):
            o = [m[fg[j]][a] - m[fg[i]][a] for a in range(3)]
            # R(u)^T o = conj(u) o u
            v = _quat_mul(_quat_mul((u[0], -u[1], -u[2], -u[3]), (0.0, *o)), u)[1:]
            sums[0] += math.sqrt(w[i][k] * sum((v[a] - po[i][k][a]) ** 2 for a in range(3)) + 1e-20)
            rj = rel(j)
            sums[1] += math.sqrt(w[i][k] * sum((rj[a] - r[a]) ** 2 for a in range(4)) + 1e-20)
            dist = math.sqrt(sum(c * c for c in o) + 1e-20)
            sums[2] += math.sqrt(w[i][k] * (dist - d0[i][k]) ** 2 + 1e-20)
            count += 1
    return torch.tensor([s / count for s in sums], dtype=torch.float64)


def test_twin_matches_brute_force():
    args = _scene()
    torch.testing.assert_close(ref.rigidity_losses(*args), brute_force(*args), atol=1e-12, rtol=0)


def test_twin_gradcheck():
    means, quats, *rest = _scene(n=12, n_fg=9, k=3, seed=1)
    means.requires_grad_()
    quats.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, q: ref.rigidity_losses(m, q, *rest), (means, quats))


def _grads(function, args, upstream):
    means, quats = (t.detach().clone().requires_grad_() for t in args[:2])
    losses = function(means, quats, *args[2:])
    means_grad, quats_grad = torch.autograd.grad(losses, (means, quats), upstream)
    return losses.detach(), means_grad, quats_grad


@pytest.mark.parametrize("n,n_fg,k,hub", [(40, 29, 5, True), (150, 130, 3, False)], ids=["hub-k5", "2-programs"])
def test_triton_matches_twin(n, n_fg, k, hub):
    from tritonsplat.ops import rigidity as ops

    args64 = _scene(n=n, n_fg=n_fg, k=k, seed=2, hub=hub)
    args32 = tuple(t.float() if t.is_floating_point() else t for t in args64)
    upstream = torch.tensor([4.0, 4.0, 2.0])
    expected = _grads(ref.rigidity_losses, args64, upstream.double())
    csr = ref.NeighbourCSR.build(args32[4])
    actual = _grads(lambda *a: ops.rigidity_losses(*a, csr=csr), args32, upstream)
    torch.testing.assert_close(actual[0].double(), expected[0], atol=1e-6, rtol=1e-5)
    for name, a, e in zip(("means", "quats"), actual[1:], expected[1:]):
        scale = float(e.abs().max())
        torch.testing.assert_close(a.double(), e, atol=1e-6 + 1e-4 * scale, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    background = torch.ones(n, dtype=torch.bool)
    background[args32[3]] = False
    assert (actual[1][background] == 0).all() and (actual[2][background] == 0).all()
    again = _grads(lambda *a: ops.rigidity_losses(*a, csr=csr), args32, upstream)
    assert torch.equal(again[1], actual[1]) and torch.equal(again[2], actual[2])


def test_bad_shapes_name_the_argument():
    from tritonsplat.ops import rigidity as ops

    args = list(_scene(dtype=torch.float32))
    args[7] = args[7][:, :2]
    for function in (ref.rigidity_losses, ops.rigidity_losses):
        with pytest.raises(ValueError, match="prev_offsets: expected shape"):
            function(*args)
