"""The ``tritonsplat-track`` command line: fit, eval, table, export, render, demo, import-original, view.

Thin: each command builds a config, calls the library, writes config.json beside the outputs and
shows progress. User mistakes print one line and exit with a non-zero code (no traceback):

| exit code | meaning |
|---|---|
| 1 | bad input (data, options, files) |
| 2 | OUT holds a run with another config (use --overwrite or another OUT) / usage error |
| 3 | a loss became NaN (completed frames are kept) |
| 4 | the disk is full or not writable (completed frames are kept) |
| 130 | interrupted (Ctrl-C); completed frames are kept, the same command resumes |
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import click

from data_tools.cli import parse_frames  # one 'A:B[:STEP]' parser for both CLIs
from tritonsplat.cli import user_errors
from tritonsplat.cpu_memory import keep_freed_memory

from .config import PRESETS, TrackingConfig
from .errors import TrackingError

DEMO_DATA = "data"  # the demo's generated data lives in OUT/data


# One-line messages and exit codes for expected failures (the table above), shared by the whole
# `tritonsplat` command family.
_friendly_errors = user_errors(
    on_interrupt="interrupted: every completed frame is kept; run the same command to resume",
    disk_full="completed frames are kept; free space and run the same command to resume")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Dynamic 3D Gaussians (Luiten et al., 3DV 2024): fit a multi-camera video as persistent Gaussians whose
    motion is a dense 6-DoF track of the scene; evaluate, export and render it."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    # CPU steps free and re-allocate MB-sized temporaries: keep them in the process (no page faults).
    keep_freed_memory()


def _build_config(preset: str, steps_scale: float, seed: int | None, backend: str, device: str | None
                  ) -> TrackingConfig:
    cfg = TrackingConfig.from_preset(preset)
    if steps_scale <= 0:
        raise click.BadParameter("must be positive", param_hint="--steps-scale")
    cfg = cfg.scaled_steps(steps_scale)
    overrides = {"backend": backend, "device": device}
    if seed is not None:
        overrides["seed"] = seed
    from dataclasses import replace

    return replace(cfg, **overrides)


def _run_fit(data, out: Path, cfg: TrackingConfig, *, downscale=1.0, frames=None, init_points=None,
             overwrite=False, dist_timeout: float = 300.0):
    from .distributed import launched_by_torchrun
    from .fit import fit

    t0 = time.perf_counter()
    result = fit(data, out, cfg, downscale=downscale, frames=frames, init_points=init_points, overwrite=overwrite,
                 progress=True, echo=click.echo, dist_timeout=dist_timeout)
    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        return result       # rank 0 reports
    click.echo(f"fitted {result.n_frames} frame(s), {result.n_gaussians:,} Gaussians "
               f"({int(result.fg.sum()):,} foreground) into {out} in {time.perf_counter() - t0:.1f} s")
    return result


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="original", show_default=True,
              help="original: the released code's behaviour; paper: Table 1's (colours fixed after t = 0, no floor "
              "loss); demo: the fast CPU demo; 3gs-online: the paper's 3GS-O baseline.")
@click.option("--steps-scale", type=float, default=1.0, show_default=True,
              help="Multiply every step count (stage lengths, densification schedule) for quick runs.")
@click.option("--cameras-per-step", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training views rendered together per step (one rasterize call); loss = their mean.")
@click.option("--lr-batch-scaling", type=click.Choice(["none", "sqrt"]), default="none", show_default=True,
              help="sqrt: learning rates x sqrt(cameras per step) (Grendel-GS).")
@click.option("--downscale", type=float, default=1.0, show_default=True, help="Divide the image size by F.")
@click.option("--frames", default=None, help="A:B, half-open 0-based indices into the data's frames.")
@click.option("--init-points", type=click.Path(path_type=Path), default=None,
              help="N x 7 .npz (xyz, rgb, seg) used when DATA has no init_pt_cld.npz.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True)
@click.option("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available).")
@click.option("--seed", type=int, default=None, help="Random seed (default: the preset's, 0).")
@click.option("--overwrite", is_flag=True, help="Start afresh: remove the run in OUT (needed when its config differs).")
@click.option("--dist-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Under torchrun: seconds after which the ranks stop with an error when one died or hangs.")
@click.option("--cuda-graphs", is_flag=True,
              help="Capture each t > 0 step once per frame as a CUDA graph (same results; CUDA only, "
                   "ignored on CPU).")
@click.option("--spawn-new", is_flag=True,
              help="Reconstruct objects that enter after the first frame (new Gaussians where the masks show "
                   "foreground that the render leaves uncovered in several cameras).")
@click.option("--spawn-min-cameras", type=click.IntRange(min=2), default=3, show_default=True,
              help="With --spawn-new: cameras that must show an uncovered foreground region.")
@click.option("--spawn-steps", type=click.IntRange(min=1), default=None,
              help="With --spawn-new: optimisation steps of the new Gaussians (default: 200 x --steps-scale).")
@_friendly_errors
def fit(data, out, preset, steps_scale, cameras_per_step, lr_batch_scaling, downscale, frames, init_points, backend,
        device, seed, overwrite, dist_timeout, cuda_graphs, spawn_new, spawn_min_cameras, spawn_steps):
    """Fit DATA (any data_tools format) into OUT, resuming what OUT already holds."""
    if downscale <= 0:
        raise click.BadParameter("must be positive", param_hint="--downscale")
    from dataclasses import replace

    cfg = replace(_build_config(preset, steps_scale, seed, backend, device), cameras_per_step=cameras_per_step,
                  lr_batch_scaling=lr_batch_scaling, cuda_graphs=cuda_graphs)
    if spawn_new:
        steps = spawn_steps if spawn_steps is not None else max(1, round(cfg.spawn_steps * steps_scale))
        cfg = replace(cfg, spawn_new=True, spawn_min_cameras=spawn_min_cameras, spawn_steps=steps)
    elif spawn_steps is not None or spawn_min_cameras != 3:
        raise click.BadParameter("needs --spawn-new", param_hint="--spawn-steps / --spawn-min-cameras")
    _run_fit(data, out, cfg, downscale=downscale, frames=parse_frames(frames), init_points=init_points,
             overwrite=overwrite, dist_timeout=dist_timeout)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"next: tritonsplat-track eval {out}")


def _print_metrics(metrics: dict, out: Path) -> None:
    def fmt(key, unit="", digits=2):
        v = metrics.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}{unit}"

    ev = metrics.get("eval_config") or {}
    click.echo(f"PSNR {fmt('psnr', ' dB')} (per channel {fmt('psnr_per_channel', ' dB')}), SSIM {fmt('ssim', '', 3)}, "
               f"LPIPS alex {fmt('lpips_alex', '', 3)} / vgg {fmt('lpips_vgg', '', 3)} (test cameras, colour "
               f"correction {ev.get('test_colour_correction', 'none')})")
    if metrics.get("mte_3d") is not None:
        rule = ("highest influence" if ev.get("readout") == "highest"
                else f"influence >= {ev.get('influence_threshold', 0.5):g}")
        click.echo(f"3D: MTE {fmt('mte_3d', ' m', 4)} ({fmt('mte_3d_pct', ' % of the extent')}), "
                   f"delta {fmt('delta_3d', ' %', 1)}, survival {fmt('survival_3d', ' %', 1)} (readout: {rule})")
        click.echo(f"    PointOdyssey: MTE {fmt('mte_3d_pod_cm', ' cm')}, delta {fmt('delta_3d_pod', ' %', 1)}, "
                   f"survival {fmt('survival_3d_pod', ' %', 1)}")
        if metrics.get("mte_3d_pct_highest_influence") is not None:
            click.echo(f"    (following the highest-influence Gaussian: MTE "
                       f"{fmt('mte_3d_pct_highest_influence', ' %')} of the extent, rotation error "
                       f"{fmt('rotation_error_3d_deg_highest_influence', ' deg', 1)}; "
                       f"{100 * metrics.get('tracked_fraction_3d', 0):.2f} % of query points reach influence "
                       f"{ev.get('influence_threshold', 0.5):g})")
        click.echo(f"2D: MTE {fmt('mte_2d', ' px', 2)} (256 x 256), delta {fmt('delta_2d', ' %', 1)}, "
                   f"survival {fmt('survival_2d', ' %', 1)} ({ev.get('cameras_2d', 'train')} cameras; following the "
                   f"highest-influence Gaussian: MTE {fmt('mte_2d_highest_influence', ' px', 2)})")
        click.echo(f"    PointOdyssey: MTE {fmt('mte_2d_pod', ' px')}, delta {fmt('delta_2d_pod', ' %', 1)}, "
                   f"survival {fmt('survival_2d_pod', ' %', 1)}")
    else:
        click.echo("tracking metrics: n/a (no ground-truth tracks)")
    click.echo(f"{metrics['n_gaussians']:,} Gaussians, fit {metrics['seconds']:.1f} s, preset {metrics['preset']}")
    click.echo(f"metrics: {out / 'metrics.json'}; plots: {out / 'plots'}")


def _eval_config(out: Path, readout, influence_threshold, test_colour_correction, lpips_backbones, cameras_2d,
                 no_lpips):
    """The run's evaluation defaults with the given options on top."""
    from .evaluate import default_eval_config

    overrides = {}
    if readout is not None:
        overrides["readout"] = readout
    if influence_threshold is not None:
        if not 0 < influence_threshold <= 1:
            raise click.BadParameter(f"must be in (0, 1], got {influence_threshold}",
                                     param_hint="--influence-threshold")
        overrides["influence_threshold"] = influence_threshold
    if test_colour_correction is not None:
        overrides["test_colour_correction"] = test_colour_correction
    if lpips_backbones is not None:
        names = tuple(b.strip() for b in lpips_backbones.split(",") if b.strip())
        bad = [b for b in names if b not in ("alex", "vgg")]
        if bad or len(set(names)) != len(names):
            raise click.BadParameter(f"expected distinct names from alex,vgg (or ''), got {lpips_backbones!r}",
                                     param_hint="--lpips-backbones")
        overrides["lpips_backbones"] = names
    if no_lpips:
        overrides["lpips_backbones"] = ()
    if cameras_2d is not None:
        overrides["cameras_2d"] = cameras_2d
    return default_eval_config(out, **overrides)


@main.command("eval")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Dataset (default: the one recorded in OUT).")
@click.option("--gt-tracks", type=click.Path(path_type=Path), default=None,
              help="Ground-truth tracks .npz (default: DATA/gt_tracks.npz when present).")
@click.option("--readout", type=click.Choice(["influence", "highest"]), default=None,
              help="Track readout: follow the highest-influence Gaussian when its influence reaches "
                   "--influence-threshold, else stay static (influence, the default); or always (highest).")
@click.option("--influence-threshold", type=float, default=None, help="Threshold of --readout influence (default 0.5).")
@click.option("--test-colour-correction", type=click.Choice(["none", "mean"]), default=None,
              help="Colour correction of test cameras (default none; mean: the training cameras' mean).")
@click.option("--lpips-backbones", default=None, help="Comma-separated LPIPS networks (default alex,vgg; '' none).")
@click.option("--cameras-2d", type=click.Choice(["train", "test", "all"]), default=None,
              help="Cameras whose projected tracks count in the 2D metrics (default train).")
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS (same as --lpips-backbones '').")
@click.option("--no-plots", is_flag=True, help="Do not draw OUT/plots.")
@_friendly_errors
def eval_(out, data, gt_tracks, readout, influence_threshold, test_colour_correction, lpips_backbones, cameras_2d,
          no_lpips, no_plots):
    """Evaluate the run in OUT: image and tracking metrics into OUT/metrics.json, plots into OUT/plots.
    The fit's files are only read; the settings used are recorded in metrics.json (eval_config)."""
    from .evaluate import evaluate

    _require_run(out)
    cfg = _eval_config(out, readout, influence_threshold, test_colour_correction, lpips_backbones, cameras_2d,
                       no_lpips)
    metrics = evaluate(out, data=data, gt_tracks=gt_tracks, eval_config=cfg, progress=True)
    if not no_plots:
        _draw(out, metrics)
    _print_metrics(metrics, out)


def _draw(out: Path, metrics: dict) -> None:
    from .plots import write_plots
    from .result import TrackingResult

    write_plots(TrackingResult(out), metrics)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "prefix", type=click.Path(path_type=Path), default=None,
              help="Write PREFIX.md and PREFIX.csv (default: print only).")
@_friendly_errors
def table(runs, prefix):
    """Table-1-style comparison of evaluated RUN folders (rows metrics, columns runs) beside the paper's
    Basketball numbers; each column says the frames, resolution and steps it used."""
    from .table import build_table, to_markdown, write_table

    for run in runs:
        _require_run(run)
    if prefix is not None:
        md_path, csv_path, md = write_table(runs, prefix)
        click.echo(md)
        click.echo(f"wrote {md_path} and {csv_path}")
    else:
        click.echo(to_markdown(*build_table(runs)))


def _require_run(out: Path) -> None:
    if not (out / "run.h5").exists():
        raise TrackingError(f"{out}: no run here (no run.h5); fit one with `tritonsplat-track fit DATA {out}`")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["ply", "d3dgs", "splat"]), default="ply", show_default=True,
              help="ply: OUT/export/ply/NNNNNN.ply (3DGS layout) and tracks.npz; d3dgs: OUT/export/params.npz "
                   "(the original's layout); splat: OUT/export/splat/NNNNNN.splat (32-byte records).")
@click.option("--sh-degree", type=click.Choice(["0", "3"]), default="0", show_default=True,
              help="PLY only: 3 adds the 45 f_rest_* fields (zeros) that Inria's loader expects by default.")
@click.option("--depth", is_flag=True,
              help="Also write expected and median depth per camera and frame: "
                   "OUT/export/depth/<camera>/<kind>_NNNNNN.npy (float32) and .png (uint16 mm, 0 = no coverage).")
@click.option("--device", default=None, help="Device for --depth renders (default: cuda when available).")
@_friendly_errors
def export(out, fmt, sh_degree, depth, device):
    """Export the run in OUT: per-frame PLY (default) or .splat, or the original's params.npz; optional depth maps."""
    from .export import export_run

    _require_run(out)
    if int(sh_degree) and fmt != "ply":
        raise click.BadParameter(f"applies to --format ply only, got --format {fmt}", param_hint="--sh-degree")
    paths = export_run(out, progress=True, fmt=fmt, sh_degree=int(sh_degree), depth=depth, device=device)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command("import-original")
@click.argument("params", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace the run OUT holds.")
@_friendly_errors
def import_original(params, data, out, overwrite):
    """Read the original Dynamic 3D Gaussians' PARAMS.npz (fitted on DATA) into the run folder OUT."""
    from .d3dgs import import_original as run_import

    run_import(params, data, out, overwrite=overwrite)
    from .result import TrackingResult

    click.echo(f"imported {TrackingResult(out)!r}")
    click.echo(f"next: tritonsplat-track eval {out}, render {out}, export {out} or view {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--port", type=int, default=8080, show_default=True, help="HTTP port (0: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--frame", type=int, default=0, show_default=True, help="Frame shown first.")
@_friendly_errors
def view(out, port, host, frame):
    """Browse the run in OUT in a web browser: splats per frame, time slider, trails, cameras (extra `viewer`)."""
    from .viewer import RunViewer

    _require_run(out)
    if not 0 <= port <= 65535:
        raise click.BadParameter(f"must be in 0..65535, got {port}", param_hint="--port")
    viewer = RunViewer(out, host=host, port=port, frame=frame)
    click.echo(f"viewing {out} ({viewer.n_frames} frame(s), {viewer.n_gaussians:,} Gaussians) at {viewer.url}")
    click.echo("press Ctrl-C to stop")
    try:
        viewer.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--camera", type=int, default=None, help="Camera id (default: the first test camera).")
@click.option("--format", "fmt", type=click.Choice(["gif", "mp4", "png"]), default="gif", show_default=True)
@_friendly_errors
def render(out, camera, fmt):
    """Render every frame for one camera: OUT/renders/cam<ID>/NNNNNN.png and a GIF or MP4."""
    from .export import render_run

    _require_run(out)
    try:
        paths = render_run(out, camera, fmt, progress=True)
    except KeyError as exc:
        raise TrackingError(str(exc.args[0])) from None
    except RuntimeError as exc:
        raise TrackingError(str(exc)) from None
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="demo", show_default=True)
@click.option("--steps-scale", type=float, default=1.0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True, help="Replace a previous demo run in OUT (keeps OUT/data).")
@_friendly_errors
def demo(out, preset, steps_scale, backend, device, overwrite):
    """The README's main job: generate the default synthetic scene (data-tools synth) into OUT/data, fit it
    into OUT, evaluate (OUT/metrics.json, OUT/plots) and render the first test camera (OUT/renders)."""
    import data_tools

    from .evaluate import evaluate
    from .export import render_run

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / DEMO_DATA
    if not (data / "gt_tracks.npz").exists():
        click.echo(f"generating the synthetic scene into {data} (data-tools synth) ...")
        data_tools.make_synthetic_scene(data, progress=True, overwrite=True)
    else:
        click.echo(f"using the synthetic scene in {data}")
    cfg = _build_config(preset, steps_scale, None, backend, device)
    _run_fit(data, out, cfg, overwrite=overwrite)
    metrics = evaluate(out, progress=True)
    _draw(out, metrics)
    paths = render_run(out, None, "gif", progress=True)
    _print_metrics(metrics, out)
    click.echo(f"renders: {paths.get('gif', paths['png'])}")
    click.echo(f"demo done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
