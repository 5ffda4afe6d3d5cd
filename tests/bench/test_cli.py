"""`python -m bench` end to end on tiny scenes: JSON schema, bad input, plots, all --quick."""

import json

import pytest
from click.testing import CliRunner

from bench import cli as bench_cli
from bench import compile_report as aot_report
from bench.harness import machine_info

TINY = ["--sizes", "300", "--resolutions", "64x48", "--warmup", "0", "--repeats", "2"]
RECORD_KEYS = {"benchmark", "metric", "case", "backend", "device", "n_gaussians", "width", "height", "p20_ms",
               "p50_ms", "p80_ms", "fps", "n_intersections", "peak_memory_bytes", "memory_kind", "target",
               "meets_target", "target_status", "machine", "samples_ms", "details", "schema_version"}
MACHINE_KEYS = {"device_name", "driver", "torch", "triton", "git_commit"}


def invoke(*args):
    return CliRunner().invoke(bench_cli.cli, [str(a) for a in args], catch_exceptions=False)


def results(out, benchmark):
    path = out / machine_info("cpu")["device_slug"] / f"{benchmark}.json"
    return json.loads(path.read_text())


def test_render_writes_records_with_the_documented_schema(tmp_path):
    result = invoke("render", "--device", "cpu", "--case", "random", "--out", tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    payload = results(tmp_path, "render")
    records = {r["backend"]: r for r in payload["records"]}
    assert set(records) == {"torch", "triton", "gsplat"}
    for record in records.values():
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert MACHINE_KEYS <= set(record["machine"])
    torch_record = records["torch"]
    assert torch_record["p20_ms"] <= torch_record["p50_ms"] <= torch_record["p80_ms"]
    assert torch_record["fps"] == pytest.approx(1000 / torch_record["p50_ms"])
    assert (torch_record["n_gaussians"], torch_record["width"], torch_record["height"]) == (300, 64, 48)
    assert torch_record["n_intersections"] > 0 and len(torch_record["samples_ms"]) == 2
    assert "interpreter is for tests" in records["triton"]["skipped"]
    assert "CUDA" in records["gsplat"]["skipped"]
    assert "N/A" in result.output and "skipped" in result.output


def test_stages_and_step_smoke(tmp_path):
    result = invoke("stages", "--device", "cpu", "--case", "random", "--backend", "torch", "--out", tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    (record,) = results(tmp_path, "stages")["records"]
    assert "compositing" in record["details"]["stages"]
    assert record["details"]["intersections"]["ellipse_over_exact"] >= 1.0
    assert record["meets_target"] is not None

    result = invoke("step", "--device", "cpu", "--case", "random", "--backend", "torch", "--foreground", "200",
                    "--out", tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    records = results(tmp_path, "step")["records"]
    metrics = {r["metric"] for r in records}
    assert {"training_step", "forward_backward", "knn", "rigidity_losses", "tracking_step"} <= metrics
    step = next(r for r in records if r["metric"] == "training_step")
    assert set(step["details"]["parts"]) == {"forward", "backward", "adam"}


@pytest.mark.parametrize("option, value, message", [
    ("--backend", "cuda_magic", "unknown backend 'cuda_magic'"),
    ("--device", "tpu", "tpu"),
    ("--case", "nonexistent", "nonexistent"),
    ("--sizes", "ten", "50k"),
    ("--resolutions", "4k", "WxH"),
])
def test_bad_input_exits_non_zero_naming_the_option(tmp_path, option, value, message):
    result = CliRunner().invoke(bench_cli.cli, ["render", "--out", str(tmp_path), *TINY, option, value])
    assert result.exit_code == 2
    assert option in result.output and message in result.output
    assert not (tmp_path / machine_info("cpu")["device_slug"] / "render.json").exists()


def test_unavailable_backend_fails_unless_keep_going(tmp_path):
    result = CliRunner().invoke(bench_cli.cli, ["render", "--device", "cpu", "--backend", "triton", "--case", "random",
                                                "--out", str(tmp_path), *TINY])
    assert result.exit_code == 1
    assert "triton" in result.output and "no CUDA device" in result.output

    result = CliRunner().invoke(bench_cli.cli, ["render", "--device", "cpu", "--backend", "torch,triton,bogus",
                                                "--case", "random", "--keep-going", "--out", str(tmp_path), *TINY])
    assert result.exit_code == 1, result.output
    assert "2 failure(s)" in result.output and "bogus" in result.output
    records = {r["backend"]: r for r in results(tmp_path, "render")["records"]}
    assert records["torch"]["p50_ms"] > 0 and "skipped" in records["triton"]


def fake_aot(rows):
    def compile_report(archs=(80, 90)):
        return [dict(row, arch=f"sm_{arch}") for row in rows for arch in archs]
    return lambda: compile_report


ROW = {"kernel": "_composite_forward_kernel", "registers": 96, "spilled_bytes": 0, "shared_memory_bytes": 8192,
       "num_warps": 4, "config": "TILE=16"}


def test_compile_report_without_aot_module_fails_clearly(tmp_path, monkeypatch):
    def unavailable():
        raise aot_report.AotUnavailable("the AOT module is unavailable: tritonsplat.aot does not import")
    monkeypatch.setattr(aot_report, "load_compile_report", unavailable)
    result = CliRunner().invoke(bench_cli.cli, ["compile-report", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "AOT module is unavailable" in result.output


def test_compile_report_records_and_spill_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(aot_report, "load_compile_report", fake_aot([ROW]))
    result = CliRunner().invoke(bench_cli.cli, ["compile-report", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = results(tmp_path, "compile_report")["records"]
    assert [r["details"]["arch"] for r in records] == ["sm_80", "sm_90"]
    assert all(r["meets_target"] is True for r in records)

    spilling = dict(ROW, kernel="_composite_backward_kernel", spilled_bytes=64)
    monkeypatch.setattr(aot_report, "load_compile_report", fake_aot([ROW, spilling]))
    result = CliRunner().invoke(bench_cli.cli, ["compile-report", "--out", str(tmp_path), "--arch", "90"])
    assert result.exit_code == 1 and "_composite_backward_kernel (sm_90): 64 bytes" in result.output


def test_plot_writes_pngs(tmp_path):
    out = tmp_path / "results"
    assert invoke("render", "--device", "cpu", "--case", "random", "--backend", "torch", "--out", out,
                  *TINY).exit_code == 0
    assert invoke("stages", "--device", "cpu", "--case", "random", "--backend", "torch", "--out", out,
                  *TINY).exit_code == 0
    result = invoke("plot", out, "--out", tmp_path / "png")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "png").rglob("*.png"))
    assert written == ["memory.png", "render_fps.png", "stages.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (tmp_path / "png").rglob("*.png"))
    empty = CliRunner().invoke(bench_cli.cli, ["plot", str(tmp_path / "nothing")])
    assert empty.exit_code == 1 and "does not exist" in empty.output


def test_all_quick_runs_everything_and_writes_json_and_pngs(tmp_path, monkeypatch):
    monkeypatch.setattr(aot_report, "run_in_subprocess", lambda out, device, timeout_s: (
        1, "Error: the AOT module is unavailable: tritonsplat.aot.compile_report does not import (test)"))
    result = invoke("all", "--quick", "--device", "cpu", "--case", "random", "--backend", "torch", "--foreground",
                    "200", "--out", tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    folder = tmp_path / machine_info("cpu")["device_slug"]
    assert {p.name for p in folder.glob("*.json")} == {"render.json", "stages.json", "step.json",
                                                       "compile_report.json"}
    assert {"render_fps.png", "stages.png", "step.png", "memory.png"} <= {p.name for p in folder.glob("*.png")}
    (compile_record,) = results(tmp_path, "compile_report")["records"]
    assert "AOT module is unavailable" in compile_record["skipped"]
    assert "targets:" in result.output and "zero register spills" in result.output


def test_cameras_per_step_configs_render_equal_views_and_the_table_lists_them(tmp_path):
    from bench import cameras_per_step as cps

    one, four = cps.config_for(1), cps.config_for(4, lr_batch_scaling="sqrt")
    assert (one.cameras_per_step, four.cameras_per_step, four.lr_batch_scaling) == (1, 4, "sqrt")
    assert (four.steps_first, four.steps_per_frame) == (one.steps_first // 4, one.steps_per_frame // 4)
    assert one.densify.opacity_reset_at == 0 == four.densify.opacity_reset_at
    row = {"cameras_per_step": 4, "lr_batch_scaling": "sqrt", "steps_first": 150, "steps_per_frame": 15,
           "views_rendered": 720, "fit_wall_s": 80.0, "fit_cpu_s": 70.0, "psnr": 25.5, "ssim": 0.9,
           "mte_3d_pct": 1.5, "mte_3d_pct_highest_influence": None, "survival_3d": 100.0, "n_gaussians": 1234}
    machine = {"device_slug": "cpu-test", "device_name": "CPU", "cpu_count": 2, "load_average_1m_5m_15m": [1, 1, 1]}
    path = cps.write(tmp_path, [row], {"width": 64}, "python -m bench cameras-per-step W", machine)
    cps.write(tmp_path, [{**row, "lr_batch_scaling": "none"}], {"width": 64}, "python -m bench cameras-per-step W",
              machine)
    assert len(json.loads(path.read_text())["rows"]) == 2      # merged by (B, lr rule, steps)
    md = (tmp_path / "cpu-test" / "cameras_per_step.md").read_text()
    assert "| 4 | sqrt | 150 / 15 | 720 | 80 s | 70 s | 25.50 dB | 1.50 % | n/a | 1,234 |" in md
    with pytest.raises(ValueError, match="batches"):
        cps.config_for(0)


def test_stage_plot_labels_repeated_cases_apart():
    """Two records of one case and similar size (two runs of a tracking fit) get distinct bars, each named by
    its date and CPU; a unique label is left as it is."""
    from bench.plot import _device_title, _unique_labels

    records = [{"created": "2026-12-02T19:25:44Z", "machine": {"cpu_capability": "AVX2", "git_commit": "a" * 40}},
               {"created": "2026-12-04T19:01:15Z", "machine": {"cpu_capability": "AVX512", "git_commit": "b" * 40}},
               {"created": "2026-12-04T19:01:15Z", "machine": {"git_commit": "b" * 40}}]
    labels = _unique_labels(["torch\nfitted:runs/bb 33,075", "torch\nfitted:runs/bb 33,075", "torch\nrandom"], records)
    assert labels == ["torch\nfitted:runs/bb 33,075\n2026-12-02 AVX2",
                      "torch\nfitted:runs/bb 33,075\n2026-12-04 AVX512", "torch\nrandom"]
    assert "records of 2 commits" in _device_title(records) and "git bbbbbbbbbb" in _device_title(records[1:])
