"""The timing harness (on a fake clock), stage timers, peak memory, JSON writing and the targets."""

import json
import time

import numpy as np
import pytest
import torch

from bench import harness
from bench.harness import (
    PeakMemory,
    Record,
    StageTimer,
    Timing,
    load_results,
    machine_info,
    measure_peak_memory,
    percentile,
    record_from_json,
    time_function,
    time_parts,
    write_json_atomic,
    write_results,
)
from bench.targets import apply_targets, format_summary, format_table, target_summary


class FakeClock:
    """perf_counter replacement: each fake call advances time by the next scripted duration (ms)."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def work(self, milliseconds):
        self.now += milliseconds / 1000.0


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock.perf_counter)
    return clock


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [5.0, 1.0, 3.0, 2.0, 4.0], list(np.linspace(0, 1, 17) ** 2)])
@pytest.mark.parametrize("q", [0, 20, 50, 80, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_time_function_warms_up_then_reports_percentiles(fake_clock):
    durations = iter([50.0, 40.0, 5.0, 1.0, 3.0, 2.0, 4.0])     # two warm-up calls, then five timed

    def fake_work():
        fake_clock.work(next(durations))

    timing = time_function(fake_work, warmup=2, repeats=5)
    assert timing.samples_ms == pytest.approx((5.0, 1.0, 3.0, 2.0, 4.0))
    assert (timing.p20_ms, timing.p50_ms, timing.p80_ms) == pytest.approx((1.8, 3.0, 4.2))
    assert timing.fps == pytest.approx(1000.0 / 3.0)


def test_time_parts_times_each_part_and_setup_is_untimed(fake_clock):
    timing, parts = time_parts([("forward", lambda: fake_clock.work(10)), ("backward", lambda: fake_clock.work(20))],
                               warmup=1, repeats=3, setup=lambda: fake_clock.work(1000))
    assert timing.samples_ms == pytest.approx((30.0,) * 3)
    assert parts["forward"].p50_ms == pytest.approx(10.0) and parts["backward"].p50_ms == pytest.approx(20.0)


def test_time_budget_limits_warmup_and_repeats(fake_clock, monkeypatch):
    monkeypatch.setattr(harness, "_wall_clock", fake_clock.perf_counter)
    calls = []

    def fake_work():
        calls.append(1)
        fake_clock.work(20.0)

    timing = time_function(fake_work, warmup=10, repeats=50, budget_s=0.1)
    # Warm-up stops once a quarter of the budget (25 ms) has passed: 2 calls; repeats once 100 ms have: 6.
    assert len(timing.samples_ms) == 6 and len(calls) == 8
    assert len(time_function(lambda: fake_clock.work(500.0), repeats=50, budget_s=0.1).samples_ms) == 3


def test_time_parts_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_parts([("x", lambda: None)], repeats=0)


def test_stage_timer_sums_repeated_stages_per_run(fake_clock):
    timer = StageTimer("cpu")
    for run in range(2):
        if run:
            timer.next_run()
        with timer.stage("projection"):
            fake_clock.work(2)
        for _ in range(3):
            with timer.stage("compositing"):
                fake_clock.work(1 + run)
    assert timer.runs() == [pytest.approx({"projection": 2.0, "compositing": 3.0}),
                            pytest.approx({"projection": 2.0, "compositing": 6.0})]


def test_stage_timer_with_tritonsplat_hooks_records_only_exposed_stages():
    from tritonsplat import profiling

    timer = StageTimer("cpu")
    with profiling.record(timer), profiling.stage("projection"):
        pass
    (run,) = timer.runs()
    assert set(run) == {"projection"} and run["projection"] >= 0


def test_peak_memory_on_cpu_sees_a_large_allocation():
    with measure_peak_memory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)            # 64 MiB, touched
        time.sleep(0.02)
        del block
    assert peak.kind in harness.MEMORY_KINDS
    if peak.kind == "cpu_peak_rss_delta":
        assert peak.bytes >= 48 * 2**20, peak


def test_machine_info_has_versions_and_commit():
    info = machine_info("cpu")
    for key in ("device_name", "device_slug", "driver", "torch", "triton", "python", "git_commit", "cpu_count"):
        assert key in info, key
    assert info["device_slug"].startswith("cpu-") and info["torch"] == torch.__version__
    # The vector ISA distinguishes CPUs that share a model name (and differ ~2x in torch timings).
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": float("nan"), "y": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def _record(**overrides) -> Record:
    fields = dict(benchmark="step", metric="forward_backward", case="random", backend="torch", device="cpu",
                  n_gaussians=50_000, width=640, height=360, timing=Timing((1500.0, 1400.0, 1600.0)),
                  peak_memory=PeakMemory(2**20, "cpu_peak_rss_delta"))
    fields.update(overrides)
    return Record(**fields)


def test_targets_pass_miss_and_not_measured_here():
    passing = _record()
    missing = _record(timing=Timing((2500.0,)), n_gaussians=50_000, case="original")
    other_size = _record(n_gaussians=10_000)
    on_gpu_target = _record(backend="triton", n_gaussians=300_000)
    render = _record(benchmark="render", metric="forward", backend="triton", n_gaussians=300_000)
    skipped = _record(backend="gsplat", timing=None, skipped="gsplat needs a CUDA device")
    records = [passing, missing, other_size, on_gpu_target, render, skipped]
    apply_targets(records)
    assert passing.meets_target is True and passing.target_status.startswith("PASS")
    assert missing.meets_target is False and "gap 1.25x" in missing.target_status
    assert other_size.meets_target is None and "50k" in other_size.target_status
    assert on_gpu_target.meets_target is None and "not measured on this device" in on_gpu_target.target_status
    assert render.meets_target is None and "not measured on this device" in render.target_status
    assert skipped.target_status.startswith("N/A: skipped")
    table = format_table(records)
    assert "PASS" in table and "MISS" in table and "N/A" in table
    summary = format_summary(records)
    assert "2 s at 50k" in summary and "MISS" in summary


def test_intersection_target_reads_the_report():
    record = _record(benchmark="stages", n_gaussians=10_000, details={"intersections": {"ellipse_over_exact": 1.003}})
    apply_targets([record])
    assert record.meets_target is True and record.target["id"] == "intersections"


def test_stage_records_get_the_torch_cpu_targets_and_the_intersection_target():
    """The tile compositor's targets (2 CPU cores): each with its case, size and resolution, beside the
    intersection target of every stages record; one miss fails the record."""
    report = {"intersections": {"ellipse_over_exact": 1.002}}

    def stage(case, n, size, ms):
        return _record(benchmark="stages", case=case, n_gaussians=n, width=size[0], height=size[1],
                       timing=Timing((ms,)), details=dict(report))

    early = stage("basketball-early:/data/basketball", 8441, (160, 90), 44.0)
    run = stage("fitted:runs/bb", 32_744, (160, 90), 79.6)
    fitted = stage("fitted", 50_000, (640, 360), 252.0)
    random_scene = stage("random", 50_000, (640, 360), 215.0)
    fitted_small = stage("fitted", 10_000, (640, 360), 90.0)
    fitted_tiny = stage("fitted", 10_000, (160, 90), 90.0)   # the synth-derived case, not a run
    records = [early, run, fitted, random_scene, fitted_small, fitted_tiny]
    apply_targets(records)
    ids = [[t["id"] for t in r.details.get("targets", [])] for r in records]
    assert ids[:4] == [["torch_cpu_basketball_early", "intersections"], ["torch_cpu_fitted_run", "intersections"],
                       ["torch_cpu_fitted", "intersections"], ["torch_cpu_random", "intersections"]]
    assert early.meets_target is True and early.target_status.startswith("PASS: 44 ms <= 50 ms; PASS: ellipse")
    assert run.meets_target is False and "gap 1.59x" in run.target_status and "PASS: ellipse" in run.target_status
    assert fitted.meets_target is True and random_scene.meets_target is False
    # The plain `fitted` case at another size: no time target applies, the intersection target does.
    assert fitted_small.target["id"] == "intersections" and fitted_small.meets_target is True
    assert fitted_tiny.target["id"] == "intersections" and fitted_tiny.meets_target is True
    summary = dict(target_summary(records))
    assert summary[next(t for t in summary if "basketball-early" in t)].startswith("PASS")
    assert summary[next(t for t in summary if "fitted:RUN" in t)].startswith("MISS")


def test_records_round_trip_through_json(tmp_path):
    records = [_record(details={"a": 1}), _record(backend="gsplat", timing=None, skipped="no CUDA")]
    apply_targets(records)
    path = write_results(tmp_path, "step", records, "cpu", {"repeats": 3})
    payload = json.loads(path.read_text())
    assert path.parent.name == machine_info("cpu")["device_slug"]
    assert payload["benchmark"] == "step" and payload["config"] == {"repeats": 3}
    loaded = load_results(tmp_path)
    assert loaded[1]["skipped"] == "no CUDA" and "skipped" not in loaded[0]
    again = record_from_json(loaded[0])
    assert again.timing.p50_ms == records[0].timing.p50_ms and again.meets_target == records[0].meets_target


def test_merge_keeps_records_not_measured_again(tmp_path):
    first = [_record(n_gaussians=10_000), _record(n_gaussians=50_000)]
    write_results(tmp_path, "step", first, "cpu", {"run": 1})
    again = [_record(n_gaussians=50_000, timing=Timing((900.0,)))]
    path = write_results(tmp_path, "step", again, "cpu", {"run": 2}, merge=True)
    payload = json.loads(path.read_text())
    assert [(r["n_gaussians"], r["p50_ms"]) for r in payload["records"]] == [(10_000, 1500.0), (50_000, 900.0)]
    assert payload["config"] == {"run": 2} and payload["earlier_configs"] == [{"run": 1}]
    path = write_results(tmp_path, "step", again, "cpu", {"run": 3})
    assert len(json.loads(path.read_text())["records"]) == 1
