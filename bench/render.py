"""`bench render`: forward frames per second vs number of Gaussians and resolution, per backend.

Every grid point (case, N, W x H) renders the same scene with each backend in turn (torch, triton,
gsplat `packed=False`), so the fps ratios between them come from one run. A forward is one
`rasterize()` call under `torch.no_grad()` (for gsplat one `rasterization()` call); fps = 1000 / p50_ms.
Peak memory is that of one more forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .baselines import GSPLAT_VERSION_COMPARED, gsplat_version
from .cases import SceneInputs
from .harness import Record, measure_peak_memory, time_function
from .runner import (
    BenchConfig,
    RunState,
    add_backend_ratios,
    backend_unavailable_reason,
    guarded,
    iterate_scenes,
    render_function,
    scene_skipper,
)

BENCHMARK = "render"
METRIC = "forward"


def measure_forward(backend: str, spec: str, scene: SceneInputs, config: BenchConfig) -> Record:
    """Time forward renders of `scene` with `backend` (warm-up, repeats, then one for peak memory)."""
    render = render_function(backend, scene)
    n_intersections: list[int | None] = [None]

    def forward() -> None:
        with torch.no_grad():
            _, n_intersections[0] = render()

    timing = time_function(forward, device=config.device, warmup=config.warmup, repeats=config.repeats,
                           budget_s=config.time_budget_s)
    with measure_peak_memory(config.device) as peak:
        forward()
    details = {"scene": scene.description}
    if backend == "gsplat":
        details["gsplat_version"] = gsplat_version()
        details["gsplat_compared_version"] = GSPLAT_VERSION_COMPARED
        details["packed"] = False
    return Record(benchmark=BENCHMARK, metric=METRIC, case=spec, backend=backend, device=config.device,
                  n_gaussians=scene.n_gaussians, width=scene.width, height=scene.height, timing=timing,
                  n_intersections=n_intersections[0], peak_memory=peak, details=details, warmup=config.warmup,
                  repeats=config.repeats)


def run_render(config: BenchConfig, state: RunState, progress: Callable[[str], None] = print) -> list[Record]:
    """All grid points x backends of `config`; unavailable backends become skip records."""
    records: list[Record] = []
    for spec, scene in iterate_scenes(BENCHMARK, METRIC, config, state, records, progress):
        for backend in config.backends:
            skip = scene_skipper(BENCHMARK, METRIC, spec, backend, config, scene)

            reason = backend_unavailable_reason(backend, config.device)
            if reason is not None:
                records.append(skip(reason))
                continue
            guarded(state, records, skip, lambda backend=backend, spec=spec, scene=scene: [
                measure_forward(backend, spec, scene, config)],
                what=f"render {backend} {scene.description}")
            last = records[-1]
            if last.timing is not None:
                progress(f"  {backend:6s} {last.timing.p50_ms:9.2f} ms  {last.timing.fps:9.2f} fps")
        del scene
    add_backend_ratios(records)
    return records
