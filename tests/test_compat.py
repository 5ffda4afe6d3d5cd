"""`tritonsplat.compat` (the original renderer's API) vs an independent emulation of the original's
CUDA semantics, and vs the native API after the convention shifts.

The emulation below follows the published behaviour of diff-gaussian-rasterization-w-depth
(reference notes, renderers.md / dyn3dgs.md sec. 5): projmatrix, ndc2Pix, the +-1.3 tan(fov) clamp,
the 0.1 eigenvalue floor, getRect's truncation, integer pixel centres, median depth with 15.0.

Tolerances:
| quantity                    | atol / rtol   | why                                                  |
|-----------------------------|---------------|------------------------------------------------------|
| colour vs emulation (fp64)  | 1e-5 / 1e-5   | the issue's forward contract                         |
| depth vs emulation          | 0 / 1e-6      | median depth picks one Gaussian's z exactly          |
| radii                       | exact         | integer                                              |
| compat vs native (fp64)     | 1e-10 / 1e-10 | identical maths on both paths where nothing truncates |
| means2D gradient (NDC)      | 1e-10 / 1e-8  | pixel gradient x (W/2, H/2), same autograd graph     |
"""

import math

import pytest
import torch

import tritonsplat
from tests.helpers import _rotate, make_scene
from tritonsplat.compat import GaussianRasterizationSettings, GaussianRasterizer


def _settings_like_dynamic_3d_gaussians(scene, bg=None, sh_degree=0, near=1.0, far=100.0):
    """What Dynamic 3D Gaussians' helpers.setup_camera builds from (w, h, K, w2c)."""
    W, H = scene.width, scene.height
    K, w2c = scene.Ks[0], scene.viewmats[0]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    opengl_proj = torch.tensor([[2 * fx / W, 0.0, -(W - 2 * cx) / W, 0.0],
                                [0.0, 2 * fy / H, -(H - 2 * cy) / H, 0.0],
                                [0.0, 0.0, far / (far - near), -(far * near) / (far - near)],
                                [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    campos = torch.linalg.inv(w2c)[:3, 3]
    bg = torch.zeros(3, dtype=torch.float64) if bg is None else bg
    return GaussianRasterizationSettings(
        image_height=H, image_width=W, tanfovx=float(W / (2 * fx)), tanfovy=float(H / (2 * fy)), bg=bg,
        scale_modifier=1.0, viewmatrix=w2c.T, projmatrix=(opengl_proj @ w2c).T, sh_degree=sh_degree,
        campos=campos, prefiltered=False, debug=False)


def _emulate_original(settings, means, colors, opacities, scales, quats):
    """Dense float64 emulation of the original CUDA forward for one camera."""
    W, H = settings.image_width, settings.image_height
    view = settings.viewmatrix.T
    full = settings.projmatrix.T
    n = means.shape[0]
    homogeneous = torch.cat([means, torch.ones(n, 1, dtype=torch.float64)], 1)
    p_view = homogeneous @ view.T
    p_hom = homogeneous @ full.T
    p_proj = p_hom[:, :3] / (p_hom[:, 3:] + 1e-7)
    pix = torch.stack([((p_proj[:, 0] + 1) * W - 1) / 2, ((p_proj[:, 1] + 1) * H - 1) / 2], -1)
    eye3 = torch.eye(3, dtype=torch.float64)
    rotation = torch.stack([_rotate(quats, eye3[i].expand(n, 3)) for i in range(3)], -1)
    cov3 = rotation @ torch.diag_embed((scales * settings.scale_modifier) ** 2) @ rotation.transpose(1, 2)
    focal_x = W / (2 * settings.tanfovx)
    focal_y = H / (2 * settings.tanfovy)
    image = torch.zeros(H, W, colors.shape[1], dtype=torch.float64)
    T = torch.ones(H, W, dtype=torch.float64)
    depth = torch.full((H, W), 15.0, dtype=torch.float64)
    done = torch.zeros(H, W, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    radii = torch.zeros(n, dtype=torch.int32)
    entries = []
    for i in range(n):
        t = p_view[i, :3].clone()
        if t[2] <= 0.2:
            continue
        lim_x, lim_y = 1.3 * settings.tanfovx, 1.3 * settings.tanfovy
        tx = min(lim_x, max(-lim_x, float(t[0] / t[2]))) * t[2]
        ty = min(lim_y, max(-lim_y, float(t[1] / t[2]))) * t[2]
        J = torch.tensor([[focal_x / t[2], 0, -focal_x * tx / t[2] ** 2],
                          [0, focal_y / t[2], -focal_y * ty / t[2] ** 2]], dtype=torch.float64)
        cov2 = J @ view[:3, :3] @ cov3[i] @ view[:3, :3].T @ J.T
        a, b, c = float(cov2[0, 0]) + 0.3, float(cov2[0, 1]), float(cov2[1, 1]) + 0.3
        det = a * c - b * b
        if det == 0:
            continue
        conic = (c / det, -b / det, a / det)
        mid = 0.5 * (a + c)
        lambda1 = mid + math.sqrt(max(0.1, mid * mid - det))
        radius = math.ceil(3 * math.sqrt(lambda1))
        px, py = float(pix[i, 0]), float(pix[i, 1])
        gx, gy = math.ceil(W / 16), math.ceil(H / 16)
        x0 = min(gx, max(0, int((px - radius) / 16)))
        y0 = min(gy, max(0, int((py - radius) / 16)))
        x1 = min(gx, max(0, int((px + radius + 15) / 16)))
        y1 = min(gy, max(0, int((py + radius + 15) / 16)))
        if (x1 - x0) * (y1 - y0) == 0:
            continue
        radii[i] = radius
        entries.append((float(t[2]), i, conic, (px, py), (x0, y0, x1, y1)))
    for z, i, conic, (px, py), (x0, y0, x1, y1) in sorted(entries):
        inside = (xs >= x0 * 16) & (xs < x1 * 16) & (ys >= y0 * 16) & (ys < y1 * 16)
        dx, dy = px - xs, py - ys
        power = -0.5 * (conic[0] * dx * dx + conic[2] * dy * dy) - conic[1] * dx * dy
        alpha = torch.clamp_max(opacities[i] * torch.exp(power), 0.99)
        use = inside & ~done & (power <= 0) & (alpha >= 1 / 255)
        test_T = T * (1 - alpha)
        stop = use & (test_T < 1e-4)
        done |= stop
        use &= ~stop
        image += torch.where(use, alpha * T, torch.zeros_like(T))[..., None] * colors[i]
        depth = torch.where(use & (T > 0.5) & (test_T < 0.5), torch.full_like(depth, z), depth)
        T = torch.where(use, test_T, T)
    image += T[..., None] * settings.bg
    return image.permute(2, 0, 1), radii, depth[None]


@pytest.mark.parametrize("seed,backend", [(0, "torch"), (1, "torch"), (2, "torch"),
                                          pytest.param(3, "triton", marks=pytest.mark.interpreter)])
def test_compat_reproduces_the_original_semantics(seed, backend):
    scene = make_scene(n=40, width=45, height=33, seed=seed, opacity_range=(0.2, 1.0))
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    settings = _settings_like_dynamic_3d_gaussians(scene, bg=bg)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    means2D = torch.zeros_like(scene.means, requires_grad=True)
    color, radii, depth = GaussianRasterizer(raster_settings=settings, backend=backend)(
        means3D=scene.means, means2D=means2D, opacities=scene.opacities[:, None], shs=None,
        colors_precomp=scene.colors, scales=scene.scales, rotations=quats, cov3D_precomp=None)
    expected_color, expected_radii, expected_depth = _emulate_original(
        settings, scene.means, scene.colors, scene.opacities, scene.scales, quats)
    assert color.shape == (3, 33, 45) and radii.dtype == torch.int32 and depth.shape == (1, 33, 45)
    torch.testing.assert_close(color.double(), expected_color, atol=1e-5, rtol=1e-5)
    assert torch.equal(radii.cpu(), expected_radii)
    torch.testing.assert_close(depth.double(), expected_depth, atol=0, rtol=1e-6 if backend == "torch" else 1e-5)
    assert not depth.requires_grad


def test_compat_agrees_with_native_api_and_gives_ndc_gradients():
    # Small, dim Gaussians centred inside tiles: the original's tile truncation removes nothing,
    # alpha stays below 0.35 so 3 sigma covers the 1/255 level set, and the clamp never acts.
    scene = make_scene(n=30, width=64, height=48, seed=3, opacity_range=(0.1, 0.34), scale_range=(0.03, 0.08))
    settings = _settings_like_dynamic_3d_gaussians(scene)
    means = scene.means.clone().requires_grad_()
    colors = scene.colors.clone().requires_grad_()
    means2D = torch.zeros_like(scene.means, requires_grad=True)
    color, radii, _ = GaussianRasterizer(settings)(means, means2D, scene.opacities[:, None],
                                                   colors_precomp=colors, scales=scene.scales,
                                                   rotations=scene.quats)
    native = tritonsplat.rasterize(scene.means.clone().requires_grad_(), scene.quats, scene.scales,
                                   scene.opacities, scene.colors.clone().requires_grad_(), scene.viewmats,
                                   scene.Ks, scene.width, scene.height, backend="torch")
    torch.testing.assert_close(color.permute(1, 2, 0), native.colors[0], atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(color)
    (color * upstream).sum().backward()
    (native.colors[0].permute(2, 0, 1) * upstream).sum().backward()
    scale = torch.tensor([scene.width / 2, scene.height / 2], dtype=torch.float64)
    torch.testing.assert_close(means2D.grad[:, :2], native.means2d.grad[0] * scale, atol=1e-10, rtol=1e-8)
    assert (means2D.grad[:, 2] == 0).all()
    assert means.grad.abs().sum() > 0 and colors.grad.abs().sum() > 0


def test_compat_sh_and_covariance_inputs():
    scene = make_scene(n=20, width=32, height=24, seed=4, sh_degree=3)
    settings = _settings_like_dynamic_3d_gaussians(scene, sh_degree=3)
    rasterizer = GaussianRasterizer(settings)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    color_sh, _, _ = rasterizer(scene.means, None, scene.opacities, shs=scene.colors, scales=scene.scales,
                                rotations=quats)
    native = tritonsplat.rasterize(scene.means, scene.quats, scene.scales, scene.opacities, scene.colors,
                                   scene.viewmats, scene.Ks, scene.width, scene.height, sh_degree=3)
    torch.testing.assert_close(color_sh.permute(1, 2, 0), native.colors[0], atol=2e-2, rtol=0)
    assert color_sh.shape == (3, 24, 32) and torch.isfinite(color_sh).all()
    # With covariances instead of scales/rotations the image must be identical.
    from tritonsplat.reference.projection import covariance_3d
    cov = covariance_3d(quats, scene.scales)
    upper = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], -1)
    colors_rgb = torch.rand(20, 3, dtype=torch.float64)
    a, radii_a, _ = rasterizer(scene.means, None, scene.opacities, colors_precomp=colors_rgb,
                               scales=scene.scales, rotations=quats)
    b, radii_b, _ = rasterizer(scene.means, None, scene.opacities, colors_precomp=colors_rgb,
                               cov3D_precomp=upper.clone().requires_grad_())
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.equal(radii_a, radii_b)
    visible = rasterizer.markVisible(scene.means)
    assert visible.dtype == torch.bool and visible.all()


def test_compat_requires_exactly_one_colour_and_one_shape_form():
    scene = make_scene(n=4, seed=5)
    rasterizer = GaussianRasterizer(_settings_like_dynamic_3d_gaussians(scene))
    with pytest.raises(ValueError, match="exactly one of either SHs or precomputed colors"):
        rasterizer(scene.means, None, scene.opacities, scales=scene.scales, rotations=scene.quats)
    with pytest.raises(ValueError, match="scale/rotation pair or precomputed 3D covariance"):
        rasterizer(scene.means, None, scene.opacities, colors_precomp=scene.colors)
    with pytest.raises(ValueError, match="means3D"):
        rasterizer(scene.means[:, :2], None, scene.opacities, colors_precomp=scene.colors,
                   scales=scene.scales, rotations=scene.quats)
