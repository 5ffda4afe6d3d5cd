"""Ablations of Dynamic 3D Gaussians on the demo scene (the paper's Table 3 switches and its 3GS-O baseline).

    python -m bench.ablations ROOT [--only NAME,...] [--table bench/results/<device>/ablations]

Fits each variant of the `demo` preset on the demo's synthetic scene (`data-tools synth` defaults: 160x120,
12 train + 2 test cameras, 10 frames; generated once into ROOT/data) into ROOT/<name>, evaluates it, and
builds the `tritonsplat-track table` of all finished runs. Resumable: a run with a metrics.json is skipped,
an unfinished fit resumes from its last completed frame. Runs one after another (the fit uses every core).

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


def variants() -> dict[str, TrackingConfig]:
    """name -> config: the demo preset and one switch changed per variant (Luiten et al. 2024, Table 3)."""
    demo = TrackingConfig.from_preset("demo", backend="torch", device="cpu")

    def without(prior: str) -> TrackingConfig:
        return replace(demo, priors=tuple(p for p in PRIORS if p != prior))

    return {
        "full": demo,
        # The paper's 3GS-O with the demo's steps and CPU settings: no priors, no velocity extrapolation,
        # nothing frozen after t = 0, no segmentation render (see the 3gs-online preset).
        "3gs-online": replace(demo, preset="3gs-online", priors=(), velocity_init=False, freeze_after_first=False,
                              weights=replace(demo.weights, seg=0.0, floor=0.0, colour=0.0)),
        "no-rigid": without("rigid"),
        "no-rot": without("rot"),
        "no-iso": without("iso"),
        "no-bg": without("bg"),
        "no-velocity-init": replace(demo, velocity_init=False),
        "no-freeze": replace(demo, freeze_after_first=False),
        # What the released code computes: its colour-consistency term is identically zero.
        "colour-term-off": replace(demo, weights=replace(demo.weights, colour=0.0)),
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
    if mine != shared or w_full != w_mine:
        raise ValueError(f"{out.name}: differs from {full.name} in more than the t > 0 switches")
    frame0 = frame_path(out, 0)
    frame0.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(frame_path(full, 0), frame0)
    if (full / "init_pt_cld.npz").exists():
        shutil.copyfile(full / "init_pt_cld.npz", out / "init_pt_cld.npz")
    run.config = cfg
    write_run(out, run)     # last: a run.h5 means t = 0 is complete


def main(argv=None) -> None:
    import data_tools
    from tracking.evaluate import evaluate
    from tracking.fit import fit
    from tracking.table import write_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all, in order)")
    ap.add_argument("--table", type=Path, default=None, help="write PREFIX.md / PREFIX.csv of the finished runs")
    ap.add_argument("--frames", type=int, default=None, help="fit only the first N frames (default: all 10)")
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
    for name, cfg in todo.items():
        out = args.root / name
        if (out / "metrics.json").exists():
            print(f"{name}: done, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        if name in SHARED_T0 and (args.root / "full" / "metrics.json").exists():
            seed_from_full(args.root / "full", out, cfg)
        frames = list(range(args.frames)) if args.frames else None
        fit(data, out, cfg, frames=frames, progress=False)
        m = evaluate(out, lpips=False, device="cpu")
        print(f"{name}: {time.perf_counter() - t0:.0f} s, PSNR {m['psnr']:.2f} dB, mte_3d_pod_cm "
              f"{m.get('mte_3d_pod_cm')}, {m['n_gaussians']:,} Gaussians", flush=True)
    if args.table is not None:
        done = [args.root / n for n in variants() if (args.root / n / "metrics.json").exists()]
        md_path, csv_path, _ = write_table(done, args.table)
        print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
