"""tritonsplat.compilation: when torch.compile is used, the fallback, and compiled == eager for the projection.

Tolerances: compiled and eager projections of float32 inputs may round differently (Inductor fuses and
reorders the arithmetic), so outputs and gradients are compared at float32 rounding of their magnitudes
(rtol 1e-5); the integer radii must be equal.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import tracking
from data_tools import make_synthetic_scene
from tests.tracking.conftest import tiny_config
from tracking import losses as L
from tritonsplat import compilation
from tritonsplat.reference import projection
from tritonsplat.settings import RenderSettings, standard_clamp_limits


@pytest.fixture(autouse=True)
def _fresh_wrappers():
    """No test leaves a compiled (or patched) function cached in the package's wrappers."""
    compilation.reset()
    yield
    compilation.reset()


def test_when_compiled_code_is_wanted(monkeypatch):
    monkeypatch.delenv(compilation.ENV, raising=False)
    assert not compilation.wanted("cpu") and not compilation.wanted("cuda")
    assert compilation.wanted("cuda", cuda_by_default=True) and not compilation.wanted("cpu", cuda_by_default=True)
    with compilation.fixed_shapes():
        assert not compilation.wanted("cpu") and not compilation.wanted("cuda")   # only when asked for
    monkeypatch.setenv(compilation.ENV, "1")
    assert not compilation.wanted("cpu") and compilation.wanted("cuda", cuda_by_default=True)
    with compilation.fixed_shapes():
        assert compilation.wanted("cpu") and compilation.wanted("cuda")
        with compilation.fixed_shapes():
            assert compilation.wanted("cpu")
        assert compilation.wanted("cpu")
    assert not compilation.wanted("cpu")
    monkeypatch.setenv(compilation.ENV, "0")
    with compilation.fixed_shapes():
        assert not compilation.wanted("cpu") and not compilation.wanted("cuda", cuda_by_default=True)


def test_the_fixed_shapes_context_is_per_thread(monkeypatch):
    import threading

    monkeypatch.setenv(compilation.ENV, "1")
    seen = []
    with compilation.fixed_shapes():
        thread = threading.Thread(target=lambda: seen.append(compilation.wanted("cpu")))
        thread.start()
        thread.join()
        assert compilation.wanted("cpu")
    assert seen == [False]


def test_a_failed_compile_warns_once_and_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv(compilation.ENV, "1")
    calls = []

    def broken_compile(function, **kwargs):
        calls.append(kwargs)

        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    double = compilation.compiled(lambda x: 2 * x, "doubling")
    x = torch.arange(3.0)
    with compilation.fixed_shapes():
        with pytest.warns(UserWarning, match="torch.compile of doubling failed.*no C\\+\\+ compiler"):
            assert torch.equal(double(x), 2 * x)
        assert double.failed()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(double(x), 2 * x)   # eager from now on, silently
    assert calls == [{"dynamic": False}]
    # Where not wanted, the eager function runs and nothing compiles.
    assert torch.equal(compilation.compiled(lambda x: x + 1, "increment")(x), x + 1)
    assert len(calls) == 1


def test_an_error_of_the_function_itself_is_raised_and_keeps_compiling(monkeypatch):
    monkeypatch.setenv(compilation.ENV, "1")
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)

    def strict(x):
        if (x < 0).any():
            raise ValueError("x: expected non-negative values")
        return x.sqrt()

    wrapped = compilation.compiled(strict, "strict")
    with compilation.fixed_shapes(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="non-negative"):
            wrapped(torch.tensor([-1.0]))
        assert not wrapped.failed()


def test_only_the_t_gt_0_steps_of_a_fit_allow_compiled_code_on_the_cpu(monkeypatch, tmp_path):
    """With TRITONSPLAT_COMPILE=1: a t > 0 stage renders the same Gaussians at every step; t = 0 densifies (new
    shapes at every refinement)."""
    stages = importlib.import_module("tracking.stages")
    monkeypatch.setenv(compilation.ENV, "1")
    seen = {}
    real = stages.step_once

    def recording(stage, *args, **kwargs):
        seen.setdefault(stage.name, set()).add(compilation.wanted("cpu"))
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(stages, "step_once", recording)
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)   # record, compile nothing (reset
    # by the fixture)
    make_synthetic_scene(tmp_path / "data", cameras=3, test_cameras=1, width=24, height=18, frames=2, seed=1)
    tracking.fit(tmp_path / "data", tmp_path / "out", tiny_config(steps_first=4, steps_per_frame=2), progress=False,
                 echo=lambda *a: None)
    assert seen == {L.FIRST: {False}, L.NEXT: {True}} and not compilation.wanted("cpu")


def _scene(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([1.0, 0.6, 0.5]) + torch.tensor([0.0, 0.0, 4.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.1 + 0.01
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    viewmats = torch.eye(4)[None].repeat(2, 1, 1)
    viewmats[1, 0, 3] = 0.3
    Ks = torch.tensor([[[60.0, 0, 40], [0, 60.0, 30], [0, 0, 1]]]).repeat(2, 1, 1)
    return means, quats, scales, opacities, viewmats, Ks


def test_compiled_projection_matches_eager(monkeypatch):
    """The projection as the torch backend compiles it: the same outputs and gradients, at two Gaussian counts
    (static shapes: the second count compiles a graph of its own, and its backward must be right too)."""
    monkeypatch.setenv(compilation.ENV, "1")
    real_compile, compiles = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compiles.append(function) or real_compile(
        function, **kwargs))
    project = compilation.compiled(projection.project_gaussians, "the projection (test)")
    settings = RenderSettings(width=80, height=60)
    with compilation.fixed_shapes():
        for n in (257, 600):
            means, quats, scales, opacities, viewmats, Ks = _scene(n, seed=n)
            limits = standard_clamp_limits(Ks, settings.width, settings.height)
            results = []
            for function in (project, projection.project_gaussians):
                leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales)]
                out = function(*leaves, opacities, viewmats, Ks, limits, settings)
                weights = torch.linspace(0.5, 1.5, out.conics.numel()).reshape(out.conics.shape)
                loss = (out.means2d ** 2).sum() + (weights * out.conics).sum() + out.depths.sum()
                results.append((out, torch.autograd.grad(loss, leaves)))
            (compiled_out, compiled_grads), (eager_out, eager_grads) = results
            assert (compiled_out.radii > 0).any() and torch.equal(compiled_out.radii, eager_out.radii)
            for name in ("means2d", "conics", "depths"):
                torch.testing.assert_close(getattr(compiled_out, name), getattr(eager_out, name), rtol=1e-5, atol=1e-6)
            for a, b in zip(compiled_grads, eager_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiles == [projection.project_gaussians] and not project.failed()   # the compiled path ran
