"""The benchmark scenes: the `random` case's definition, the `fitted` case, the registry."""

import math

import pytest
import torch

from bench.cases import (
    CASES,
    approximate_knn,
    expand_grid,
    fitted_synth_scene,
    make_case,
    parse_case,
    random_scene,
    rotation_to_quaternion,
)


def screen_sigma_max(scene) -> torch.Tensor:
    """sqrt(lambda_max) of each Gaussian's 2D covariance, computed here independently of tritonsplat:
    Sigma2D = J W Sigma W^T J^T + 0.3 I (EWA with the 0.3 px^2 dilation), float64."""
    means, quats, scales = (t.double() for t in (scene.means, scene.quats, scene.scales))
    viewmat, K = scene.viewmats[0].double(), scene.Ks[0].double()
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rotation = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    covariance = rotation @ torch.diag_embed(scales**2) @ rotation.transpose(1, 2)
    camera = means @ viewmat[:3, :3].T + viewmat[:3, 3]
    world_to_camera = viewmat[:3, :3]
    covariance = world_to_camera @ covariance @ world_to_camera.T
    px, py, pz = camera.unbind(-1)
    fx, fy = K[0, 0], K[1, 1]
    zeros = torch.zeros_like(pz)
    jacobian = torch.stack([fx / pz, zeros, -fx * px / pz**2, zeros, fy / pz, -fy * py / pz**2], -1).reshape(-1, 2, 3)
    covariance_2d = jacobian @ covariance @ jacobian.transpose(1, 2) + 0.3 * torch.eye(2, dtype=torch.float64)
    return torch.linalg.eigvalsh(covariance_2d)[:, -1].sqrt()


@pytest.mark.parametrize("width, height", [(640, 360), (1280, 720)])
def test_random_case_mean_three_sigma_radius_is_about_4_px(width, height):
    scene = random_scene(20_000, width, height)
    mean_radius = float(3 * screen_sigma_max(scene).mean())
    assert 3.5 <= mean_radius <= 4.5, f"mean 3-sigma screen radius {mean_radius:.2f} px, expected about 4"


def test_random_case_ranges_and_frustum():
    scene = random_scene(10_000)
    assert scene.opacities.min() >= 0.05 and scene.opacities.max() <= 1.0
    depth = scene.means[:, 2]
    assert depth.min() >= 2.0 and depth.max() <= 6.0
    pixel = scene.means[:, :2] / depth[:, None] * scene.Ks[0, 0, 0] + scene.Ks[0, :2, 2]
    assert (pixel[:, 0] >= 0).all() and (pixel[:, 0] <= 640).all()
    assert (pixel[:, 1] >= 0).all() and (pixel[:, 1] <= 360).all()
    assert scene.colors.shape == (10_000, 3) and scene.n_gaussians == 10_000


def test_random_case_is_deterministic_from_seed_0():
    first, second = random_scene(1000), random_scene(1000)
    for name in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(random_scene(1000, seed=1).means, first.means)


def test_original_case_is_the_papers_setting():
    case, argument = parse_case("original")
    assert argument is None and case.fixed_n_gaussians == 300_000 and case.fixed_resolution == (640, 360)
    assert expand_grid(["original", "random"], [1000, 2000], [(64, 48)]) == [
        ("original", 300_000, 640, 360), ("random", 1000, 64, 48), ("random", 2000, 64, 48)]


def test_unknown_case_names_the_known_ones():
    with pytest.raises(ValueError, match="fitted.*original.*random"):
        make_case("nope", 10, 64, 48)
    with pytest.raises(ValueError, match="takes no argument"):
        parse_case("random:/tmp")


def test_fitted_case_is_flat_anisotropic_and_visible():
    pytest.importorskip("data_tools.synthetic")
    scene = fitted_synth_scene(2000, 320, 180)
    assert scene.n_gaussians == 2000
    assert torch.allclose(scene.quats.norm(dim=-1), torch.ones(2000), atol=1e-5)
    ordered = scene.scales.sort(dim=-1).values
    flatness = ordered[:, 0] / ordered[:, 1]                        # normal / smaller tangent = 0.1 a
    assert flatness.min() >= 0.1 - 1e-4 and flatness.max() <= 0.1 * math.sqrt(3) + 1e-4
    assert (ordered[:, 2] / ordered[:, 1]).max() <= 3.0 + 1e-4      # tangential axis ratio <= 3
    assert (scene.opacities > 0.8).float().mean() > 0.6
    sigma = screen_sigma_max(scene)
    camera_z = scene.means.double() @ scene.viewmats[0, :3, :3].double().T[:, 2] + scene.viewmats[0, 2, 3]
    visible = camera_z > 0.1
    assert visible.float().mean() > 0.5
    assert float(3 * sigma[visible].median()) > 4.0, "fitted Gaussians should be larger than the random case's"
    again = CASES["fitted"](2000, 320, 180)
    assert torch.equal(again.means, scene.means) and torch.equal(again.scales, scene.scales)


def test_approximate_knn_finds_most_true_neighbours():
    points = torch.rand(3000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    indices, squared = approximate_knn(points, 8)
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(float("inf"))
    exact = distances.topk(8, largest=False).indices
    recall = (indices[:, :, None] == exact[:, None, :]).any(-1).double().mean()
    assert recall > 0.85, f"recall {recall:.3f}"
    assert (indices != torch.arange(3000)[:, None]).all()
    assert torch.allclose(squared, ((points[indices] - points[:, None]) ** 2).sum(-1))
    assert (squared[:, 1:] >= squared[:, :-1]).all()


def test_rotation_to_quaternion_round_trip():
    matrices = torch.linalg.qr(torch.randn(200, 3, 3, dtype=torch.float64)).Q
    matrices[torch.linalg.det(matrices) < 0, :, 0] *= -1
    w, x, y, z = rotation_to_quaternion(matrices).unbind(-1)
    rebuilt = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    assert torch.allclose(rebuilt, matrices, atol=1e-12)


def test_fitted_case_from_a_tracking_run(monkeypatch):
    tracking = pytest.importorskip("tracking")
    data_tools = pytest.importorskip("data_tools")
    n = 50
    generator = torch.Generator().manual_seed(0)
    params = {"means": torch.randn(n, 3, generator=generator) * 0.2 + torch.tensor([0.0, 0.0, 3.0]),
              "quats": torch.randn(n, 4, generator=generator) * 3, "log_scales": torch.full((n, 3), -3.0),
              "logit_opacities": torch.zeros(n, 1), "rgb": torch.rand(n, 3, generator=generator)}
    camera = data_tools.Camera(0, [[500.0, 0, 320], [0, 500.0, 180], [0, 0, 1]], torch.eye(4).numpy(), 640, 360)

    class FakeRun:
        train_cameras = [camera]

        def params(self, t):
            assert t == 0
            return params

    monkeypatch.setattr(tracking, "load", lambda path: FakeRun())
    scene = make_case("fitted:/runs/demo", 0, 320, 180)
    assert scene.n_gaussians == n and (scene.width, scene.height) == (320, 180)
    assert torch.allclose(scene.opacities, torch.full((n,), 0.5))
    assert torch.allclose(scene.scales, torch.full((n, 3), math.exp(-3.0)))
    assert torch.allclose(scene.quats.norm(dim=-1), torch.ones(n))
    assert scene.Ks[0, 0, 0] == pytest.approx(250.0) and scene.Ks[0, 1, 2] == pytest.approx(90.0)

    assert scene.colors.shape == (n, 3) and scene.keywords() == {}

    # A run with segmentation colours renders as its t = 0 steps do: D = 6, the densification head, a background.
    params["seg"] = torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)
    scene = make_case("fitted:/runs/demo", 0, 320, 180)
    assert scene.colors.shape == (n, 6) and torch.equal(scene.colors[:, 3:], params["seg"])
    keywords = scene.keywords()
    assert keywords["densify_channels"] == 3 and keywords["backgrounds"].shape == (1, 6)

    monkeypatch.setattr(tracking, "load", lambda path: (_ for _ in ()).throw(FileNotFoundError("no run.h5")))
    with pytest.raises(ValueError, match="fitted:/nowhere: could not read a tracking run.*no run.h5"):
        make_case("fitted:/nowhere", 0, 320, 180)


def test_tracking_step_parts_take_the_case_spec_from_the_command_line():
    from bench.step import STEP_CASES, step_case_specs

    assert step_case_specs(("random",)) == list(STEP_CASES)
    assert step_case_specs(("basketball-early:/data/bb", "random")) == ["fitted", "basketball-early:/data/bb"]


def test_every_tritonsplat_timing_renders_a_case_with_its_keywords(monkeypatch):
    """basketball-early's densify_channels=3 and background must reach rasterize() in render, step and stages."""
    from bench.runner import BenchConfig, render_function
    from bench.stages import measure_stages
    from bench.step import TrainingStep
    from tests.helpers import record_rasterize_keywords

    seen = record_rasterize_keywords(monkeypatch)
    scene = random_scene(200, 32, 24)
    background = torch.full((1, 3), 0.25)
    scene.extra["rasterize_kwargs"] = {"densify_channels": 2, "backgrounds": background}
    render_function("torch", scene)()
    TrainingStep(scene, "torch").forward()
    measure_stages("torch", "random", scene, BenchConfig(device="cpu", warmup=0, repeats=1), {})
    assert len(seen) >= 3
    for keywords in seen:
        assert keywords["densify_channels"] == 2 and torch.equal(keywords["backgrounds"], background)
