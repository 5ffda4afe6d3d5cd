"""`bench stages`: time per stage of forward and backward, intersections per Gaussian, peak memory.

Stage times come from `tritonsplat.profiling.record(timer)`: each backend wraps its stages in
`profiling.stage(name)` / `backward_stage(name)` (names in `tritonsplat.profiling.STAGES`); a stage a
backend does not expose is simply absent, and the time outside all reported stages of a pass is
given as `unattributed_forward_ms` / `unattributed_backward_ms`. Each run is one forward and one
backward of sum(colors) with CUDA-event timers on a GPU and perf_counter elsewhere.

Intersections (`tritonsplat.statistics.intersection_report`, torch, on the same scene): tile
intersections of tritonsplat's ellipse rule, of the exact minimum (tiles holding a pixel where the
Gaussian's alpha reaches 1/255) and of the original's 3-sigma rectangle rule, per Gaussian and as
ratios; the target is ellipse <= 1.1 x exact minimum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cases import SceneInputs
from .harness import Record, Timing, measure_peak_memory, percentile, stage_timer_for, time_parts
from .runner import (
    TRITONSPLAT_BACKENDS,
    BenchConfig,
    RunState,
    backend_unavailable_reason,
    guarded,
    iterate_scenes,
    scene_skipper,
    skip_record,
)

BENCHMARK = "stages"
METRIC = "forward_backward"
GRADIENT_INPUTS = ("means", "quats", "scales", "opacities", "colors")


def intersection_statistics(scene: SceneInputs) -> dict:
    """`tritonsplat.statistics.intersection_report` of the scene, or {"unavailable": reason}."""
    try:
        from tritonsplat.statistics import intersection_report
    except ImportError as error:
        return {"unavailable": f"tritonsplat.statistics.intersection_report does not import ({error})"}
    try:
        return intersection_report(scene.means, scene.quats, scene.scales, scene.opacities, scene.viewmats,
                                   scene.Ks, scene.width, scene.height)
    except Exception as error:  # a failing report must not cost the stage timings
        return {"unavailable": f"intersection_report failed ({type(error).__name__}: {error})"}


def _stage_statistics(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = sorted({name for run in runs for name in run})
    statistics = {}
    for name in names:
        values = [run.get(name, 0.0) for run in runs]
        statistics[name] = {"p20_ms": percentile(values, 20), "p50_ms": percentile(values, 50),
                            "p80_ms": percentile(values, 80), "calls_seen_in_runs": sum(name in r for r in runs)}
    return statistics


def measure_stages(backend: str, spec: str, scene: SceneInputs, config: BenchConfig,
                   intersections: dict) -> Record:
    """Stage breakdown of forward + backward of `scene` with `backend`."""
    import tritonsplat
    from tritonsplat import profiling

    leaves = {name: getattr(scene, name).detach().clone().requires_grad_(True) for name in GRADIENT_INPUTS}
    state: dict = {}

    def zero_grads() -> None:
        for tensor in leaves.values():
            tensor.grad = None

    def forward() -> None:
        out = tritonsplat.rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                    leaves["colors"], scene.viewmats, scene.Ks, scene.width, scene.height,
                                    backend=backend, **scene.keywords())
        state["loss"] = out.colors.sum()
        state["n_intersections"] = out.n_intersections

    def backward() -> None:
        state.pop("loss").backward()

    timer = stage_timer_for(config.device)

    def setup() -> None:
        zero_grads()
        timer.next_run()

    with profiling.record(timer):
        for _ in range(config.warmup):
            zero_grads()
            forward()
            backward()
        timer.reset()
        total, parts = time_parts([("forward", forward), ("backward", backward)], device=config.device, warmup=0,
                                  repeats=config.repeats, setup=setup, budget_s=config.time_budget_s)
        runs = timer.runs()
    zero_grads()
    with measure_peak_memory(config.device) as peak:
        forward()
        backward()
    stages = _stage_statistics(runs)
    forward_stages = [name for name in stages if not name.endswith("_backward")]
    backward_stages = [name for name in stages if name.endswith("_backward")]
    details = {
        "scene": scene.description,
        "stages": stages,
        "stage_order": [name for name in profiling.STAGES if name in stages],
        "forward": _timing_summary(parts["forward"]),
        "backward": _timing_summary(parts["backward"]),
        "unattributed_forward_ms": parts["forward"].p50_ms - sum(stages[n]["p50_ms"] for n in forward_stages),
        "unattributed_backward_ms": parts["backward"].p50_ms - sum(stages[n]["p50_ms"] for n in backward_stages),
        "stages_not_reported": [name for name in profiling.STAGES if name not in stages],
        "intersections": intersections,
        "backend_n_intersections_meaning": (
            "tile pairs of the radius boxes (the torch backend composites Gaussian-pixel pairs)"
            if backend == "torch" else "tile-Gaussian pairs of the backend's binning"),
    }
    return Record(benchmark=BENCHMARK, metric=METRIC, case=spec, backend=backend, device=config.device,
                  n_gaussians=scene.n_gaussians, width=scene.width, height=scene.height, timing=total,
                  n_intersections=state.get("n_intersections"), peak_memory=peak, details=details,
                  warmup=config.warmup, repeats=config.repeats)


def _timing_summary(timing: Timing) -> dict:
    return {"p20_ms": timing.p20_ms, "p50_ms": timing.p50_ms, "p80_ms": timing.p80_ms}


def run_stages(config: BenchConfig, state: RunState, progress: Callable[[str], None] = print) -> list[Record]:
    """Stage breakdown for every grid point and tritonsplat backend of `config`."""
    records: list[Record] = []
    backends = [b for b in config.backends if b in TRITONSPLAT_BACKENDS]
    for spec, scene in iterate_scenes(BENCHMARK, METRIC, config, state, records, progress):
        if "gsplat" in config.backends and config.explicit_backends:
            records.append(skip_record(BENCHMARK, METRIC, spec, "gsplat", config,
                                       "gsplat exposes no per-stage timings", scene.n_gaussians, scene.width,
                                       scene.height))
        intersections: dict | None = None
        for backend in backends:
            skip = scene_skipper(BENCHMARK, METRIC, spec, backend, config, scene)

            reason = backend_unavailable_reason(backend, config.device)
            if reason is not None:
                records.append(skip(reason))
                continue
            if intersections is None:
                with torch.no_grad():
                    intersections = intersection_statistics(scene)
            guarded(state, records, skip, lambda backend=backend, spec=spec, scene=scene, report=intersections: [
                measure_stages(backend, spec, scene, config, report)],
                what=f"stages {backend} {scene.description}")
            last = records[-1]
            if last.timing is not None:
                stages = ", ".join(f"{name} {values['p50_ms']:.1f}" for name, values in
                                   last.details["stages"].items())
                progress(f"  {backend:6s} forward+backward {last.timing.p50_ms:.1f} ms ({stages})")
    return records
