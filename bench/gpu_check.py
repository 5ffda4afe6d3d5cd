"""`python -m bench gpu-check`: the one command to run when a GPU is lent for a few minutes.

In order, each part with its own time limit so the whole run fits in 8 minutes on one H100/H200:
1. `pytest -m gpu` (the GPU tests: Triton vs torch on inputs kept away from decision boundaries);
2. `bench render` at 300k Gaussians, 640x360, `random` and `fitted`, triton and (when importable) gsplat
   in the same process, so the ratio compares like with like;
3. `bench step` at the same size (forward + backward + Adam);
4. intersection statistics of the same scenes: tile intersections, and the intersections actually
   walked before each tile saturates (the compositor's work, Speedy-Splat's measure of waste).
Everything goes to `<out>/<device slug>/` (render.json, step.json, gpu_tests.txt, gpu_check.json).
Without CUDA it exits at once with status 1 and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

GPU_CHECK_SIZE = "300k"
GPU_CHECK_RESOLUTION = "360p"
GPU_CHECK_CASES = "random,fitted"
# Seconds per part; their sum (6.5 min) leaves room for start-up inside the 8-minute budget.
TIME_LIMITS_S = {"gpu_tests": 150.0, "render": 120.0, "step": 90.0, "intersections": 30.0}


class GpuCheckUnavailable(RuntimeError):
    """No CUDA device: nothing of gpu-check can run."""


def require_cuda() -> str:
    if not torch.cuda.is_available():
        raise GpuCheckUnavailable(
            "gpu-check needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
            "on a CPU machine run `python -m bench all --quick` instead")
    return torch.cuda.get_device_name(0)


def run_gpu_tests(out_dir: Path, timeout_s: float) -> dict:
    """`pytest -m gpu` in a subprocess; its output goes to gpu_tests.txt."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "TRITON_INTERPRET": "0"})
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        status = None
        output = f"stopped after {timeout_s:.0f} s\n{(error.stdout or b'')!s}"
    (out_dir / "gpu_tests.txt").write_text(output)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return {"command": " ".join(command[1:]), "exit_status": status, "summary": summary,
            "seconds": round(time.perf_counter() - started, 1)}


def intersection_statistics(scene_specs: list[str], size: int, width: int, height: int, device: str) -> list[dict]:
    """Tile intersections and intersections walked before saturation, per scene, from the torch twins
    of binning and sorting run on the GPU scene (walked = for each tile, the largest over its pixels
    of last blended index + 1 - tile start)."""
    from tritonsplat.statistics import walked_intersections

    from .cases import make_case

    rows = []
    for spec in scene_specs:
        scene = make_case(spec, size, width, height, device=device)
        rows.append({"case": spec, "gaussians": size, "resolution": f"{width}x{height}",
                     **walked_intersections(scene.means, scene.quats, scene.scales, scene.opacities,
                                            scene.colors, scene.viewmats, scene.Ks, scene.width,
                                            scene.height)})
    return rows


def run_gpu_check(out: Path, run_render: Callable[[dict], list], run_step: Callable[[dict], list],
                  size: int, width: int, height: int, echo: Callable[[str], None] = print) -> dict:
    """Run every part, write gpu_check.json, return its content. `run_render`/`run_step` take the
    common bench options (sizes, cases, ...) and write their own JSON."""
    from .harness import device_slug

    name = require_cuda()
    device = "cuda"
    out_dir = out / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"device_name": name, "torch": torch.__version__, "parts": {}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None

    echo("== pytest -m gpu")
    report["parts"]["gpu_tests"] = run_gpu_tests(out_dir, TIME_LIMITS_S["gpu_tests"])
    echo(f"   {report['parts']['gpu_tests']['summary']}")
    grid = dict(sizes=GPU_CHECK_SIZE, resolutions=GPU_CHECK_RESOLUTION, case=GPU_CHECK_CASES)
    for part, run in (("render", run_render), ("step", run_step)):
        echo(f"== bench {part}")
        part_started = time.perf_counter()
        try:
            run(grid)
            report["parts"][part] = {"status": "ok", "seconds": round(time.perf_counter() - part_started, 1)}
        except Exception as error:  # noqa: BLE001 - one part failing must not lose the others' results
            report["parts"][part] = {"status": f"error: {error}"}
    echo("== intersections")
    try:
        report["parts"]["intersections"] = intersection_statistics(
            GPU_CHECK_CASES.split(","), size, width, height, device)
    except Exception as error:  # noqa: BLE001
        report["parts"]["intersections"] = {"status": f"error: {error}"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    path = out_dir / "gpu_check.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)
    echo(f"wrote {path} ({report['seconds']} s)")
    return report
