"""Densification: clone/split/prune/reset and the Adam moments that must follow the parameters.

Tolerances: exact comparisons (surgery copies and selects values; no arithmetic except the split's
log-scale shift, compared at rel 1e-6 for float32 log/exp).
"""

from __future__ import annotations

import math

import pytest
import torch

from tracking.config import DensifyConfig, TrackingConfig
from tracking.params import GAUSSIAN_KEYS, group_of, init_params, learning_rates, make_optimizer
from tracking.strategy import (
    AllGaussiansPrunedError,
    DensifyStrategy,
    append_gaussians,
    reset_parameter,
    select_gaussians,
)


def make(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.cat([torch.randn(n, 3, generator=g), torch.rand(n, 3, generator=g),
                     (torch.arange(n) % 2).float()[:, None]], 1)
    params = init_params(pts, n_cameras=3)
    cfg = TrackingConfig()
    opt = make_optimizer(params, learning_rates(cfg, 1.0), cfg)
    # Two Adam steps so every moment is non-zero.
    for _ in range(2):
        loss = sum((p**2).sum() for p in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def moments(opt, params, name):
    st = opt.state[params[name]]
    return st["exp_avg"], st["exp_avg_sq"], st["step"]


def test_select_keeps_rows_and_moments():
    params, opt = make()
    before = {k: (params[k].detach().clone(), *[m.clone() for m in moments(opt, params, k)[:2]])
              for k in GAUSSIAN_KEYS if params[k].requires_grad}
    keep = torch.tensor([True, False] * 6)
    select_gaussians(params, opt, keep)
    for k, (value, m1, m2) in before.items():
        assert torch.equal(params[k].detach(), value[keep])
        a, b, step = moments(opt, params, k)
        assert torch.equal(a, m1[keep]) and torch.equal(b, m2[keep]) and step.item() == 2
        assert group_of(opt, k)["params"][0] is params[k]
    assert len(opt.state) == sum(1 for g in opt.param_groups for _ in g["params"])


def test_append_zero_moments_for_new_rows():
    params, opt = make()
    rows = {k: params[k].detach()[:3].clone() for k in GAUSSIAN_KEYS}
    old_m = moments(opt, params, "means")[0].clone()
    append_gaussians(params, opt, rows)
    assert params["means"].shape[0] == 15
    m1, m2, _ = moments(opt, params, "means")
    assert m1.shape == (15, 3) and torch.equal(m1[:12], old_m)
    assert (m1[12:] == 0).all() and (m2[12:] == 0).all()
    assert params["seg"].shape == (15, 3) and not params["seg"].requires_grad  # lr 0: outside Adam


def test_reset_zeroes_moments_keeps_step():
    params, opt = make()
    reset_parameter(params, opt, "logit_opacities", torch.full_like(params["logit_opacities"], -4.0))
    m1, m2, step = moments(opt, params, "logit_opacities")
    assert (params["logit_opacities"] == -4.0).all() and (m1 == 0).all() and (m2 == 0).all() and step.item() == 2


def test_refine_clone_split_prune():
    params, opt = make()
    n = 12
    scene_radius = 10.0
    with torch.no_grad():
        params["log_scales"][:] = math.log(0.05)  # <= 0.01 x 10: clone
        params["log_scales"][6:] = math.log(0.5)  # > 0.1: split (and not "big": 0.5 <= 0.1 x 10)
        params["logit_opacities"][:] = 5.0
    strat = DensifyStrategy(DensifyConfig(start=0, stop=10, every=1, prune_big_from=100), scene_radius)
    state = strat.initialize_state(n, "cpu")
    state.grad_sum[:] = torch.tensor([1.0, 0, 0, 0, 0, 0, 1.0, 1.0, 0, 0, 0, 0])
    state.count[:] = 1.0
    means_before = params["means"].detach().clone()
    summary = strat.refine(params, opt, state, step=5, generator=torch.Generator().manual_seed(0))
    assert summary["cloned"] == 1 and summary["split"] == 2 and summary["pruned"] == 0
    n_new = n - 2 + 1 + 2 * 2
    assert summary["n"] == n_new and params["means"].shape[0] == n_new
    for k in GAUSSIAN_KEYS:
        assert params[k].shape[0] == n_new
        if params[k].requires_grad:
            m1, m2, _ = moments(opt, params, k)
            assert m1.shape == params[k].shape and m2.shape == params[k].shape
            assert (m1[n - 2:] == 0).all() and (m2[n - 2:] == 0).all(), "new Gaussians start with zero moments"
    # Kept rows first (split parents removed), then the clone (exact copy of 0), then 2 x 2 children.
    assert torch.equal(params["means"].detach()[n - 2], means_before[0])
    children = params["log_scales"].detach()[n - 1:]
    torch.testing.assert_close(children, torch.full_like(children, math.log(0.5 / 1.6)), rtol=1e-6, atol=0)
    assert state.grad_sum.shape == (n_new,) and (state.grad_sum == 0).all()


def test_final_cull_and_big_prune():
    params, opt = make()
    with torch.no_grad():
        params["logit_opacities"][:] = 5.0
        params["logit_opacities"][:3] = torch.logit(torch.tensor(0.1))  # < 0.25 at the last refinement
        params["log_scales"][:] = math.log(0.05)
        params["log_scales"][3] = math.log(5.0)  # > 0.1 x 10 once prune_big_from is reached
    strat = DensifyStrategy(DensifyConfig(start=10, stop=30, every=10, prune_big_from=20), 10.0)
    state = strat.initialize_state(12, "cpu")
    assert strat.last_refine_step == 30
    s = strat.refine(params, opt, state, step=20)
    assert s["pruned"] == 1  # only the big one: 0.1 > 0.005
    s = strat.refine(params, opt, state, step=30)
    assert s["pruned"] == 3 and params["means"].shape[0] == 8


def test_opacity_reset_in_post_backward():
    params, opt = make()
    strat = DensifyStrategy(DensifyConfig(start=100, stop=200, every=100, opacity_reset_at=150), 1.0)
    state = strat.initialize_state(12, "cpu")
    strat.step_post_backward(params, opt, state, 150)
    torch.testing.assert_close(torch.sigmoid(params["logit_opacities"].detach()), torch.full((12, 1), 0.01))


def test_final_cull_falls_back_when_it_would_empty_the_scene():
    params, opt = make()
    with torch.no_grad():
        params["logit_opacities"][:] = torch.logit(torch.tensor(0.1))
    strat = DensifyStrategy(DensifyConfig(start=10, stop=10, every=10), 1.0)
    with pytest.warns(UserWarning, match="final cull"):
        s = strat.refine(params, opt, strat.initialize_state(12, "cpu"), step=10)
    assert s["pruned"] == 0


def test_all_pruned_raises():
    params, opt = make()
    with torch.no_grad():
        params["logit_opacities"][:] = -10.0
    strat = DensifyStrategy(DensifyConfig(start=0, stop=20, every=10), 1.0)
    with pytest.raises(AllGaussiansPrunedError, match="would remove all"):
        strat.refine(params, opt, strat.initialize_state(12, "cpu"), step=10)


def test_accumulate_uses_ndc_units_and_visibility():
    strat = DensifyStrategy(DensifyConfig(), 1.0)
    state = strat.initialize_state(2, "cpu")
    grad = torch.tensor([[1e-6, 0.0], [1.0, 1.0]])
    strat.accumulate(state, 0, grad, torch.tensor([3, 0]), width=640, height=360)
    assert state.grad_sum[0].item() == pytest.approx(1e-6 * 320, rel=1e-6)
    assert state.count.tolist() == [1.0, 0.0] and state.grad_sum[1] == 0


def test_accumulate_scales_views_narrower_than_the_threshold_width():
    # grad_threshold_width 640: a 64-pixel-wide view counts 64 / 640 of its NDC gradient, a wider one all of it;
    # 0 switches the rescaling off. Tolerance: float32 products, rel 1e-6.
    grad = torch.tensor([[1e-6, 0.0]])
    visible = torch.tensor([3])
    sums = {}
    for ref, width in ((640, 64), (640, 1280), (0, 64)):
        strat = DensifyStrategy(DensifyConfig(grad_threshold_width=ref), 1.0)
        state = strat.initialize_state(1, "cpu")
        strat.accumulate(state, 0, grad, visible, width=width, height=width * 3 // 4)
        sums[ref, width] = state.grad_sum[0].item()
    assert sums[640, 64] == pytest.approx(1e-6 * 32 * 0.1, rel=1e-6)
    assert sums[640, 1280] == pytest.approx(1e-6 * 640, rel=1e-6)
    assert sums[0, 64] == pytest.approx(1e-6 * 32, rel=1e-6)
    assert DensifyConfig().grad_threshold_width == 640


def test_view_gradients_undo_the_mean_over_a_steps_views():
    from tracking.strategy import view_gradients

    grad = torch.randn(4, 10, 2)
    assert view_gradients(grad, 1) is grad
    assert torch.equal(view_gradients(grad, 4), grad * 4)
