"""`bench step`: one training step and its parts per backend, and the tracking step's parts.

Training step (per backend, on each grid scene): parameters are the raw leaves a trainer optimises
(means, quaternions, log-scales, logit-opacities, colours); one step is
  forward   activations + render + L1 loss against a grey image,
  backward  loss.backward(),
  adam      torch.optim.Adam.step() + zero_grad(set_to_none=True) (lr 1e-5, so the scene stays put).
Records: metric "training_step" (all three parts, per-part percentiles in details["parts"]) and
metric "forward_backward" (forward + backward of each run; the gsplat and CPU targets are about it).

Tracking (Dynamic 3D Gaussians; needs `tracking.neighbours` and `tracking.losses`, skipped with the
reason otherwise), at N foreground Gaussians (`--foreground`):
  knn               building the K = 20 neighbour lists, `tracking.neighbours.knn` (done once per
                    sequence in the method, timed alone);
  rigidity_losses   `tracking.losses.rigidity_losses` forward + backward (the H100 target: < 1 ms at 100k);
  tracking_step     render + L1 + rigidity losses, backward, Adam, per backend;
  tracking_step_parts  one t > 0 step through the tracking package itself, on the `fitted` and
                    `basketball-early` cases, with per part (render_forward, render_backward, image_losses,
                    rigidity_losses, optimizer, host_overhead) its time, launches and host reads.
The foreground Gaussians are the `random` scene's (their spacing makes most weights exp(-2000 d^2)
tiny, which changes no timing: the losses are dense over the N x K neighbour lists).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .baselines import gsplat_rasterize
from .cases import SceneInputs, random_scene
from .harness import Record, Timing, measure_peak_memory, time_function, time_parts
from .runner import (
    BenchConfig,
    RunState,
    add_backend_ratios,
    backend_unavailable_reason,
    guarded,
    iterate_scenes,
    scene_skipper,
    skip_record,
)

BENCHMARK = "step"
KNN_NEIGHBOURS = 20
NEIGHBOUR_WEIGHT_SCALE = 2000.0   # weights = exp(-2000 d^2), Dynamic 3D Gaussians
LEARNING_RATE = 1e-5


class TrainingStep:
    """Raw parameters of one scene, an Adam optimiser and the three parts of a step."""

    def __init__(self, scene: SceneInputs, backend: str, rigidity: dict | None = None):
        self.scene = scene
        self.backend = backend
        self.rigidity = rigidity
        self.params = {
            "means": scene.means.detach().clone(),
            "quats": scene.quats.detach().clone(),
            "log_scales": scene.scales.detach().log(),
            "logit_opacities": torch.logit(scene.opacities.detach().clamp(1e-4, 1 - 1e-4)),
            "colors": scene.colors.detach().clone(),
        }
        for tensor in self.params.values():
            tensor.requires_grad_(True)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=LEARNING_RATE)
        self.target = torch.full((1, scene.height, scene.width, scene.colors.shape[-1]), 0.5,
                                 device=scene.means.device, dtype=scene.means.dtype)
        self.loss: torch.Tensor | None = None

    def render(self) -> torch.Tensor:
        p = self.params
        args = (p["means"], p["quats"], p["log_scales"].exp(), torch.sigmoid(p["logit_opacities"]), p["colors"],
                self.scene.viewmats, self.scene.Ks, self.scene.width, self.scene.height)
        if self.backend == "gsplat":
            colors, _ = gsplat_rasterize(*args)
            return colors
        import tritonsplat

        return tritonsplat.rasterize(*args, backend=self.backend, **self.scene.keywords()).colors

    def forward(self) -> None:
        loss = (self.render() - self.target).abs().mean()
        if self.rigidity is not None:
            loss = loss + sum(rigidity_loss_terms(self.params["means"], self.params["quats"], self.rigidity).values())
        self.loss = loss

    def backward(self) -> None:
        self.loss.backward()
        self.loss = None

    def adam(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parts(self) -> list[tuple[str, Callable[[], None]]]:
        return [("forward", self.forward), ("backward", self.backward), ("adam", self.adam)]


def _sum_samples(*timings: Timing) -> Timing:
    return Timing(tuple(sum(values) for values in zip(*(t.samples_ms for t in timings))))


def _parts_summary(parts: dict[str, Timing]) -> dict:
    return {name: {"p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms} for name, t in parts.items()}


def measure_training_step(backend: str, spec: str, scene: SceneInputs, config: BenchConfig) -> list[Record]:
    """training_step and forward_backward records of `backend` on `scene`."""
    step = TrainingStep(scene, backend)
    total, parts = time_parts(step.parts(), device=config.device, warmup=config.warmup, repeats=config.repeats,
                              budget_s=config.time_budget_s)
    with measure_peak_memory(config.device) as peak:
        for _, part in step.parts():
            part()
    common = dict(benchmark=BENCHMARK, case=spec, backend=backend, device=config.device,
                  n_gaussians=scene.n_gaussians, width=scene.width, height=scene.height, peak_memory=peak,
                  warmup=config.warmup, repeats=config.repeats)
    details = {"scene": scene.description, "parts": _parts_summary(parts), "loss": "L1 to a grey image",
               "optimizer": f"Adam lr={LEARNING_RATE}"}
    return [
        Record(metric="training_step", timing=total, details=details, **common),
        Record(metric="forward_backward", timing=_sum_samples(parts["forward"], parts["backward"]),
               details={**details, "parts": _parts_summary({k: parts[k] for k in ("forward", "backward")})},
               **common),
    ]


# ----------------------------------------------------------------------------- tracking
def tracking_unavailable_reason() -> str | None:
    """None when tracking.neighbours.knn and tracking.losses.rigidity_losses import, else why not."""
    try:
        from tracking.losses import rigidity_losses  # noqa: F401
        from tracking.neighbours import knn  # noqa: F401
    except Exception as error:  # the tracking package is being written; report whatever stops it
        return (f"tracking.neighbours.knn / tracking.losses.rigidity_losses do not import yet "
                f"({type(error).__name__}: {error})")
    return None


def knn_backend_for(device: str) -> str:
    """"torch" on CPU (PyKeOps compiles on first use, minutes on 2 cores), "auto" on CUDA."""
    return "auto" if torch.device(device).type == "cuda" else "torch"


def build_neighbours(points: torch.Tensor, device: str) -> dict:
    """Neighbour lists as Dynamic 3D Gaussians builds them: K = 20, weights exp(-2000 d^2)."""
    from tracking.neighbours import knn

    indices, squared = knn(points, KNN_NEIGHBOURS, backend=knn_backend_for(device))
    return {"indices": indices, "weights": torch.exp(-NEIGHBOUR_WEIGHT_SCALE * squared),
            "initial_distances": squared.clamp_min(0).sqrt(), "prev_means": points.detach().clone()}


def rigidity_function():
    """(function, its name): `rigidity_losses_fast` (torch.compile on CUDA, what tracking uses) when it
    exists, else `rigidity_losses`."""
    import tracking.losses as losses

    if hasattr(losses, "rigidity_losses_fast"):
        return losses.rigidity_losses_fast, "tracking.losses.rigidity_losses_fast"
    return losses.rigidity_losses, "tracking.losses.rigidity_losses"


def rigidity_loss_terms(means: torch.Tensor, raw_quats: torch.Tensor, rigidity: dict) -> dict:
    rigidity_losses, _ = rigidity_function()
    quats = torch.nn.functional.normalize(raw_quats, dim=-1)
    return rigidity_losses(means, quats, rigidity["prev_means"], rigidity["prev_quats"], rigidity["indices"],
                           rigidity["weights"], rigidity["initial_distances"])


def measure_tracking(n_foreground: int, config: BenchConfig, backends: list[str]) -> list[Record]:
    """knn, rigidity_losses and tracking_step records at n_foreground Gaussians."""
    scene = random_scene(n_foreground, 640, 360, device=config.device)
    spec = "random"
    common = dict(benchmark=BENCHMARK, case=spec, device=config.device, n_gaussians=n_foreground,
                  warmup=config.warmup, repeats=config.repeats)
    knn_backend = knn_backend_for(config.device)
    points = scene.means.detach()
    knn_timing = time_function(lambda: build_neighbours(points, config.device), device=config.device,
                               warmup=min(config.warmup, 1), repeats=min(config.repeats, 3))
    with measure_peak_memory(config.device) as knn_peak:
        rigidity = build_neighbours(points, config.device)
    rigidity["prev_quats"] = torch.nn.functional.normalize(scene.quats.detach(), dim=-1)
    records = [Record(metric="knn", backend=f"knn:{knn_backend}", timing=knn_timing, peak_memory=knn_peak,
                      details={"k": KNN_NEIGHBOURS, "function": "tracking.neighbours.knn"},
                      **common)]

    means = (scene.means.detach() + 1e-3 * torch.randn_like(scene.means)).requires_grad_(True)
    raw_quats = scene.quats.detach().clone().requires_grad_(True)
    held: dict = {}

    def losses_forward() -> None:
        held["loss"] = sum(rigidity_loss_terms(means, raw_quats, rigidity).values())

    def losses_backward() -> None:
        held.pop("loss").backward()
        means.grad = raw_quats.grad = None

    total, parts = time_parts([("forward", losses_forward), ("backward", losses_backward)], device=config.device,
                              warmup=config.warmup, repeats=config.repeats, budget_s=config.time_budget_s)
    with measure_peak_memory(config.device) as peak:
        losses_forward()
        losses_backward()
    records.append(Record(metric="rigidity_losses", backend="tracking", timing=total, peak_memory=peak,
                          details={"parts": _parts_summary(parts), "k": KNN_NEIGHBOURS,
                                   "terms": "rigid + rot + iso, forward + backward",
                                   "function": rigidity_function()[1]}, **common))

    for backend in backends:
        reason = backend_unavailable_reason(backend, config.device)
        if reason is not None:
            records.append(Record(metric="tracking_step", backend=backend, skipped=reason, width=640, height=360,
                                  **common))
            continue
        step = TrainingStep(scene, backend, rigidity=rigidity)
        step_total, step_parts = time_parts(step.parts(), device=config.device, warmup=config.warmup,
                                            repeats=config.repeats, budget_s=config.time_budget_s)
        with measure_peak_memory(config.device) as step_peak:
            for _, part in step.parts():
                part()
        records.append(Record(metric="tracking_step", backend=backend, timing=step_total, peak_memory=step_peak,
                              width=640, height=360,
                              details={"parts": _parts_summary(step_parts), "scene": scene.description,
                                       "loss": "L1 to a grey image + rigid + rot + iso"}, **common))
    return records


def run_step(config: BenchConfig, state: RunState, foreground_sizes: tuple[int, ...],
             progress: Callable[[str], None] = print) -> list[Record]:
    """Training steps over the grid, then the tracking parts at each foreground size."""
    records: list[Record] = []
    for spec, scene in iterate_scenes(BENCHMARK, "training_step", config, state, records, progress):
        for backend in config.backends:
            skip = scene_skipper(BENCHMARK, "training_step", spec, backend, config, scene)

            reason = backend_unavailable_reason(backend, config.device)
            if reason is not None:
                records.append(skip(reason))
                continue
            guarded(state, records, skip, lambda backend=backend, spec=spec, scene=scene:
                    measure_training_step(backend, spec, scene, config),
                    what=f"step {backend} {scene.description}")
            if records[-1].timing is not None:
                step, forward_backward = records[-2], records[-1]
                progress(f"  {backend:6s} step {step.timing.p50_ms:.1f} ms, forward+backward "
                         f"{forward_backward.timing.p50_ms:.1f} ms")

    tracking_backends = [b for b in config.backends if b != "gsplat"]
    reason = tracking_unavailable_reason()
    for n_foreground in foreground_sizes:
        if reason is not None:
            for metric in ("knn", "rigidity_losses", "tracking_step"):
                records.append(skip_record(BENCHMARK, metric, "random", "tracking", config, reason, n_foreground))
            progress(f"skipped tracking step at {n_foreground}: {reason}")
            continue
        progress(f"step: tracking parts at {n_foreground} foreground Gaussians")

        def skip(why: str, n_foreground=n_foreground) -> Record:
            return skip_record(BENCHMARK, "tracking", "random", "tracking", config, why, n_foreground)

        guarded(state, records, skip, lambda n_foreground=n_foreground: measure_tracking(
            n_foreground, config, tracking_backends), what=f"tracking step at {n_foreground}")
        for record in records[-(2 + len(tracking_backends)):]:
            if record.timing is not None and record.n_gaussians == n_foreground:
                progress(f"  {record.metric:16s} {record.backend:10s} {record.timing.p50_ms:.2f} ms")
    for case in step_case_specs(config.cases):
        for backend in tracking_backends:
            if reason is not None or backend_unavailable_reason(backend, config.device) is not None:
                continue

            def skip(why: str, case=case, backend=backend) -> Record:
                return skip_record(BENCHMARK, "tracking_step_parts", case, backend, config, why, None)

            guarded(state, records, skip, lambda case=case, backend=backend: [measure_tracking_step_parts(
                case, foreground_sizes[0] if foreground_sizes else 10_000, config, backend)],
                what=f"tracking step parts {case} {backend}")
            record = records[-1]
            if record.timing is not None:
                parts = ", ".join(f"{k} {v['p50_ms']:.2f} ms/{v['launches']} ops"
                                  for k, v in record.details["parts"].items())
                progress(f"  tracking step {case} {backend}: {parts}")
    add_backend_ratios(records)
    return records


# ----------------------------------------------------------------------------- one tracking step, by part
STEP_PARTS = ("render_forward", "render_backward", "image_losses", "rigidity_losses", "optimizer", "host_overhead")
STEP_CASES = ("fitted", "basketball-early")  # basketball-early: a case another module may register


def step_case_specs(cases: tuple[str, ...]) -> list[str]:
    """The STEP_CASES, each as `--case` names it when it does (`basketball-early:/path/to/basketball`
    reaches the tracking step parts too), else by its bare name (its default data)."""
    named = {spec.partition(":")[0]: spec for spec in cases}
    return [named.get(name, name) for name in STEP_CASES]


class _OpCounter:
    """Counts aten ops (~ kernel launches on a GPU; view/metadata ops excluded) and host reads
    (`_local_scalar_dense`, `nonzero`, `masked_select`) while active."""

    NOT_LAUNCHES = frozenset({"view", "_unsafe_view", "expand", "t", "permute", "select", "slice", "unsqueeze",
                              "squeeze", "as_strided", "detach", "alias", "lift_fresh", "transpose", "unbind",
                              "split", "empty", "empty_like", "empty_strided"})
    HOST_READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select"})

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                counter.launches += name not in counter.NOT_LAUNCHES
                counter.host_reads += name in counter.HOST_READS
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.launches = 0
        self.host_reads = 0

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class TrackingStepParts:
    """A t > 0 Dynamic 3D Gaussians step on a scene, split into the parts of STEP_PARTS, through the
    tracking package's own code (`tracking.stages.render`, `losses.image_losses`, the rigidity, floor,
    background and colour terms, Adam). All Gaussians with even index are foreground."""

    def __init__(self, scene: SceneInputs, backend: str):
        from tracking import losses
        from tracking.config import TrackingConfig
        from tracking.params import make_optimizer
        from tracking.targets import Views

        device = scene.means.device
        self.losses = losses
        self.config = TrackingConfig(backend=backend)
        n = scene.n_gaussians
        self.params = {"means": torch.nn.Parameter(scene.means.detach().clone()),
                       "quats": torch.nn.Parameter(scene.quats.detach().clone()),
                       "rgb": torch.nn.Parameter(scene.colors.detach()[:, :3].clone())}
        self.optimizer = make_optimizer(self.params, {"means": 1e-6, "quats": 1e-5, "rgb": 1e-5}, self.config)
        self.seg = torch.zeros(n, 3, device=device)
        self.seg[::2, 0] = 1
        self.seg[1::2, 2] = 1
        self.scales, self.opacities = scene.scales.detach(), scene.opacities.detach()
        self.fg_idx = torch.arange(0, n, 2, device=device)
        self.bg_idx = torch.arange(1, n, 2, device=device)
        rig = build_neighbours(scene.means.detach()[self.fg_idx], str(device))
        self.rig = rig
        self.prev_offsets = losses.previous_offsets(rig["prev_means"], rig["indices"])
        self.prev_quats = torch.nn.functional.normalize(scene.quats.detach()[self.fg_idx], dim=-1)
        self.prev_rgb = self.params["rgb"].detach().clone()
        self.init_bg = (scene.means.detach()[self.bg_idx], torch.nn.functional.normalize(
            scene.quats.detach()[self.bg_idx], dim=-1))
        self.views = Views(scene.viewmats[:1], scene.Ks[:1], [(scene.width, scene.height)],
                           torch.tensor([0, 0, 0, 0, 0, 1.0], device=device))
        self.image = torch.full((1, 3, scene.height, scene.width), 0.5, device=device)
        self.seg_target = torch.zeros(1, 3, scene.height, scene.width, device=device)
        self.seg_target[:, 2] = 1
        self.buffer = torch.zeros(8, device=device)
        self.held: dict = {}

    def host_overhead(self) -> None:
        """Activations and colour concatenation (before the render) and the scalar-buffer write."""
        p = self.params
        self.held["act"] = {"means": p["means"], "quats": torch.nn.functional.normalize(p["quats"], dim=-1),
                            "scales": self.scales, "opacities": self.opacities,
                            "colors": torch.cat([p["rgb"], self.seg], -1)}

    def render_forward(self) -> None:
        from tracking.stages import render

        self.held["out"] = render(self.held["act"], self.views, [0], self.config, densify=False)

    def image_losses(self) -> None:
        colors = self.held["out"].colors.detach().requires_grad_(True)
        L = self.losses
        s = self.config.weights.ssim
        im, seg = L.image_losses([(colors[..., :3].permute(0, 3, 1, 2), self.image),
                                  (colors[..., 3:].permute(0, 3, 1, 2), self.seg_target)], s,
                                 backend=self.config.backend)   # as tracking.stages.StepContext.photometric
        (im + 3 * seg).backward()
        self.held["colors_grad"] = colors.grad
        torch.stack([im.detach(), seg.detach()], out=self.buffer[:2])

    def rigidity_losses(self) -> None:
        L, act, r = self.losses, self.held["act"], self.rig
        fg = act["means"].index_select(0, self.fg_idx)   # as tracking.stages.StepContext gathers them
        terms = L.rigidity_losses_fast(fg, act["quats"].index_select(0, self.fg_idx), r["prev_means"], self.prev_quats,
                                       r["indices"], r["weights"], r["initial_distances"],
                                       prev_offsets=self.prev_offsets)
        total = 4 * terms["rigid"] + 4 * terms["rot"] + 2 * terms["iso"] + 2 * L.floor_loss(fg, 0.0)
        total = total + 20 * L.background_loss(act["means"].index_select(0, self.bg_idx),
                                               act["quats"].index_select(0, self.bg_idx), *self.init_bg)
        total.backward(retain_graph=True)

    def render_backward(self) -> None:
        self.held.pop("out").colors.backward(self.held.pop("colors_grad"))
        self.held.pop("act")

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parts(self) -> list[tuple[str, Callable[[], None]]]:
        return [("host_overhead", self.host_overhead), ("render_forward", self.render_forward),
                ("image_losses", self.image_losses), ("rigidity_losses", self.rigidity_losses),
                ("render_backward", self.render_backward), ("optimizer", self.optimizer_step)]


def measure_tracking_step_parts(case: str, n_gaussians: int, config: BenchConfig, backend: str) -> Record:
    """Record "tracking_step_parts": per part of STEP_PARTS its time (p20/p50/p80 ms), launches and host
    reads of one t > 0 step on `case` (skipped with the reason when the case is not registered)."""
    from .cases import CASES, make_case

    common = dict(benchmark=BENCHMARK, metric="tracking_step_parts", case=case, backend=backend,
                  device=config.device, n_gaussians=n_gaussians)
    if case.partition(":")[0] not in CASES:
        return Record(skipped=f"case {case!r} is not registered in bench/cases.py", **common)
    try:
        scene = make_case(case, n_gaussians, 640, 360, device=config.device)
    except Exception as error:  # a case whose data is absent here
        return Record(skipped=f"case {case!r} unavailable ({type(error).__name__}: {error})", **common)
    step = TrackingStepParts(scene, backend)
    total, parts = time_parts(step.parts(), device=config.device, warmup=config.warmup, repeats=config.repeats,
                              budget_s=config.time_budget_s)
    counts = {}
    for name, part in step.parts():
        with _OpCounter() as counter:
            part()
        counts[name] = {"launches": counter.launches, "host_reads": counter.host_reads}
    details = {"parts": {name: {**_parts_summary({name: parts[name]})[name], **counts[name]}
                         for name in STEP_PARTS},
               "scene": scene.description,
               "counting": "aten ops outside views (~ launches on a GPU), host reads = item/nonzero/masked_select"}
    return Record(timing=total, width=scene.width, height=scene.height, details=details,
                  **{**common, "n_gaussians": scene.n_gaussians})
