"""Bad input to `rasterize()`: one ValueError naming the argument, the expectation and what came.

No tolerances: every case must raise (or, for the valid edge cases, must not).
"""

import math

import pytest
import torch

import tritonsplat
from tests.helpers import make_scene
from tritonsplat import backends


def _call(**overrides):
    scene = make_scene(n=6, n_cameras=2, seed=1, dtype=torch.float32)
    args = dict(means=scene.means, quats=scene.quats, scales=scene.scales, opacities=scene.opacities,
                colors=scene.colors, viewmats=scene.viewmats, Ks=scene.Ks, width=scene.width,
                height=scene.height)
    keywords = {"backend": "torch"}
    for key, value in overrides.items():
        (args if key in args else keywords)[key] = value
    return tritonsplat.rasterize(**args, **keywords)


def _nan_at(tensor, index=0):
    tensor = tensor.clone()
    tensor.view(-1)[index] = math.nan
    return tensor


SCENE = make_scene(n=6, n_cameras=2, seed=1, dtype=torch.float32)

BAD_INPUTS = [
    pytest.param({"means": SCENE.means[:, :2]}, "means", "[N, 3]", id="means-shape"),
    pytest.param({"means": SCENE.means.to(torch.int64)}, "means", "floating", id="means-int-dtype"),
    pytest.param({"means": SCENE.means.numpy()}, "means", "torch.Tensor", id="means-numpy"),
    pytest.param({"quats": SCENE.quats[:5]}, "quats", "[N=6, 4]", id="quats-count"),
    pytest.param({"scales": SCENE.scales[:, :1]}, "scales", "[N=6, 3]", id="scales-shape"),
    pytest.param({"opacities": SCENE.opacities[:, None]}, "opacities", "[N=6]", id="opacities-shape"),
    pytest.param({"colors": SCENE.colors[:3]}, "colors", "[N=6, D]", id="colors-count"),
    pytest.param({"colors": SCENE.colors[:, :0]}, "colors", "D >= 1", id="colors-zero-channels"),
    pytest.param({"colors": SCENE.colors[None].expand(3, 6, 3)}, "colors", "[C=2, N=6, D]",
                 id="colors-camera-count"),
    pytest.param({"viewmats": SCENE.viewmats[:, :3]}, "viewmats", "[C, 4, 4]", id="viewmats-shape"),
    pytest.param({"Ks": SCENE.Ks[:1]}, "Ks", "[C=2, 3, 3]", id="Ks-camera-count"),
    pytest.param({"width": 0}, "width", "positive int", id="width-zero"),
    pytest.param({"height": 12.5}, "height", "positive int", id="height-float"),
    pytest.param({"means": _nan_at(SCENE.means)}, "means", "NaN", id="means-nan"),
    pytest.param({"quats": _nan_at(SCENE.quats, 5)}, "quats", "NaN", id="quats-nan"),
    pytest.param({"scales": SCENE.scales.clone().fill_(math.inf)}, "scales", "Inf", id="scales-inf"),
    pytest.param({"colors": _nan_at(SCENE.colors)}, "colors", "NaN", id="colors-nan"),
    pytest.param({"viewmats": _nan_at(SCENE.viewmats)}, "viewmats", "NaN", id="viewmats-nan"),
    pytest.param({"opacities": SCENE.opacities + 1.5}, "opacities", "[0, 1]", id="opacities-range"),
    pytest.param({"scales": -SCENE.scales}, "scales", "log-scales", id="scales-negative"),
    pytest.param({"quats": torch.zeros_like(SCENE.quats)}, "quats", "non-zero", id="quats-zero"),
    pytest.param({"Ks": SCENE.Ks * torch.tensor([-1.0, 1, 1])[None, :, None]}, "Ks", "focal",
                 id="Ks-negative-focal"),
    pytest.param({"backgrounds": torch.zeros(2, 4)}, "backgrounds", "[C=2, D=3]", id="backgrounds-shape"),
    pytest.param({"sh_degree": 4}, "sh_degree", "0..3", id="sh-degree-range"),
    pytest.param({"sh_degree": 2}, "colors", "SH coefficients", id="sh-colors-shape"),
    pytest.param({"near": 2.0, "far": 1.0}, "near", "near < far", id="near-far"),
    pytest.param({"alpha_cap": 1.0}, "alpha_cap", "(0, 1)", id="alpha-cap"),
    pytest.param({"eps2d": -0.1}, "eps2d", ">= 0", id="eps2d"),
    pytest.param({"tile_size": 0}, "tile_size", "positive int", id="tile-size"),
    pytest.param({"densify_channels": 4}, "densify_channels", "1..D=3", id="densify-channels"),
    pytest.param({"backend": "cuda"}, "backend", "expected one of", id="backend-name"),
]


@pytest.mark.parametrize("overrides,argument,expected", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_argument(overrides, argument, expected):
    with pytest.raises(ValueError) as error:
        _call(**overrides)
    message = str(error.value)
    assert message.startswith(argument), message
    assert expected in message, message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices():  # pragma: no cover - GPU machines
    with pytest.raises(ValueError, match="Ks: expected a tensor on"):
        _call(Ks=SCENE.Ks.cuda())


def test_mixed_float_dtypes_are_promoted():
    out = _call(means=SCENE.means.double())
    assert out.colors.dtype == torch.float64


def test_triton_backend_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setattr(backends, "INTERPRETER_ACTIVE", False)
    monkeypatch.setattr(backends, "triton_importable", lambda: True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backends.resolve_backend("triton", torch.device("cpu"))
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_backend_environment_override(monkeypatch):
    monkeypatch.setenv(backends.ENV_VARIABLE, "torch")
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(backends.ENV_VARIABLE, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VARIABLE):
        backends.resolve_backend("auto", torch.device("cpu"))


def test_triton_missing_is_explained(monkeypatch):
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    with pytest.raises(ValueError, match="triton package is not installed"):
        backends.resolve_backend("triton", torch.device("cpu"))


def test_torch_backend_works_without_triton():
    """triton is imported lazily: with it blocked, the torch backend renders and 'triton' explains."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, tritonsplat\n"
        "K = torch.tensor([[[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]])\n"
        "args = (torch.randn(5, 3) + torch.tensor([0, 0, 4.0]), torch.randn(5, 4), torch.rand(5, 3) * 0.1,\n"
        "        torch.rand(5), torch.rand(5, 3), torch.eye(4)[None], K, 16, 16)\n"
        "assert tritonsplat.rasterize(*args).backend == 'torch'\n"
        "try:\n"
        "    tritonsplat.rasterize(*args, backend='triton')\n"
        "except ValueError as error:\n"
        "    assert 'triton package is not installed' in str(error)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    environment = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr


VALUE_CASES = ["means-nan", "quats-nan", "scales-inf", "colors-nan", "viewmats-nan", "opacities-range",
               "scales-negative", "quats-zero", "Ks-negative-focal"]


@pytest.mark.interpreter
@pytest.mark.parametrize("overrides,argument,expected",
                         [case for case in BAD_INPUTS if case.id in VALUE_CASES])
def test_triton_backend_raises_the_same_value_errors(overrides, argument, expected):
    """The Triton backend checks values on the device and reads the flags with its intersection
    count: the same first error as the torch backend's checks."""
    with pytest.raises(ValueError) as error:
        _call(backend="triton", **overrides)
    message = str(error.value)
    assert message.startswith(argument), message
    assert expected in message, message


@pytest.mark.interpreter
def test_triton_backend_checks_backgrounds_and_reports_the_first_failure():
    backgrounds = torch.zeros(2, 3)
    backgrounds[1, 2] = math.nan
    with pytest.raises(ValueError, match="^backgrounds: expected only finite"):
        _call(backend="triton", backgrounds=backgrounds)
    with pytest.raises(ValueError, match="^means: expected only finite"):   # means come first, as in torch
        _call(backend="triton", means=_nan_at(SCENE.means), opacities=SCENE.opacities + 2)
