"""Host work of a t > 0 tracking step with the triton backend, counted by `tests.helpers.count_host_work`.

Marginal cost of one more step: a fit with 20 and one with 40 steps per frame (frames 0 and 1 of the
tiny synthetic scene), difference / 20. The rasterizer is replaced by a cheap differentiable stand-in
(its own budget, <= 1 read and <= 45 launches per forward + backward, is asserted in
tests/test_host_budget.py). The SSIM kernels keep their launches but get cheap bodies: the interpreter
takes ~7 s per 16 x 16 tile program of the 121-tap window (2-core CPU), and their numbers are tested in
tests/ops/test_ssim.py. Everything else runs as a fit runs it: the fused rigidity kernels, the loss
terms, backward, Adam, the scalar buffer.

Budgets per t > 0 step besides the rasterizer: host reads <= 0.05, launches <= 120.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import tracking
from tests.helpers import count_host_work
from tracking import stages

from .conftest import tiny_config

pytestmark = pytest.mark.interpreter

QUIET = {"progress": False, "echo": lambda s: None}
MAX_READS_PER_STEP = 0.05
MAX_LAUNCHES_PER_STEP = 120


@triton.jit
def _cheap_l1_dssim_forward(a_ptr, b_ptr, window_ptr, partials_ptr, sums_ptr, H, W, n_planes,
                            C1: tl.constexpr, C2: tl.constexpr, WINDOW: tl.constexpr, SAVE_PARTIALS: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(sums_ptr + program * 2, 0.25)
    tl.store(sums_ptr + program * 2 + 1, 0.5)


@triton.jit
def _cheap_l1_dssim_backward(a_ptr, b_ptr, window_ptr, partials_ptr, grad_loss_ptr, grad_a_ptr, H, W, n_planes,
                             inv_n, ssim_weight, WINDOW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    ys = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    xs = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (ys < H) & (xs < W)
    offset = tl.program_id(0).to(tl.int64) * H * W + ys * W + xs
    tl.store(grad_a_ptr + offset, tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32), mask=inside)


class _FakeRasterize(torch.autograd.Function):
    """A constant grey image with zero gradients for means, quats and colours: 1 launch forward, 3 backward
    (a real rasterizer's backward also writes those three gradients, inside its own budget)."""

    @staticmethod
    def forward(ctx, means, quats, colors, shape):
        ctx.inputs = (means.shape, quats.shape, colors.shape)
        return torch.full(shape, 0.5)

    @staticmethod
    def backward(ctx, grad):
        return (*(grad.new_zeros(shape) for shape in ctx.inputs), None)


def fake_render(act, views, index, config, *, densify, max_intersections=None):
    W, H = views.sizes[index[0]]
    n = act["means"].shape[0]

    class Out:
        pass

    out = Out()
    out.colors = _FakeRasterize.apply(act["means"], act["quats"], act["colors"],
                                      (len(index), H, W, act["colors"].shape[1]))
    out.radii = torch.zeros(len(index), n, dtype=torch.int32)
    out.densify_grad = torch.zeros(len(index), n, 2)
    return out


def cheap_ssim_kernels(monkeypatch) -> None:
    from tritonsplat.ops import ssim

    monkeypatch.setattr(ssim, "_l1_dssim_forward_kernel", _cheap_l1_dssim_forward)
    monkeypatch.setattr(ssim, "_l1_dssim_backward_kernel", _cheap_l1_dssim_backward)


def test_marginal_host_work_of_a_triton_step(tiny_scene, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "render", fake_render)
    cheap_ssim_kernels(monkeypatch)
    works = {}
    for steps in (20, 40):
        cfg = tiny_config(steps_first=4, steps_per_frame=steps, log_every=40, backend="triton")
        _, works[steps] = count_host_work(tracking.fit, tiny_scene, tmp_path / f"s{steps}", cfg,
                                          frames=slice(0, 2), **QUIET)
    reads = (works[40].n_reads - works[20].n_reads) / 20
    launches = (works[40].n_launches - works[20].n_launches) / 20
    print(f"marginal t > 0 step: {launches} launches, {reads} host reads")  # bench/results step_launches.json
    assert reads <= MAX_READS_PER_STEP, f"{reads} reads per step; 40 steps: {works[40].summary()}"
    assert launches <= MAX_LAUNCHES_PER_STEP, f"{launches} launches per step; 40 steps: {works[40].summary()}"
    fused = [name for name in works[40].triton_launches if name.startswith("_rigidity")]
    assert len(fused) == 3 * 40, "the fused rigidity kernels run once per step (forward, 2 backward)"
