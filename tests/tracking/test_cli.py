"""The tritonsplat-track command line: outputs, and user mistakes as one-line errors with exit codes.

Tolerances: none (files, exit codes and messages).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from click.testing import CliRunner

from tracking.cli import main
from tracking.export import read_ply


def run(args, **env):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env or None)
    return result


def assert_clean_error(result, code: int, text: str):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert text in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def test_help_lists_commands():
    result = run(["--help"])
    assert result.exit_code == 0
    for name in ("fit", "eval", "export", "render", "demo"):
        assert name in result.output
    fit_help = run(["fit", "--help"]).output
    for option in ("--steps-scale", "--downscale", "--frames", "--init-points", "--backend", "--device", "--seed",
                   "--overwrite"):
        assert option in fit_help


def test_fit_missing_data(tmp_path):
    assert_clean_error(run(["fit", tmp_path / "nope", tmp_path / "out"]), 1, "no such file or folder")


def test_fit_bad_frames(tiny_scene, tmp_path):
    result = run(["fit", tiny_scene, tmp_path / "out", "--frames", "a:b"])
    assert result.exit_code == 2 and "--frames" in result.output


def test_fit_other_config_refused(tiny_scene, run_copy):
    result = run(["fit", tiny_scene, run_copy, "--seed", "3"])
    assert_clean_error(result, 2, "--overwrite")


def test_fit_nan_exit_code(tiny_scene, tmp_path):
    result = run(["fit", tiny_scene, tmp_path / "out", "--preset", "demo", "--steps-scale", "0.05"],
                 TRITONSPLAT_FAULT_AT="0:2:nan")
    assert_clean_error(result, 3, "became NaN/Inf at frame 0, step 2")


def test_fit_cli_quick_run(tiny_scene, tmp_path):
    out = tmp_path / "out"
    # The compressed schedule drops the opacity reset that would leave too few steps before the final
    # cull (TrackingConfig.scaled_steps), so the fit no longer warns that nothing recovers.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(["fit", tiny_scene, out, "--preset", "demo", "--steps-scale", "0.05", "--frames", "0:2",
                      "--backend", "torch", "--device", "cpu"])
    assert not [w for w in caught if "final cull" in str(w.message)]
    assert result.exit_code == 0, result.output
    assert "frame 1/1" in result.output and "fitted 2 frame(s)" in result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["preset"] == "demo" and cfg["config"]["steps_first"] == 45
    assert cfg["data"]["source_frames"] == [0, 1]


def test_eval_without_run(tmp_path):
    assert_clean_error(run(["eval", tmp_path]), 1, "no run here")


def test_eval_missing_data_points_to_option(run_copy, tmp_path):
    result = run(["eval", run_copy, "--data", tmp_path / "gone"])
    assert_clean_error(result, 1, "--data")


def test_eval_export_render(run_copy):
    result = run(["eval", run_copy, "--no-lpips"])
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "3D: MTE" in result.output
    assert json.loads((run_copy / "metrics.json").read_text())["psnr"] is not None

    result = run(["export", run_copy])
    assert result.exit_code == 0, result.output
    plys = sorted((run_copy / "export" / "ply").glob("*.ply"))
    assert [p.name for p in plys] == ["000000.ply", "000001.ply", "000002.ply"]
    assert len(read_ply(plys[0])["x"]) > 0

    result = run(["render", run_copy, "--format", "gif"])
    assert result.exit_code == 0, result.output
    assert len(list((run_copy / "renders").glob("cam*/0*.png"))) == 3
    assert list((run_copy / "renders").glob("cam*.gif"))

    assert_clean_error(run(["render", run_copy, "--camera", "999"]), 1, "no camera with id 999")


@pytest.mark.filterwarnings("ignore:the final cull")
def test_ctrl_c_keeps_frames_and_resumes(tiny_scene, tmp_path):
    out = tmp_path / "out"
    args = ["fit", tiny_scene, out, "--preset", "demo", "--steps-scale", "0.1", "--frames", "0:3"]
    result = run(args, TRITONSPLAT_FAULT_AT="2:1:interrupt")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output
    assert (out / "frames" / "000001.h5").exists() and not (out / "frames" / "000002.h5").exists()
    result = run(args)
    assert result.exit_code == 0 and "resuming" in result.output


@pytest.mark.filterwarnings("ignore:the final cull")
def test_full_disk_keeps_frames(tiny_scene, tmp_path, monkeypatch):
    import errno
    import os

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("000002.h5"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    result = run(["fit", tiny_scene, out, "--preset", "demo", "--steps-scale", "0.1", "--frames", "0:3"])
    assert_clean_error(result, 4, "No space left on device")
    assert (out / "frames" / "000001.h5").exists() and not list(out.rglob(".*.tmp-*"))
