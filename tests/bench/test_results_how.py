"""Where results go and how each says it was made: `all --quick` never writes over the committed
`bench/results/<device>/`, and every file and record carries the command that made it (`how`)."""

import json
import sys
from pathlib import Path

from click.testing import CliRunner

import bench.cli as bench_cli
from bench import compile_report as aot_report
from bench.harness import Record, command_line, machine_info, write_results

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_how_is_the_bench_command_line_in_the_file_and_every_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/bench/__main__.py", "step", "--device", "cpu", "--case", "fitted:/my run"])
    assert command_line() == "python -m bench step --device cpu --case 'fitted:/my run'"
    record = Record(benchmark="step", metric="training_step", case="random", backend="torch", device="cpu",
                    n_gaussians=10, width=8, height=8, timing=None, skipped="test")
    first = json.loads(write_results(tmp_path, "step", [record], "cpu", {}).read_text())
    assert first["how"] == command_line() and [r["how"] for r in first["records"]] == [command_line()]
    # A merged file keeps how each older record was made.
    other = Record(benchmark="step", metric="training_step", case="random", backend="torch", device="cpu",
                   n_gaussians=20, width=8, height=8, timing=None, skipped="test")
    path = write_results(tmp_path, "step", [other], "cpu", {}, merge=True, how="python -m bench x")
    merged = json.loads(path.read_text())
    assert merged["how"] == "python -m bench x"
    assert sorted(r["how"] for r in merged["records"]) == [command_line(), "python -m bench x"]


def test_all_quick_without_out_writes_to_the_ignored_quick_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # the default --out is relative: bench/results under the working directory
    monkeypatch.setattr(aot_report, "run_in_subprocess", lambda out, device, timeout_s: (
        1, "Error: the AOT module is unavailable: tritonsplat.aot.compile_report does not import (test)"))
    result = CliRunner().invoke(bench_cli.cli, ["all", "--quick", "--device", "cpu", "--case", "random", "--backend",
                                                "torch", "--foreground", "200", "--sizes", "300", "--resolutions",
                                                "64x48", "--warmup", "0", "--repeats", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    slug = machine_info("cpu")["device_slug"]
    quick = tmp_path / "bench" / "results" / "quick" / slug
    assert {p.name for p in quick.glob("*.json")} == {"render.json", "stages.json", "step.json", "compile_report.json"}
    assert not (tmp_path / "bench" / "results" / slug).exists()


# Records are made by the bench harness, except end-to-end runs of the project's own commands (the spawn
# record: synth, fit and eval; the exhaustive compile record: tritonsplat.aot; the step's launch counts: the
# budget test that measures them), whose `how` is that command.
HOW_PREFIXES = ("python -m bench ", "python -m data_tools.cli synth ", "python -m tritonsplat.aot ",
                "python -m pytest tests/")


def test_committed_results_say_how_they_were_made():
    files = [p for p in RESULTS.rglob("*.json") if "quick" not in p.relative_to(RESULTS).parts]
    assert files
    for path in files:
        payload = json.loads(path.read_text())
        assert payload.get("how", "").startswith(HOW_PREFIXES), path
        # Files without a record list (a compile report's rows, the host counts' calls) are one
        # measurement, described by the file's own `how`.
        assert all(r.get("how", "").startswith(HOW_PREFIXES) for r in payload.get("records", [])), path
