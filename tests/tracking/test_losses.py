"""Losses of Dynamic 3D Gaussians vs hand-computed small cases.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| rigidity terms, rigid motion | <= 1e-6 | sqrt(w * ~0 + 1e-20) >= 1e-10 per pair + float32 rotations (~1e-7 m) |
| hand-computed two-point cases | rel 1e-5 | float32 evaluation of the same closed form |
| SSIM of constant images | abs 1e-4 | E[x^2] - E[x]^2 cancels in float32 (~3e-8) against C2 = 9e-4 |
| deterministic gather gradient vs autograd | abs 1e-6 | same sums, different order (float32) |
| compiled vs eager rigidity | rel 1e-5 (values), 1e-4 (grads) | inductor fuses and reorders float32 sums |
| written-out rigidity gradient | values exact; grads 1e-5 x max abs (float32) | the same forward; sums reordered |
| eager rigidity family vs autograd, float32 | values rel 1e-6; grads 1e-5 x max abs | fused products, sums reordered |
| the same, float64 | values rel 1e-12; grads 1e-10 x max abs | the same |
| the CSR scatter vs index_add_ | abs 1e-6 | the same sums, associated differently |
"""

from __future__ import annotations

import math

import pytest
import torch

from tracking import losses as L
from tracking.quaternions import quat_conjugate, quat_multiply, quat_normalize, quat_to_rotmat, rotmat_to_quat


def random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quat_normalize(torch.randn(4, generator=g))


def cluster(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.02
    quats = quat_normalize(torch.randn(n, 4, generator=g))
    d2 = ((means[:, None] - means[None]) ** 2).sum(-1)
    d2.fill_diagonal_(float("inf"))
    d2k, idx = torch.topk(d2, 6, largest=False)
    return means, quats, idx, torch.exp(-2000 * d2k), d2k.sqrt()


# ----------------------------------------------------------------------------- quaternions
def test_quaternion_product_matches_rotation_matrices():
    a, b = random_rotation(1), random_rotation(2)
    Rab = quat_to_rotmat(quat_multiply(a, b))
    torch.testing.assert_close(Rab, quat_to_rotmat(a) @ quat_to_rotmat(b), atol=1e-6, rtol=0)
    torch.testing.assert_close(quat_to_rotmat(quat_conjugate(a)), quat_to_rotmat(a).T, atol=1e-6, rtol=0)


def test_rotmat_to_quat_round_trip():
    q = quat_normalize(torch.randn(50, 4))
    q = torch.where(q[:, :1] < 0, -q, q)
    torch.testing.assert_close(rotmat_to_quat(quat_to_rotmat(q)), q, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- rigidity family
def test_rigid_motion_gives_zero_rigidity_losses():
    means0, quats0, idx, w, d0 = cluster()
    R_q = random_rotation(3)
    R = quat_to_rotmat(R_q)
    shift = torch.tensor([0.3, -0.1, 0.2])
    means1 = means0 @ R.T + shift
    quats1 = quat_multiply(R_q.expand_as(quats0), quats0)
    out = L.rigidity_losses(means1, quats1, means0, quats0, idx, w, d0)
    for name in ("rigid", "rot", "iso"):
        assert out[name].item() <= 1e-6, (name, out[name].item())


def test_non_rigid_deformation_gives_positive_losses():
    means0, quats0, idx, w, d0 = cluster()
    stretched = means0 * torch.tensor([1.5, 1.0, 1.0])
    twisted = quat_multiply(quat_normalize(torch.randn(len(quats0), 4)), quats0)
    out = L.rigidity_losses(stretched, twisted, means0, quats0, idx, w, d0)
    assert out["rigid"] > 1e-4 and out["iso"] > 1e-4 and out["rot"] > 1e-2


def test_two_points_by_hand():
    """Two Gaussians, each the other's neighbour; point 1 moves by (0, 0.01, 0), no rotations."""
    prev = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    cur = prev + torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.01, 0.0]])
    ident = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    idx = torch.tensor([[1], [0]])
    d0 = torch.full((2, 1), 0.01)
    w = torch.exp(-2000 * d0**2)
    out = L.rigidity_losses(cur, ident, prev, ident, idx, w, d0)
    # rigid: |offset_t - offset_t-1| = 0.01 for both pairs.
    assert out["rigid"].item() == pytest.approx(math.sqrt(w[0, 0].item() * 0.01**2 + 1e-20), rel=1e-5)
    # iso: |(sqrt(2) 0.01) - 0.01| for both pairs.
    expected_iso = math.sqrt(w[0, 0].item() * (0.01 * math.sqrt(2) - 0.01) ** 2 + 1e-20)
    assert out["iso"].item() == pytest.approx(expected_iso, rel=1e-5)
    # rot: no rotation anywhere -> only the 1e-20 floor.
    assert out["rot"].item() == pytest.approx(1e-10, rel=1e-3)


def test_rotation_term_by_hand():
    """Point 0 turns by angle a about z, point 1 does not: |q_rel,1 - q_rel,0|^2 = 2 - 2 cos(a / 2)."""
    a = 0.3
    ident = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    turned = ident.clone()
    turned[0] = torch.tensor([math.cos(a / 2), 0.0, 0.0, math.sin(a / 2)])
    means = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    idx = torch.tensor([[1], [0]])
    w = torch.tensor([[0.5], [0.5]])
    out = L.rigidity_losses(means, turned, means, ident, idx, w, torch.full((2, 1), 0.01))
    assert out["rot"].item() == pytest.approx(math.sqrt(0.5 * (2 - 2 * math.cos(a / 2))), rel=1e-5)


def test_rigidity_gradients_flow_and_are_deterministic():
    means0, quats0, idx, w, d0 = cluster(n=60)
    means1 = means0 + 0.003 * torch.randn_like(means0)
    quats1 = quat_normalize(quats0 + 0.05 * torch.randn_like(quats0))

    def grads():
        m = means1.clone().requires_grad_()
        q = quats1.clone().requires_grad_()
        sum(L.rigidity_losses(m, quat_normalize(q), means0, quats0, idx, w, d0).values()).backward()
        return m.grad, q.grad

    g1, g2 = grads(), grads()
    assert torch.isfinite(g1[0]).all() and g1[0].abs().sum() > 0 and g1[1].abs().sum() > 0
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])


def test_neighbour_gather_backward_matches_autograd_index():
    values = torch.randn(30, 4)
    idx = torch.randint(0, 30, (30, 7))
    upstream = torch.randn(30, 7, 4)
    a = values.clone().requires_grad_()
    (L.neighbour_gather(a, idx) * upstream).sum().backward()
    b = values.clone().requires_grad_()
    (b[idx] * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- other terms
def test_floor_background_colour_terms():
    fg = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.1, 0.0]])
    assert L.floor_loss(fg, 0.0).item() == pytest.approx((0.5 + 0.1) / 3)
    assert L.floor_loss(fg, 0.2).item() == pytest.approx(0.3 / 3)
    bg0 = torch.zeros(2, 3)
    q0 = torch.tensor([[1.0, 0, 0, 0]] * 2)
    bg1 = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.0, 0.3]])
    assert L.background_loss(bg1, q0, bg0, q0).item() == pytest.approx((0.3 + 0.3) / 2)
    assert L.l1_rows(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


# ----------------------------------------------------------------------------- SSIM, PSNR
def test_flatness_value_and_gradient_by_hand():
    # A sphere has ratio 1, a (1, 2, 4) ellipsoid 1/4: mean 5/8. Only the smallest scale gets a gradient
    # (the largest is a detached reference): d/ds_min = 1 / (N s_max), zero for the other two.
    scales = torch.tensor([[2.0, 2.0, 2.0], [4.0, 1.0, 2.0]], requires_grad=True)
    value = L.flatness(scales)
    assert float(value) == pytest.approx(0.625)
    value.backward()
    g = scales.grad
    assert float(g[1, 1]) == pytest.approx(1 / (2 * 4.0))
    assert float(g[1, 0]) == 0 and float(g[1, 2]) == 0
    assert float(g[0].sum()) == pytest.approx(1 / (2 * 2.0))  # the tie's gradient goes to one of the three
    assert float(L.flatness(torch.tensor([[1e-3, 1.0, 1.0]]))) == pytest.approx(1e-3)


def test_ssim_identical_is_one_and_shapes():
    img = torch.rand(3, 20, 24)
    assert L.ssim(img, img).item() == pytest.approx(1.0, abs=1e-6)
    assert L.ssim(img[None], img[None]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        L.ssim(img, img[:2])


def test_ssim_constant_images_closed_form():
    """Constant images a, b away from the zero-padded border: SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 0.3, 0.5
    x = torch.full((1, 40, 40), a)
    y = torch.full((1, 40, 40), b)
    m = L.ssim_map(x[None], y[None])[0, 0, 10:30, 10:30]
    expected = (2 * a * b + L.SSIM_C1) / (a * a + b * b + L.SSIM_C1)
    torch.testing.assert_close(m, torch.full_like(m, expected), atol=1e-4, rtol=0)


def test_ssim_matches_direct_2d_window():
    """The separable convolution equals the 11x11 outer-product window applied in 2D."""
    x, y = torch.rand(1, 2, 16, 18), torch.rand(1, 2, 16, 18)
    g = L._gaussian_window_1d(11, 1.5, torch.float32, "cpu")
    w2 = (g[:, None] * g[None]).expand(2, 1, 11, 11)

    def blur(t):
        return torch.nn.functional.conv2d(t, w2, padding=5, groups=2)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ref = ((2 * mx * my + L.SSIM_C1) * (2 * cxy + L.SSIM_C2)) / ((mx**2 + my**2 + L.SSIM_C1) * (vx + vy + L.SSIM_C2))
    torch.testing.assert_close(L.ssim_map(x, y), ref, atol=1e-5, rtol=0)


def test_psnr_whole_image_not_per_channel():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    b[0] = 0.1  # only one channel differs: MSE over all = 0.01 / 3
    assert L.psnr(a, b).item() == pytest.approx(-10 * math.log10(0.01 / 3), rel=1e-5)


def test_image_loss_weights():
    a, b = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    expected = 0.8 * (a - b).abs().mean() + 0.2 * (1 - L.ssim(a, b))
    assert L.image_loss(a, b, 0.2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_image_losses_are_the_image_loss_of_each_pair():
    g = torch.Generator().manual_seed(4)
    a, b, c, d = (torch.rand(1, 3, 16, 18, generator=g) for _ in range(4))
    for backend in ("torch", "auto"):
        together = L.image_losses([(a, b), (c, d)], 0.2, backend=backend)
        for value, (x, y) in zip(together, ((a, b), (c, d))):
            assert value.item() == pytest.approx(L.image_loss(x, y, 0.2).item(), rel=1e-6)
    assert L.image_losses([(a[0], b[0])], 0.0)[0].item() == pytest.approx((a - b).abs().mean().item(), rel=1e-6)


@pytest.mark.slow
def test_compiled_rigidity_matches_eager():
    """The torch.compile'd pointwise parts (used on CUDA) equal the eager reference (CPU inductor here)."""
    means0, quats0, idx, w, d0 = cluster(n=200)
    m = (means0 + 0.002 * torch.randn_like(means0)).requires_grad_()
    q = quat_normalize(quats0 + 0.02 * torch.randn_like(quats0)).requires_grad_()
    ref = L.rigidity_losses(m, q, means0, quats0, idx, w, d0)
    g_ref = torch.autograd.grad(sum(ref.values()), [m, q])
    rel = torch.compile(L._relative_rotations, dynamic=True)
    terms = torch.compile(L._rigidity_terms, dynamic=True)
    out = L._rigidity(m, q, means0, quats0, idx, w, d0, rel, terms)
    g = torch.autograd.grad(sum(out.values()), [m, q])
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-9)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_written_out_rigidity_gradient_matches_autograd():
    """`_RigidityTerms` (the eager path) has `_rigidity_terms`'s values and autograd's gradients."""
    means0, quats0, idx, w, d0 = cluster(n=60)
    g = torch.Generator().manual_seed(3)
    prev_offsets = L.previous_offsets(means0, idx)
    for dtype in (torch.float32, torch.float64):
        m = (means0 + 0.01 * torch.randn(means0.shape, generator=g)).to(dtype).requires_grad_()
        q = quat_normalize(quats0 + 0.05 * torch.randn(quats0.shape, generator=g)).to(dtype).requires_grad_()
        args = [t.to(dtype) for t in (prev_offsets, w, d0)]
        rel = L._relative_rotations(q, quats0.to(dtype))
        nm, nr = L.neighbour_gather(m, idx), L.neighbour_gather(rel, idx)
        written = L._rigidity_terms_eager(m, rel, nm, nr, *args)
        reference = L._rigidity_terms(m, rel, nm, nr, *args)
        weights = (1.0, 2.0, 3.0)
        grads = [torch.autograd.grad(sum(c * v for c, v in zip(weights, terms)), [m, q], retain_graph=True)
                 for terms in (written, reference)]
        for a, b in zip(written, reference):
            assert torch.equal(a, b)
        for a, b in zip(*grads):  # entries summed from cancelling products: scaled by the largest one
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert torch.autograd.gradcheck(
        lambda mm, qq: sum(L._rigidity_terms_eager(mm, qq, L.neighbour_gather(mm, idx), L.neighbour_gather(qq, idx),
                                                   *args)), (m, rel.detach().requires_grad_()))


def _family_case(n=60, seed=3, dtype=torch.float32):
    """A cluster with a hub (row 0 among everyone's neighbours) moved a little: means and quats to fit."""
    means0, quats0, idx, w, d0 = cluster(n=n)
    idx = idx.clone()
    idx[1:, 0] = 0
    g = torch.Generator().manual_seed(seed)
    m = (means0 + 0.01 * torch.randn(means0.shape, generator=g)).to(dtype)
    q = quat_normalize(quats0 + 0.05 * torch.randn(quats0.shape, generator=g)).to(dtype)
    return m, q, means0.to(dtype), quats0.to(dtype), idx, w.to(dtype), d0.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_rigidity_family_matches_the_autograd_form(dtype):
    """`rigidity_losses` (`_RigidityFamily`: components-first layout, gradient written out) against
    `_rigidity` with `_rigidity_terms` through autograd: values and gradients in means and quats."""
    m, q, means0, quats0, idx, w, d0 = _family_case(dtype=dtype)
    coefs = (4.0, 4.0, 2.0)

    def run(function):
        mm, qq = m.clone().requires_grad_(), q.clone().requires_grad_()
        out = function(mm, qq)
        grads = torch.autograd.grad(sum(c * out[k] for c, k in zip(coefs, ("rigid", "rot", "iso"))), [mm, qq])
        return out, grads

    eager, g_eager = run(lambda mm, qq: L.rigidity_losses(mm, qq, means0, quats0, idx, w, d0))
    ref, g_ref = run(lambda mm, qq: L._rigidity(mm, qq, means0, quats0, idx, w, d0, L._relative_rotations,
                                                L._rigidity_terms))
    rel_tol, grad_tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-10)
    for k in ("rigid", "rot", "iso"):
        torch.testing.assert_close(eager[k], ref[k], rtol=rel_tol, atol=0)
    for a, b in zip(g_eager, g_ref):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=0, atol=grad_tol * float(b.abs().max()))


def test_eager_rigidity_family_gradcheck():
    # Offsets and weights of order 1 (scaled up from the cluster's), so that every term's gradient is
    # well above gradcheck's absolute tolerance (1e-5).
    m, q, means0, quats0, idx, _, d0 = _family_case(n=24, dtype=torch.float64)
    m, means0, d0 = 50 * m, 50 * means0, 50 * d0
    w = 0.5 + torch.rand(d0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prev_offsets = L.previous_offsets(means0, idx)

    def total(mm, qq):
        out = L.rigidity_losses(mm, qq, means0, quats0, idx, w, d0, prev_offsets)
        return out["rigid"] + 2 * out["rot"] + 3 * out["iso"]

    assert torch.autograd.gradcheck(total, (m.requires_grad_(), q.requires_grad_()))


def test_rigidity_scatter_off_the_cpu_path_matches_index_add():
    """The CSR segmented sum (`_scatter_columns` with a table, the path off the CPU) equals index_add_."""
    _, _, _, _, idx, w, d0 = _family_case()
    layout = L._neighbour_layout(idx, w, d0, idx.shape[0])
    assert layout.table is None  # the CPU adds with index_add_
    with_table = L._NeighbourLayout(layout.index, layout.weights, layout.initial_distances,
                                    L._GatherTable(layout.index, *L._csr_table(layout.index, idx.shape[0])))
    g = torch.Generator().manual_seed(0)
    grad, base = torch.randn(7, layout.index.numel(), generator=g), torch.randn(7, idx.shape[0], generator=g)
    torch.testing.assert_close(L._scatter_columns(grad, with_table, base.clone()),
                               L._scatter_columns(grad, layout, base.clone()), atol=1e-6, rtol=0)


def test_rotation_rows_are_quat_to_rotmat():
    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    R, n, norm = L._rotation_rows(q.t().contiguous())
    torch.testing.assert_close(R, quat_to_rotmat(q).reshape(50, 9).t(), atol=1e-15, rtol=0)
    torch.testing.assert_close(n, quat_normalize(q).t(), atol=1e-15, rtol=0)
