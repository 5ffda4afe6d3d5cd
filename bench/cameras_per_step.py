"""`bench cameras-per-step`: held-out PSNR and track error for B training views per step, at equal rendered views.

Each fit renders B views per step for 1/B of the steps (`TrackingConfig.scaled_steps(1 / B)`: both stages and
the densification schedule), so every fit renders the same number of views and, on a CPU where a step's cost
is about proportional to its views, takes about the same wall time; the actual wall and CPU times are recorded.
The scene is `data-tools synth` at a small size (default 64x48, 8 + 2 cameras, 3 frames); the config is the
`demo` preset on the torch backend without its opacity reset (at 1/4 of the steps the reset leaves too few
refinement windows before the final cull and `scaled_steps` drops it, so no fit has it). Metrics:
`tracking.evaluate` without LPIPS (held-out PSNR, mte_3d_pct under the 0.5-influence readout and following the
highest-influence Gaussian).

`--steps-scale` multiplies every fit's steps (e.g. B = 2 at 1.25: 5/8 of the demo's steps, to match the B = 1
fit's wall time rather than its rendered views). Writes <out>/<device slug>/cameras_per_step.json (rows keyed by
B, the lr rule and the steps; rows of other keys already in the file are kept) and cameras_per_step.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tracking.config import TrackingConfig

STEM = "cameras_per_step"
METRICS = ("psnr", "ssim", "mte_3d_pct", "mte_3d_pct_highest_influence", "survival_3d", "n_gaussians")


def base_config(steps_scale: float = 1.0) -> TrackingConfig:
    """The B = 1 config: the demo preset, torch backend on the CPU, no opacity reset, steps x steps_scale."""
    demo = TrackingConfig.from_preset("demo", backend="torch", device="cpu")
    return replace(demo, densify=replace(demo.densify, opacity_reset_at=0)).scaled_steps(steps_scale)


def config_for(batch: int, steps_scale: float = 1.0, lr_batch_scaling: str = "none") -> TrackingConfig:
    """B views per step for 1/B of the base config's steps."""
    if batch < 1:
        raise ValueError(f"batches: expected positive view counts, got {batch}")
    return replace(base_config(steps_scale).scaled_steps(1.0 / batch), cameras_per_step=batch,
                   lr_batch_scaling=lr_batch_scaling).validate()


def run(work: Path, batches: tuple[int, ...], *, width: int, height: int, cameras: int, test_cameras: int,
        frames: int, seed: int, steps_scale: float, lr_batch_scaling: str,
        progress: Callable[[str], None] = print) -> list[dict]:
    """Generate the scene into WORK/data (once), fit and evaluate each B into WORK/b<B>-<rule>; one row per B."""
    import data_tools
    import tracking
    from tracking.evaluate import default_eval_config

    data = work / "data"
    if not (data / "gt_tracks.npz").exists():
        data_tools.make_synthetic_scene(data, cameras=cameras, test_cameras=test_cameras, width=width, height=height,
                                        frames=frames, seed=seed, overwrite=True)
    rows = []
    for batch in batches:
        cfg = config_for(batch, steps_scale, lr_batch_scaling)
        out = work / f"b{batch}-{lr_batch_scaling}"
        progress(f"cameras-per-step: B = {batch}, {cfg.steps_first} + {cfg.steps_per_frame} steps per frame -> {out}")
        wall, cpu = time.perf_counter(), time.process_time()
        tracking.fit(data, out, cfg, overwrite=True, progress=False, echo=lambda s: None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = tracking.evaluate(out, eval_config=default_eval_config(out, lpips_backbones=()))
        row = {"cameras_per_step": batch, "lr_batch_scaling": lr_batch_scaling, "steps_first": cfg.steps_first,
               "steps_per_frame": cfg.steps_per_frame, "views_rendered": batch * (cfg.steps_first
                                                                                  + (frames - 1) * cfg.steps_per_frame),
               "fit_wall_s": round(wall, 1), "fit_cpu_s": round(cpu, 1),
               **{k: metrics.get(k) for k in METRICS}}
        progress(f"  {json.dumps(row)}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, by lr rule then B."""
    def fmt(value, digits, unit):
        return "n/a" if value is None else f"{value:.{digits}f} {unit}"

    lines = ["| B | lr rule | steps (t = 0 / t > 0) | views rendered | fit wall | fit CPU | held-out PSNR | "
             "mte_3d_pct (0.5 influence) | mte_3d_pct (highest influence) | Gaussians |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["lr_batch_scaling"], r["cameras_per_step"], r["steps_first"])):
        lines.append(f"| {r['cameras_per_step']} | {r['lr_batch_scaling']} | "
                     f"{r['steps_first']} / {r['steps_per_frame']} | {r['views_rendered']} | "
                     f"{r['fit_wall_s']:.0f} s | {r['fit_cpu_s']:.0f} s | "
                     f"{fmt(r['psnr'], 2, 'dB')} | {fmt(r['mte_3d_pct'], 2, '%')} | "
                     f"{fmt(r['mte_3d_pct_highest_influence'], 2, '%')} | {r['n_gaussians']:,} |")
    return "\n".join(lines) + "\n"


def _key(row: dict) -> tuple:
    return row["cameras_per_step"], row["lr_batch_scaling"], row["steps_first"]


def write(out_dir: Path, rows: list[dict], scene: dict, how: str, machine: dict) -> Path:
    """Merge rows into <out_dir>/<slug>/cameras_per_step.json (by B, lr rule and steps) and rewrite the .md
    table."""
    folder = Path(out_dir) / machine["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{STEM}.json"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    new = [{**r, "how": how, "created": created, "load_average_1m": machine.get("load_average_1m_5m_15m", [None])[0]}
           for r in rows]
    keys = {_key(r) for r in new}
    old = []
    if path.exists():
        old = [r for r in json.loads(path.read_text()).get("rows", []) if _key(r) not in keys]
    payload = {"benchmark": STEM, "how": how, "created": created, "scene": scene, "machine": machine,
               "config": "tracking demo preset, torch backend, no opacity reset; steps x 1/B "
                         "(bench.cameras_per_step.config_for)",
               "rows": old + new}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    (folder / f"{STEM}.md").write_text(markdown(payload))
    return path


def markdown(payload: dict) -> str:
    """The results file as a page: how the rows were made, then the table."""
    machine, scene = payload["machine"], payload["scene"]
    hows = sorted({r["how"] for r in payload["rows"]})
    return ("# Cameras per step\n\nB views per step for 1/B of the demo preset's steps (equal rendered views), "
            "or more steps where the command says `--steps-scale` (to approach the B = 1 fit's time). "
            f"{machine.get('device_name')}, {machine.get('cpu_count')} cores, 1 thread, shared machine (load "
            f"average per row in the JSON); synthetic scene {scene}. Made by:\n\n"
            + "".join(f"- `{h}`\n" for h in hows) + "\n" + table(payload["rows"]))
