"""What every benchmark shares: the run configuration, failure bookkeeping (`--keep-going`), backend
availability, one render call per backend, and the case grid with its skips.

Failure policy: something the user asked for by name that cannot run (a backend, a case) or a
benchmark that raises is a failure. Without `--keep-going` the first failure stops the command with
a clear message and exit status 1; with it, the failure becomes a skipped record, the other
benchmarks still run, and the command still exits 1 at the end (like `make --keep-going`).
Backends and cases that were not named but cannot run here (gsplat or triton on a CPU) are plain
skips with the reason, not failures.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .baselines import gsplat_rasterize, gsplat_unavailable_reason
from .cases import CaseUnavailable, SceneInputs, expand_grid, make_case
from .harness import Record

KNOWN_BACKENDS = ("torch", "triton", "gsplat")
TRITONSPLAT_BACKENDS = ("torch", "triton")
INTERPRETER_NOT_FOR_TIMING = "no CUDA device (the interpreter is for tests, not timing)"


class BenchError(RuntimeError):
    """A failure that stops a benchmark command (exit status 1)."""


@dataclass(frozen=True)
class BenchConfig:
    """Options shared by the benchmark commands (built by bench/cli.py)."""

    device: str = "cpu"
    backends: tuple[str, ...] = KNOWN_BACKENDS
    explicit_backends: bool = False
    cases: tuple[str, ...] = ("random",)
    explicit_cases: bool = False
    sizes: tuple[int, ...] = (10_000,)
    resolutions: tuple[tuple[int, int], ...] = ((640, 360),)
    warmup: int = 1
    repeats: int = 5
    keep_going: bool = False
    time_budget_s: float | None = None

    def as_dict(self) -> dict:
        return {"device": self.device, "backends": list(self.backends), "cases": list(self.cases),
                "sizes": list(self.sizes), "resolutions": [f"{w}x{h}" for w, h in self.resolutions],
                "warmup": self.warmup, "repeats": self.repeats, "keep_going": self.keep_going,
                "time_budget_s": self.time_budget_s}


@dataclass
class RunState:
    """Failures seen so far in one command."""

    keep_going: bool = False
    failures: list[str] = field(default_factory=list)
    echo: Callable[[str], None] = print

    def fail(self, message: str) -> None:
        """Raise BenchError, or with --keep-going remember the failure and carry on."""
        if not self.keep_going:
            raise BenchError(message)
        self.failures.append(message)
        self.echo(f"error (continuing, --keep-going): {message}")


# ----------------------------------------------------------------------------- backends
@functools.lru_cache(maxsize=8)
def _triton_pipeline_reason() -> str | None:
    try:
        importlib.import_module("tritonsplat.ops.pipeline")
    except Exception as error:
        return f"the Triton backend does not import yet ({type(error).__name__}: {error})"
    return None


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None when `backend` can be timed on `device`, else why not (a sentence for the record)."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "gsplat":
        return gsplat_unavailable_reason(device)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if device.type != "cuda":
            return INTERPRETER_NOT_FOR_TIMING
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "TRITON_INTERPRET=1 is set, so the kernels would run in the interpreter; unset it to time them"
        return _triton_pipeline_reason()
    return f"unknown backend {backend!r} (expected one of {KNOWN_BACKENDS})"


def check_requested_backends(config: BenchConfig, state: RunState, supported: tuple[str, ...] = KNOWN_BACKENDS,
                             ) -> None:
    """Fail early (before any timing) for backends named on the command line that cannot run."""
    if not config.explicit_backends:
        return
    for backend in config.backends:
        if backend not in supported:
            state.fail(f"backend {backend!r} is not part of this benchmark (supported: {', '.join(supported)})")
            continue
        reason = backend_unavailable_reason(backend, config.device)
        if reason is not None:
            state.fail(f"backend {backend!r} is not available on {config.device}: {reason}")


def render_function(backend: str, scene: SceneInputs) -> Callable[[], tuple[torch.Tensor, int | None]]:
    """A no-argument callable rendering `scene` once with `backend`: -> (colors, n_intersections)."""
    if backend == "gsplat":
        return lambda: gsplat_rasterize(*scene.args())
    import tritonsplat

    keywords = scene.keywords()

    def render() -> tuple[torch.Tensor, int | None]:
        out = tritonsplat.rasterize(*scene.args(), backend=backend, **keywords)
        return out.colors, out.n_intersections
    return render


# ----------------------------------------------------------------------------- grid
def skip_record(benchmark: str, metric: str, case: str, backend: str, config: BenchConfig, reason: str,
                n_gaussians: int | None = None, width: int | None = None, height: int | None = None) -> Record:
    return Record(benchmark=benchmark, metric=metric, case=case, backend=backend, device=config.device,
                  n_gaussians=n_gaussians, width=width, height=height, skipped=reason)


def scene_skipper(benchmark: str, metric: str, case: str, backend: str, config: BenchConfig,
                  scene: SceneInputs) -> Callable[[str], Record]:
    """reason -> skip record for one (case, backend, scene) point of the grid."""
    def skip(reason: str) -> Record:
        return skip_record(benchmark, metric, case, backend, config, reason, scene.n_gaussians, scene.width,
                           scene.height)

    return skip


def iterate_scenes(benchmark: str, metric: str, config: BenchConfig, state: RunState, records: list[Record],
                   progress: Callable[[str], None] = print) -> Iterator[tuple[str, SceneInputs]]:
    """Yield (case spec, scene on the device) over the grid; unbuildable cases become skip records."""
    for spec, n_gaussians, width, height in expand_grid(config.cases, config.sizes, config.resolutions):
        try:
            scene = make_case(spec, n_gaussians, width, height, device=config.device)
        except Exception as error:  # a case that cannot be built here is recorded, never lost silently
            records.append(skip_record(benchmark, metric, spec, "-", config, str(error), n_gaussians, width, height))
            if config.explicit_cases or not isinstance(error, CaseUnavailable):
                state.fail(f"case {spec!r}: {error}")
            else:
                progress(f"skipped case {spec!r}: {error}")
            continue
        progress(f"{benchmark}: {scene.description}")
        yield spec, scene


def guarded(state: RunState, records: list[Record], skip: Callable[[str], Record], run: Callable[[], list[Record]],
            what: str) -> None:
    """Run one measurement; on an exception record a skip and fail (stops unless --keep-going)."""
    try:
        records.extend(run())
    except BenchError:
        raise
    except Exception as error:  # any failure of the code under test must not lose the other results
        message = f"{what}: {type(error).__name__}: {error}"
        records.append(skip(f"error: {type(error).__name__}: {error}"))
        state.fail(message)


def add_backend_ratios(records: list[Record]) -> None:
    """details["fps_ratio_vs"] = {other backend: this fps / its fps} for records of the same grid point."""
    groups: dict[tuple, list[Record]] = {}
    for record in records:
        if record.timing is None:
            continue
        key = (record.benchmark, record.metric, record.case, record.n_gaussians, record.width, record.height)
        groups.setdefault(key, []).append(record)
    for group in groups.values():
        for record in group:
            ratios = {other.backend: record.timing.fps / other.timing.fps for other in group
                      if other is not record and other.timing.fps > 0}
            if ratios:
                record.details["fps_ratio_vs"] = ratios
