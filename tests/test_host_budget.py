"""Host work of a render: host reads (synchronising device-to-host transfers) and launches.

Counted by `tests.helpers.count_host_work` (the one counting rule: reads are item, int(), float(),
bool(), tolist, cpu, numpy, nonzero, unique, masked_select on tensors; launches are the aten ops
outside Triton launches except views, reshapes, empty* and metadata, plus one per Triton launch).
Scene: 80 Gaussians, one 64 x 48 camera, D = 3, float32, warm (every kernel compiled before).

Budgets (a launch costs ~5 us of CPU and >= 1.5 us on an H100; a read stalls the CPU until the GPU
has caught up, and makes a CUDA-graph capture impossible):
| call                                   | host reads | launches |
|----------------------------------------|------------|----------|
| warm forward                           | <= 1       | <= 25    |
| warm forward + colors.sum().backward() | <= 1       | <= 45    |
| the same with max_intersections=N      | 0          | same     |
| each of these, rasterize_mode="antialiased" | same  | same     |
"""

import pytest
import torch

import tritonsplat
from tests.helpers import count_host_work, make_scene

pytestmark = pytest.mark.interpreter

SCENE = make_scene(n=80, width=64, height=48, seed=0, dtype=torch.float32)
CAPACITY = 4096


def _forward(**keywords):
    return tritonsplat.rasterize(*SCENE.args(), backend="triton", **keywords)


def _leaves():
    return [t.clone().requires_grad_() for t in (SCENE.means, SCENE.quats, SCENE.scales, SCENE.opacities,
                                                 SCENE.colors)]


def _forward_backward(leaves, **keywords):
    out = tritonsplat.rasterize(*leaves, *SCENE.args()[5:], backend="triton", **keywords)
    out.colors.sum().backward()
    return out


@pytest.fixture(scope="module")
def warm():
    """Compile every kernel variant once, in both modes."""
    _forward_backward(_leaves())
    _forward_backward(_leaves(), max_intersections=CAPACITY)
    return _forward()


def test_the_counter_counts_what_the_rule_names():
    x = torch.arange(6.0)

    def reads():
        int(x.sum()), float(x[0]), bool(x.any()), x[1].item()
        x.cpu().tolist()                                  # two reads
        x.numpy(), torch.nonzero(x), torch.unique(x), torch.masked_select(x, x > 2)

    _, work = count_host_work(reads)
    assert work.reads == ["__int__", "__float__", "__bool__", "item", "cpu", "tolist", "numpy", "nonzero",
                          "unique", "masked_select"], work.summary()

    def free():
        x.view(2, 3), x.reshape(3, 2), x[2:], x.unsqueeze(0).expand(4, 6), torch.empty(5), x.shape

    _, work = count_host_work(free)
    assert work.n_launches == 0 and work.n_reads == 0, work.summary()
    _, work = count_host_work(lambda: (x + 1, torch.zeros(3), x.sum()))
    assert work.torch_ops == ["add", "zeros", "sum"], work.summary()


def test_a_triton_launch_counts_once_whatever_the_interpreter_runs_inside():
    from tritonsplat.ops.checks import pending_value_checks
    from tritonsplat.validation import validate_rasterize_inputs

    inputs = validate_rasterize_inputs(*SCENE.args(), sh_degree=None, near=0.01, far=1e10, backgrounds=None,
                                       alpha_cap=0.99, eps2d=0.3, tile_size=16, densify_channels=None,
                                       check_values_now=False)
    _, work = count_host_work(pending_value_checks, inputs)
    assert work.triton_launches == ["_value_checks_kernel"] and work.torch_ops == ["zeros"], work.summary()
    assert work.n_reads == 0, work.summary()


def test_warm_forward_makes_one_host_read_and_few_launches(warm):
    out, work = count_host_work(_forward)
    assert work.n_reads <= 1, work.summary()
    assert work.n_launches <= 25, work.summary()
    assert isinstance(out.n_intersections, int) and out.n_intersections > 0 and out.overflow is None


def test_warm_forward_backward_launch_budget(warm):
    _, work = count_host_work(_forward_backward, _leaves())
    assert work.n_reads <= 1, work.summary()
    assert work.n_launches <= 45, work.summary()


def test_capacity_mode_makes_no_host_reads(warm):
    out, work = count_host_work(_forward, max_intersections=CAPACITY)
    assert work.n_reads == 0, work.summary()
    assert work.n_launches <= 25, work.summary()
    assert isinstance(out.n_intersections, torch.Tensor) and out.n_intersections.shape == ()
    assert out.n_intersections.dtype == torch.int64 and out.n_intersections.device == SCENE.means.device
    assert out.overflow.shape == () and out.overflow.dtype == torch.bool and not bool(out.overflow)
    assert int(out.n_intersections) == warm.n_intersections
    for name in ("colors", "alphas", "depths", "median_depths"):
        assert torch.equal(getattr(out, name), getattr(warm, name)), name
    _, work = count_host_work(_forward_backward, _leaves(), max_intersections=CAPACITY)
    assert work.n_reads == 0, work.summary()
    assert work.n_launches <= 45, work.summary()


@pytest.mark.parametrize("capacity", [None, CAPACITY])
def test_antialiased_mode_keeps_the_budgets(warm, capacity):
    """The opacity factor is one kernel each way (15 + 21 torch launches as autograd over the conic)."""
    keywords = dict(rasterize_mode="antialiased", max_intersections=capacity)
    _forward_backward(_leaves(), **keywords)                # compile the antialiased variants
    max_reads = 1 if capacity is None else 0
    _, work = count_host_work(_forward, **keywords)
    assert work.n_reads <= max_reads and work.n_launches <= 25, work.summary()
    _, work = count_host_work(_forward_backward, _leaves(), **keywords)
    assert work.n_reads <= max_reads and work.n_launches <= 45, work.summary()


def test_capacity_overflow_is_reported_on_the_device(warm):
    out = _forward(max_intersections=warm.n_intersections - 1)
    assert bool(out.overflow) and int(out.n_intersections) == warm.n_intersections


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_outputs_not_asked_for_are_none(backend):
    full = tritonsplat.rasterize(*SCENE.args(), backend=backend)
    part = tritonsplat.rasterize(*SCENE.args(), backend=backend, outputs=("colors", "median_depths"))
    assert part.alphas is None and part.depths is None
    assert torch.equal(part.colors, full.colors) and torch.equal(part.median_depths, full.median_depths)
    assert full.alphas is not None and full.depths is not None


@pytest.mark.parametrize("keywords,argument", [
    ({"outputs": ("colors", "normals")}, "outputs"),
    ({"outputs": ()}, "outputs"),
    ({"outputs": "colors"}, "outputs"),
    ({"outputs": ("colors", "colors")}, "outputs"),
    ({"color_grad_channels": 0}, "color_grad_channels"),
    ({"color_grad_channels": 4}, "color_grad_channels"),
    ({"max_intersections": 0}, "max_intersections"),
    ({"max_intersections": 2.5}, "max_intersections"),
])
def test_bad_options_raise_value_error_naming_them(keywords, argument):
    with pytest.raises(ValueError) as error:
        tritonsplat.rasterize(*SCENE.args(), backend="torch", **keywords)
    assert str(error.value).startswith(argument), str(error.value)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_color_grad_channels_freezes_the_other_colours_only(backend):
    scene = make_scene(n=30, width=24, height=20, seed=3, n_channels=4, dtype=torch.float32)
    grads = {}
    for k in (None, 2):
        leaves = [t.clone().requires_grad_() for t in (scene.means, scene.colors)]
        out = tritonsplat.rasterize(leaves[0], scene.quats, scene.scales, scene.opacities, leaves[1], scene.viewmats,
                                    scene.Ks, scene.width, scene.height, backend=backend, color_grad_channels=k)
        (out.colors * torch.linspace(0.5, 2.0, 4)).sum().backward()
        grads[k] = (out.colors.detach(), leaves[0].grad, leaves[1].grad)
    assert torch.equal(grads[2][0], grads[None][0])                  # same images
    assert torch.equal(grads[2][1], grads[None][1])                  # geometry sees all channels
    assert torch.equal(grads[2][2][:, :2], grads[None][2][:, :2])
    assert (grads[2][2][:, 2:] == 0).all() and (grads[None][2][:, 2:] != 0).any()
