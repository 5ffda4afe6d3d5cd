"""Plots of a run (matplotlib, Agg): PSNR per frame, loss curves, trajectories over a test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .losses import NEXT, term_names
from .metrics import project
from .result import TrackingResult

MAX_TRAJECTORIES = 300  # drawn foreground tracks (the original's visualiser shows ~4 %)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: TrackingResult, metrics: dict, seq=None) -> dict[str, Path]:
    """OUT/plots/{psnr_per_frame,loss_curves,trajectories}.png; returns their paths."""
    folder = result.out_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "psnr": plot_psnr(metrics, folder / "psnr_per_frame.png"),
        "loss": plot_losses(result, folder / "loss_curves.png"),
        "trajectories": plot_trajectories(result, folder / "trajectories.png", seq=seq),
    }
    return {k: v for k, v in paths.items() if v is not None}


def plot_psnr(metrics: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label in (("psnr_per_frame", "test cameras"), ("train_psnr_per_frame", "training (fit)")):
        vals = [np.nan if v is None else v for v in metrics.get(key, [])]
        if vals:
            ax.plot(range(len(vals)), vals, marker="o", label=label)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("PSNR per frame")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(result: TrackingResult, path: Path) -> Path:
    """Total loss per step over the whole run (t = 0 then every frame), and the t > 0 terms."""
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    offset = 0
    for t in range(result.n_frames):
        curves = result.curves(t)
        loss = curves["loss"]
        x = np.arange(offset, offset + len(loss))
        ax0.plot(x, loss, lw=0.6, color="C0" if t == 0 else "C1")
        offset += len(loss)
    ax0.set_yscale("log")
    ax0.set_xlabel("step (all frames)")
    ax0.set_ylabel("total loss")
    ax0.set_title("loss (t = 0 blue, t > 0 orange)")
    ax0.grid(alpha=0.3)
    terms = term_names(NEXT)
    finals = {k: [] for k in terms}
    for t in range(1, result.n_frames):
        stats = result.frame_stats(t)
        for k in terms:
            finals[k].append(stats.get(f"final_{k}", np.nan))
    for k, v in finals.items():
        if v and np.nanmax(np.abs(v)) > 0:
            ax1.plot(range(1, result.n_frames), v, marker=".", label=k)
    ax1.set_yscale("log")
    ax1.set_xlabel("frame")
    ax1.set_ylabel("final loss term (unweighted)")
    ax1.set_title("loss terms per frame (t > 0)")
    ax1.grid(alpha=0.3)
    if result.n_frames > 1:
        ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_trajectories(result: TrackingResult, path: Path, seq=None) -> Path | None:
    """Foreground Gaussian trajectories projected over the last frame's image of the first test camera."""
    plt = _pyplot()
    cams = result.test_cameras or result.train_cameras
    if not cams:
        return None
    cam = cams[0]
    t_last = result.n_frames - 1
    image = None
    if seq is not None:
        try:
            image = seq.image(t_last, cam.id)
        except Exception:
            image = None
    if image is None:
        image = result.render(t_last, cam).clamp(0, 1).numpy()
    fg = np.nonzero(result.fg.numpy())[0]
    if len(fg) > MAX_TRAJECTORIES:
        fg = fg[np.linspace(0, len(fg) - 1, MAX_TRAJECTORIES).astype(int)]
    centres = result.means.stack().numpy()[:, fg]  # [T, P, 3], NaN before a Gaussian's birth frame
    uv, z = project(centres, cam.K, cam.w2c)
    fig, ax = plt.subplots(figsize=(cam.width / cam.height * 4.5, 4.5), dpi=150)
    ax.imshow(image, extent=(0, cam.width, cam.height, 0))
    colours = plt.cm.hsv(np.linspace(0, 1, len(fg), endpoint=False))
    for p in range(len(fg)):
        ok = z[:, p] > 0
        ax.plot(uv[ok, p, 0], uv[ok, p, 1], lw=0.8, color=colours[p], alpha=0.9)
    ax.set_xlim(0, cam.width)
    ax.set_ylim(cam.height, 0)
    ax.set_axis_off()
    ax.set_title(f"trajectories of {len(fg)} foreground Gaussians, camera {cam.id}, frames 0-{t_last}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
