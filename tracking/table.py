"""A Table-1-style comparison of evaluated runs beside the paper's Basketball numbers.

Rows are metrics, columns are runs (their OUT/metrics.json) and then the published values of Luiten et
al., "Dynamic 3D Gaussians" (3DV 2024), Table 1, Basketball column, for their method and the 3GS-O baseline.
Every column is labelled with the frames, resolution and step counts actually used, so that a 30-frame CPU
run is not mistaken for the paper's setting (150 frames, 640 x 360, 10,000 + 2,000 steps per frame).

The paper's PSNR follows its code's per-channel convention (our psnr_per_channel), its tracking metrics
PointOdyssey's (our *_pod keys); its LPIPS backbone is not stated, so its value stands beside both ours.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import TrackingError
from .store import atomic_path

PAPER_SETTING = "150 frames, 640x360, 10000/2000 steps"
PAPER_BASKETBALL = {
    "paper Ours (Basketball)": {"psnr": 28.22, "ssim": 0.91, "lpips": 0.18, "mte_3d": 2.56, "delta_3d": 66.3,
                                "survival_3d": 100.0, "mte_2d": 1.93, "delta_2d": 73.9, "survival_2d": 100.0},
    "paper 3GS-O (Basketball)": {"psnr": 27.02, "ssim": 0.89, "lpips": 0.18, "mte_3d": 76.71, "delta_3d": 3.5,
                                 "survival_3d": 31.9, "mte_2d": 64.29, "delta_2d": 7.2, "survival_2d": 47.1},
}
"""Luiten et al. 2024, Table 1, Basketball column (PSNR dB, 3D MTE cm, 2D MTE pixels at 256 x 256, % else)."""


@dataclass(frozen=True)
class Row:
    label: str
    key: str  # metrics.json key
    paper: str | None  # key of PAPER_BASKETBALL, None: the paper has no such number
    digits: int


ROWS = (
    Row("PSNR (dB), per channel [paper's]", "psnr_per_channel", "psnr", 2),
    Row("PSNR (dB), whole image", "psnr", None, 2),
    Row("SSIM", "ssim", "ssim", 3),
    Row("LPIPS (VGG)", "lpips_vgg", "lpips", 3),
    Row("LPIPS (AlexNet)", "lpips_alex", "lpips", 3),
    Row("3D MTE (cm), PointOdyssey", "mte_3d_pod_cm", "mte_3d", 2),
    Row("3D delta (%), PointOdyssey", "delta_3d_pod", "delta_3d", 1),
    Row("3D survival (%), PointOdyssey", "survival_3d_pod", "survival_3d", 1),
    Row("2D MTE (px at 256), PointOdyssey", "mte_2d_pod", "mte_2d", 2),
    Row("2D delta (%), PointOdyssey", "delta_2d_pod", "delta_2d", 1),
    Row("2D survival (%), PointOdyssey", "survival_2d_pod", "survival_2d", 1),
    Row("3D MTE (% of extent), mean then median", "mte_3d_pct", None, 2),
    # At low resolution few points reach the 0.5-influence readout (the rest stay static): the
    # highest-influence readout shows whether the Gaussians themselves move right.
    Row("3D MTE (% of extent), highest-influence readout", "mte_3d_pct_highest_influence", None, 2),
    Row("3D rotation error (deg), highest-influence readout", "rotation_error_3d_deg_highest_influence", None, 1),
    Row("Gaussians", "n_gaussians", None, 0),
    Row("fit time (s)", "seconds", None, 0),
)


def run_column(out_dir: str | Path) -> tuple[str, dict]:
    """(setting label, metrics) of an evaluated run: frames, resolution and steps actually used."""
    from .result import TrackingResult

    out = Path(out_dir)
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise TrackingError(f"{out}: no metrics.json (evaluate it first: tritonsplat-track eval {out})")
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as exc:
        raise TrackingError(f"{metrics_path}: not valid JSON ({exc})") from None
    result = TrackingResult(out)
    n_frames = len(metrics.get("psnr_per_frame") or []) or result.n_frames
    sizes = Counter((c.width, c.height) for c in result.train_cameras + result.test_cameras)
    (w, h), _ = sizes.most_common(1)[0]
    cfg = result.config
    setting = f"{n_frames} frames, {w}x{h}, {cfg.preset} {cfg.steps_first}/{cfg.steps_per_frame} steps"
    return setting, metrics


def _fmt(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def build_table(runs) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells) for runs (folders); columns: metric, each run, the paper's two."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("table needs at least one RUN folder")
    names = [r.name or str(r) for r in runs]
    if len(set(names)) < len(names):
        names = [str(r) for r in runs]
    columns = [run_column(r) for r in runs]
    header = ["metric"] + [f"{n} ({setting})" for n, (setting, _) in zip(names, columns, strict=True)]
    header += [f"{name} ({PAPER_SETTING})" for name in PAPER_BASKETBALL]
    rows = []
    for row in ROWS:
        cells = [row.label] + [_fmt(m.get(row.key), row.digits) for _, m in columns]
        for paper in PAPER_BASKETBALL.values():
            cells.append(f"{paper[row.paper]:g}" if row.paper else "")  # as published
        rows.append(cells)
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = ("\nPaper: Luiten et al. 2024, Table 1, Basketball (its LPIPS backbone is not stated). Our columns "
            "are labelled with the frames, resolution (most common camera size) and preset with steps at "
            "t = 0 / per later frame that the run used.\n")
    return "\n".join(lines) + "\n" + note


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_table(runs, prefix: str | Path) -> tuple[Path, Path, str]:
    """Write PREFIX.md and PREFIX.csv (each atomically); returns their paths and the Markdown."""
    header, rows = build_table(runs)
    md = to_markdown(header, rows)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in ((".md", md), (".csv", to_csv(header, rows))):
        path = prefix.with_name(prefix.name + ext)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text)
        paths.append(path)
    return paths[0], paths[1], md


__all__ = ["PAPER_BASKETBALL", "ROWS", "build_table", "to_csv", "to_markdown", "write_table"]
