"""`bench plot`: JSON results -> matplotlib PNGs, one set per device.

- render_fps.png: forward fps vs number of Gaussians, one line per backend x case x resolution;
- stages.png: stacked per-stage bars (p50) of forward + backward, per backend x scene;
- step.png: stacked training / tracking step parts (p50), per backend x scene;
- memory.png: peak memory vs number of Gaussians per benchmark x backend (what "peak" means is in
  each record's memory_kind, named in the axis label).
Skipped records are left out. Only measured numbers are drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import MEMORY_KINDS, load_results  # noqa: E402

FORWARD_FPS_TARGET = 3000.0  # the project's target, at 300k Gaussians 640x360 on one H100


def _measured(records: Sequence[dict], benchmark: str, metric: str | None = None) -> list[dict]:
    return [r for r in records if r.get("benchmark") == benchmark and (metric is None or r.get("metric") == metric)
            and not r.get("skipped") and r.get("p50_ms") is not None]


def _device_title(records: Sequence[dict]) -> str:
    machine = records[0].get("machine", {}) if records else {}
    commits = sorted({str(r.get("machine", {}).get("git_commit", "?"))[:10] for r in records})
    source = f"git {commits[0]}" if len(commits) == 1 else f"records of {len(commits)} commits"
    return f"{machine.get('device_name', '?')} (torch {machine.get('torch', '?')}, {source})"


def _unique_labels(labels: list[str], records: Sequence[dict]) -> list[str]:
    """Labels with the record's date (and CPU capability, where known) added to any that repeat: a categorical
    axis draws equal labels at one position, one bar over another."""
    counts = defaultdict(int)
    for label in labels:
        counts[label] += 1
    unique = []
    for label, record in zip(labels, records):
        if counts[label] > 1:
            capability = record.get("machine", {}).get("cpu_capability")
            label += f"\n{str(record.get('created', '?'))[:10]}" + (f" {capability}" if capability else "")
        unique.append(label)
    return unique


def plot_render_fps(records: Sequence[dict], path: Path) -> Path | None:
    measured = _measured(records, "render", "forward")
    if not measured:
        return None
    lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in measured:
        lines[(r["backend"], r["case"], f"{r['width']}x{r['height']}")].append((r["n_gaussians"], r["fps"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (backend, case, resolution), points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=f"{backend}, {case}, {resolution}")
    if measured[0].get("machine", {}).get("device_type") == "cuda":
        axes.axhline(FORWARD_FPS_TARGET, color="grey", linestyle="--", label="target 3000 fps (300k, H100)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("Gaussians")
    axes.set_ylabel("forward frames per second (p50)")
    axes.set_title(f"render: {_device_title(measured)}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    return _save(figure, path)


def _stacked_bars(axes, labels: list[str], stacks: list[dict[str, float]], order: list[str]) -> None:
    bottoms = [0.0] * len(labels)
    colours = plt.get_cmap("tab10")
    for index, name in enumerate(order):
        heights = [stack.get(name, 0.0) for stack in stacks]
        if not any(heights):
            continue
        axes.bar(labels, heights, bottom=bottoms, label=name, color=colours(index % 10))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.tick_params(axis="x", labelsize=7, labelrotation=20)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_stages(records: Sequence[dict], path: Path) -> Path | None:
    measured = _measured(records, "stages")
    if not measured:
        return None
    labels, stacks, order = [], [], []
    for r in measured:
        details = r.get("details", {})
        stack = {name: values["p50_ms"] for name, values in details.get("stages", {}).items()}
        for name in details.get("stage_order", list(stack)):
            if name not in order:
                order.append(name)
        stack["other forward"] = max(0.0, details.get("unattributed_forward_ms") or 0.0)
        stack["other backward"] = max(0.0, details.get("unattributed_backward_ms") or 0.0)
        labels.append(f"{r['backend']}\n{r['case']} {r['n_gaussians']:,} {r['width']}x{r['height']}")
        stacks.append(stack)
    labels = _unique_labels(labels, measured)
    order += ["other forward", "other backward"]
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(labels) + 3.5), 4.5))
    _stacked_bars(axes, labels, stacks, order)
    axes.set_ylabel("ms per forward + backward (p50 per stage)")
    axes.set_title(f"stages: {_device_title(measured)}", fontsize=9)
    return _save(figure, path)


def plot_step(records: Sequence[dict], path: Path) -> Path | None:
    measured = [r for r in _measured(records, "step") if r["metric"] in ("training_step", "tracking_step")]
    if not measured:
        return None
    labels, stacks = [], []
    for r in measured:
        parts = r.get("details", {}).get("parts", {})
        n = f"{r['n_gaussians'] // 1000}k" if r.get("n_gaussians") else ""
        labels.append(f"{r['metric'].replace('_step', '')} {r['backend']}\n{r['case']} {n}")
        stacks.append({name: values["p50_ms"] for name, values in parts.items()})
    labels = _unique_labels(labels, measured)
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(labels) + 3.5), 4.5))
    _stacked_bars(axes, labels, stacks, ["forward", "backward", "adam"])
    axes.set_ylabel("ms per step (p50 per part)")
    axes.set_title(f"step: {_device_title(measured)}", fontsize=9)
    return _save(figure, path)


def plot_memory(records: Sequence[dict], path: Path) -> Path | None:
    measured = [r for r in records if r.get("peak_memory_bytes") is not None and not r.get("skipped")
                and r.get("n_gaussians")]
    if not measured:
        return None
    lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    kinds = set()
    for r in measured:
        resolution = f"{r['width']}x{r['height']}" if r.get("width") else "no image"
        key = (r["benchmark"], r["metric"], r["backend"], r["case"], resolution)
        lines[key].append((r["n_gaussians"], r["peak_memory_bytes"] / 2**20))
        kinds.add(r.get("memory_kind"))
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for (benchmark, metric, backend, case, resolution), points in sorted(lines.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=f"{benchmark}/{metric}, {backend}, {case}, {resolution}")
    axes.set_xscale("log")
    axes.set_xlabel("Gaussians")
    kind_text = "; ".join(sorted(k for k in kinds if k))
    axes.set_ylabel(f"peak memory, MiB\n({kind_text})", fontsize=8)
    axes.set_title(f"memory: {_device_title(measured)}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if kinds - set(MEMORY_KINDS) - {None}:
        axes.text(0.01, 0.01, "unknown memory kinds present", transform=axes.transAxes, fontsize=6)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PLOTS = {"render_fps.png": plot_render_fps, "stages.png": plot_stages, "step.png": plot_step,
         "memory.png": plot_memory}


def plot_results(source: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Draw every plot for each device found under `source` (a results folder or one JSON file).

    PNGs go to `out_dir/<device slug>/` when `out_dir` is given, else beside the device's JSON files.
    Raises ValueError when `source` holds no results.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"plot: {source} does not exist")
    records = load_results(source)
    if not records:
        raise ValueError(f"plot: no benchmark records (JSON with a 'records' list) under {source}")
    by_device: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_device[record.get("machine", {}).get("device_slug", "unknown")].append(record)
    written = []
    for slug, device_records in sorted(by_device.items()):
        if out_dir is not None:
            folder = Path(out_dir) / slug
        elif source.is_dir():
            folder = source / slug if (source / slug).is_dir() else source
        else:
            folder = source.parent
        for name, plot in PLOTS.items():
            path = plot(device_records, folder / name)
            if path is not None:
                written.append(path)
    return written
