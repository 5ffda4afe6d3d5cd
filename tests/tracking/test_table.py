"""`tritonsplat-track table`: rows metrics, columns runs labelled with their setting, the paper beside them.

Tolerances: none (text and files).
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from tracking.cli import main
from tracking.table import PAPER_BASKETBALL, ROWS, build_table


@pytest.fixture
def two_runs(tiny_run, tmp_path):
    """Two copies of the tiny run with hand-written metrics.json (no evaluation needed)."""
    runs = []
    for name, psnr in (("a", 20.5), ("b", 21.25)):
        out = tmp_path / name
        shutil.copytree(tiny_run, out)
        metrics = {"psnr": psnr - 0.3, "psnr_per_channel": psnr, "ssim": 0.8, "lpips_alex": None, "lpips_vgg": 0.25,
                   "mte_3d_pod_cm": 3.5, "delta_3d_pod": 60.0, "survival_3d_pod": 100.0, "mte_2d_pod": 2.0,
                   "delta_2d_pod": 70.0, "survival_2d_pod": 99.0, "mte_3d_pct": 1.5, "n_gaussians": 1234,
                   "seconds": 12.0, "psnr_per_frame": [psnr] * 3}
        (out / "metrics.json").write_text(json.dumps(metrics))
        runs.append(out)
    return runs


def test_build_table_rows_columns_and_labels(two_runs):
    header, rows = build_table(two_runs)
    assert header[0] == "metric" and len(header) == 1 + 2 + len(PAPER_BASKETBALL)
    assert header[1] == "a (3 frames, 40x30, test 30/8 steps)"  # frames, resolution, preset and steps used
    assert "150 frames, 640x360" in header[3]
    assert [r[0] for r in rows] == [row.label for row in ROWS]
    by_key = {row.key: cells for row, cells in zip(ROWS, rows, strict=True)}
    assert by_key["psnr_per_channel"][1:] == ["20.50", "21.25", "28.22", "27.02"]
    assert by_key["lpips_alex"][1:3] == ["n/a", "n/a"] and by_key["lpips_vgg"][1] == "0.250"
    assert by_key["mte_3d_pod_cm"][3:] == ["2.56", "76.71"] and by_key["n_gaussians"][1] == "1,234"
    assert by_key["psnr"][3:] == ["", ""]  # the paper has no whole-image PSNR


def test_table_command_writes_md_and_csv(two_runs, tmp_path):
    prefix = tmp_path / "out" / "cmp"
    result = CliRunner().invoke(main, ["table", *map(str, two_runs), "--out", str(prefix)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "cmp.md").read_text()
    assert md in result.output and "| PSNR (dB), per channel [paper's] | 20.50 | 21.25 | 28.22 | 27.02 |" in md
    with open(tmp_path / "out" / "cmp.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1].startswith("a (3 frames") and len(table) == 1 + len(ROWS)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written through temporary files, none left


def test_table_needs_evaluated_runs(tiny_run, tmp_path):
    out = tmp_path / "raw"
    shutil.copytree(tiny_run, out)
    (out / "metrics.json").unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["table", str(out)])
    assert result.exit_code == 1 and "no metrics.json" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["table", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no run here" in result.output
