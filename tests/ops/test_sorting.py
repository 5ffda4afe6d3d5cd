"""Triton depth sort and tile ranges (`ops.sorting.sort_intersections`) vs a brute-force order.

Tolerances:
| quantity                       | tolerance | why                                                   |
|--------------------------------|-----------|-------------------------------------------------------|
| sorted keys, ids, tile ranges  | exact     | integers; the order is (camera, tile, depth, index)    |
"""

import pytest
import torch

from tests.helpers import make_scene
from tritonsplat.ops import binning as triton_binning
from tritonsplat.ops import sorting as triton_sorting
from tritonsplat.reference.projection import project_gaussians
from tritonsplat.settings import RenderSettings, standard_clamp_limits
from tritonsplat.types import SortedTiles, TileBins

pytestmark = pytest.mark.interpreter


def _bins(n_cameras, layout, monkeypatch, device, seed=5, ties=True, max_intersections=None):
    scene = make_scene(n=40, width=40, height=24, n_cameras=n_cameras, seed=seed, scale_range=(0.05, 0.4))
    if ties:
        scene.means[5:15, 2] = 3.0                   # equal depths: ordered by index
    settings = RenderSettings(40, 24, tile_size=8)
    scene32 = scene.to(dtype=torch.float32)
    with torch.no_grad():
        p = project_gaussians(scene32.means, scene32.quats, scene32.scales, scene32.opacities, scene32.viewmats,
                              scene32.Ks, standard_clamp_limits(scene32.Ks, 40, 24), settings)
    monkeypatch.setattr(triton_binning, "KEY_LAYOUT", layout)
    inputs = [t.to(device) for t in (p.means2d, p.conics, scene32.opacities, p.radii, p.depths)]
    bins = triton_binning.bin_tiles(*inputs, settings, max_intersections=max_intersections)
    return bins, p, settings


def _brute_force(bins, depths, n_cameras, n, settings):
    """(sorted ids, ranges) from the emitted (bin, Gaussian) pairs, sorted in Python."""
    ids = bins.gaussian_ids.cpu().tolist()
    keys = bins.keys.cpu()
    shift = triton_binning.rank_key_bits(n_cameras, n, settings) if keys.dtype == torch.int32 else 32
    tile_bins = (keys >> shift).tolist()
    flat_depths = depths.reshape(-1).tolist()
    order = sorted(range(len(ids)), key=lambda i: (tile_bins[i], flat_depths[ids[i]], ids[i]))
    sorted_ids = torch.tensor([ids[i] for i in order], dtype=torch.int32)
    ranges = torch.zeros(n_cameras * settings.n_tiles, 2, dtype=torch.int32)
    for position, i in enumerate(order):
        b = tile_bins[i]
        if ranges[b, 1] == 0:
            ranges[b, 0] = position
        ranges[b, 1] = position + 1
    return sorted_ids, ranges


@pytest.mark.parametrize("layout", ["auto", "depth_bits"])
@pytest.mark.parametrize("n_cameras", [1, 3])
def test_sort_intersections_orders_by_camera_tile_depth_then_index(layout, n_cameras, monkeypatch, device):
    bins, p, settings = _bins(n_cameras, layout, monkeypatch, device)
    assert bins.keys.dtype == (torch.int32 if layout == "auto" else torch.int64)
    assert (bins.depth_order is not None) == (layout == "auto")
    tiles = triton_sorting.sort_intersections(bins, n_cameras, 40, settings)
    assert isinstance(tiles, SortedTiles)
    assert tiles.gaussian_ids.dtype == torch.int32 and tiles.tile_ranges.dtype == torch.int32
    assert tiles.tile_ranges.shape == (n_cameras * settings.n_tiles, 2)
    expected_ids, expected_ranges = _brute_force(bins, p.depths, n_cameras, 40, settings)
    assert bins.keys.numel() > 100
    assert torch.equal(tiles.gaussian_ids.cpu(), expected_ids)
    assert torch.equal(tiles.tile_ranges.cpu(), expected_ranges)
    assert torch.equal(tiles.keys.cpu(), torch.sort(bins.keys.cpu()).values)


def test_rank_and_depth_bit_keys_give_the_same_lists(monkeypatch, device):
    """Sorting only the rank keys and recovering the ids gives today's int64 order exactly."""
    results = {}
    for layout in ("auto", "depth_bits"):
        bins, _, settings = _bins(2, layout, monkeypatch, device, seed=9)
        tiles = triton_sorting.sort_intersections(bins, 2, 40, settings)
        results[layout] = (tiles.gaussian_ids.cpu(), tiles.tile_ranges.cpu())
    assert torch.equal(results["auto"][0], results["depth_bits"][0])
    assert torch.equal(results["auto"][1], results["depth_bits"][1])


@pytest.mark.parametrize("layout", ["auto", "depth_bits"])
def test_capacity_mode_sorts_the_valid_prefix_and_pads_the_rest(layout, monkeypatch, device):
    exact, _, settings = _bins(1, layout, monkeypatch, device)
    total = exact.n_intersections
    reference = triton_sorting.sort_intersections(exact, 1, 40, settings)
    roomy, _, _ = _bins(1, layout, monkeypatch, device, max_intersections=total + 50)
    assert isinstance(roomy.n_intersections, torch.Tensor) and roomy.n_intersections.dtype == torch.int64
    assert roomy.n_intersections.dim() == 0 and int(roomy.n_intersections) == total and not bool(roomy.overflow)
    tiles = triton_sorting.sort_intersections(roomy, 1, 40, settings)
    assert tiles.gaussian_ids.numel() == total + 50
    assert torch.equal(tiles.gaussian_ids[:total].cpu(), reference.gaussian_ids.cpu())
    assert (tiles.gaussian_ids[total:] == 0).all()
    assert torch.equal(tiles.tile_ranges.cpu(), reference.tile_ranges.cpu())
    # Too small: the first entries (in Gaussian order) are kept, the ranges never pass the capacity.
    tight, _, _ = _bins(1, layout, monkeypatch, device, max_intersections=total // 2)
    assert bool(tight.overflow) and int(tight.n_intersections) == total
    assert torch.equal(tight.keys.cpu(), exact.keys[:total // 2].cpu())
    ranges = triton_sorting.sort_intersections(tight, 1, 40, settings).tile_ranges
    assert int(ranges.max()) <= total // 2


def test_tile_ranges_never_write_outside_the_bins(device):
    """Keys whose bin lies outside [0, C * n_tiles) are ignored, not written past the buffer."""
    settings = RenderSettings(16, 16, tile_size=8)        # 4 tiles
    n_bins = settings.n_tiles
    bin_of = torch.tensor([0, 0, 3, 7, 9], dtype=torch.int64)          # 7, 9: out of range
    keys = (bin_of << 32) | torch.arange(5, dtype=torch.int64)
    ids = torch.arange(5, dtype=torch.int32)
    bins = TileBins(keys.to(device), ids.to(device), torch.ones(1, 5, dtype=torch.int32, device=device), 5)
    tiles = triton_sorting.sort_intersections(bins, 1, 5, settings)
    assert tiles.tile_ranges.shape == (n_bins, 2)
    assert tiles.tile_ranges.cpu().tolist() == [[0, 2], [0, 0], [0, 0], [2, 3]]
