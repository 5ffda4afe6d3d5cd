"""Triton projection (interpreter on CPU) vs the torch twin: outputs and hand-written gradients.

Tolerances:
| quantity                      | tolerance                                | why                               |
|-------------------------------|------------------------------------------|-----------------------------------|
| means2d, conics, depths, SH   | atol 1e-5, rtol 1e-5                     | float32 kernel vs float64 twin    |
| radii                         | exact                                    | same float32 rule; off integers   |
| gradients                     | ||diff|| <= 1e-4 ||g||, and elementwise   | the contract; atol scaled by the  |
|                               | rtol 1e-3, atol 1e-6 x max|g|            | magnitude (entries span 6 decades)|
"""

import pytest
import torch

from tests.helpers import assert_close, assert_relative_norm, make_scene
from tritonsplat.ops import projection as triton_projection
from tritonsplat.reference import projection as torch_projection
from tritonsplat.settings import RenderSettings, standard_clamp_limits

pytestmark = pytest.mark.interpreter


def _gradients(module, scene, settings, limits, sh_degree, device, dtype, covars=None, viewmat_grad=True):
    def leaf(t, grad=True):
        return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(grad)

    means, quats, scales = leaf(scene.means), leaf(scene.quats), leaf(scene.scales)
    viewmats = leaf(scene.viewmats, viewmat_grad)
    sh = leaf(scene.colors) if sh_degree is not None else None
    cov = leaf(covars) if covars is not None else None
    projected = module.project_gaussians(
        means, None if cov is not None else quats, None if cov is not None else scales,
        scene.opacities.to(device, dtype), viewmats, scene.Ks.to(device, dtype), limits.to(device, dtype), settings,
        covars=cov, sh_coeffs=sh, sh_degree=sh_degree)
    g = torch.Generator().manual_seed(1)
    visible = (projected.radii > 0).to(dtype)

    def upstream(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(device, dtype)

    loss = ((projected.means2d * upstream(projected.means2d)).sum(-1) * visible).sum()
    loss = loss + ((projected.conics * upstream(projected.conics)).sum(-1) * visible).sum()
    loss = loss + (projected.depths * upstream(projected.depths) * visible).sum()
    if sh_degree is not None:
        loss = loss + ((projected.colors * upstream(projected.colors)).sum(-1) * visible).sum()
    loss.backward()
    grads = {"means": means.grad}
    if viewmat_grad:
        grads["viewmats"] = viewmats.grad
    if cov is not None:
        grads["covars"] = cov.grad
    else:
        grads.update(quats=quats.grad, scales=scales.grad)
    if sh is not None:
        grads["sh"] = sh.grad
    return projected, grads


def _compare_gradients(actual, expected):
    for name, reference in expected.items():
        assert_relative_norm(actual[name], reference, 1e-4, f"grad {name}")
        scale = float(reference.abs().max())
        assert_close(actual[name], reference, 1e-6 * scale, 1e-3, f"grad {name}")


@pytest.mark.parametrize("n_cameras,sh_degree", [(1, None), (3, None), (2, 0), (1, 1), (2, 3)])
def test_projection_matches_torch_twin(n_cameras, sh_degree, device):
    scene = make_scene(n=60, n_cameras=n_cameras, sh_degree=sh_degree, seed=10 + n_cameras)
    scene.means[0] = torch.tensor([9.0, 0.2, 3.0], dtype=torch.float64)   # Jacobian clamp active
    scene.means[1, 2] = -2.0                                               # behind the camera
    scene.opacities[2] = 0.001                                             # below 1/255
    settings = RenderSettings(scene.width, scene.height)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    triton_out, triton_grads = _gradients(triton_projection, scene, settings, limits, sh_degree, device,
                                          torch.float32)
    torch_out, torch_grads = _gradients(torch_projection, scene, settings, limits, sh_degree, "cpu", torch.float64)
    assert torch.equal(triton_out.radii.cpu(), torch_out.radii)
    assert triton_out.radii[0, 1] == 0 and triton_out.radii[0, 2] == 0
    visible = torch_out.radii > 0
    for name in ("means2d", "conics", "depths") + (("colors",) if sh_degree is not None else ()):
        actual, expected = getattr(triton_out, name).cpu(), getattr(torch_out, name)
        assert_close(actual[visible], expected[visible], 1e-5, 1e-5, name)
    _compare_gradients({k: v.cpu() for k, v in triton_grads.items()}, torch_grads)


def test_projection_original_conventions_with_covariances(device):
    """The compat path: covariance input, the 0.1-floored 3-sigma radius, the tile-rectangle cull."""
    scene = make_scene(n=40, seed=5)
    from tritonsplat.reference.projection import covariance_3d

    cov = covariance_3d(scene.quats, scene.scales)
    upper = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], -1)
    settings = RenderSettings(scene.width, scene.height, near=0.2, radius_rule="inria", tile_rule="rectangle")
    limits = torch.tensor([[-0.6, 0.6, -0.5, 0.5]], dtype=torch.float64)
    triton_out, triton_grads = _gradients(triton_projection, scene, settings, limits, None, device, torch.float32,
                                          covars=upper)
    torch_out, torch_grads = _gradients(torch_projection, scene, settings, limits, None, "cpu", torch.float64,
                                        covars=upper)
    assert torch.equal(triton_out.radii.cpu(), torch_out.radii)
    visible = torch_out.radii > 0
    assert_close(triton_out.conics.cpu()[visible], torch_out.conics[visible], 1e-5, 1e-5, "conics")
    _compare_gradients({k: v.cpu() for k, v in triton_grads.items()}, torch_grads)


def test_projection_empty_scene(device):
    scene = make_scene(n=3, seed=1)
    settings = RenderSettings(scene.width, scene.height)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    empty = torch.zeros(0, 3, device=device)
    out = triton_projection.project_gaussians(empty, torch.zeros(0, 4, device=device), empty.clone(),
                                              torch.zeros(0, device=device), scene.viewmats.float().to(device),
                                              scene.Ks.float().to(device), limits.float().to(device), settings)
    assert out.means2d.shape == (1, 0, 2) and out.radii.shape == (1, 0)


@pytest.mark.parametrize("covariance_input", [False, True])
def test_projection_backward_matches_the_twins_hand_backward(covariance_input, device):
    """Without view-matrix gradients the torch twin differentiates by its hand-written backward (the kernel's
    chain rule over [C, N] tensors): the kernel's gradients against it, clamped and culled Gaussians included."""
    scene = make_scene(n=40, n_cameras=2, seed=41)
    scene.means[0] = torch.tensor([9.0, 0.2, 3.0], dtype=torch.float64)   # Jacobian clamp active
    scene.means[1, 2] = -2.0                                               # behind the camera
    settings = RenderSettings(scene.width, scene.height)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    covars = None
    if covariance_input:
        from tritonsplat.reference.projection import covariance_3d

        full = covariance_3d(scene.quats, scene.scales)
        covars = torch.stack([full[:, 0, 0], full[:, 0, 1], full[:, 0, 2], full[:, 1, 1], full[:, 1, 2],
                              full[:, 2, 2]], -1)
    _, triton_grads = _gradients(triton_projection, scene, settings, limits, None, device, torch.float32,
                                 covars=covars, viewmat_grad=False)
    _, torch_grads = _gradients(torch_projection, scene, settings, limits, None, "cpu", torch.float64,
                                covars=covars, viewmat_grad=False)
    assert set(torch_grads) == ({"means", "covars"} if covariance_input else {"means", "quats", "scales"})
    _compare_gradients({k: v.cpu() for k, v in triton_grads.items()}, torch_grads)
