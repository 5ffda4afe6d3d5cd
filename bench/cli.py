"""`python -m bench`: render, step, stages, compile-report, plot, all --quick (see bench/README.md).

Each command builds a `BenchConfig`, calls the library, prints a table with the target beside every
measurement (PASS / MISS / N/A) and writes `<out>/<device slug>/<benchmark>.json`.
Exit status: 0 on success; 2 for a bad option (unknown backend, device or case, malformed size);
1 when a requested backend/case cannot run or a benchmark fails (with --keep-going the others still
run and are written, and the status is still 1), or when a kernel spills (compile-report).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from tritonsplat.cpu_memory import keep_freed_memory

from . import compile_report as aot_report
from .cases import CASES, parse_case
from .harness import Record, device_slug, load_results, record_from_json, write_results
from .plot import plot_results
from .render import run_render
from .runner import KNOWN_BACKENDS, BenchConfig, BenchError, RunState, check_requested_backends, skip_record
from .stages import run_stages
from .step import run_step
from .targets import apply_targets, format_summary, format_table

DEFAULT_OUT = Path("bench") / "results"
# `all --quick` smoke runs go here (git-ignored) unless --out is given: never over the committed results.
QUICK_OUT = DEFAULT_OUT / "quick"
RESOLUTION_NAMES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}

# Default grids: up to 100k Gaussians at 640x360 on a CPU, 10k..1M at three resolutions on a GPU.
DEFAULTS = {
    "render": {"cpu": dict(sizes="10k,50k,100k", resolutions="360p", cases="random,fitted"),
               "cuda": dict(sizes="10k,30k,100k,300k,1M", resolutions="360p,720p,1080p",
                            cases="random,fitted,original")},
    "stages": {"cpu": dict(sizes="50k", resolutions="360p", cases="random,fitted"),
               "cuda": dict(sizes="300k,1M", resolutions="360p,1080p", cases="random,fitted")},
    "step": {"cpu": dict(sizes="50k", resolutions="360p", cases="random"),
             "cuda": dict(sizes="100k,300k,1M", resolutions="360p", cases="random,fitted")},
}
DEFAULT_REPEATS = {"cpu": (1, 5), "cuda": (10, 50)}          # (warm-up, repeats)
# Per measurement, on CUDA only: the torch backend at 1M Gaussians and 1080p would otherwise take 60 slow calls.
DEFAULT_TIME_BUDGET_S = {"cpu": None, "cuda": 20.0}
DEFAULT_FOREGROUND = {"cpu": "20k", "cuda": "100k"}          # rigidity-loss sizes
QUICK = {  # all --quick: a CPU smoke run of everything in < 2 minutes on 2 cores; grids run one after the other
    "render": [dict(sizes="10k,50k", resolutions="360p", cases="random"),
               dict(sizes="10k", resolutions="360p", cases="fitted")],
    "stages": [dict(sizes="50k", resolutions="360p", cases="random")],
    "step": [dict(sizes="50k", resolutions="360p", cases="random")],   # one grid: the tracking parts run once
    "foreground": "10k", "warmup": 1, "repeats": 3, "budget_s": 115.0, "min_compile_s": 30.0,
}


# ----------------------------------------------------------------------------- option parsing
def parse_size(text: str) -> int:
    """"50k" -> 50000, "1M" -> 1000000, "300000" -> 300000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"expected a count such as 50k, 1M or 300000, got {text!r}")
    value = float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"expected a positive whole count, got {text!r}")
    return int(value)


def parse_resolution(text: str) -> tuple[int, int]:
    """"360p"/"720p"/"1080p" or "WxH"."""
    text = text.strip().lower()
    if text in RESOLUTION_NAMES:
        return RESOLUTION_NAMES[text]
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"expected 360p, 720p, 1080p or WxH such as 1280x720, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def resolve_device(text: str | None) -> str:
    """Validate --device ("cpu", "cuda", "cuda:1"); default cuda when available. BadParameter otherwise."""
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise click.BadParameter(f"unknown device {text!r} ({error}); expected cpu or cuda[:index]",
                                 param_hint="--device") from error
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"unsupported device {text!r}; expected cpu or cuda[:index]", param_hint="--device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"device {text!r}: no CUDA device is available on this machine",
                                     param_hint="--device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s)",
                                     param_hint="--device")
    return str(device)


def build_config(benchmark: str, options: dict, state: RunState, defaults: dict | None = None) -> BenchConfig:
    """BenchConfig from the common options; unknown names are bad parameters (or, with --keep-going,
    failures that are reported while the remaining names still run)."""
    device = resolve_device(options["device"])
    kind = "cuda" if device.startswith("cuda") else "cpu"
    defaults = defaults or DEFAULTS[benchmark][kind]

    def unknown(option: str, message: str) -> None:
        if not options["keep_going"]:
            raise click.BadParameter(message, param_hint=option)
        state.fail(f"{option}: {message}")

    backends = []
    for name in _split(options["backend"]) if options["backend"] else list(KNOWN_BACKENDS):
        if name in KNOWN_BACKENDS:
            backends.append(name)
        else:
            unknown("--backend", f"unknown backend {name!r}; expected one of {', '.join(KNOWN_BACKENDS)}")
    cases = []
    for spec in _split(options["case"] or defaults["cases"]):
        try:
            parse_case(spec)
            cases.append(spec)
        except ValueError as error:
            unknown("--case", str(error))
    try:
        sizes = tuple(parse_size(s) for s in _split(options["sizes"] or defaults["sizes"]))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--sizes") from error
    try:
        resolutions = tuple(parse_resolution(r) for r in _split(options["resolutions"] or defaults["resolutions"]))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--resolutions") from error
    warmup, repeats = DEFAULT_REPEATS[kind]
    warmup = options["warmup"] if options["warmup"] is not None else defaults.get("warmup", warmup)
    repeats = options["repeats"] if options["repeats"] is not None else defaults.get("repeats", repeats)
    if not backends or not cases or not sizes or not resolutions:
        raise click.UsageError("nothing to run: every backend, case, size or resolution given was rejected")
    return BenchConfig(device=device, backends=tuple(backends), explicit_backends=bool(options["backend"]),
                       cases=tuple(cases), explicit_cases=bool(options["case"]), sizes=sizes,
                       resolutions=resolutions, warmup=warmup, repeats=repeats, keep_going=options["keep_going"],
                       time_budget_s=DEFAULT_TIME_BUDGET_S[kind])


def common_options(function: Callable) -> Callable:
    """--out --backend --device --case --sizes --resolutions --warmup --repeats --keep-going."""
    options = [
        click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
                     show_default=True, help="Results folder; files go to <out>/<device slug>/."),
        click.option("--backend", default=None,
                     help=f"Comma-separated backends of {', '.join(KNOWN_BACKENDS)} [default: all; those that "
                          "cannot run here are recorded as skipped]. Naming one that cannot run is an error."),
        click.option("--device", default=None, help="cpu or cuda[:index] [default: cuda when available]."),
        click.option("--case", default=None,
                     help=f"Comma-separated cases of {', '.join(sorted(CASES))}, or fitted:/path/to/tracking/run."),
        click.option("--sizes", default=None, help="Comma-separated Gaussian counts, e.g. 10k,50k,1M."),
        click.option("--resolutions", default=None, help="Comma-separated 360p, 720p, 1080p or WxH."),
        click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed calls first."),
        click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed calls."),
        click.option("--keep-going", is_flag=True, help="Record failures as skips, run the rest, exit 1 at the end."),
        click.option("--merge", is_flag=True,
                     help="Keep the records of an existing results file that this run does not measure again."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _finish(benchmark: str, records: list[Record], config: BenchConfig, out: Path, extra_config: dict | None = None,
            merge: bool = False) -> Path:
    apply_targets(records)
    path = write_results(out, benchmark, records, config.device, {**config.as_dict(), **(extra_config or {})},
                         merge=merge)
    click.echo(f"\n{benchmark} on {device_slug(config.device)}:")
    click.echo(format_table(records))
    click.echo(f"wrote {path}")
    return path


def _exit_on_failures(state: RunState) -> None:
    if state.failures:
        raise click.ClickException(f"{len(state.failures)} failure(s):\n  " + "\n  ".join(state.failures))


def bench_command(function: Callable) -> Callable:
    """Turn BenchError (a failure without --keep-going) into a clear message and exit status 1."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BenchError as error:
            raise click.ClickException(str(error)) from error
    return wrapper


# ----------------------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Reproducible speed, memory and resource benchmarks of tritonsplat (and gsplat, when installed)."""
    keep_freed_memory()   # as the tracking command line does: CPU timings without page-fault churn


@cli.command()
@common_options
@bench_command
def render(**options) -> None:
    """Forward frames per second vs number of Gaussians and resolution, per backend."""
    config, records, state = _run_render(options)
    _finish("render", records, config, options["out"], merge=options["merge"])
    _exit_on_failures(state)


def _run_render(options: dict, defaults: dict | None = None):
    state = RunState(keep_going=options["keep_going"], echo=_progress)
    config = build_config("render", options, state, defaults)
    check_requested_backends(config, state)
    return config, run_render(config, state, _progress), state


@cli.command()
@common_options
@bench_command
def stages(**options) -> None:
    """Time per stage (forward and backward), intersections per Gaussian and ratios, peak memory."""
    config, records, state = _run_stages(options)
    _finish("stages", records, config, options["out"], merge=options["merge"])
    _exit_on_failures(state)


def _run_stages(options: dict, defaults: dict | None = None):
    state = RunState(keep_going=options["keep_going"], echo=_progress)
    config = build_config("stages", options, state, defaults)
    check_requested_backends(config, state, supported=("torch", "triton"))
    return config, run_stages(config, state, _progress), state


@cli.command()
@common_options
@click.option("--foreground", default=None,
              help="Comma-separated foreground Gaussian counts for the tracking step (KNN, rigidity losses) "
                   f"[default: {DEFAULT_FOREGROUND['cpu']} on CPU, {DEFAULT_FOREGROUND['cuda']} on CUDA].")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Camera-parallel step on N gloo processes (CPU): records allreduce_bytes, allreduce_ms, "
                   "render_ms and step_ms per step, one view per process.")
@bench_command
def step(foreground: str | None, world_size: int | None, **options) -> None:
    """One training step (forward + backward + Adam) and its parts; the tracking step's parts."""
    if world_size is not None:
        _distributed_step(world_size, options)
        return
    config, records, state, foreground_sizes = _run_step(options, foreground)
    _finish("step", records, config, options["out"], {"foreground": list(foreground_sizes)}, merge=options["merge"])
    _exit_on_failures(state)


def _run_step(options: dict, foreground: str | None, defaults: dict | None = None):
    state = RunState(keep_going=options["keep_going"], echo=_progress)
    config = build_config("step", options, state, defaults)
    check_requested_backends(config, state)
    kind = "cuda" if config.device.startswith("cuda") else "cpu"
    try:
        foreground_sizes = tuple(parse_size(s) for s in _split(foreground or DEFAULT_FOREGROUND[kind]))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--foreground") from error
    return config, run_step(config, state, foreground_sizes, _progress), state, foreground_sizes


def _distributed_step(world_size: int, options: dict) -> None:
    from .distributed_step import measure_distributed_step

    state = RunState(keep_going=options["keep_going"], echo=_progress)
    defaults = dict(sizes="50k", resolutions="360p", cases="random")
    config = build_config("step", {**options, "device": options["device"] or "cpu"}, state, defaults)
    if config.device != "cpu":
        raise click.BadParameter("the multi-process step runs on CPU with gloo here; on GPUs use torchrun",
                                 param_hint="--world-size")
    backend = options["backend"] or "torch"
    records = []
    for spec in config.cases:
        for size in config.sizes:
            for width, height in config.resolutions:
                _progress(f"step --world-size {world_size}: {spec} {size} {width}x{height}")
                record = measure_distributed_step(world_size, spec, size, width, height, backend=backend,
                                                  warmup=config.warmup, repeats=config.repeats)
                d = record.details
                _progress(f"  render {d['render_ms']:.1f} ms, all-reduce {d['allreduce_ms']:.2f} ms "
                          f"({d['allreduce_bytes'] / 1e6:.1f} MB), step {d['step_ms']:.1f} ms")
                records.append(record)
    _finish("step", records, config, options["out"], {"world_size": world_size}, merge=True)


@cli.command("cameras-per-step")
@click.argument("work", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Results folder; files go to <out>/<device slug>/.")
@click.option("--batches", default="1,2,4", show_default=True, help="Comma-separated views per step (B).")
@click.option("--lr-batch-scaling", type=click.Choice(["none", "sqrt"]), default="none", show_default=True)
@click.option("--steps-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="The B = 1 fit's steps as a multiple of the demo preset's.")
@click.option("--width", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--height", type=click.IntRange(min=8), default=48, show_default=True)
@click.option("--cameras", type=click.IntRange(min=3), default=8, show_default=True, help="Training cameras.")
@click.option("--test-cameras", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--frames", type=click.IntRange(min=2), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def cameras_per_step(work: Path, out: Path, batches: str, lr_batch_scaling: str, steps_scale: float, width: int,
                     height: int, cameras: int, test_cameras: int, frames: int, seed: int) -> None:
    """Held-out PSNR and MTE of fits with B views per step for 1/B of the steps (equal rendered views, about
    equal CPU time) on a small synthetic scene generated into WORK/data; fits go to WORK/b<B>-<rule>."""
    from . import cameras_per_step as cps
    from .harness import command_line, machine_info

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}",
                                 param_hint="--batches") from None
    if not sizes or min(sizes) < 1 or max(sizes) > cameras:
        raise click.BadParameter(f"expected view counts in 1..{cameras} (the training cameras), got {batches!r}",
                                 param_hint="--batches")
    rows = cps.run(work, sizes, width=width, height=height, cameras=cameras, test_cameras=test_cameras,
                   frames=frames, seed=seed, steps_scale=steps_scale, lr_batch_scaling=lr_batch_scaling,
                   progress=_progress)
    scene = {"width": width, "height": height, "cameras": cameras, "test_cameras": test_cameras, "frames": frames,
             "seed": seed}
    path = cps.write(out, rows, scene, command_line(), machine_info("cpu"))
    click.echo(cps.table(rows))
    click.echo(f"wrote {path}")


@cli.command("host")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=QUICK_OUT, show_default=True)
def host(out: Path) -> None:
    """Host reads and launches of a warm Triton render (forward, forward + backward, capacity mode),
    counted by the tests' counting rule through Triton's interpreter; writes <out>/host.json."""
    from . import host as host_report

    status = host_report.main(["--out", str(out)])
    if status:
        raise click.ClickException("a host budget is missed (see the table)")


@cli.command("compile-report")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Only names the results folder; no GPU is used.")
@click.option("--arch", "archs", type=click.Choice(["80", "90"]), multiple=True,
              help="Target architecture (sm_XX); repeatable [default: 80 and 90].")
def compile_report(out: Path, device: str, archs: tuple[str, ...]) -> None:
    """Ahead-of-time compile of every Triton kernel for sm_80 and sm_90: registers, spills, shared
    memory. Needs no GPU. Exits non-zero when any kernel spills."""
    device = resolve_device(device)
    architectures = tuple(int(a) for a in archs) or aot_report.ARCHITECTURES
    try:
        records = aot_report.run_compile_report(architectures, device=device)
    except aot_report.AotUnavailable as error:
        raise click.ClickException(str(error)) from error
    apply_targets(records)
    path = write_results(out, aot_report.BENCHMARK, records, device, {"archs": list(architectures)})
    click.echo(aot_report.format_compile_table(records))
    click.echo(f"wrote {path}")
    spilled = aot_report.spilling_kernels(records)
    if spilled:
        raise click.ClickException("register spills in " + "; ".join(spilled))


@cli.command()
@click.argument("source", type=click.Path(path_type=Path), default=DEFAULT_OUT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs [default: beside each device's JSON].")
def plot(source: Path, out: Path | None) -> None:
    """JSON results (a file, or a folder searched recursively) -> PNG plots per device."""
    try:
        written = plot_results(source, out)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    for path in written:
        click.echo(f"wrote {path}")


@cli.command("gpu-check")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Results folder; files go to <out>/<device slug>/.")
@bench_command
def gpu_check(out: Path) -> None:
    """On a CUDA machine, in under 8 minutes: pytest -m gpu, render and step at 300k Gaussians 640x360 for
    triton and gsplat, intersection statistics; results to <out>/<device slug>/."""
    from .gpu_check import GpuCheckUnavailable, run_gpu_check

    def options(grid: dict) -> dict:
        import importlib.util
        backends = "triton,gsplat" if importlib.util.find_spec("gsplat") is not None else "triton"
        return dict(out=out, backend=backends, device="cuda", case=grid["case"], sizes=grid["sizes"],
                    resolutions=grid["resolutions"], warmup=None, repeats=None, keep_going=True, merge=True)

    def render_part(grid: dict) -> list:
        config, records, _ = _run_render(options(grid))
        _finish("render", records, config, out, {"gpu_check": True}, merge=True)
        return records

    def step_part(grid: dict) -> list:
        config, records, _, sizes = _run_step(options(grid), None)
        _finish("step", records, config, out, {"gpu_check": True, "foreground": list(sizes)}, merge=True)
        return records

    try:
        from .gpu_check import GPU_CHECK_RESOLUTION, GPU_CHECK_SIZE
        width, height = parse_resolution(GPU_CHECK_RESOLUTION)
        run_gpu_check(out, render_part, step_part, parse_size(GPU_CHECK_SIZE), width, height,
                      echo=lambda message: click.echo(message, err=True))
    except GpuCheckUnavailable as error:
        raise click.ClickException(str(error)) from error


@cli.command("all")
@common_options
@click.option("--quick", is_flag=True, help="CPU smoke run of everything in under 2 minutes on 2 cores.")
@click.option("--foreground", default=None, help="Foreground sizes for the tracking step (see `step`).")
@click.option("--compile-timeout", type=float, default=None,
              help="Seconds allowed for compile-report [default: what is left of the 2-minute budget with "
                   "--quick, else 1800].")
@bench_command
def all_benchmarks(quick: bool, foreground: str | None, compile_timeout: float | None, **options) -> None:
    """render, stages, step, compile-report and plot in one run (--quick: the CPU smoke run)."""
    started = time.perf_counter()
    if quick:
        if options["out"] == DEFAULT_OUT:
            options["out"] = QUICK_OUT
        options["warmup"] = QUICK["warmup"] if options["warmup"] is None else options["warmup"]
        options["repeats"] = QUICK["repeats"] if options["repeats"] is None else options["repeats"]
        foreground = foreground or QUICK["foreground"]
    everything: list[Record] = []
    failures: list[str] = []
    config = None
    for name, run in (("render", _run_render), ("stages", _run_stages), ("step", _run_step)):
        click.echo(f"== {name}", err=True)
        records: list[Record] = []
        grids = QUICK[name] if quick else [None]
        if any(options[key] for key in ("case", "sizes", "resolutions")):
            grids = grids[:1]       # the command line replaces the quick grids; run it once
        for defaults in grids:
            if name == "step":
                config, grid_records, state, sizes = run(options, foreground, defaults)
                extra = {"foreground": list(sizes)}
            else:
                config, grid_records, state = run(options, defaults)
                extra = {}
            records += grid_records
            failures += state.failures
        _finish(name, records, config, options["out"], {**extra, "quick": quick, "grids": grids},
                merge=options["merge"])
        everything += records
    click.echo("== compile-report", err=True)
    if compile_timeout is None:
        remaining = QUICK["budget_s"] - (time.perf_counter() - started)
        compile_timeout = max(QUICK["min_compile_s"], remaining) if quick else 1800.0
    everything += _compile_report_for_all(options["out"], config, compile_timeout, failures, options["keep_going"])
    click.echo("== plot", err=True)
    for path in plot_results(options["out"] / device_slug(config.device)):
        click.echo(f"wrote {path}")
    click.echo("\ntargets:")
    click.echo(format_summary(everything))
    click.echo(f"all{' --quick' if quick else ''}: {time.perf_counter() - started:.0f} s")
    if failures:
        raise click.ClickException(f"{len(failures)} failure(s):\n  " + "\n  ".join(failures))


def _compile_report_for_all(out: Path, config: BenchConfig, timeout_s: float, failures: list[str],
                            keep_going: bool) -> list[Record]:
    """compile-report in a time-limited subprocess; unavailable AOT module or timeout -> a skip record."""
    path = out / device_slug(config.device) / f"{aot_report.BENCHMARK}.json"
    before = path.stat().st_mtime if path.exists() else None
    status, output = aot_report.run_in_subprocess(out, config.device, timeout_s)
    fresh = path.exists() and path.stat().st_mtime != before
    if status is not None and fresh:
        click.echo(output.rstrip())
        return [record_from_json(r) for r in load_results(path)]
    if status is None:
        reason = f"compile-report did not finish within {timeout_s:.0f} s (stopped)"
    elif "AOT module is unavailable" in output:
        reason = output.strip().splitlines()[-1].removeprefix("Error: ")
    else:
        message = f"compile-report failed (exit {status}): {output.strip()[-500:]}"
        if not keep_going:
            raise click.ClickException(message)
        failures.append(message)
        reason = f"error: {message}"
    click.echo(f"compile-report skipped: {reason}", err=True)
    records = [skip_record(aot_report.BENCHMARK, aot_report.METRIC, "all kernels", "triton", config, reason)]
    apply_targets(records)
    write_results(out, aot_report.BENCHMARK, records, config.device, {"skipped": reason})
    return records


def main() -> None:
    cli(prog_name="python -m bench")
