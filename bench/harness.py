"""The one timing harness of `bench`: warm-up and repeats, percentiles, stage timers, peak memory,
machine information and the JSON writer.

Timing method: `warmup` untimed calls, then `repeats` timed calls; each record keeps the
median and the 20th/80th percentiles (linear interpolation, as numpy.percentile) in milliseconds.
On CUDA every call is bracketed by CUDA events on the current stream and read after one
synchronisation; elsewhere by `time.perf_counter` (with `torch.cuda.synchronize` before reading the
clock if the work is on a GPU anyway).

Peak memory is measured in one extra, untimed call (a sampling thread would perturb the timings on
a 2-core machine) and labelled by how it was measured, see `MEMORY_KINDS`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]

# How `peak_memory_bytes` was obtained; stored as `memory_kind` beside it.
MEMORY_KINDS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated() during the call minus the allocation "
                                 "before it (tensors held by the caching allocator, not the process)",
    "cpu_peak_rss_delta": "peak resident set size of the whole process during the call (sampled every "
                          "millisecond from /proc/self/statm or psutil) minus the RSS before it, after "
                          "malloc_trim(0) returned freed heap pages to the system (glibc)",
    "cpu_ru_maxrss_delta": "growth of the process's lifetime RSS high-water mark (getrusage ru_maxrss); "
                           "0 when an earlier call already used more",
}


# ----------------------------------------------------------------------------- percentiles, timing
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile: expected at least one value, got none")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Timing:
    """Repeated-run statistics of one timed quantity, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def p20_ms(self) -> float:
        return percentile(self.samples_ms, 20)

    @property
    def p50_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p80_ms(self) -> float:
        return percentile(self.samples_ms, 80)

    @property
    def fps(self) -> float:
        """Calls per second at the median."""
        return 1000.0 / self.p50_ms if self.p50_ms > 0 else math.inf

    def as_dict(self) -> dict:
        return {"p20_ms": self.p20_ms, "p50_ms": self.p50_ms, "p80_ms": self.p80_ms, "fps": self.fps,
                "samples_ms": list(self.samples_ms)}


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on `device` (a no-op on CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class _Clock:
    """Marks points in time on `device` and reads the elapsed milliseconds between them afterwards.

    CUDA: one event per mark, read after a single synchronisation. Otherwise perf_counter.
    """

    def __init__(self, device: torch.device | str, cuda_events: bool | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" if cuda_events is None else cuda_events

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def finish(self) -> None:
        synchronize(self.device)


MIN_REPEATS_WITHIN_BUDGET = 3


def time_parts(parts: Sequence[tuple[str, Callable[[], object]]], *, device: torch.device | str = "cpu",
               warmup: int = 1, repeats: int = 5, setup: Callable[[], object] | None = None,
               budget_s: float | None = None) -> tuple[Timing, dict[str, Timing]]:
    """Time a sequence of named callables run in order (e.g. forward, backward, optimizer step).

    Each repeat calls `setup()` (untimed, if given) and then every part, marking the clock between
    parts. With `budget_s`, warm-up stops after a quarter of the budget (one call at least) and
    repeats stop once the budget is spent (after MIN_REPEATS_WITHIN_BUDGET at least), so slow grid
    points do not take 60 calls; the number of samples says how many ran.
    Returns the timing of the whole sequence and of each part.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats >= 1 and warmup >= 0 expected, got repeats={repeats}, warmup={warmup}")
    clock = _Clock(device)
    started = _wall_clock()
    for index in range(warmup):
        if index and budget_s is not None and _wall_clock() - started > budget_s / 4:
            break
        if setup is not None:
            setup()
        for _, part in parts:
            part()
        synchronize(device)
    started = _wall_clock()
    totals: list[float] = []
    per_part: dict[str, list[float]] = {name: [] for name, _ in parts}
    for index in range(repeats):
        if (budget_s is not None and index >= MIN_REPEATS_WITHIN_BUDGET
                and _wall_clock() - started > budget_s):
            break
        if setup is not None:
            setup()
            synchronize(device)
        marks = [clock.mark()]
        for _, part in parts:
            part()
            if not clock.cuda:
                synchronize(device)
            marks.append(clock.mark())
        clock.finish()
        for (name, _), start, end in zip(parts, marks[:-1], marks[1:]):
            per_part[name].append(clock.elapsed_ms(start, end))
        totals.append(clock.elapsed_ms(marks[0], marks[-1]))
    return Timing(tuple(totals)), {name: Timing(tuple(values)) for name, values in per_part.items()}


def time_function(function: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 1,
                  repeats: int = 5, setup: Callable[[], object] | None = None, budget_s: float | None = None
                  ) -> Timing:
    """Time one callable: `warmup` untimed calls, then `repeats` timed ones (see `time_parts`)."""
    total, _ = time_parts([("call", function)], device=device, warmup=warmup, repeats=repeats, setup=setup,
                          budget_s=budget_s)
    return total


def _wall_clock() -> float:
    # Separate from the measured clock (time.perf_counter), so tests can fake one without the other.
    return time.monotonic()


# ----------------------------------------------------------------------------- stage timers
class StageTimer:
    """Collects per-stage durations for `tritonsplat.profiling.record(timer)`.

    `stage(name)` returns a context manager; durations of a stage entered several times within one
    run are summed. Call `next_run()` between runs, `runs()` at the end. Thread-safe: the torch
    backend's backward stages may run on autograd's worker thread.
    """

    def __init__(self, device: torch.device | str = "cpu", cuda_events: bool | None = None):
        self.clock = _Clock(device, cuda_events)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, object, object]] = []
        self._run = 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.clock.cuda:
            synchronize(self.clock.device)
        start = self.clock.mark()
        try:
            yield
        finally:
            if not self.clock.cuda:
                synchronize(self.clock.device)
            end = self.clock.mark()
            with self._lock:
                self._pending.append((self._run, name, start, end))

    def next_run(self) -> None:
        with self._lock:
            self._run += 1

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self._run = 0

    def runs(self) -> list[dict[str, float]]:
        """Per run, {stage: total milliseconds}; stages that never ran are absent."""
        self.clock.finish()
        runs: list[dict[str, float]] = [{} for _ in range(self._run + 1)]
        for run, name, start, end in self._pending:
            runs[run][name] = runs[run].get(name, 0.0) + self.clock.elapsed_ms(start, end)
        return [run for run in runs if run] or [{}]


def cpu_stage_timer(device: torch.device | str = "cpu") -> StageTimer:
    """perf_counter stage timer (with torch.cuda.synchronize around stages when `device` is CUDA)."""
    return StageTimer(device, cuda_events=False)


def cuda_event_stage_timer(device: torch.device | str = "cuda") -> StageTimer:
    """CUDA-event stage timer: no synchronisation inside the run, events read at the end."""
    if not is_cuda(device):
        raise ValueError(f"cuda_event_stage_timer: expected a CUDA device, got {device}")
    return StageTimer(device, cuda_events=True)


def stage_timer_for(device: torch.device | str) -> StageTimer:
    """CUDA events on CUDA, perf_counter elsewhere."""
    return cuda_event_stage_timer(device) if is_cuda(device) else cpu_stage_timer(device)


# ----------------------------------------------------------------------------- peak memory
def _current_rss_bytes() -> int | None:
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None elsewhere. Without it, memory freed by earlier calls stays in
    the heap and a repeated call's RSS barely grows, hiding its real peak."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def _ru_maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


@dataclass
class PeakMemory:
    """Result of `measure_peak_memory`: bytes and how they were measured (a key of MEMORY_KINDS)."""

    bytes: int | None = None
    kind: str | None = None


@contextlib.contextmanager
def measure_peak_memory(device: torch.device | str, interval_s: float = 0.001) -> Iterator[PeakMemory]:
    """Peak memory used by the block (see MEMORY_KINDS for what each device reports)."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result.bytes = int(torch.cuda.max_memory_allocated(device) - before)
        result.kind = "cuda_max_memory_allocated"
        return
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim()
    before = _current_rss_bytes()
    if before is None:
        high_water = _ru_maxrss_bytes()
        yield result
        result.bytes = max(0, _ru_maxrss_bytes() - high_water)
        result.kind = "cpu_ru_maxrss_delta"
        return
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = _current_rss_bytes()
            if rss is not None and rss > peak[0]:
                peak[0] = rss
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, name="bench-rss-sampler", daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        after = _current_rss_bytes() or before
        result.bytes = max(0, max(peak[0], after) - before)
        result.kind = "cpu_peak_rss_delta"


# ----------------------------------------------------------------------------- machine information
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_capability() -> str | None:
    with contextlib.suppress(AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability()
    return None


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as version:
            match = re.search(r"Kernel Module\s+([0-9.]+)", version.read())
            if match:
                return match.group(1)
    except OSError:
        pass
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10)
        if completed.returncode == 0 and completed.stdout.strip():
            return completed.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """`git rev-parse HEAD` of the checkout (with "+dirty" when tracked files changed), else "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return os.environ.get("GIT_COMMIT", "unknown")
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, capture_output=True,
                               timeout=10)
        return commit + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=8)
def _machine_info_cached(device_key: str) -> tuple:
    device = torch.device(device_key)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = properties.name
        info = {
            "device_name": name,
            "device_slug": _slug(name),
            "device_type": "cuda",
            "driver": _nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "gpu_memory_bytes": int(properties.total_memory),
            "compute_capability": f"sm_{properties.major}{properties.minor}",
        }
    else:
        name = _cpu_model()
        info = {
            "device_name": name,
            "device_slug": "cpu-" + _slug(name),
            "device_type": device.type,
            "driver": None,
        }
    info.update({
        "cpu_model": _cpu_model(),
        # The vector ISA torch's CPU kernels use ("AVX512", "AVX2", ...): two machines both named "AMD EPYC"
        # differed 1.7-2x in the torch backend's timings (2026-12-02), the slower one AVX2-only.
        "cpu_capability": _cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "keep_freed_memory": _keeps_freed_memory(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "tritonsplat": _package_version("tritonsplat"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    })
    return tuple(sorted(info.items()))


def _keeps_freed_memory() -> bool:
    """Whether `tritonsplat.cpu_memory.keep_freed_memory` is in effect (CPU timings depend on it)."""
    from tritonsplat import cpu_memory

    return cpu_memory.in_effect()


def machine_info(device: torch.device | str) -> dict:
    """Device name and slug, driver, torch/triton/python versions, CPU, git commit (cached), and the
    system load average now (other processes on a shared machine distort CPU timings)."""
    info = dict(_machine_info_cached(str(torch.device(device))))
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1m_5m_15m"] = [round(value, 2) for value in os.getloadavg()]
    return info


def device_slug(device: torch.device | str) -> str:
    """Folder name of a device's results, e.g. "cpu-amd-epyc" or "nvidia-h100-80gb-hbm3"."""
    return machine_info(device)["device_slug"]


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- records and JSON
RECORD_KEYS = ("benchmark", "metric", "case", "backend", "device", "n_gaussians", "width", "height",
               "p20_ms", "p50_ms", "p80_ms", "fps", "n_intersections", "peak_memory_bytes", "memory_kind",
               "target", "meets_target", "target_status", "machine")


@dataclass
class Record:
    """One measurement (or one skip). `to_json()` gives the documented schema (bench/README.md)."""

    benchmark: str
    metric: str
    case: str
    backend: str
    device: str
    n_gaussians: int | None = None
    width: int | None = None
    height: int | None = None
    timing: Timing | None = None
    n_intersections: int | None = None
    peak_memory: PeakMemory | None = None
    skipped: str | None = None
    details: dict = field(default_factory=dict)
    warmup: int | None = None
    repeats: int | None = None
    target: dict | None = None
    meets_target: bool | None = None
    target_status: str | None = None
    load_average_1m: float | None = field(default_factory=lambda: _load_average_1m())

    def to_json(self, machine: dict) -> dict:
        timing = self.timing.as_dict() if self.timing is not None else {}
        record = {
            "schema_version": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            "metric": self.metric,
            "case": self.case,
            "backend": self.backend,
            "device": self.device,
            "n_gaussians": self.n_gaussians,
            "width": self.width,
            "height": self.height,
            "p20_ms": timing.get("p20_ms"),
            "p50_ms": timing.get("p50_ms"),
            "p80_ms": timing.get("p80_ms"),
            "fps": timing.get("fps"),
            "samples_ms": timing.get("samples_ms"),
            "warmup": self.warmup,
            "repeats": len(self.timing.samples_ms) if self.timing is not None else self.repeats,
            "n_intersections": self.n_intersections,
            "peak_memory_bytes": self.peak_memory.bytes if self.peak_memory else None,
            "memory_kind": self.peak_memory.kind if self.peak_memory else None,
            "target": self.target,
            "meets_target": self.meets_target,
            "target_status": self.target_status,
            "load_average_1m": self.load_average_1m,
            "details": _json_safe(self.details),
            "machine": machine,
        }
        if self.skipped is not None:
            record["skipped"] = self.skipped
        return record


def _load_average_1m() -> float | None:
    """The system's 1-minute load average when a record is made (None where unknown): on a shared
    machine, CPU timings taken at a load above the core count are not comparable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _json_safe(value):
    """Replace non-finite floats (not valid JSON) by None and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path | str, payload) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(_json_safe(payload), stream, indent=1, allow_nan=False)
            stream.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)     # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def record_key(record: dict) -> tuple:
    """What a record measured: two records with the same key are the same measurement."""
    return tuple(record.get(k) for k in ("benchmark", "metric", "case", "backend", "device", "n_gaussians", "width",
                                         "height"))


def command_line() -> str:
    """This process's command line as a shell command: `python -m bench ...` for the bench CLI."""
    argv = sys.argv or [""]
    first = Path(argv[0])
    if first.name == "__main__.py":             # python -m <package> ...
        return shlex.join(["python", "-m", first.parent.name, *argv[1:]])
    return shlex.join([first.name or "python", *argv[1:]])


def write_results(out_dir: Path | str, benchmark: str, records: Sequence[Record], device: torch.device | str,
                  config: dict | None = None, merge: bool = False, how: str | None = None) -> Path:
    """Write `<out_dir>/<device slug>/<benchmark>.json` ({"schema_version", "benchmark", "created",
    "how", "config", "machine", "records"}) and return its path.

    `how` (default: this process's command line) says how the file and each of its new records were
    made; every record keeps its own, so merged files say how each part was made.

    With `merge`, records of an existing file that this run did not measure again (by `record_key`)
    are kept after the new ones, and the earlier configs are kept under "earlier_configs"; each record
    has its own "created" time, and ratios only ever compare records of one run.
    """
    machine = machine_info(device)
    created = now_utc()
    how = command_line() if how is None else how
    new_records = [{**record.to_json(machine), "created": created, "how": how} for record in records]
    path = Path(out_dir) / machine["device_slug"] / f"{benchmark}.json"
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "created": created,
        "how": how,
        "config": config or {},
        "machine": machine,
        "records": new_records,
    }
    if merge and path.exists():
        with open(path) as stream:
            existing = json.load(stream)
        if existing.get("schema_version") == SCHEMA_VERSION:
            # Re-measured records take their old place; the rest of the new ones follow.
            by_key = {record_key(r): r for r in new_records}
            merged = [by_key.pop(record_key(r), r) for r in existing.get("records", [])]
            payload["records"] = merged + [r for r in new_records if record_key(r) in by_key]
            payload["earlier_configs"] = [existing.get("config", {}), *existing.get("earlier_configs", [])]
    return write_json_atomic(path, payload)


def load_results(path: Path | str) -> list[dict]:
    """All records of one results file or of every *.json below a folder."""
    path = Path(path)
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    records: list[dict] = []
    for file in files:
        with open(file) as stream:
            payload = json.load(stream)
        if isinstance(payload, dict) and "records" in payload:
            records.extend(payload["records"])
    return records


def record_from_json(data: dict) -> Record:
    """Inverse of `Record.to_json` (the machine block is dropped)."""
    samples = data.get("samples_ms")
    peak = None
    if data.get("peak_memory_bytes") is not None or data.get("memory_kind") is not None:
        peak = PeakMemory(data.get("peak_memory_bytes"), data.get("memory_kind"))
    return Record(benchmark=data["benchmark"], metric=data["metric"], case=data["case"], backend=data["backend"],
                  device=data["device"], n_gaussians=data.get("n_gaussians"), width=data.get("width"),
                  height=data.get("height"), timing=Timing(tuple(samples)) if samples else None,
                  n_intersections=data.get("n_intersections"), peak_memory=peak, skipped=data.get("skipped"),
                  details=dict(data.get("details") or {}), warmup=data.get("warmup"), repeats=data.get("repeats"),
                  target=data.get("target"), meets_target=data.get("meets_target"),
                  target_status=data.get("target_status"), load_average_1m=data.get("load_average_1m"))
