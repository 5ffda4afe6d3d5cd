"""`tritonsplat.compat` (the original renderer's API) vs an independent emulation of the original's
CUDA semantics, vs the native API after the convention shifts, and argument by argument.

The settings are built as Dynamic 3D Gaussians' `helpers.setup_camera` builds them (float32,
viewmatrix = w2c[None] transposed to [1, 4, 4], projmatrix = viewmatrix.bmm(P[None] transposed)).
The emulation follows the published behaviour of diff-gaussian-rasterization-w-depth: the CUDA side
reads the 16 matrix values in order, projmatrix, ndc2Pix, the +-1.3 tan(fov) clamp, the 0.1
eigenvalue floor, getRect's truncation, integer pixel centres, the covariance of the quaternion as
given (no normalisation), median depth with 15.0 where transmittance never falls below 0.5.

Tolerances:
| quantity                          | atol / rtol   | why                                                   |
|-----------------------------------|---------------|-------------------------------------------------------|
| colour vs emulation (fp64)        | 1e-5 / 1e-5   | same maths, different summation order; 1e-5 is far    |
|                                   |               | below one 8-bit level (3.9e-3)                        |
| depth vs emulation                | 0 / 1e-6      | median depth picks one Gaussian's z exactly           |
| radii                             | exact         | integer                                               |
| compat vs native (fp64)           | 1e-10 / 1e-10 | identical maths on both paths where nothing truncates |
| compat vs native (fp32 settings)  | 1e-6 / 0      | K recovered from fp32 matrices, covariance from the   |
|                                   |               | quaternion formula: float32 rounding (measured 1.2e-7 |
|                                   |               | torch, 6e-8 triton)                                   |
| means2D gradient (NDC, fp64)      | 1e-10 / 1e-8  | pixel gradient x (W/2, H/2), same autograd graph      |
| means2D gradient (NDC, fp32)      | 1e-4 / 1e-3   | float32 accumulation over pixels                      |
| same call, other tensor layout    | exact         | the same 16 / 3 values reach the same maths           |
| directional derivative (fp64)     | 1e-6 relative | central difference, h = 1e-6, O(h^2) error            |
"""

import math

import pytest
import torch

import tritonsplat
from tests.helpers import make_scene
from tritonsplat.compat import SNAPSHOT_FILE, GaussianRasterizationSettings, GaussianRasterizer


def setup_camera_like_dynamic_3d_gaussians(width, height, K, w2c, near=1.0, far=100.0):
    """The settings Dynamic 3D Gaussians' helpers.setup_camera returns, built with the same tensor ops.

    Its published behaviour: float32 tensors; campos = inverse(w2c)[:3, 3]; viewmatrix =
    w2c.unsqueeze(0).transpose(1, 2) ([1, 4, 4], not contiguous); an OpenGL-style P from the full K
    with depth mapped to [0, 1] by near/far, also unsqueezed and transposed; projmatrix =
    viewmatrix.bmm(P^T) = (P w2c)^T [1, 4, 4]; tanfov = size / (2 f); black bg; scale_modifier 1;
    sh_degree 0; prefiltered False; no debug field (the -w-depth fork has none).
    """
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    world_to_camera = torch.as_tensor(w2c).float()
    camera_centre = torch.inverse(world_to_camera)[:3, 3]
    view_rows = world_to_camera.unsqueeze(0).transpose(1, 2)
    opengl = torch.tensor([[2 * fx / width, 0.0, -(width - 2 * cx) / width, 0.0],
                           [0.0, 2 * fy / height, -(height - 2 * cy) / height, 0.0],
                           [0.0, 0.0, far / (far - near), -(far * near) / (far - near)],
                           [0.0, 0.0, 1.0, 0.0]]).float().unsqueeze(0).transpose(1, 2)
    return GaussianRasterizationSettings(
        image_height=height, image_width=width, tanfovx=width / (2 * fx), tanfovy=height / (2 * fy),
        bg=torch.tensor([0, 0, 0], dtype=torch.float32), scale_modifier=1.0, viewmatrix=view_rows,
        projmatrix=view_rows.bmm(opengl), sh_degree=0, campos=camera_centre, prefiltered=False)


def _settings(scene, **changes):
    """setup_camera's settings for camera 0 of a test scene, with some fields replaced."""
    return setup_camera_like_dynamic_3d_gaussians(scene.width, scene.height, scene.Ks[0],
                                                  scene.viewmats[0])._replace(**changes)


def _rotation_as_given(quats):
    """R(q) = I + 2 w [v]x + 2 [v]x^2 for q = (w, v) as given: the unit-quaternion formula, unnormalised."""
    w, v = quats[:, 0], quats[:, 1:]
    zero = torch.zeros_like(w)
    cross = torch.stack([zero, -v[:, 2], v[:, 1], v[:, 2], zero, -v[:, 0], -v[:, 1], v[:, 0], zero],
                        -1).reshape(-1, 3, 3)
    return torch.eye(3, dtype=quats.dtype) + 2 * w[:, None, None] * cross + 2 * cross @ cross


def _emulate_original(settings, means, colors, opacities, scales, quats):
    """Dense float64 emulation of the original CUDA forward for one camera."""
    W, H = settings.image_width, settings.image_height
    view = settings.viewmatrix.reshape(4, 4).T.double()      # the CUDA side reads the 16 values in order
    full = settings.projmatrix.reshape(4, 4).T.double()
    bg = settings.bg.reshape(-1).double()
    n = means.shape[0]
    homogeneous = torch.cat([means, torch.ones(n, 1, dtype=torch.float64)], 1)
    p_view = homogeneous @ view.T
    p_hom = homogeneous @ full.T
    p_proj = p_hom[:, :3] / (p_hom[:, 3:] + 1e-7)
    pix = torch.stack([((p_proj[:, 0] + 1) * W - 1) / 2, ((p_proj[:, 1] + 1) * H - 1) / 2], -1)
    rotation = _rotation_as_given(quats)
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
    image += T[..., None] * bg
    return image.permute(2, 0, 1), radii, depth[None]


def _render(settings, scene, backend="torch", quats=None, **overrides):
    """One compat call the way Dynamic 3D Gaussians makes it (keywords, means2D a zero handle)."""
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True) if quats is None else quats
    kwargs = dict(means3D=scene.means, colors_precomp=scene.colors, rotations=quats,
                  opacities=scene.opacities[:, None], scales=scene.scales,
                  means2D=torch.zeros_like(scene.means, requires_grad=True))
    kwargs.update(overrides)
    return GaussianRasterizer(raster_settings=settings, backend=backend)(**kwargs)


def _dim_scene(dtype=torch.float64):
    # Small, dim Gaussians centred inside tiles: the original's tile truncation removes nothing,
    # alpha stays below 0.35 so 3 sigma covers the 1/255 level set, and the clamp never acts.
    return make_scene(n=30, width=64, height=48, seed=3, opacity_range=(0.1, 0.34), scale_range=(0.03, 0.08),
                      dtype=dtype)


# --- the original's forward, as emulated ---------------------------------------------------------

@pytest.mark.parametrize("seed,backend", [(0, "torch"), (1, "torch"), (2, "torch"),
                                          pytest.param(3, "triton", marks=pytest.mark.interpreter)])
def test_compat_reproduces_the_original_semantics(seed, backend):
    scene = make_scene(n=40, width=45, height=33, seed=seed, opacity_range=(0.2, 1.0))
    settings = _settings(scene, bg=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    color, radii, depth = _render(settings, scene, backend, quats=quats)
    expected_color, expected_radii, expected_depth = _emulate_original(
        settings, scene.means, scene.colors, scene.opacities, scene.scales, quats)
    assert color.shape == (3, 33, 45) and radii.dtype == torch.int32 and depth.shape == (1, 33, 45)
    torch.testing.assert_close(color.double(), expected_color, atol=1e-5, rtol=1e-5)
    assert torch.equal(radii.cpu(), expected_radii)
    torch.testing.assert_close(depth.double(), expected_depth, atol=0, rtol=1e-6 if backend == "torch" else 1e-5)
    assert not depth.requires_grad


# --- regression: settings exactly as setup_camera builds them --------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_setup_camera_settings_match_rasterize_with_the_same_K_and_w2c(backend):
    scene = _dim_scene(dtype=torch.float32)
    cam = setup_camera_like_dynamic_3d_gaussians(scene.width, scene.height, scene.Ks[0], scene.viewmats[0])
    assert cam.viewmatrix.shape == (1, 4, 4) and cam.projmatrix.shape == (1, 4, 4)
    assert not cam.viewmatrix.is_contiguous()
    unnorm_rotations = scene.quats.clone().requires_grad_()
    means = scene.means.clone().requires_grad_()
    # params2rendervar: normalised rotations, a non-leaf zero means2D whose grad densification reads.
    means2D = torch.zeros_like(means, requires_grad=True) + 0
    means2D.retain_grad()
    im, radius, depth, = GaussianRasterizer(raster_settings=cam, backend=backend)(
        means3D=means, colors_precomp=scene.colors, rotations=torch.nn.functional.normalize(unnorm_rotations),
        opacities=scene.opacities[:, None], scales=scene.scales, means2D=means2D)
    native = tritonsplat.rasterize(scene.means.clone().requires_grad_(), scene.quats, scene.scales,
                                   scene.opacities, scene.colors, scene.viewmats[:1], scene.Ks[:1],
                                   scene.width, scene.height, backend=backend)
    assert im.shape == (3, 48, 64) and im.dtype == torch.float32
    assert radius.shape == (30,) and radius.dtype == torch.int32 and depth.shape == (1, 48, 64)
    torch.testing.assert_close(im.permute(1, 2, 0), native.colors[0], atol=1e-6, rtol=0)
    # Radii follow the original's rules (3 sigma, zero-area tile rectangle), not the native ones.
    expected = _emulate_original(cam, scene.means.double(), scene.colors.double(), scene.opacities.double(),
                                 scene.scales.double(), torch.nn.functional.normalize(scene.quats.double()))
    assert torch.equal(radius, expected[1])
    native_depth = torch.where(native.median_depths[0, ..., 0] > 0, native.median_depths[0, ..., 0], 15.0)
    torch.testing.assert_close(depth[0], native_depth, atol=0, rtol=1e-5)
    upstream = torch.randn_like(im)
    (im * upstream).sum().backward()
    (native.colors[0].permute(2, 0, 1) * upstream).sum().backward()
    assert means2D.grad is not None and means2D.grad.shape == (30, 3)
    scale = torch.tensor([scene.width / 2, scene.height / 2])
    torch.testing.assert_close(means2D.grad[:, :2], native.means2d.grad[0] * scale, atol=1e-4, rtol=1e-3)
    assert (means2D.grad[radius > 0, :2].norm(dim=-1) > 0).all() and (means2D.grad[:, 2] == 0).all()
    assert unnorm_rotations.grad.abs().sum() > 0 and means.grad.abs().sum() > 0


def test_compat_agrees_with_native_api_and_gives_ndc_gradients():
    scene = _dim_scene()
    settings = _settings(scene)
    means = scene.means.clone().requires_grad_()
    colors = scene.colors.clone().requires_grad_()
    means2D = torch.zeros_like(scene.means, requires_grad=True)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    color, radii, _ = GaussianRasterizer(settings)(means, means2D, scene.opacities[:, None],
                                                   colors_precomp=colors, scales=scene.scales, rotations=quats)
    native = tritonsplat.rasterize(scene.means.clone().requires_grad_(), scene.quats, scene.scales,
                                   scene.opacities, scene.colors.clone().requires_grad_(), scene.viewmats[:1],
                                   scene.Ks[:1], scene.width, scene.height, backend="torch")
    # The settings are float32 (as setup_camera builds them): K carries their rounding.
    torch.testing.assert_close(color.permute(1, 2, 0), native.colors[0], atol=1e-6, rtol=0)
    settings64 = _float64_settings(scene)
    color64, _, _ = GaussianRasterizer(settings64)(means, means2D, scene.opacities[:, None], colors_precomp=colors,
                                                   scales=scene.scales, rotations=quats)
    torch.testing.assert_close(color64.permute(1, 2, 0), native.colors[0], atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(color64)
    (color64 * upstream).sum().backward()
    (native.colors[0].permute(2, 0, 1) * upstream).sum().backward()
    scale = torch.tensor([scene.width / 2, scene.height / 2], dtype=torch.float64)
    torch.testing.assert_close(means2D.grad[:, :2], native.means2d.grad[0] * scale, atol=1e-10, rtol=1e-8)
    assert (means2D.grad[:, 2] == 0).all()
    assert means.grad.abs().sum() > 0 and colors.grad.abs().sum() > 0


def _float64_settings(scene):
    """setup_camera's construction in float64 (for comparisons at 1e-10)."""
    W, H = scene.width, scene.height
    K, w2c = scene.Ks[0], scene.viewmats[0]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    near, far = 1.0, 100.0
    opengl = torch.tensor([[2 * fx / W, 0.0, -(W - 2 * cx) / W, 0.0], [0.0, 2 * fy / H, -(H - 2 * cy) / H, 0.0],
                           [0.0, 0.0, far / (far - near), -(far * near) / (far - near)], [0.0, 0.0, 1.0, 0.0]],
                          dtype=torch.float64)
    view_rows = w2c.unsqueeze(0).transpose(1, 2)
    return GaussianRasterizationSettings(
        image_height=H, image_width=W, tanfovx=float(W / (2 * fx)), tanfovy=float(H / (2 * fy)),
        bg=torch.zeros(3, dtype=torch.float64), scale_modifier=1.0, viewmatrix=view_rows,
        projmatrix=view_rows.bmm(opengl.T[None]), sh_degree=0, campos=torch.inverse(w2c)[:3, 3],
        prefiltered=False)


# --- viewmatrix / projmatrix / bg / campos layouts ------------------------------------------------

def test_every_matrix_layout_the_original_reads_gives_the_same_render():
    scene = make_scene(n=12, width=32, height=24, seed=6)
    base = _settings(scene)
    view, full = base.viewmatrix, base.projmatrix            # [1, 4, 4] transposed views
    reference = _render(base, scene)
    layouts = {
        "[4, 4]": (view[0], full[0]),
        "[4, 4] contiguous": (view[0].contiguous(), full[0].contiguous()),
        "[16]": (view.reshape(16), full.reshape(16)),
        "[1, 16]": (view.reshape(1, 16), full.reshape(1, 16)),
        "float64": (view.double(), full.double()),
    }
    for name, (v, p) in layouts.items():
        color, radii, depth = _render(base._replace(viewmatrix=v, projmatrix=p), scene)
        assert torch.equal(color, reference[0]), name
        assert torch.equal(radii, reference[1]) and torch.equal(depth, reference[2]), name
        assert torch.equal(GaussianRasterizer(base._replace(viewmatrix=v, projmatrix=p)).markVisible(scene.means),
                           GaussianRasterizer(base).markVisible(scene.means)), name


def test_bg_and_campos_layouts_and_values():
    scene = make_scene(n=10, width=32, height=24, seed=7, sh_degree=1)
    bg = torch.tensor([0.2, 0.5, 0.7])
    base = _settings(scene, bg=bg, sh_degree=1)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)

    def render(settings):
        return GaussianRasterizer(settings)(scene.means, None, scene.opacities, shs=scene.colors, scales=scene.scales,
                                            rotations=quats)[0]

    reference = render(base)
    for bg_layout in (bg[None], bg.reshape(3, 1, 1), bg.double()):
        assert torch.equal(render(base._replace(bg=bg_layout)), reference)
    for campos in (base.campos[None], base.campos.double(), base.campos.reshape(3, 1)):
        assert torch.equal(render(base._replace(campos=campos)), reference)
    # An empty image is the background; moving the camera centre changes the SH colours.
    empty = GaussianRasterizer(base)(scene.means[:0], None, scene.opacities[:0], shs=scene.colors[:0],
                                     scales=scene.scales[:0], rotations=quats[:0])[0]
    assert torch.equal(empty, bg.double()[:, None, None].expand(3, 24, 32))
    assert (render(base._replace(campos=base.campos + 1.0)) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("field,value,message", [
    ("viewmatrix", torch.eye(4)[:3], r"viewmatrix: .*got shape \(3, 4\)"),
    ("projmatrix", torch.eye(4).expand(2, 4, 4), r"projmatrix: .*got shape \(2, 4, 4\)"),
    ("viewmatrix", [[1.0, 0, 0, 0]] * 4, r"viewmatrix: expected a torch.Tensor"),
    ("projmatrix", torch.full((4, 4), float("nan")), r"projmatrix: expected only finite values"),
    ("bg", torch.zeros(4), r"bg: .*one value per colour channel \(3\).*got shape \(4,\)"),
    ("bg", None, r"bg: expected a torch.Tensor"),
    ("campos", torch.zeros(2, 3), r"campos: .*got shape \(2, 3\)"),
])
def test_bad_settings_fields_are_named_with_their_shape(field, value, message):
    scene = make_scene(n=4, seed=5)
    with pytest.raises(ValueError, match=message):
        _render(_settings(scene, **{field: value}), scene)


# --- per argument -----------------------------------------------------------------------------------

def test_rotations_are_used_as_given_not_normalised():
    scene = make_scene(n=25, width=40, height=30, seed=8, opacity_range=(0.3, 0.9))
    g = torch.Generator().manual_seed(1)
    norms = 0.6 + 0.9 * torch.rand(25, 1, generator=g, dtype=torch.float64)
    unit = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    quats = unit * norms                                        # norms in [0.6, 1.5]
    settings = _settings(scene)
    color, radii, depth = _render(settings, scene, quats=quats)
    expected_color, expected_radii, expected_depth = _emulate_original(
        settings, scene.means, scene.colors, scene.opacities, scene.scales, quats)
    torch.testing.assert_close(color, expected_color, atol=1e-5, rtol=1e-5)
    assert torch.equal(radii, expected_radii)
    torch.testing.assert_close(depth, expected_depth, atol=0, rtol=1e-6)
    assert (color - _render(settings, scene, quats=unit)[0]).abs().max() > 1e-2


def _directional_check(loss_of, value, n_directions=3, h=1e-6):
    value = value.detach().clone().requires_grad_()
    loss_of(value).backward()
    g = torch.Generator().manual_seed(2)
    for _ in range(n_directions):
        direction = torch.randn(value.shape, generator=g, dtype=value.dtype)
        with torch.no_grad():
            numeric = (loss_of(value + h * direction) - loss_of(value - h * direction)) / (2 * h)
        analytic = (value.grad * direction).sum()
        assert abs(float(analytic - numeric)) <= 1e-6 * max(1.0, abs(float(numeric))), (float(analytic), float(numeric))
    return value.grad


def test_rotation_gradient_is_with_respect_to_the_quaternion_as_given():
    # Smooth scene (no Gaussian near a cut-off) so that central differences are meaningful.
    scene = make_scene(n=6, width=24, height=20, seed=9, opacity_range=(0.2, 0.3), scale_range=(0.08, 0.12))
    settings = _settings(scene)
    weights = torch.rand(3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True) * 1.2
    grad = _directional_check(lambda q: (_render(settings, scene, quats=q)[0] * weights).sum(), quats)
    # Normalising first would make the gradient orthogonal to q; the original's is not.
    assert (grad * quats).sum(-1).abs().max() > 1e-6


def test_scale_modifier_multiplies_scales_but_not_cov3D_precomp():
    scene = make_scene(n=15, width=32, height=24, seed=10)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    settings = _settings(scene)
    half = _render(settings._replace(scale_modifier=0.5), scene)
    halved_scales = _render(settings, scene, scales=scene.scales * 0.5)
    for a, b in zip(half, halved_scales):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (half[0] - _render(settings, scene)[0]).abs().max() > 1e-2
    from tritonsplat.compat import covariance_as_given
    cov = covariance_as_given(quats, scene.scales)
    with_cov = [_render(settings._replace(scale_modifier=m), scene, rotations=None, scales=None, cov3D_precomp=cov)
                for m in (1.0, 0.5)]
    assert torch.equal(with_cov[0][0], with_cov[1][0])
    torch.testing.assert_close(with_cov[0][0], _render(settings, scene)[0], atol=1e-12, rtol=0)


def test_scale_gradient_includes_the_scale_modifier():
    scene = make_scene(n=6, width=24, height=20, seed=11, opacity_range=(0.2, 0.3), scale_range=(0.08, 0.12))
    weights = torch.rand(3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    settings = _settings(scene, scale_modifier=0.5)
    grad = _directional_check(lambda s: (_render(settings, scene, scales=s)[0] * weights).sum(), scene.scales)
    plain = _directional_check(lambda s: (_render(settings._replace(scale_modifier=1.0), scene, scales=s)[0]
                                          * weights).sum(), scene.scales * 0.5)
    torch.testing.assert_close(grad, 0.5 * plain, atol=1e-12, rtol=1e-9)


def test_opacities_and_means2D_forms():
    scene = make_scene(n=10, width=32, height=24, seed=12)
    settings = _settings(scene)
    reference = _render(settings, scene)
    for overrides in (dict(opacities=scene.opacities), dict(means2D=None),
                      dict(means2D=torch.zeros(10, 2, dtype=torch.float64, requires_grad=True))):
        out = _render(settings, scene, **overrides)
        assert all(torch.equal(a, b) for a, b in zip(out, reference)), overrides
    with pytest.raises(ValueError, match=r"opacities: expected \[N=10, 1\] or \[N=10\]"):
        _render(settings, scene, opacities=scene.opacities[:, None, None])
    with pytest.raises(ValueError, match=r"means2D: expected \[N=10, 2\] or \[N=10, 3\]"):
        _render(settings, scene, means2D=torch.zeros(10, 1))


def test_prefiltered_renders_the_same_and_rejects_a_broken_promise():
    scene = make_scene(n=10, width=32, height=24, seed=13)
    settings = _settings(scene)
    assert all(torch.equal(a, b) for a, b in zip(_render(settings._replace(prefiltered=True), scene),
                                                 _render(settings, scene)))
    behind = scene.means.clone()
    behind[0, 2] = 0.1                                        # camera 0 is at the origin looking down +z
    color, radii, _ = _render(settings, scene, means3D=behind)
    assert radii[0] == 0 and (radii[1:] > 0).all()
    with pytest.raises(ValueError, match="prefiltered: True promises every Gaussian has camera z > 0.2"):
        _render(settings._replace(prefiltered=True), scene, means3D=behind)


def test_debug_changes_nothing_and_dumps_the_inputs_when_forward_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene = make_scene(n=8, width=32, height=24, seed=14)
    settings = _settings(scene)
    assert all(torch.equal(a, b) for a, b in zip(_render(settings._replace(debug=True), scene),
                                                 _render(settings, scene)))
    assert not (tmp_path / SNAPSHOT_FILE).exists()
    with pytest.raises(ValueError, match="backend"):          # fails inside forward, after validation
        _render(settings._replace(debug=False), scene, backend="no-such-backend")
    assert not (tmp_path / SNAPSHOT_FILE).exists()
    with pytest.raises(ValueError, match="backend"):
        _render(settings._replace(debug=True), scene, backend="no-such-backend")
    snapshot = torch.load(tmp_path / SNAPSHOT_FILE)
    assert torch.equal(snapshot["means3D"], scene.means) and snapshot["image_width"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == [SNAPSHOT_FILE]


def test_mark_visible_is_the_near_plane_test_for_any_matrix_layout():
    scene = make_scene(n=4, seed=15)
    settings = _settings(scene)                               # [1, 4, 4] matrices, camera at the origin
    positions = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.2], [0.0, 0.0, 0.21], [50.0, -40.0, 1.0],
                              [0.0, 0.0, -2.0]], dtype=torch.float32)
    expected = torch.tensor([True, False, True, True, False])
    for v in (settings.viewmatrix, settings.viewmatrix[0], settings.viewmatrix.reshape(16)):
        visible = GaussianRasterizer(settings._replace(viewmatrix=v)).markVisible(positions)
        assert visible.dtype == torch.bool and torch.equal(visible, expected)
    with pytest.raises(ValueError, match=r"positions: expected \[N, 3\]"):
        GaussianRasterizer(settings).markVisible(positions[:, :2])


def test_returned_tuple_and_median_depth_convention():
    scene = make_scene(n=1, width=32, height=32, seed=16)
    means = torch.tensor([[0.0, 0.0, 2.5]], dtype=torch.float64)
    scene.means, scene.opacities = means, torch.tensor([0.95], dtype=torch.float64)
    scene.scales = torch.full((1, 3), 0.2, dtype=torch.float64)
    out = _render(_settings(scene), scene)
    assert isinstance(out, tuple) and len(out) == 3
    im, radius, depth, = out
    assert radius.tolist() == [int(radius[0])] and radius[0] > 0
    centre = (16, 16)
    assert float(depth[0, centre[0], centre[1]]) == pytest.approx(2.5, rel=1e-12)
    assert float(depth[0, 0, 0]) == 15.0 and not depth.requires_grad
    assert torch.equal(im[:, 0, 0], torch.zeros(3, dtype=torch.float64))


def test_compat_sh_and_covariance_inputs():
    scene = make_scene(n=20, width=32, height=24, seed=4, sh_degree=3)
    settings = _settings(scene, sh_degree=3)
    rasterizer = GaussianRasterizer(settings)
    quats = scene.quats / scene.quats.norm(dim=-1, keepdim=True)
    color_sh, _, _ = rasterizer(scene.means, None, scene.opacities, shs=scene.colors, scales=scene.scales,
                                rotations=quats)
    native = tritonsplat.rasterize(scene.means, scene.quats, scene.scales, scene.opacities, scene.colors,
                                   scene.viewmats[:1], scene.Ks[:1], scene.width, scene.height, sh_degree=3)
    # Different 2D rules (radius, clamp, tile truncation) on Gaussians up to 0.9 opaque: small differences.
    torch.testing.assert_close(color_sh.permute(1, 2, 0), native.colors[0], atol=2e-2, rtol=0)
    assert color_sh.shape == (3, 24, 32) and torch.isfinite(color_sh).all()
    # With covariances instead of scales/rotations the image must be identical.
    from tritonsplat.reference.projection import covariance_3d
    cov = covariance_3d(quats, scene.scales)
    upper = torch.stack([cov[:, 0, 0], cov[:, 0, 1], cov[:, 0, 2], cov[:, 1, 1], cov[:, 1, 2], cov[:, 2, 2]], -1)
    colors_rgb = torch.rand(20, 3, dtype=torch.float64)
    a, radii_a, _ = rasterizer(scene.means, None, scene.opacities, colors_precomp=colors_rgb,
                               scales=scene.scales, rotations=quats)
    upper = upper.clone().requires_grad_()
    b, radii_b, _ = rasterizer(scene.means, None, scene.opacities, colors_precomp=colors_rgb, cov3D_precomp=upper)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.equal(radii_a, radii_b)
    b.sum().backward()
    assert upper.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"sh_degree: expected an int in 0..3"):
        GaussianRasterizer(settings._replace(sh_degree=4))(scene.means, None, scene.opacities, shs=scene.colors,
                                                           scales=scene.scales, rotations=quats)


def test_compat_requires_exactly_one_colour_and_one_shape_form():
    scene = make_scene(n=4, seed=5)
    rasterizer = GaussianRasterizer(_settings(scene))
    with pytest.raises(ValueError, match="exactly one of either SHs or precomputed colors"):
        rasterizer(scene.means, None, scene.opacities, scales=scene.scales, rotations=scene.quats)
    with pytest.raises(ValueError, match="scale/rotation pair or precomputed 3D covariance"):
        rasterizer(scene.means, None, scene.opacities, colors_precomp=scene.colors)
    with pytest.raises(ValueError, match="means3D"):
        rasterizer(scene.means[:, :2], None, scene.opacities, colors_precomp=scene.colors,
                   scales=scene.scales, rotations=scene.quats)
