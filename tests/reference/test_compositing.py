"""The torch tile compositor vs a dense float64 brute force; its hand-written backward: gradcheck,
absgrad, densify_grad, colour-gradient channels; chunking invariance; cut-offs; capacity-mode binning.

Tolerances:
| check                          | tolerance                      | why                                         |
|--------------------------------|--------------------------------|---------------------------------------------|
| vs dense brute force (float64) | atol 1e-10, rtol 1e-9          | same rule in float64; only the order of the |
|                                |                                | sums differs (chunked products, bmm)        |
| last blended index             | exact                          | integer decision, scenes kept off cut-offs  |
| gradcheck (float64)            | eps 1e-7, atol 1e-6, rtol 1e-4 | central differences; scenes checked to stay |
|                                |                                | >= 1e-4 away from 1/255, 0.99, 1e-4 cut-offs|
| absgrad / densify_grad         | atol 1e-12, rtol 1e-10         | float64, same quantities summed differently |
| chunk / batch / sub-tile sizes | atol 1e-6, rtol 1e-5 (float32) | same entries and order; only the grouping   |
|   images                       |                                | of float32 products and sums differs        |
|   gradients                    | atol 1e-6 x max abs, rtol 1e-4 | backward recovers T_i by dividing T_final by|
|                                |                                | per-chunk products: the chain length depends|
|                                |                                | on K (measured: 2.3e-5 relative at K = 1)   |
"""

import pytest
import torch

from tests.helpers import assert_close, make_scene
from tritonsplat.reference.binning import bin_tiles
from tritonsplat.reference.compositing import composite, composite_state
from tritonsplat.reference.projection import project_gaussians
from tritonsplat.reference.sorting import sort_intersections
from tritonsplat.settings import RenderSettings, standard_clamp_limits

SMALL = dict(chunk_entries=2, tile_batch=3, sub_tile=4)   # many chunks, batches and sub-tiles


def _projected(scene, tile_size=8):
    settings = RenderSettings(scene.width, scene.height, tile_size=tile_size)
    limits = standard_clamp_limits(scene.Ks, scene.width, scene.height)
    p = project_gaussians(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats,
                          scene.Ks, limits, settings)
    c, n = p.radii.shape
    bins = bin_tiles(p.means2d.detach(), p.conics.detach(), scene.opacities, p.radii, p.depths.detach(), settings)
    tiles = sort_intersections(bins, c, n, settings)
    colors = scene.colors if scene.colors.dim() == 3 else scene.colors[None].expand(c, -1, -1)
    return p, tiles, colors.contiguous(), settings


def dense_composite(means2d, conics, opacities, colors, depths, backgrounds, visible, settings):
    """Every visible Gaussian at every pixel, blended sequentially front to back (float64).

    Returns colors, alphas, expected depths, median depths ([C, H, W, .]), the flat row c * N + g of
    each pixel's last blended Gaussian ([C, H, W], -1: none) and the smallest relative distance of any
    decision to the 1/255, 0.99 and 1e-4 cut-offs.
    """
    c_count, n = depths.shape
    h, w = settings.height, settings.width
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    images, alphas, depth_images, medians, lasts = [], [], [], [], []
    margin = float("inf")
    for c in range(c_count):
        t = torch.ones(h, w, dtype=torch.float64)
        color = torch.zeros(h, w, colors.shape[-1], dtype=torch.float64)
        depth_sum = torch.zeros(h, w, dtype=torch.float64)
        median = torch.zeros(h, w, dtype=torch.float64)
        last = torch.full((h, w), -1, dtype=torch.int64)
        done = torch.zeros(h, w, dtype=torch.bool)
        for g in sorted(range(n), key=lambda i: (float(depths[c, i]), i)):
            if not visible[c, g]:
                continue
            a, b, cc = conics[c, g].tolist()
            dx, dy = means2d[c, g, 0] - xs, means2d[c, g, 1] - ys
            raw = opacities[g] * torch.exp(-(0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy))
            alpha = raw.clamp_max(settings.alpha_cap)
            used = ~done & (alpha >= 1 / 255)
            after = t * (1 - alpha)
            margin = min(margin, float((raw[~done] * 255 - 1).abs().min()),
                         float((raw[~done] / settings.alpha_cap - 1).abs().min()),
                         float((after[used] / 1e-4 - 1).abs().min()) if used.any() else margin)
            stop = used & (after < 1e-4)
            done |= stop
            used &= ~stop
            weight = torch.where(used, alpha * t, 0)
            color += weight[..., None] * colors[c, g]
            depth_sum += weight * depths[c, g]
            median = torch.where(used & (t >= 0.5) & (after < 0.5), depths[c, g], median)
            last = torch.where(used, c * n + g, last)
            t = torch.where(used, after, t)
        if backgrounds is not None:
            color += t[..., None] * backgrounds[c]
        alpha_image = 1 - t
        images.append(color)
        alphas.append(alpha_image[..., None])
        depth_images.append(torch.where(alpha_image > 0, depth_sum / alpha_image.clamp_min(1e-300), 0)[..., None])
        medians.append(median[..., None])
        lasts.append(last)
    return (torch.stack(images), torch.stack(alphas), torch.stack(depth_images), torch.stack(medians),
            torch.stack(lasts), margin)


@pytest.mark.parametrize("n_cameras,n_channels,width,height,tile_size,per_camera,backgrounds", [
    pytest.param(1, 3, 23, 17, 8, False, False, id="C1-D3-23x17-t8"),
    pytest.param(2, 5, 37, 21, 16, True, True, id="C2-D5-37x21-t16-percam-bg"),
    pytest.param(1, 1, 19, 33, 4, False, True, id="C1-D1-19x33-t4-bg"),
])
def test_matches_dense_float64(n_cameras, n_channels, width, height, tile_size, per_camera, backgrounds):
    scene = make_scene(n=120, width=width, height=height, n_cameras=n_cameras, n_channels=n_channels,
                       per_camera_colors=per_camera, backgrounds=backgrounds, seed=width + tile_size,
                       opacity_range=(0.5, 0.99), scale_range=(0.1, 0.6))
    p, tiles, colors, settings = _projected(scene, tile_size)
    expected = dense_composite(p.means2d, p.conics, scene.opacities, colors, p.depths, scene.backgrounds,
                               p.radii > 0, settings)
    assert expected[-1] > 1e-7, "scene too close to a cut-off for an exact comparison"
    for sizes in ({}, SMALL):
        out = composite(p.means2d, p.conics, scene.opacities, colors, p.depths, scene.backgrounds,
                        tiles.tile_ranges, tiles.gaussian_ids, settings, **sizes)
        for name, reference in zip(("colors", "alphas", "depths", "median_depths"), expected):
            assert_close(getattr(out, name), reference, 1e-10, 1e-9, f"{name} {sizes}")
        state = composite_state(p.means2d, p.conics, scene.opacities, colors, p.depths, tiles.tile_ranges,
                                tiles.gaussian_ids, settings, **sizes)
        last_rows = torch.where(state.last_index >= 0, tiles.gaussian_ids[state.last_index.clamp_min(0).long()], -1)
        assert torch.equal(last_rows.long(), expected[4]), "last blended entry"
        assert_close(state.final_transmittance[..., None], 1 - expected[1], 1e-10, 1e-9, "final transmittance")
    assert (expected[1] > 1 - 1e-3).any() and (expected[3] > 0).any(), "the scene should saturate some pixels"


def _gradcheck_scene(seed):
    return make_scene(n=6, width=9, height=7, n_cameras=2, n_channels=2, backgrounds=True, seed=seed,
                      opacity_range=(0.3, 0.95), scale_range=(0.1, 0.4))


@pytest.mark.parametrize("seed", [3, 11])
def test_composite_gradcheck(seed):
    scene = _gradcheck_scene(seed)
    p, tiles, colors, settings = _projected(scene, tile_size=4)
    margin = dense_composite(p.means2d, p.conics, scene.opacities, colors, p.depths, scene.backgrounds,
                             p.radii > 0, settings)[-1]
    assert margin > 1e-4, "scene too close to a cut-off"
    inputs = [t.detach().clone().requires_grad_() for t in
              (p.means2d, p.conics, scene.opacities, colors, p.depths, scene.backgrounds)]

    def render(means2d, conics, opacities, colors, depths, backgrounds):
        out = composite(means2d, conics, opacities, colors, depths, backgrounds, tiles.tile_ranges,
                        tiles.gaussian_ids, settings, chunk_entries=3, sub_tile=2)
        return out.colors, out.alphas, out.depths

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


def test_composite_gradcheck_with_saturated_pixels():
    """Opaque stacks: alpha hits the 0.99 cap at centres and pixels stop at T < 1e-4."""
    scene = make_scene(n=10, width=8, height=8, seed=5, opacity_range=(0.97, 1.0), scale_range=(0.3, 0.5))
    scene.means[:, :2] *= 0.1
    p, tiles, colors, settings = _projected(scene, tile_size=4)
    out = composite(p.means2d, p.conics, scene.opacities, colors, p.depths, None, tiles.tile_ranges,
                    tiles.gaussian_ids, settings)
    assert float(out.alphas.max()) > 1 - 1e-3, "some pixel should saturate"
    inputs = [t.detach().clone().requires_grad_() for t in (p.means2d, p.conics, colors, p.depths)]

    def render(means2d, conics, colors, depths):
        result = composite(means2d, conics, scene.opacities, colors, depths, None, tiles.tile_ranges,
                           tiles.gaussian_ids, settings, chunk_entries=3)
        return result.colors, result.alphas, result.depths

    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-6, rtol=1e-4)


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    scene = _gradcheck_scene(3)
    p, tiles, colors, settings = _projected(scene, tile_size=4)
    args = (p.conics.detach(), scene.opacities, colors, p.depths.detach(), scene.backgrounds, tiles.tile_ranges,
            tiles.gaussian_ids, settings)
    means2d = p.means2d.detach().clone().requires_grad_()
    upstream = torch.randn(2, settings.height, settings.width, 2, dtype=torch.float64)
    out = composite(means2d, *args, absgrad=True, **SMALL)
    (out.colors * upstream).sum().backward()
    expected = torch.zeros_like(means2d)
    for c in range(2):
        for y in range(settings.height):
            for x in range(settings.width):
                m = p.means2d.detach().clone().requires_grad_()
                o = composite(m, *args)
                (o.colors[c, y, x] * upstream[c, y, x]).sum().backward()
                expected += m.grad.abs()
    torch.testing.assert_close(means2d.absgrad, expected, atol=1e-12, rtol=1e-10)
    assert (means2d.absgrad >= means2d.grad.abs() - 1e-12).all()


def test_densify_grad_uses_only_the_first_k_channels():
    scene = make_scene(n=12, width=11, height=9, n_cameras=2, n_channels=5, backgrounds=True, seed=6)
    p, tiles, colors, settings = _projected(scene)
    args = (p.conics.detach(), scene.opacities, colors, p.depths.detach(), scene.backgrounds, tiles.tile_ranges,
            tiles.gaussian_ids, settings)
    upstream = torch.randn(2, settings.height, settings.width, 5, dtype=torch.float64)
    upstream_alpha = torch.randn(2, settings.height, settings.width, 1, dtype=torch.float64)
    k = 3
    means2d = p.means2d.detach().clone().requires_grad_()
    densify = torch.zeros_like(means2d)
    out = composite(means2d, *args, densify_channels=k, densify_grad=densify, **SMALL)
    ((out.colors * upstream).sum() + (out.alphas * upstream_alpha).sum() + out.depths.sum()).backward()
    reference = p.means2d.detach().clone().requires_grad_()
    out_k = composite(reference, *args)
    (out_k.colors[..., :k] * upstream[..., :k]).sum().backward()
    torch.testing.assert_close(densify, reference.grad, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(densify, means2d.grad), "the full gradient must differ from RGB-only"


def test_color_grad_channels_and_outputs():
    scene = make_scene(n=20, width=13, height=11, n_channels=4, backgrounds=True, seed=9)
    p, tiles, colors, settings = _projected(scene)
    results = {}
    for kc in (None, 2):
        leaves = [t.detach().clone().requires_grad_() for t in (p.means2d, colors)]
        out = composite(leaves[0], p.conics, scene.opacities, leaves[1], p.depths, scene.backgrounds,
                        tiles.tile_ranges, tiles.gaussian_ids, settings, color_grad_channels=kc)
        (out.colors.square().sum() + out.depths.sum()).backward()
        results[kc] = [t.grad for t in leaves]
    assert torch.equal(results[2][0], results[None][0]), "other gradients see all channels"
    assert torch.equal(results[2][1][..., :2], results[None][1][..., :2])
    assert (results[2][1][..., 2:] == 0).all() and (results[None][1][..., 2:] != 0).any()
    only = composite(p.means2d, p.conics, scene.opacities, colors, p.depths, None, tiles.tile_ranges,
                     tiles.gaussian_ids, settings, outputs=("colors", "alphas"))
    assert only.depths is None and only.median_depths is None and only.colors is not None


def test_chunk_batch_and_sub_tile_sizes_do_not_change_results():
    scene = make_scene(n=40, width=31, height=19, n_cameras=2, seed=8, dtype=torch.float32)
    p, tiles, colors, settings = _projected(scene, tile_size=16)
    results = []
    for sizes in (dict(chunk_entries=1, tile_batch=1, sub_tile=1), dict(chunk_entries=5, tile_batch=7, sub_tile=4),
                  dict(chunk_entries=32, tile_batch=128, sub_tile=16), {}):
        m = p.means2d.detach().clone().requires_grad_()
        col = colors.clone().requires_grad_()
        out = composite(m, p.conics, scene.opacities, col, p.depths, None, tiles.tile_ranges, tiles.gaussian_ids,
                        settings, **sizes)
        (out.colors.square().sum() + out.depths.sum()).backward()
        results.append((out.colors, out.alphas, out.depths, out.median_depths, m.grad, col.grad))
    for other in results[1:]:
        for a, b in zip(results[0][:4], other[:4]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for a, b in zip(results[0][4:], other[4:]):
            torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-4)


def test_chunks_per_step_bounds_padding_budget_and_length():
    from tritonsplat.reference.compositing import STEP_WASTE_PER_SAVED_STEP, chunks_per_step

    assert chunks_per_step([9], budget=512, max_entries=128, k_entries=32) == 4       # one long list: 4 x 32
    assert chunks_per_step([3], budget=512, max_entries=128, k_entries=32) == 3       # no more than it has
    assert chunks_per_step([9, 9], budget=2, max_entries=128, k_entries=32) == 1      # the batch's budget
    # m lists of one chunk waste m - 1 padding chunks each, against 8 per step saved (m - 1 steps):
    assert chunks_per_step([9] * 10 + [1] * 9, 512, 128, 32) == 1                      # 9 (m - 1) > 8 (m - 1)
    assert chunks_per_step([9] * 10 + [1] * 8, 512, 128, 32) == 4                      # 8 (m - 1): allowed
    assert chunks_per_step([9] * 10 + [2] * 13, 512, 128, 32) == 3                     # m = 4: 26 > 24; 3: 13
    for remaining in ([5, 4, 4, 2, 1], [30, 2, 1, 1], [7] * 3):
        m = chunks_per_step(remaining, 512, 256, 16)
        waste = sum(max(0, m - left) for left in remaining)
        assert waste <= STEP_WASTE_PER_SAVED_STEP * (m - 1) and m <= remaining[0]


def test_forward_steps_of_several_chunks_give_the_same_renders_state_and_gradients(monkeypatch):
    """The forward walks several chunks per step where lists are long (`chunks_per_step`), reading the
    all-padding chunk past a list's end and stopping pixels inside a step: one chunk per step must give the
    same outputs, state and gradients. Opaque Gaussians, so that pixels reach the transmittance stop."""
    from tritonsplat.reference import compositing as module

    scene = make_scene(n=80, width=29, height=21, n_cameras=2, seed=3, opacity_range=(0.9, 1.0),
                       scale_range=(0.1, 0.4), dtype=torch.float32)
    p, tiles, colors, settings = _projected(scene, tile_size=16)
    steps = []                                 # (m, a list ran past its end, a pixel stopped in the step)
    original_rule, original_chunk = module.chunks_per_step, module._forward_chunk

    def rule_spy(remaining, *args):
        m = original_rule(remaining, *args)
        steps.append([m, remaining[-1] < m, False])
        return m

    def chunk_spy(*args, **kwargs):
        result = original_chunk(*args, **kwargs)
        steps[-1][2] = bool(result.stopped.any())
        return result

    monkeypatch.setattr(module, "chunks_per_step", rule_spy)
    monkeypatch.setattr(module, "_forward_chunk", chunk_spy)

    def run(max_entries):
        monkeypatch.setattr(module, "MAX_STEP_ENTRIES", max_entries)
        m = p.means2d.detach().clone().requires_grad_()
        col = colors.clone().requires_grad_()
        sizes = dict(chunk_entries=2, tile_batch=16, sub_tile=4)
        out = composite(m, p.conics, scene.opacities, col, p.depths, None, tiles.tile_ranges, tiles.gaussian_ids,
                        settings, **sizes)
        (out.colors.square().sum() + out.depths.sum() + out.alphas.sum()).backward()
        state = composite_state(p.means2d.detach(), p.conics, scene.opacities, colors, p.depths, tiles.tile_ranges,
                                tiles.gaussian_ids, settings, **sizes)
        return (out.colors, out.alphas, out.depths, out.median_depths, state.final_transmittance,
                state.last_index, m.grad, col.grad)

    merged = run(16)
    assert any(m > 1 and stopped for m, _, stopped in steps), steps
    assert any(m > 1 and past_end for m, past_end, _ in steps), steps
    steps.clear()
    single = run(2)
    assert all(m == 1 for m, _, _ in steps) and any(stopped for _, _, stopped in steps)
    for a, b in zip(merged, single):
        torch.testing.assert_close(a, b, atol=1e-6 * max(1.0, float(b.abs().max())), rtol=1e-5)


@pytest.mark.parametrize("files, expected", [
    ({"index0": ("1", "48K"), "index2": ("2", "2048K"), "index3": ("3", "491520K")}, 2 << 20),
    ({"index1": ("2", "1M")}, 1 << 20),
    ({"index2": ("2", "512k")}, 512 << 10),
    ({"index2": ("2", "lots")}, None),          # unreadable size: the fallback
    ({"index0": ("1", "32K")}, None),           # no L2 level
    ({}, None),                                 # no cache directory entries
])
def test_l2_cache_size_from_sysfs_and_the_batch_it_gives(tmp_path, files, expected):
    from tritonsplat.reference import compositing as module

    for name, (level, size) in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    size = module.read_l2_cache_bytes(tmp_path)
    assert size == (expected or module.FALLBACK_L2_BYTES)
    # The measured points of the rule: 128 sub-tiles of K = 32, P = 64 at 512 KiB, 512 at 2 MiB.
    assert module.tile_batch_for(32, 64, 512 << 10) == 128
    assert module.tile_batch_for(32, 64, 2 << 20) == 512
    assert module.tile_batch_for(32, 256, 64 << 10) == module.MIN_TILE_BATCH
    assert module.tile_batch_for(32, 64, 512 << 10, element_size=8) == 64          # float64: half the batch
    assert module.read_l2_cache_bytes(tmp_path / "missing") == module.FALLBACK_L2_BYTES
    # Off the CPU the host's cache says nothing: the fallback's batch.
    assert module._tile_batch(32, 64, torch.float32, torch.device("meta")) == 128


def test_l2_cache_size_skips_unreadable_entries(tmp_path):
    from tritonsplat.reference import compositing as module

    (tmp_path / "index0" / "level").mkdir(parents=True)          # reading a directory fails
    (tmp_path / "index1").mkdir()
    (tmp_path / "index1" / "level").write_text("2\n")
    (tmp_path / "index1" / "size").write_text("broken\n")
    (tmp_path / "index2").mkdir()
    (tmp_path / "index2" / "level").write_text("2\n")
    (tmp_path / "index2" / "size").write_text("1024K\n")
    assert module.read_l2_cache_bytes(tmp_path) == 1 << 20


@pytest.mark.parametrize("piece", [1, 5, 64])
def test_sub_tile_filter_pieces_do_not_change_the_lists_or_results(monkeypatch, piece):
    """The sub-tile filter runs in pieces that end at tile-list boundaries (a list longer than a piece gets
    its own): every piece size gives the same sub-bin lists, each contiguous and in list order."""
    from tritonsplat.reference import compositing as module

    scene = make_scene(n=40, width=31, height=19, n_cameras=2, seed=8, dtype=torch.float32)
    p, tiles, colors, settings = _projected(scene, tile_size=16)
    flat = module._flat_inputs(p.means2d.detach(), p.conics, scene.opacities, colors, p.depths.detach())
    grid = module._grid(settings, 4)

    def lists_and_results():
        layout = module._layout(tiles.tile_ranges, tiles.gaussian_ids, flat, settings, grid)
        lists = {}
        for b, start, end in zip(layout.bins.tolist(), layout.start.tolist(), layout.end.tolist()):
            assert b not in lists, "a sub-bin's entries are not contiguous"
            lists[b] = layout.entry_index[start:end].tolist()
            assert lists[b] == sorted(lists[b]), "entries out of list order"
        m = p.means2d.detach().clone().requires_grad_()
        out = composite(m, p.conics, scene.opacities, colors, p.depths, None, tiles.tile_ranges, tiles.gaussian_ids,
                        settings, sub_tile=4)
        out.colors.square().sum().backward()
        return lists, (out.colors, out.alphas, m.grad)

    reference_lists, reference = lists_and_results()
    assert max(len(v) for v in reference_lists.values()) > piece or piece == 64
    monkeypatch.setattr(module, "FILTER_PIECE", piece)
    lists, results = lists_and_results()
    assert lists == reference_lists
    for a, b in zip(reference, results):
        torch.testing.assert_close(a, b, atol=1e-6 * float(a.abs().max()), rtol=1e-5)


def test_transmittance_stop_and_alpha_cap():
    """A column of opaque, centred, identical Gaussians: each blends 0.99 until T (1 - a) < 1e-4."""
    n = 5
    means2d = torch.full((1, n, 2), 4.5, dtype=torch.float64)  # exactly at pixel (4, 4)'s centre
    conics = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(1, n, 3).contiguous()
    opacities = torch.ones(n, dtype=torch.float64)
    colors = torch.eye(n, dtype=torch.float64)                 # Gaussian i writes channel i
    depths = torch.arange(1, n + 1, dtype=torch.float64)[None]
    settings = RenderSettings(9, 9, tile_size=16)
    tile_ranges = torch.tensor([[0, n]], dtype=torch.int32)
    sorted_ids = torch.arange(n, dtype=torch.int32)
    out = composite(means2d, conics, opacities, colors, depths, None, tile_ranges, sorted_ids, settings)
    pixel = out.colors[0, 4, 4]
    # T: 1 -> 0.01 -> 1e-4 (not < 1e-4, blended) -> would be 1e-6 < 1e-4: the third stops the pixel.
    torch.testing.assert_close(pixel, torch.tensor([0.99, 0.0099, 0, 0, 0], dtype=torch.float64))
    assert float(out.alphas[0, 4, 4]) == pytest.approx(1 - 0.01 * 0.01)
    assert float(out.median_depths[0, 4, 4]) == 1.0
    state = composite_state(means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings)
    assert int(state.last_index[0, 4, 4]) == 1 and float(state.final_transmittance[0, 4, 4]) == pytest.approx(1e-4)


def test_capacity_mode_pads_truncates_and_flags_overflow():
    scene = make_scene(n=30, width=40, height=24, n_cameras=2, seed=4, dtype=torch.float32)
    settings = RenderSettings(40, 24, tile_size=8)
    limits = standard_clamp_limits(scene.Ks, 40, 24)
    p = project_gaussians(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats, scene.Ks,
                          limits, settings)
    args = (p.means2d, p.conics, scene.opacities, p.radii, p.depths, settings)
    exact = bin_tiles(*args)
    total = exact.n_intersections
    assert isinstance(total, int) and total == exact.keys.numel() and exact.overflow is None
    reference = sort_intersections(exact, 2, 30, settings)
    roomy = bin_tiles(*args, max_intersections=total + 17)
    assert roomy.keys.numel() == total + 17 and int(roomy.n_intersections) == total and not bool(roomy.overflow)
    sorted_roomy = sort_intersections(roomy, 2, 30, settings)
    assert torch.equal(sorted_roomy.tile_ranges, reference.tile_ranges)
    assert torch.equal(sorted_roomy.gaussian_ids[:total], reference.gaussian_ids)
    assert (sorted_roomy.gaussian_ids[total:] == 0).all()
    tight = bin_tiles(*args, max_intersections=total - 5)
    assert bool(tight.overflow) and int(tight.n_intersections) == total
    assert torch.equal(tight.keys, exact.keys[:total - 5])
    assert int(sort_intersections(tight, 2, 30, settings).tile_ranges[:, 1].max()) == total - 5
    with pytest.raises(ValueError, match="max_intersections"):
        bin_tiles(*args, max_intersections=0)
