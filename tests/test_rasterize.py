"""`rasterize()` with the torch backend vs the independent dense float64 renderer; API behaviour.

Tolerances:
| output                     | atol / rtol            | why                                                   |
|----------------------------|------------------------|-------------------------------------------------------|
| colors, alphas (float64)   | 1e-5 / 1e-5            | the rasterize contract; float64 differs only by rounding |
| depths, median (float64)   | 0 / 1e-5 (relative)    | depths are metres: compare relatively                 |
| colors (float32 inputs)    | 1e-5 / 1e-5            | float32 compute; scan and weights keep ~1e-7 error    |
| pixels near a cut-off      | excluded               | within 1e-5 of 1/255, 0.99 or 1e-4 a decision may flip |
| radii                      | exact                  | integer                                               |
| gradcheck                  | eps 1e-7, atol 1e-6, rtol 1e-4 | float64 central differences                   |
"""

import dataclasses

import pytest
import torch

import tritonsplat
from tests.helpers import assert_close, dense_radii, dense_render, make_scene


def _compare_with_dense(scene, out, atol=1e-5, rtol=1e-5):
    c_count = scene.viewmats.shape[0]
    for c in range(c_count):
        reference = dense_render(scene, c)
        keep = ~reference.near_cutoff
        assert_close(out.colors[c], reference.colors, atol, rtol, f"colors[{c}]",
                     keep[..., None].expand_as(reference.colors))
        assert_close(out.alphas[c], reference.alphas, atol, rtol, f"alphas[{c}]", keep[..., None])
        assert_close(out.depths[c], reference.depths, 0, rtol, f"depths[{c}]", keep[..., None])
        assert_close(out.median_depths[c], reference.median, 0, rtol, f"median_depths[{c}]", keep[..., None])
        assert torch.equal(out.radii[c].cpu(), dense_radii(scene, c)), f"radii[{c}]"
        assert keep.float().mean() > 0.9


@pytest.mark.parametrize("n_cameras,n_channels,width,height,per_camera,backgrounds", [
    pytest.param(1, 3, 23, 17, False, False, id="C1-D3-23x17"),
    pytest.param(3, 3, 16, 16, False, True, id="C3-D3-16x16-bg"),
    pytest.param(2, 1, 37, 21, True, True, id="C2-D1-37x21-percam"),
    pytest.param(1, 4, 33, 9, False, True, id="C1-D4-33x9-bg"),
    pytest.param(2, 33, 20, 18, False, False, id="C2-D33-20x18"),
])
def test_torch_backend_matches_dense_float64(n_cameras, n_channels, width, height, per_camera, backgrounds):
    scene = make_scene(n=60, width=width, height=height, n_cameras=n_cameras, n_channels=n_channels,
                       per_camera_colors=per_camera, backgrounds=backgrounds, seed=n_channels + width)
    out = tritonsplat.rasterize(*scene.args(), backgrounds=scene.backgrounds, backend="torch")
    assert out.colors.shape == (n_cameras, height, width, n_channels)
    assert out.colors.dtype == torch.float64 and out.backend == "torch"
    _compare_with_dense(scene, out)


@pytest.mark.parametrize("n_cameras,per_camera", [(1, False), (3, True)])
def test_antialiased_mode_matches_dense_float64(n_cameras, per_camera):
    """rasterize_mode="antialiased" against the dense renderer's own sqrt(det Sigma / det(Sigma + eps2d I)),
    at the default dilation and at a large one (where the factor of the smallest splats is near 0)."""
    scene = make_scene(n=60, width=25, height=19, n_cameras=n_cameras, per_camera_colors=per_camera,
                       backgrounds=True, seed=31 + n_cameras, scale_range=(0.005, 0.25))
    for eps2d in (0.3, 2.0):
        out = tritonsplat.rasterize(*scene.args(), backgrounds=scene.backgrounds, backend="torch", eps2d=eps2d,
                                    rasterize_mode="antialiased")
        classic = tritonsplat.rasterize(*scene.args(), backgrounds=scene.backgrounds, backend="torch", eps2d=eps2d)
        assert not torch.allclose(out.colors, classic.colors)
        for c in range(n_cameras):
            reference = dense_render(scene, c, antialiased=True, eps2d=eps2d)
            keep = ~reference.near_cutoff
            assert keep.float().mean() > 0.9
            assert_close(out.colors[c], reference.colors, 1e-5, 1e-5, f"colors[{c}]",
                         keep[..., None].expand_as(reference.colors))
            assert_close(out.alphas[c], reference.alphas, 1e-5, 1e-5, f"alphas[{c}]", keep[..., None])
            assert_close(out.depths[c], reference.depths, 0, 1e-5, f"depths[{c}]", keep[..., None])


def test_antialiased_factor_is_the_determinant_ratio():
    from tritonsplat.reference.antialiasing import antialiased_opacities

    g = torch.Generator().manual_seed(3)
    factors = torch.randn(2, 50, 2, 2, generator=g, dtype=torch.float64)
    covariances = factors @ factors.transpose(-1, -2) * 0.5          # some much thinner than the dilation
    eps2d = 0.3
    dilated = covariances + eps2d * torch.eye(2, dtype=torch.float64)
    inverse = torch.linalg.inv(dilated)
    conics = torch.stack([inverse[..., 0, 0], inverse[..., 0, 1], inverse[..., 1, 1]], -1)
    opacities = torch.rand(50, generator=g, dtype=torch.float64)
    expected = opacities * torch.sqrt(torch.linalg.det(covariances) / torch.linalg.det(dilated))
    assert torch.allclose(antialiased_opacities(opacities, conics, eps2d), expected, atol=1e-12, rtol=1e-9)
    rounded = torch.tensor([[[0.5, 0.0, 10.0]]], dtype=torch.float64)  # a conic whose Sigma2D rounded below 0
    assert antialiased_opacities(torch.ones(1, dtype=torch.float64), rounded, 0.3).item() == 0.0


def test_unknown_rasterize_mode_is_a_clear_error():
    scene = make_scene(n=3)
    with pytest.raises(ValueError, match="rasterize_mode: expected 'classic' or 'antialiased', got 'mip'"):
        tritonsplat.rasterize(*scene.args(), rasterize_mode="mip")


def test_dense_coverage_gives_median_depths():
    scene = make_scene(n=80, width=24, height=20, seed=1, opacity_range=(0.6, 0.98), scale_range=(0.1, 0.4))
    out = tritonsplat.rasterize(*scene.args(), backend="torch")
    assert (out.median_depths > 0).float().mean() > 0.5
    assert (out.alphas > 0.999).any()
    _compare_with_dense(scene, out)


def test_float32_inputs_match_dense():
    scene = make_scene(n=60, width=29, height=19, n_cameras=2, seed=3)
    out = tritonsplat.rasterize(*scene.to(dtype=torch.float32).args(), backend="torch")
    assert out.colors.dtype == torch.float32
    _compare_with_dense(scene, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_colors_match_dense(degree):
    scene = make_scene(n=40, width=21, height=15, n_cameras=2, sh_degree=degree, seed=degree)
    out = tritonsplat.rasterize(*scene.args(), sh_degree=degree, backend="torch")
    from tests.helpers import _rotate  # noqa: F401 - the helper module is independent of tritonsplat
    for c in range(2):
        view = scene.viewmats[c]
        center = -view[:3, :3].T @ view[:3, 3]
        direction = scene.means - center
        direction = direction / direction.norm(dim=-1, keepdim=True)
        x, y, z = direction.unbind(-1)
        terms = [torch.full_like(x, 0.28209479177387814)]
        if degree >= 1:
            terms += [-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x]
        if degree >= 2:
            terms += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                      0.31539156525252005 * (2 * z * z - x * x - y * y), -1.0925484305920792 * x * z,
                      0.5462742152960396 * (x * x - y * y)]
        if degree >= 3:
            terms += [-0.5900435899266435 * y * (3 * x * x - y * y), 2.890611442640554 * x * y * z,
                      -0.4570457994644658 * y * (4 * z * z - x * x - y * y),
                      0.3731763325901154 * z * (2 * z * z - 3 * x * x - 3 * y * y),
                      -0.4570457994644658 * x * (4 * z * z - x * x - y * y),
                      1.445305721320277 * z * (x * x - y * y), -0.5900435899266435 * x * (x * x - 3 * y * y)]
        basis = torch.stack(terms, -1)
        colors = (torch.einsum("nb,nbd->nd", basis, scene.colors[:, : len(terms)]) + 0.5).clamp_min(0)
        reference = dense_render(scene, c, colors=colors)
        keep = ~reference.near_cutoff
        assert_close(out.colors[c], reference.colors, 1e-5, 1e-5, "sh colors", keep[..., None].expand(-1, -1, 3))


def test_empty_scene_and_all_behind_camera_render_background():
    scene = make_scene(n=10, n_cameras=2, backgrounds=True, seed=2)
    empty = tritonsplat.rasterize(scene.means[:0], scene.quats[:0], scene.scales[:0], scene.opacities[:0],
                                  scene.colors[:0], scene.viewmats, scene.Ks, scene.width, scene.height,
                                  backgrounds=scene.backgrounds, backend="torch")
    expected = scene.backgrounds[:, None, None, :].expand(2, scene.height, scene.width, 3)
    torch.testing.assert_close(empty.colors, expected)
    assert empty.n_intersections == 0 and empty.radii.shape == (2, 0)
    assert (empty.alphas == 0).all() and (empty.depths == 0).all()
    behind = scene.means.clone()
    behind[:, 2] = -behind[:, 2] - 6.0  # behind every camera (they look toward +z around z = 3)
    out = tritonsplat.rasterize(behind, scene.quats, scene.scales, scene.opacities, scene.colors,
                                scene.viewmats[:1], scene.Ks[:1], scene.width, scene.height,
                                backgrounds=scene.backgrounds[:1], backend="torch")
    torch.testing.assert_close(out.colors, expected[:1])
    assert (out.radii == 0).all()


def test_huge_and_subpixel_gaussians():
    scene = make_scene(n=4, width=31, height=23, seed=9)
    scene.scales[0] = torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)    # covers the whole image
    scene.means[0] = torch.tensor([0.1, -0.2, 6.0], dtype=torch.float64)
    scene.scales[1] = torch.tensor([1e-5, 2e-5, 1e-5], dtype=torch.float64)  # far below a pixel
    scene.opacities[0] = 0.5
    scene.opacities[1] = 0.95
    out = tritonsplat.rasterize(*scene.args(), backend="torch")
    assert int(out.radii[0, 0]) > 30 and 0 < int(out.radii[0, 1]) <= 2
    assert (out.alphas > 0.1).all(), "the huge Gaussian covers every pixel"
    _compare_with_dense(scene, out)


def test_gradcheck_end_to_end_with_camera_gradient():
    scene = make_scene(n=5, width=9, height=8, n_cameras=2, n_channels=2, backgrounds=True, seed=12,
                       opacity_range=(0.3, 0.9), scale_range=(0.1, 0.3))
    tensors = [scene.means, scene.quats, scene.scales, scene.opacities, scene.colors, scene.viewmats,
               scene.backgrounds]
    inputs = [t.clone().requires_grad_() for t in tensors]

    def render(means, quats, scales, opacities, colors, viewmats, backgrounds):
        out = tritonsplat.rasterize(means, quats, scales, opacities, colors, viewmats, scene.Ks,
                                    scene.width, scene.height, backgrounds=backgrounds, backend="torch")
        return out.colors, out.alphas, out.depths

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed,render_kwargs", [
    pytest.param(13, {}, id="classic"),
    # eps2d 1 px^2: a dilation large enough that the antialiased factor varies well away from 1.
    pytest.param(14, {"rasterize_mode": "antialiased", "eps2d": 1.0}, id="antialiased"),
])
def test_gradcheck_end_to_end_without_camera_gradient(seed, render_kwargs):
    """The training path: no camera gradient, so the projection differentiates by its hand-written backward."""
    scene = make_scene(n=5, width=9, height=8, n_cameras=2, n_channels=2, backgrounds=True, seed=seed,
                       opacity_range=(0.3, 0.9), scale_range=(0.1, 0.3))
    inputs = [t.clone().requires_grad_() for t in (scene.means, scene.quats, scene.scales, scene.opacities,
                                                   scene.colors)]

    def render(means, quats, scales, opacities, colors):
        out = tritonsplat.rasterize(means, quats, scales, opacities, colors, scene.viewmats, scene.Ks,
                                    scene.width, scene.height, backgrounds=scene.backgrounds, backend="torch",
                                    **render_kwargs)
        return out.colors, out.alphas, out.depths

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


def test_viewmats_get_gradient_only_when_required_and_means2d_grads():
    scene = make_scene(n=20, n_cameras=2, seed=4)
    means = scene.means.clone().requires_grad_()
    out = tritonsplat.rasterize(means, scene.quats, scene.scales, scene.opacities, scene.colors,
                                scene.viewmats, scene.Ks, scene.width, scene.height, absgrad=True,
                                densify_channels=2, backend="torch")
    out.colors.sum().backward()
    assert scene.viewmats.grad is None
    assert out.means2d.grad.shape == (2, 20, 2) and out.means2d.grad.abs().sum() > 0
    assert out.means2d.absgrad.shape == (2, 20, 2)
    assert out.densify_grad.shape == (2, 20, 2) and out.densify_grad.abs().sum() > 0
    assert ((out.means2d.grad != 0).any(-1) <= out.visible).all()
    viewmats = scene.viewmats.clone().requires_grad_()
    out = tritonsplat.rasterize(scene.means, scene.quats, scene.scales, scene.opacities, scene.colors,
                                viewmats, scene.Ks, scene.width, scene.height, backend="torch")
    out.depths.sum().backward()
    assert viewmats.grad is not None and viewmats.grad.abs().sum() > 0


def test_half_precision_inputs_are_upcast():
    scene = make_scene(n=20, seed=5, dtype=torch.float16)
    out = tritonsplat.rasterize(*scene.args(), backend="torch")
    assert out.colors.dtype == torch.float32
    reference = tritonsplat.rasterize(*scene.to(dtype=torch.float32).args(), backend="torch")
    torch.testing.assert_close(out.colors, reference.colors)


def test_output_is_frozen_and_visible_property():
    scene = make_scene(n=8, seed=6)
    out = tritonsplat.rasterize(*scene.args(), backend="torch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.colors = None
    assert torch.equal(out.visible, out.radii > 0)
    assert isinstance(out.n_intersections, int) and out.n_intersections > 0
    assert out.densify_grad is None
