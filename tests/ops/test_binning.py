"""Triton binning, sorting and tile ranges vs the torch twins; key packing at its limits; the
intersection-count guard; the ellipse rule's tightness against the exact minimum; the closed-form
row spans against the exact per-tile test; the emit pass's bounds; capacity mode.

Tolerances:
| quantity                               | tolerance      | why                                          |
|----------------------------------------|----------------|----------------------------------------------|
| keys, ids, tiles per Gaussian, ranges  | exact          | integer outputs of the same float32 tests    |
| intersections / exact minimum          | <= 1.1         | at most 10 % above the minimum (bench target) |
"""

import pytest
import torch

from tests.helpers import make_scene
from tritonsplat.ops import binning as triton_binning
from tritonsplat.ops import sorting as triton_sorting
from tritonsplat.reference import binning as torch_binning
from tritonsplat.reference import sorting as torch_sorting
from tritonsplat.reference.projection import project_gaussians
from tritonsplat.settings import RenderSettings, standard_clamp_limits

pytestmark = pytest.mark.interpreter


def _projected(scene, settings):
    scene32 = scene.to(dtype=torch.float32)
    limits = standard_clamp_limits(scene32.Ks, scene.width, scene.height)
    with torch.no_grad():
        return project_gaussians(scene32.means, scene32.quats, scene32.scales, scene32.opacities, scene32.viewmats,
                                 scene32.Ks, limits, settings), scene32


@pytest.mark.parametrize("tile_rule", ["ellipse", "rectangle"])
@pytest.mark.parametrize("n_cameras,width,height", [(1, 32, 32), (3, 37, 21)])
def test_binning_matches_torch_twin(tile_rule, n_cameras, width, height, device, monkeypatch):
    monkeypatch.setattr(triton_binning, "KEY_LAYOUT", "depth_bits")   # the twin's int64 keys, exactly
    scene = make_scene(n=50, width=width, height=height, n_cameras=n_cameras, seed=width,
                       scale_range=(0.05, 0.5))
    settings = RenderSettings(width, height, tile_size=8 if tile_rule == "ellipse" else 16, tile_rule=tile_rule,
                              radius_rule="inria" if tile_rule == "rectangle" else "opacity_aware")
    p, scene32 = _projected(scene, settings)
    expected = torch_binning.bin_tiles(p.means2d, p.conics, scene32.opacities, p.radii, p.depths, settings)
    actual = triton_binning.bin_tiles(p.means2d.to(device), p.conics.to(device), scene32.opacities.to(device),
                                      p.radii.to(device), p.depths.to(device), settings)
    assert actual.keys.numel() > 50
    assert torch.equal(actual.tiles_per_gaussian.cpu(), expected.tiles_per_gaussian)
    assert torch.equal(actual.keys.cpu(), expected.keys)
    assert torch.equal(actual.gaussian_ids.cpu(), expected.gaussian_ids)

    sorted_keys, sorted_ids = triton_sorting.sort_by_depth(actual.keys, actual.gaussian_ids)
    reference = torch_sorting.sort_by_depth(expected.keys, expected.gaussian_ids, n_cameras, settings.n_tiles)
    assert torch.equal(sorted_keys.cpu(), reference.keys) and torch.equal(sorted_ids.cpu(), reference.gaussian_ids)
    ranges = triton_sorting.tile_ranges(sorted_keys, n_cameras * settings.n_tiles).cpu().long()
    starts, ends = reference.tile_offsets[:-1], reference.tile_offsets[1:]
    nonempty = ends > starts
    assert torch.equal(ranges[nonempty, 0], starts[nonempty]) and torch.equal(ranges[nonempty, 1], ends[nonempty])
    assert (ranges[~nonempty] == 0).all()


@pytest.mark.parametrize("n_cameras", [1, 3])
def test_rank_keys_sort_exactly_like_depth_keys(n_cameras, device, monkeypatch):
    scene = make_scene(n=60, width=40, height=24, n_cameras=n_cameras, seed=21, scale_range=(0.05, 0.4))
    scene.means[10:20, 2] = 3.0                      # ties in depth
    settings = RenderSettings(40, 24)
    p, scene32 = _projected(scene, settings)
    inputs = [t.to(device) for t in (p.means2d, p.conics, scene32.opacities, p.radii, p.depths)]
    results = {}
    for layout in ("auto", "depth_bits"):
        monkeypatch.setattr(triton_binning, "KEY_LAYOUT", layout)
        bins = triton_binning.bin_tiles(*inputs, settings)
        sorted_keys, sorted_ids = triton_sorting.sort_by_depth(bins.keys, bins.gaussian_ids)
        rank_bits = triton_binning.rank_key_bits(n_cameras, 60, settings)
        shift = rank_bits if sorted_keys.dtype == torch.int32 else 32
        results[layout] = (sorted_keys.dtype, sorted_ids.cpu(),
                           triton_sorting.tile_ranges(sorted_keys, n_cameras * settings.n_tiles, shift).cpu())
    assert results["auto"][0] == torch.int32 and results["depth_bits"][0] == torch.int64
    assert torch.equal(results["auto"][1], results["depth_bits"][1])
    assert torch.equal(results["auto"][2], results["depth_bits"][2])
    monkeypatch.setattr(triton_binning, "KEY_LAYOUT", "auto")
    assert triton_binning.rank_key_bits(2, 300_000, RenderSettings(640, 360)) == 19      # 920 tiles: int32
    assert triton_binning.rank_key_bits(64, 1_000_000, RenderSettings(1920, 1080)) == 0  # too wide: int64


def test_equal_depths_are_ordered_by_gaussian_index(device):
    scene = make_scene(n=12, width=16, height=16, seed=3)
    scene.means[:, 2] = 3.0          # every Gaussian at the same camera z
    settings = RenderSettings(16, 16)
    p, scene32 = _projected(scene, settings)
    bins = triton_binning.bin_tiles(p.means2d.to(device), p.conics.to(device), scene32.opacities.to(device),
                                    p.radii.to(device), p.depths.to(device), settings)
    _, ids = triton_sorting.sort_by_depth(bins.keys, bins.gaussian_ids)
    assert torch.equal(ids.cpu(), torch.sort(ids.cpu()).values), "equal depths must keep index order"


def test_key_packing_at_the_limits(device):
    """Many cameras x many tiles: the camera | tile field must survive int32 intermediates."""
    width = height = 32768                     # 2048 x 2048 = 4.2M tiles of 16 px
    n_cameras = 500                            # camera * n_tiles up to 2.1e9 (just under 2^31)
    settings = RenderSettings(width, height)
    assert n_cameras * settings.n_tiles < 2**31
    means2d = torch.zeros(n_cameras, 1, 2)
    means2d[-1, 0] = torch.tensor([width - 3.0, height - 3.0])   # last camera, last tile
    means2d[0, 0] = torch.tensor([5.0, 5.0])
    conics = torch.tensor([1.0, 0.0, 1.0]).expand(n_cameras, 1, 3).contiguous()
    radii = torch.zeros(n_cameras, 1, dtype=torch.int32)
    radii[0, 0] = radii[-1, 0] = 2
    depths = torch.full((n_cameras, 1), 2.5)
    opacities = torch.ones(1)
    expected = torch_binning.bin_tiles(means2d, conics, opacities, radii, depths, settings)
    actual = triton_binning.bin_tiles(means2d.to(device), conics.to(device), opacities.to(device),
                                      radii.to(device), depths.to(device), settings)
    assert torch.equal(actual.keys.cpu(), expected.keys)
    top = int(actual.keys.max()) >> 32
    assert top == (n_cameras - 1) * settings.n_tiles + settings.n_tiles - 1
    assert int(actual.gaussian_ids.max()) == n_cameras - 1
    with pytest.raises(ValueError, match="viewmats: .* do not fit"):
        torch_binning.check_key_capacity(2**31 // settings.n_tiles + 1, settings)


def test_intersection_overflow_is_rejected_with_a_clear_error(monkeypatch, device):
    with pytest.raises(ValueError, match=r"exceed the supported 2\^31 - 1"):
        triton_binning.check_intersection_count(2**31)
    scene = make_scene(n=20, width=32, height=32, seed=2)
    settings = RenderSettings(32, 32)
    p, scene32 = _projected(scene, settings)
    monkeypatch.setattr(triton_binning, "MAX_INTERSECTIONS", 5)
    with pytest.raises(ValueError, match="tile intersections"):
        triton_binning.bin_tiles(p.means2d.to(device), p.conics.to(device), scene32.opacities.to(device),
                                 p.radii.to(device), p.depths.to(device), settings)


def test_ellipse_binning_is_within_10_percent_of_the_exact_minimum():
    """On the bench `random` scene (torch twin, same algorithm as the kernel), and never drops a tile."""
    from bench.cases import random_scene
    from tritonsplat.statistics import intersection_report

    scene = random_scene(20_000)
    report = intersection_report(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats,
                                 scene.Ks, scene.width, scene.height)
    assert report["exact_minimum"] <= report["ellipse"] <= 1.1 * report["exact_minimum"], report
    assert report["exact_over_original"] < 0.9, report


def test_large_anisotropic_gaussians_bin_far_fewer_tiles_than_their_box(device):
    scene = make_scene(n=6, width=64, height=64, seed=4, scale_range=(0.02, 0.6), opacity_range=(0.5, 0.9))
    scene.scales[:, 1] = 0.01                    # needles: the box is mostly empty
    settings = RenderSettings(64, 64, tile_size=8)
    p, scene32 = _projected(scene, settings)
    bins = triton_binning.bin_tiles(p.means2d.to(device), p.conics.to(device), scene32.opacities.to(device),
                                    p.radii.to(device), p.depths.to(device), settings)
    boxes = torch_binning.count_box_tiles(torch_binning.pixel_boxes(p.means2d, p.radii, settings), settings)
    exact = torch_binning.exact_tile_intersections(p.means2d, p.conics, scene32.opacities, p.radii, settings)
    assert exact <= bins.keys.numel() <= 1.1 * exact
    assert bins.keys.numel() < 0.8 * boxes


SPAN_CASES = [
    pytest.param(dict(scale_range=(0.02, 0.9)), 8, id="large-mixed-8px"),
    pytest.param(dict(scale_range=(0.3, 1.5), opacity_range=(0.9, 1.0)), 16, id="huge-opaque-16px"),
    pytest.param(dict(scale_range=(0.05, 1.2), needles=True), 4, id="needles-4px"),
    pytest.param(dict(scale_range=(0.05, 1.2), needles=True), 32, id="needles-32px"),
    pytest.param(dict(scale_range=(0.005, 0.03), opacity_range=(0.004, 0.05)), 8, id="tiny-faint-8px"),
]


@pytest.mark.parametrize("kind,tile_size", SPAN_CASES)
def test_row_spans_keep_exactly_the_exact_tests_tiles(kind, tile_size, device, monkeypatch):
    """The closed-form span per tile row keeps the same tiles as testing every candidate tile (the
    torch twin tests every tile of the box with the exact ellipse-rectangle minimum)."""
    monkeypatch.setattr(triton_binning, "KEY_LAYOUT", "depth_bits")
    kind = dict(kind)
    needles = kind.pop("needles", False)
    scene = make_scene(n=24, width=48, height=40, seed=tile_size + len(kind), **kind)
    if needles:
        scene.scales[:, 1] = 0.004                      # thin ellipses at every angle
        scene.scales[::2, 0] = 0.004
    settings = RenderSettings(48, 40, tile_size=tile_size)
    p, scene32 = _projected(scene, settings)
    expected = torch_binning.bin_tiles(p.means2d, p.conics, scene32.opacities, p.radii, p.depths, settings)
    actual = triton_binning.bin_tiles(p.means2d.to(device), p.conics.to(device), scene32.opacities.to(device),
                                      p.radii.to(device), p.depths.to(device), settings)
    assert expected.keys.numel() > 20
    assert torch.equal(actual.tiles_per_gaussian.cpu(), expected.tiles_per_gaussian)
    assert torch.equal(actual.keys.cpu(), expected.keys)
    assert torch.equal(actual.gaussian_ids.cpu(), expected.gaussian_ids)


def test_emit_never_writes_past_the_stored_counts(device):
    """The emit pass writes at most the count pass's stored count per Gaussian, and never past the
    buffer, even when the two passes disagree (here: stored counts lowered by hand)."""
    scene = make_scene(n=30, width=40, height=32, seed=6, scale_range=(0.05, 0.5))
    settings = RenderSettings(40, 32, tile_size=8)
    p, scene32 = _projected(scene, settings)
    inputs = [t.to(device).contiguous() for t in (p.means2d, p.conics, scene32.opacities, p.radii, p.depths)]
    true_counts = triton_binning.bin_tiles(*inputs, settings).tiles_per_gaussian
    lowered = (true_counts // 2).to(torch.int32).contiguous()
    inclusive = torch.cumsum(lowered.reshape(-1), 0, dtype=torch.int64)
    total = int(inclusive[-1])
    capacity = total - 3                                  # and a buffer too small for the last entries
    keys = torch.full((total + 16,), -7, dtype=torch.int64, device=device)
    ids = torch.full((total + 16,), -7, dtype=torch.int32, device=device)
    triton_binning._launch(*inputs[:4], inputs[4], inputs[3], inclusive, lowered, keys, ids, settings, emit=True,
                           capacity=capacity)
    assert (ids[capacity:] == -7).all() and (keys[capacity:] == -7).all(), "wrote past the buffer"
    written = ids[:capacity].cpu()
    assert (written >= 0).all(), "left a counted slot empty"
    per_gaussian = torch.bincount(written.long(), minlength=lowered.numel())
    assert (per_gaussian <= lowered.reshape(-1).cpu()).all()


def test_capacity_mode_makes_no_host_reads(device):
    from tests.helpers import count_host_work

    scene = make_scene(n=20, width=32, height=32, seed=2)
    settings = RenderSettings(32, 32)
    p, scene32 = _projected(scene, settings)
    inputs = [t.to(device) for t in (p.means2d, p.conics, scene32.opacities, p.radii, p.depths)]
    exact = triton_binning.bin_tiles(*inputs, settings)
    assert isinstance(exact.n_intersections, int) and exact.overflow is None
    bins, work = count_host_work(triton_binning.bin_tiles, *inputs, settings, max_intersections=4096)
    assert work.n_reads == 0, work.summary()
    assert bins.keys.numel() == 4096 and bins.n_intersections.shape == () and bins.overflow.dtype == torch.bool
    assert int(bins.n_intersections) == exact.n_intersections
    assert torch.equal(bins.keys[:exact.n_intersections], exact.keys)
    _, work = count_host_work(triton_binning.bin_tiles, *inputs, settings)
    assert work.n_reads == 1, work.summary()
    with pytest.raises(ValueError, match="max_intersections"):
        triton_binning.bin_tiles(*inputs, settings, max_intersections=0)
