"""Torch projection vs an independent float64 implementation, gradcheck, and the SH basis.

Tolerances:
| quantity                 | atol / rtol   | why                                                          |
|--------------------------|---------------|--------------------------------------------------------------|
| means2d, depths, conics  | 1e-9 / 1e-9   | float64 on both sides, different formulas (rounding only)    |
| radii                    | exact         | integer ceil; scenes are checked to be 1e-6 away from ints   |
| gradcheck                | eps 1e-6, atol 1e-6, rtol 1e-4 | float64 central differences               |
| hand vs autograd backward | atol 1e-12 x max, rtol 1e-9 | float64, the same derivative by two routes (rounding only) |
| SH Gram matrix           | 2e-3          | 3-point-per-ring quadrature error on 40k points              |
"""

import math

import pytest
import torch

from tests.helpers import dense_projection, dense_radii, make_scene
from tritonsplat import constants
from tritonsplat.reference.projection import (
    camera_centers,
    evaluate_sh_colors,
    project_gaussians,
    quaternion_to_rotation,
    sh_basis,
)
from tritonsplat.settings import RenderSettings, standard_clamp_limits


def _project(scene, **settings_kwargs):
    settings = RenderSettings(scene.width, scene.height, **settings_kwargs)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    return project_gaussians(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats,
                             scene.Ks, limits, settings), settings


@pytest.mark.parametrize("n_cameras", [1, 3])
def test_projection_matches_independent_float64(n_cameras):
    scene = make_scene(n=50, n_cameras=n_cameras, seed=n_cameras)
    projected, _ = _project(scene)
    for c in range(n_cameras):
        mean2, cov2, z, ok = dense_projection(scene, c)
        visible = projected.radii[c] > 0
        assert visible.any()
        torch.testing.assert_close(projected.means2d[c][ok], mean2[ok], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(projected.depths[c], z, atol=1e-12, rtol=0)
        inverse = torch.linalg.inv(cov2[visible])
        conic = torch.stack([inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 1, 1]], -1)
        torch.testing.assert_close(projected.conics[c][visible], conic, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(projected.radii[c], dense_radii(scene, c), atol=0, rtol=0)


def test_culling_rules():
    scene = make_scene(n=6, seed=4)
    scene.means[0, 2] = -1.0        # behind the camera
    scene.means[1, 2] = 0.005       # closer than near = 0.01
    scene.opacities[2] = 0.5 / 255  # below 1/255
    scene.means[3] = torch.tensor([100.0, 0.0, 3.0], dtype=scene.means.dtype)  # box misses image
    projected, _ = _project(scene)
    assert projected.radii[0, :4].tolist() == [0, 0, 0, 0]
    assert (projected.radii[0, 4:] > 0).all()
    assert torch.isfinite(projected.means2d).all() and torch.isfinite(projected.conics).all()
    far_projected, _ = _project(scene, far=2.0)
    assert (far_projected.radii[0][scene.means[:, 2] >= 2.0] == 0).all()


def test_opacity_aware_radius():
    """r = ceil(k sqrt(lambda_max)) with k = min(3.33, sqrt(2 ln(255 o)))."""
    scene = make_scene(n=3, seed=2)
    scene.opacities[:] = torch.tensor([1.0, 0.1, 0.02], dtype=scene.opacities.dtype)
    projected, _ = _project(scene)
    _, cov2, _, _ = dense_projection(scene, 0)
    lam = torch.linalg.eigvalsh(cov2)[:, -1]
    for i, o in enumerate([1.0, 0.1, 0.02]):
        k = min(constants.MAX_EXTENT_SIGMAS, math.sqrt(2 * math.log(255 * o)))
        assert int(projected.radii[0, i]) == math.ceil(k * math.sqrt(float(lam[i])))


def test_projection_gradcheck_including_clamp():
    scene = make_scene(n=5, n_cameras=2, seed=7)
    # Gaussian 0 far outside the x guard band: the Jacobian clamp is active (t_x = z * lim).
    scene.means[0] = torch.tensor([9.0, 0.3, 3.0], dtype=torch.float64)
    settings = RenderSettings(scene.width, scene.height, far=100.0)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    assert abs(float(scene.means[0, 0] / scene.means[0, 2])) > float(limits[0, 1])
    inputs = [t.clone().requires_grad_() for t in (scene.means, scene.quats, scene.scales, scene.viewmats)]

    def project(means, quats, scales, viewmats):
        p = project_gaussians(means, quats, scales, scene.opacities, viewmats, scene.Ks, limits, settings)
        # Include the clamped Gaussian's conic although its box misses the image: compute it here.
        return p.means2d, p.conics, p.depths

    assert torch.autograd.gradcheck(project, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_quaternion_rotation_is_orthonormal_and_scale_invariant():
    quats = torch.randn(100, 4, dtype=torch.float64)
    rotation = quaternion_to_rotation(quats)
    identity = torch.eye(3, dtype=torch.float64).expand(100, 3, 3)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), identity, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(100, dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_rotation(3.7 * quats), rotation)
    # 90 degrees about z maps x to y.
    q = torch.tensor([[math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_rotation(q)[0] @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_sh_basis_is_orthonormal():
    # Fibonacci sphere: equal-area points, so the mean approximates (1/4pi) * integral.
    m = 40000
    i = torch.arange(m, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / m
    phi = math.pi * (1 + 5 ** 0.5) * i
    r = torch.sqrt(1 - z * z)
    directions = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    basis = sh_basis(directions, 3)
    gram = 4 * math.pi * basis.T @ basis / m
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)


def test_sh_basis_pinned_values():
    """The 3DGS/gsplat real basis: degree 1 is C1 (-y, z, -x); values at the axes."""
    c0, c1, c2, c3 = constants.SH_C0, constants.SH_C1, constants.SH_C2, constants.SH_C3
    z_axis = sh_basis(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64), 3)[0]
    expected = torch.zeros(16, dtype=torch.float64)
    expected[0], expected[2], expected[6], expected[12] = c0, c1, 2 * c2[2], 2 * c3[3]
    torch.testing.assert_close(z_axis, expected)
    x_axis = sh_basis(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), 3)[0]
    expected = torch.zeros(16, dtype=torch.float64)
    expected[0], expected[3], expected[6], expected[8] = c0, -c1, -c2[2], c2[4]
    expected[13], expected[15] = -c3[4], c3[6]
    torch.testing.assert_close(x_axis, expected)
    y_axis = sh_basis(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), 3)[0]
    assert float(y_axis[1]) == pytest.approx(-c1)
    # Sloan's constants: C1 = sqrt(3 / 4pi), C0 = 1 / (2 sqrt(pi)).
    assert c0 == pytest.approx(0.5 / math.sqrt(math.pi), rel=1e-12)
    assert c1 == pytest.approx(math.sqrt(3 / (4 * math.pi)), rel=1e-12)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_colors_gradcheck(degree):
    scene = make_scene(n=4, n_cameras=2, sh_degree=3, seed=degree)
    inputs = [scene.colors.clone().requires_grad_(), scene.means.clone().requires_grad_(),
              scene.viewmats.clone().requires_grad_()]

    def colors(coeffs, means, viewmats):
        return evaluate_sh_colors(coeffs, means, camera_centers(viewmats), degree)

    value = colors(*inputs)
    assert value.shape == (2, 4, 3) and (value >= 0).all()
    assert torch.autograd.gradcheck(colors, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def _culled_and_clamped_scene(n_cameras, seed):
    scene = make_scene(n=40, n_cameras=n_cameras, seed=seed)
    scene.means[0] = torch.tensor([9.0, 0.3, 3.0], dtype=torch.float64)   # Jacobian clamp active, culled
    scene.means[1] = torch.tensor([0.4, -6.0, 3.5], dtype=torch.float64)  # y clamp active
    scene.means[2, 2] = -1.0                                              # behind the camera
    scene.opacities[3] = 0.5 / 255                                        # below 1/255
    return scene


def _upper(scene):
    from tritonsplat.reference.projection import covariance_3d

    full = covariance_3d(scene.quats, scene.scales)
    return torch.stack([full[:, 0, 0], full[:, 0, 1], full[:, 0, 2], full[:, 1, 1], full[:, 1, 2], full[:, 2, 2]], -1)


@pytest.mark.parametrize("n_cameras", [1, 3])
@pytest.mark.parametrize("covariance_input", [False, True])
def test_hand_backward_matches_autograd(n_cameras, covariance_input):
    """The hand-written backward and autograd through the same forward give the same gradients for every
    output (culled Gaussians' means2d and depths, clamped Jacobians and the conic mask included)."""
    scene = _culled_and_clamped_scene(n_cameras, seed=20 + n_cameras)
    settings = RenderSettings(scene.width, scene.height, far=100.0)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(n_cameras, 40, k, generator=g, dtype=torch.float64) for k in (2, 3, 1)]
    gradients = {}
    for hand in (True, False):
        means = scene.means.clone().requires_grad_()
        if covariance_input:
            extra = {"covars": _upper(scene).requires_grad_()}
            quats = scales = None
            leaves = (means, extra["covars"])
        else:
            extra = {}
            quats, scales = scene.quats.clone().requires_grad_(), scene.scales.clone().requires_grad_()
            leaves = (means, quats, scales)
        p = project_gaussians(means, quats, scales, scene.opacities, scene.viewmats, scene.Ks, limits, settings,
                              hand_backward=hand, **extra)
        loss = ((p.means2d * upstream[0]).sum() + (p.conics * upstream[1]).sum()
                + (p.depths * upstream[2][..., 0]).sum())
        gradients[hand] = torch.autograd.grad(loss, leaves)
    assert (p.radii[:, :4] == 0).all() and (p.radii > 0).any()
    for hand, auto in zip(gradients[True], gradients[False]):
        assert hand.shape == auto.shape and hand.is_contiguous()
        assert auto.abs().max() > 0
        torch.testing.assert_close(hand, auto, atol=1e-12 * float(auto.abs().max()), rtol=1e-9)


@pytest.mark.parametrize("covariance_input", [False, True])
def test_hand_backward_gradcheck(covariance_input):
    scene = _culled_and_clamped_scene(2, seed=31)
    settings = RenderSettings(scene.width, scene.height, far=100.0)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    keep = slice(0, 7)
    means = scene.means[keep].clone().requires_grad_()
    if covariance_input:
        second = (_upper(scene)[keep].clone().requires_grad_(),)
    else:
        second = (scene.quats[keep].clone().requires_grad_(), scene.scales[keep].clone().requires_grad_())

    def project(means, *shape):
        if covariance_input:
            quats, scales, extra = None, None, {"covars": shape[0]}
        else:
            (quats, scales), extra = shape, {}
        p = project_gaussians(means, quats, scales, scene.opacities[keep], scene.viewmats, scene.Ks, limits,
                              settings, hand_backward=True, **extra)
        return p.means2d, p.conics, p.depths

    assert torch.autograd.gradcheck(project, (means, *second), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_hand_backward_refuses_camera_gradients():
    scene = make_scene(n=4, seed=5)
    settings = RenderSettings(scene.width, scene.height)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    viewmats = scene.viewmats.clone().requires_grad_()
    with pytest.raises(ValueError, match="hand_backward"):
        project_gaussians(scene.means, scene.quats, scene.scales, scene.opacities, viewmats, scene.Ks, limits,
                          settings, hand_backward=True)
    # By default a camera gradient takes the autograd route, and reaches the view matrices.
    means = scene.means.clone().requires_grad_()
    p = project_gaussians(means, scene.quats, scene.scales, scene.opacities, viewmats, scene.Ks, limits, settings)
    p.means2d.sum().backward()
    assert viewmats.grad is not None and viewmats.grad.abs().sum() > 0 and means.grad.abs().sum() > 0


def _setup_small(seed=8):
    scene = make_scene(n=12, n_cameras=2, seed=seed)
    settings = RenderSettings(scene.width, scene.height)
    return scene, settings, standard_clamp_limits(scene.Ks, scene.width, scene.height)


def test_hand_backward_is_first_order_only_and_says_so():
    """A double backward through the hand route raises instead of silently dropping second-order terms; the
    autograd route differentiates twice."""
    scene, settings, limits = _setup_small()
    for hand in (True, False):
        means = scene.means.clone().requires_grad_()
        p = project_gaussians(means, scene.quats, scene.scales, scene.opacities, scene.viewmats, scene.Ks, limits,
                              settings, hand_backward=hand)
        (grad,) = torch.autograd.grad((p.conics ** 2).sum(), means, create_graph=True)
        if hand:
            with pytest.raises(RuntimeError, match="not have been used in the graph"):
                torch.autograd.grad(grad.sum(), means)
            with pytest.raises(RuntimeError, match="once_differentiable"):
                grad.sum().backward()
        else:
            assert torch.autograd.grad(grad.sum(), means)[0].abs().sum() > 0


def test_hand_backward_leaves_unreached_inputs_without_gradient_and_frees_its_state():
    """A loss on means2d alone reaches no quaternion or scale (their .grad stays None, as with autograd, so an
    optimizer skips them), and the forward's intermediates are freed by the backward although the outputs live
    on (they went through save_for_backward, not a context attribute that the outputs would keep alive)."""
    import weakref

    from tritonsplat.reference import projection as module

    scene, settings, limits = _setup_small()
    kept = []
    original = module._projection_terms

    def spy(*args, **kwargs):
        terms = original(*args, **kwargs)
        kept.append(weakref.ref(terms.det))
        return terms

    module._projection_terms = spy
    try:
        for hand in (True, False):
            means, quats, scales = (t.clone().requires_grad_() for t in (scene.means, scene.quats, scene.scales))
            p = project_gaussians(means, quats, scales, scene.opacities, scene.viewmats, scene.Ks, limits, settings,
                                  hand_backward=hand)
            p.means2d.sum().backward()
            assert means.grad is not None and quats.grad is None and scales.grad is None, hand
            assert kept[-1]() is None, f"hand_backward={hand}: the forward's terms outlive the backward"
            del p
    finally:
        module._projection_terms = original
