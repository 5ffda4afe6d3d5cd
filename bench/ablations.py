"""Ablations of Dynamic 3D Gaussians on the demo scene (the paper's Table 3 switches and its 3GS-O baseline).

    python -m bench.ablations ROOT [--only NAME,...]                       # fit (resumable; kill any time)
    python -m bench.ablations ROOT --evaluate [--only ...] --table PREFIX  # compare on the common frames

Fits each variant of the `demo` preset on the demo's synthetic scene (`data-tools synth` defaults: 160x120,
12 train + 2 test cameras, 10 frames; generated once into ROOT/data) into ROOT/<name>, in frame rounds:
every variant gets frame k before any gets frame k + 1, so that when time runs out all hold the same
frames. `--evaluate` evaluates every run on the frames all of them completed (copies truncated to those
frames under ROOT/first-K-frames/ when fewer than all) and writes the `tritonsplat-track table`.

The switches of the Table 3 variants act at t > 0 only (priors, velocity initialisation, freezing, the
colour term), so their t = 0 is the `full` run's: it is fitted once, and each such variant starts from a
copy of it (run.h5 with the variant's config, frames/000000.h5), as if it had been interrupted after t = 0.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from tracking.config import PRIORS, TrackingConfig

SHARED_T0 = ("no-rigid", "no-rot", "no-iso", "no-bg", "no-velocity-init", "no-freeze", "colour-term-off")
"""variants whose t = 0 equals the full run's (they differ only at t > 0)."""
T0_FROM_FULL_ANYWAY = ("3gs-online-t0-of-full",)
"""variants started from the full run's t = 0 although their own t = 0 would differ (labelled so)."""


def variants() -> dict[str, TrackingConfig]:
    """name -> config: the demo preset and one switch changed per variant (Luiten et al. 2024, Table 3)."""
    demo = TrackingConfig.from_preset("demo", backend="torch", device="cpu")

    def without(prior: str) -> TrackingConfig:
        return replace(demo, priors=tuple(p for p in PRIORS if p != prior))

    # The paper's 3GS-O with the demo's steps and CPU settings: no priors, no velocity extrapolation,
    # nothing frozen after t = 0, no segmentation render (see the 3gs-online preset).
    online = replace(demo, preset="3gs-online", priors=(), velocity_init=False, freeze_after_first=False,
                     weights=replace(demo.weights, seg=0.0, floor=0.0, colour=0.0))
    return {
        "full": demo,
        "no-rigid": without("rigid"),
        "no-rot": without("rot"),
        "no-iso": without("iso"),
        "no-bg": without("bg"),
        "no-velocity-init": replace(demo, velocity_init=False),
        "no-freeze": replace(demo, freeze_after_first=False),
        # What the released code computes: its colour-consistency term is identically zero.
        "colour-term-off": replace(demo, weights=replace(demo.weights, colour=0.0)),
        "3gs-online": online,
        # A cheaper stand-in when the CPU cannot fit a second t = 0: 3GS-O at t > 0 from the full run's t = 0
        # (which was fitted with the segmentation loss on).
        "3gs-online-t0-of-full": online,
    }


def seed_from_full(full: Path, out: Path, cfg: TrackingConfig) -> None:
    """Start `out` from the t = 0 of the finished run `full`: its run.h5 with `cfg`, its frame 0."""
    import shutil

    from tracking.store import frame_path, read_run, write_run

    if (out / "run.h5").exists():
        return
    run = read_run(full)
    shared = {k: v for k, v in run.config.to_dict().items() if k not in ("priors", "velocity_init",
                                                                          "freeze_after_first", "weights")}
    mine = {k: v for k, v in cfg.to_dict().items() if k in shared}
    w_full, w_mine = dict(run.config.to_dict()["weights"]), dict(cfg.to_dict()["weights"])
    w_full.pop("colour"), w_mine.pop("colour")
    if out.name not in T0_FROM_FULL_ANYWAY and (mine != shared or w_full != w_mine):
        raise ValueError(f"{out.name}: differs from {full.name} in more than the t > 0 switches")
    frame0 = frame_path(out, 0)
    frame0.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(frame_path(full, 0), frame0)
    if (full / "init_pt_cld.npz").exists():
        shutil.copyfile(full / "init_pt_cld.npz", out / "init_pt_cld.npz")
    run.config = cfg
    write_run(out, run)     # last: a run.h5 means t = 0 is complete


def truncated_copy(run: Path, out: Path, n_frames: int) -> Path:
    """A copy of `run` holding only its first n_frames frames (evaluates as the fit of those frames)."""
    import shutil

    from tracking.store import frame_path

    if out.exists():
        shutil.rmtree(out)
    frame_path(out, 0).parent.mkdir(parents=True)
    for t in range(n_frames):
        shutil.copyfile(frame_path(run, t), frame_path(out, t))
    for name in ("config.json", "init_pt_cld.npz", "run.h5"):
        if (run / name).exists():
            shutil.copyfile(run / name, out / name)
    return out


def main(argv=None) -> None:
    import data_tools
    from tracking.evaluate import evaluate
    from tracking.fit import fit
    from tracking.store import completed_frames
    from tracking.table import write_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all, in order)")
    ap.add_argument("--evaluate", action="store_true",
                    help="do not fit: evaluate every run on the frames all of them completed, write the table")
    ap.add_argument("--table", type=Path, default=None, help="with --evaluate: write PREFIX.md / PREFIX.csv")
    args = ap.parse_args(argv)
    todo = variants()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in todo]
        if bad:
            ap.error(f"--only: unknown variants {bad}; choose from {', '.join(todo)}")
        todo = {n: todo[n] for n in names}
    data = args.root / "data"
    if not (data / "gt_tracks.npz").exists():
        data_tools.make_synthetic_scene(data, progress=True, overwrite=True)
    n_frames = data_tools.load(data).n_frames
    if args.evaluate:
        done = {n: completed_frames(args.root / n) for n in todo}
        common = min(done.values())
        if common < 2:
            raise SystemExit(f"fewer than 2 frames in every run: {done}")
        runs = []
        for name in todo:
            run = args.root / name
            if common < n_frames:
                run = args.root / f"first-{common}-frames" / name
                if (run / "metrics.json").exists():  # evaluated before (resumable)
                    runs.append(run)
                    continue
                truncated_copy(args.root / name, run, common)
            m = evaluate(run, lpips=False, device="cpu")
            print(f"{name}: PSNR {m['psnr']:.2f} dB, mte_3d_pod_cm {m.get('mte_3d_pod_cm')}", flush=True)
            runs.append(run)
        if args.table is not None:
            md_path, csv_path, _ = write_table(runs, args.table)
            print(f"wrote {md_path} and {csv_path}")
        return
    # Frame rounds: every variant gets frame k before any gets frame k + 1, so that when time runs out all
    # of them hold the same frames (compared with --evaluate on the frames all completed).
    for k in range(1, n_frames + 1):
        for name, cfg in todo.items():
            out = args.root / name
            if completed_frames(out) >= k:
                continue
            if name in SHARED_T0 + T0_FROM_FULL_ANYWAY and completed_frames(args.root / "full") >= 1:
                seed_from_full(args.root / "full", out, cfg)
                if completed_frames(out) >= k:
                    continue
            t0 = time.perf_counter()
            fit(data, out, cfg, frames=list(range(k)), progress=False, echo=lambda s: None)
            print(f"{time.strftime('%H:%M:%S')} {name}: frame {k - 1} in {time.perf_counter() - t0:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
