"""Parameter shaping at t = 0 (`tracking.params.ScaleShaping`, `max_sampling_rate`) and the opacity entropy.

Tolerances: float32 rounding (rtol 1e-5) where a value is recomputed through exp/log; exact elsewhere.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tracking import losses as L
from tracking.config import PRESETS, TrackingConfig
from tracking.params import ScaleShaping, activated, max_sampling_rate


def _camera(f=100.0, width=64, height=48):
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    return SimpleNamespace(K=K, w2c=np.eye(4), width=width, height=height)


def _params(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.1 + torch.tensor([0.0, 0.0, 2.0])
    return {"means": means, "quats": torch.randn(n, 4, generator=g), "rgb": torch.rand(n, 3, generator=g),
            "seg": torch.rand(n, 3, generator=g), "log_scales": torch.randn(n, 3, generator=g) - 4,
            "logit_opacities": torch.randn(n, 1, generator=g)}


def test_sampling_rate_is_focal_over_depth_in_the_frustum_only():
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0], [0.0, 0.0, -1.0], [10.0, 0.0, 2.0]])
    nu = max_sampling_rate(means, [_camera(100.0), _camera(300.0)], near=0.2)
    # the finer camera wins; behind the camera and far outside the image: no rate
    assert nu.tolist() == [150.0, 75.0, 0.0, 0.0]


def test_filter_adds_its_variance_per_axis_and_scales_opacity_by_the_determinant_ratio():
    cfg = TrackingConfig(filter_3d=0.2)
    p = _params()
    shaping = ScaleShaping(cfg, [_camera(100.0)])
    act = shaping.shaped(p)
    nu = max_sampling_rate(p["means"], [_camera(100.0)], near=0.2)
    s2 = torch.exp(2 * p["log_scales"])
    expected = torch.sqrt(s2 + (0.2 / nu ** 2)[:, None])
    assert torch.allclose(act["scales"], expected, rtol=1e-5)
    ratio = torch.sqrt((s2 / expected ** 2).prod(1))
    assert torch.allclose(act["opacities"], torch.sigmoid(p["logit_opacities"]).squeeze(-1) * ratio, rtol=1e-5)
    kept = ScaleShaping(TrackingConfig(filter_3d=0.2, filter_3d_opacity=False), [_camera(100.0)]).shaped(p)
    assert torch.equal(kept["opacities"], activated(p)["opacities"])


def test_bake_renders_as_shaped():
    for cfg in (TrackingConfig(isotropic=True), TrackingConfig(filter_3d=1.0), TrackingConfig(isotropic=True,
                                                                                              filter_3d=0.2)):
        p = _params(seed=1)
        shaping = ScaleShaping(cfg, [_camera(100.0)])
        act = shaping.shaped(p)
        baked = activated(shaping.bake(p))
        assert torch.allclose(baked["scales"], act["scales"], rtol=1e-5), cfg
        assert torch.allclose(baked["opacities"], act["opacities"], rtol=1e-5), cfg
        if cfg.isotropic:
            assert torch.allclose(act["scales"], act["scales"][:, :1].expand(-1, 3))


def test_no_preset_of_the_original_shapes_its_gaussians():
    for name in ("original", "paper", "3gs-online", "demo"):
        cfg = PRESETS[name]
        assert not ScaleShaping.wanted(cfg) and cfg.weights.opacity_entropy == 0 and cfg.weights.flatten == 0, name


def test_binary_entropy():
    assert float(L.binary_entropy(torch.tensor([0.5]))) == pytest.approx(math.log(2))
    assert float(L.binary_entropy(torch.tensor([0.0, 1.0]))) < 2e-5
