"""The torch compositor's hand-written backward: gradcheck, absgrad, densify_grad, chunking, cut-offs.

Tolerances:
| check                        | tolerance                      | why                                         |
|------------------------------|--------------------------------|---------------------------------------------|
| gradcheck (float64)          | eps 1e-7, atol 1e-6, rtol 1e-4 | central differences; scenes checked to stay |
|                              |                                | >= 1e-4 away from 1/255, 0.99, 1e-4 cut-offs|
| absgrad / densify_grad       | atol 1e-12, rtol 1e-10         | float64, same quantities summed differently |
| chunked vs unchunked (fp32)  | atol 1e-6, rtol 1e-5           | same pairs and order; only the rounding of  |
|                              |                                | the float64 band-wide log-T scan differs    |
"""

import pytest
import torch

from tests.helpers import make_scene
from tritonsplat.reference.binning import pixel_boxes
from tritonsplat.reference.compositing import _pair_geometry, composite
from tritonsplat.reference.projection import project_gaussians
from tritonsplat.settings import RenderSettings, standard_clamp_limits


def _projected(scene):
    settings = RenderSettings(scene.width, scene.height)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    p = project_gaussians(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats,
                          scene.Ks, limits, settings)
    boxes = pixel_boxes(p.means2d, p.radii, settings)
    c = scene.viewmats.shape[0]
    colors = scene.colors if scene.colors.dim() == 3 else scene.colors[None].expand(c, -1, -1)
    return p, boxes, colors.contiguous(), settings


def _distance_to_cutoffs(p, boxes, scene, settings) -> float:
    """Smallest relative distance of any evaluated pair to the 1/255 and 0.99 cut-offs."""
    c, n = p.radii.shape
    worst = float("inf")
    for ci in range(c):
        for g in range(n):
            x0, y0, x1, y1 = boxes[ci, g].tolist()
            if x1 <= x0:
                continue
            ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
            pixel = (ci * settings.height + ys.reshape(-1)) * settings.width + xs.reshape(-1)
            geometry = _pair_geometry(torch.full_like(pixel, ci * n + g), pixel, p.means2d.reshape(-1, 2),
                                      p.conics.reshape(-1, 3),
                                      scene.opacities[None].expand(c, n).reshape(-1),
                                      settings.width, settings.height, settings.alpha_cap)
            raw = geometry.gaussian_alpha
            worst = min(worst, float((raw * 255 - 1).abs().min()), float((raw / 0.99 - 1).abs().min()))
    return worst


def _gradcheck_scene(seed):
    scene = make_scene(n=6, width=9, height=7, n_cameras=2, n_channels=2, backgrounds=True, seed=seed,
                       opacity_range=(0.3, 0.95), scale_range=(0.1, 0.4))
    return scene


@pytest.mark.parametrize("seed", [3, 11])
def test_composite_gradcheck(seed):
    scene = _gradcheck_scene(seed)
    p, boxes, colors, settings = _projected(scene)
    assert _distance_to_cutoffs(p, boxes, scene, settings) > 1e-4, "scene too close to a cut-off"
    inputs = [t.detach().clone().requires_grad_() for t in
              (p.means2d, p.conics, scene.opacities, colors, p.depths, scene.backgrounds)]

    def render(means2d, conics, opacities, colors, depths, backgrounds):
        out = composite(means2d, conics, opacities, colors, depths, backgrounds, boxes, settings,
                        chunk_pairs=40)  # several bands in both passes
        return out.colors, out.alphas, out.depth_sums

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


def test_composite_gradcheck_with_saturated_pixels():
    """Opaque stacks: alpha hits the 0.99 cap at centres and pixels stop at T < 1e-4."""
    scene = make_scene(n=10, width=8, height=8, seed=5, opacity_range=(0.97, 1.0), scale_range=(0.3, 0.5))
    scene.means[:, :2] *= 0.1
    p, boxes, colors, settings = _projected(scene)
    out = composite(p.means2d, p.conics, scene.opacities, colors, p.depths, None, boxes, settings)
    assert float(out.alphas.max()) > 1 - 1e-3, "some pixel should saturate"
    inputs = [t.detach().clone().requires_grad_() for t in (p.means2d, p.conics, colors, p.depths)]

    def render(means2d, conics, colors, depths):
        result = composite(means2d, conics, scene.opacities, colors, depths, None, boxes, settings)
        return result.colors, result.alphas, result.depth_sums

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    scene = _gradcheck_scene(3)
    p, boxes, colors, settings = _projected(scene)
    means2d = p.means2d.detach().clone().requires_grad_()
    upstream = torch.randn(2, settings.height, settings.width, 2, dtype=torch.float64)
    out = composite(means2d, p.conics.detach(), scene.opacities, colors, p.depths.detach(),
                    scene.backgrounds, boxes, settings, absgrad=True)
    (out.colors * upstream).sum().backward()
    expected = torch.zeros_like(means2d)
    for c in range(2):
        for y in range(settings.height):
            for x in range(settings.width):
                mask = torch.zeros_like(upstream)
                mask[c, y, x] = 1
                m = p.means2d.detach().clone().requires_grad_()
                o = composite(m, p.conics.detach(), scene.opacities, colors, p.depths.detach(),
                              scene.backgrounds, boxes, settings)
                (o.colors * upstream * mask).sum().backward()
                expected += m.grad.abs()
    torch.testing.assert_close(means2d.absgrad, expected, atol=1e-12, rtol=1e-10)
    assert (means2d.absgrad >= means2d.grad.abs() - 1e-12).all()


def test_densify_grad_uses_only_the_first_k_channels():
    scene = make_scene(n=12, width=11, height=9, n_cameras=2, n_channels=5, backgrounds=True, seed=6)
    p, boxes, colors, settings = _projected(scene)
    upstream = torch.randn(2, settings.height, settings.width, 5, dtype=torch.float64)
    upstream_alpha = torch.randn(2, settings.height, settings.width, 1, dtype=torch.float64)
    k = 3
    means2d = p.means2d.detach().clone().requires_grad_()
    densify = torch.zeros_like(means2d)
    out = composite(means2d, p.conics.detach(), scene.opacities, colors, p.depths.detach(),
                    scene.backgrounds, boxes, settings, densify_channels=k, densify_grad=densify)
    ((out.colors * upstream).sum() + (out.alphas * upstream_alpha).sum() + out.depth_sums.sum()).backward()
    reference = p.means2d.detach().clone().requires_grad_()
    out_k = composite(reference, p.conics.detach(), scene.opacities, colors, p.depths.detach(),
                      scene.backgrounds, boxes, settings)
    (out_k.colors[..., :k] * upstream[..., :k]).sum().backward()
    torch.testing.assert_close(densify, reference.grad, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(densify, means2d.grad), "the full gradient must differ from RGB-only"


def test_band_chunking_does_not_change_results():
    scene = make_scene(n=40, width=31, height=19, n_cameras=2, seed=8, dtype=torch.float32)
    p, boxes, colors, settings = _projected(scene)
    results = []
    for chunk in (7, 300, 1 << 20):
        m = p.means2d.detach().clone().requires_grad_()
        col = colors.clone().requires_grad_()
        out = composite(m, p.conics, scene.opacities, col, p.depths, None, boxes, settings, chunk_pairs=chunk)
        (out.colors.square().sum() + out.depth_sums.sum()).backward()
        results.append((out.colors, out.alphas, out.depth_sums, out.median_depths, m.grad, col.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_transmittance_stop_and_alpha_cap():
    """A column of opaque, centred, identical Gaussians: each blends 0.99 until T (1 - a) < 1e-4."""
    n = 5
    means2d = torch.full((1, n, 2), 4.5, dtype=torch.float64)  # exactly at pixel (4, 4)'s centre
    conics = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(1, n, 3).contiguous()
    opacities = torch.ones(n, dtype=torch.float64)
    colors = torch.eye(n, dtype=torch.float64)[None]           # Gaussian i writes channel i
    depths = torch.arange(1, n + 1, dtype=torch.float64)[None]
    boxes = torch.tensor([[0, 0, 9, 9]], dtype=torch.int32).expand(1, n, 4).contiguous()
    settings = RenderSettings(9, 9)
    out = composite(means2d, conics, opacities, colors, depths, None, boxes, settings)
    pixel = out.colors[0, 4, 4]
    # T: 1 -> 0.01 -> 1e-4 (not < 1e-4, blended) -> would be 1e-6 < 1e-4: the third stops the pixel.
    torch.testing.assert_close(pixel, torch.tensor([0.99, 0.0099, 0, 0, 0], dtype=torch.float64))
    assert float(out.alphas[0, 4, 4]) == pytest.approx(1 - 0.01 * 0.01)
    assert float(out.median_depths[0, 4, 4]) == 1.0
