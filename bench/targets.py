"""The project's speed targets, checked beside every measurement, and the printed results table.

Each record of a run gets the target of its benchmark/metric/backend (or none), `meets_target`
(True/False where the measurement is the target's setting, None elsewhere) and `target_status`:
"PASS ...", "MISS ..." with the gap, or "N/A: <why>" (e.g. "not measured on this device" for the
H100 targets on a CPU). Ratios against gsplat use the gsplat record of the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .harness import Record, machine_info

RANDOM_CASES = ("random", "original")


@dataclass(frozen=True)
class Target:
    """One target of the project and the measurements it is about.

    Attributes:
        id: short stable name (stored in records).
        text: the target as the project states it (README, Benchmarks).
        benchmark, metric: which records it is about.
        backends: backends it applies to (None: all).
        device_contains: substring of the device name it is stated for ("H100"), "cpu", or None.
        n_gaussians, resolution: the stated setting, or None for any.
        cases: scenes it is stated for, or None for any; case_prefix: the same for case specs with an argument
            ("basketball-early" also matches "basketball-early:/data"; "fitted:" matches only a tracking run).
        check: (record, peers of the same run) -> (passed or None, "value vs threshold" text).
    """

    id: str
    text: str
    benchmark: str
    metric: str
    check: Callable[[Record, Sequence[Record]], tuple[bool | None, str]]
    backends: tuple[str, ...] | None = None
    device_contains: str | None = None
    n_gaussians: int | None = None
    resolution: tuple[int, int] | None = None
    cases: tuple[str, ...] | None = None
    case_prefix: str | None = None   # "basketball-early" also matches "basketball-early:DATA"

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text}

    def matches_case(self, case: str) -> bool:
        if self.cases is not None and case not in self.cases:
            return False
        if self.case_prefix is None:
            return True
        if self.case_prefix.endswith(":"):   # "fitted:": only a case with an argument
            return case.startswith(self.case_prefix)
        return case.partition(":")[0] == self.case_prefix


def _gsplat_peer(record: Record, peers: Sequence[Record]) -> Record | None:
    for peer in peers:
        if (peer.backend == "gsplat" and peer.benchmark == record.benchmark and peer.metric == record.metric
                and peer.case == record.case and peer.n_gaussians == record.n_gaussians
                and (peer.width, peer.height) == (record.width, record.height)):
            return peer
    return None


def _ratio_text(value: float, threshold: float, unit: str, higher_is_better: bool) -> tuple[bool, str]:
    passed = value >= threshold if higher_is_better else value <= threshold
    relation = (">=" if passed else "<") if higher_is_better else ("<=" if passed else ">")
    if passed:
        return True, f"{value:.4g}{unit} {relation} {threshold:.4g}{unit}"
    factor = threshold / value if higher_is_better else value / threshold
    return False, f"{value:.4g}{unit} {relation} {threshold:.4g}{unit} (gap {factor:.2f}x)"


def _check_forward_fps(record: Record, peers: Sequence[Record]) -> tuple[bool | None, str]:
    passed, text = _ratio_text(record.timing.fps, 3000.0, " fps", higher_is_better=True)
    gsplat = _gsplat_peer(record, peers)
    if gsplat is None or gsplat.timing is None:
        reason = gsplat.skipped if gsplat is not None and gsplat.skipped else "not in this run"
        return None if passed else False, f"{text}; vs gsplat: N/A (gsplat {reason})"
    ratio = record.timing.fps / gsplat.timing.fps
    ratio_passed, ratio_text = _ratio_text(ratio, 1.2, "x gsplat", higher_is_better=True)
    return passed and ratio_passed, f"{text}; {ratio_text}"


def _check_forward_backward_vs_gsplat(record: Record, peers: Sequence[Record]) -> tuple[bool | None, str]:
    gsplat = _gsplat_peer(record, peers)
    if gsplat is None or gsplat.timing is None:
        reason = gsplat.skipped if gsplat is not None and gsplat.skipped else "not in this run"
        return None, f"gsplat {reason}"
    speed_passed, speed_text = _ratio_text(gsplat.timing.p50_ms / record.timing.p50_ms, 1.5, "x gsplat",
                                           higher_is_better=True)
    ours, theirs = record.peak_memory, gsplat.peak_memory
    if ours is None or theirs is None or ours.bytes is None or theirs.bytes is None:
        return None, f"{speed_text}; memory not measured"
    memory_passed = ours.bytes <= theirs.bytes
    relation = "<=" if memory_passed else ">"
    memory_text = f"memory {ours.bytes / 2**20:.0f} MiB {relation} gsplat {theirs.bytes / 2**20:.0f} MiB"
    return speed_passed and memory_passed, f"{speed_text}; {memory_text}"


def _check_intersections(record: Record, peers: Sequence[Record]) -> tuple[bool | None, str]:
    ratio = record.details.get("intersections", {}).get("ellipse_over_exact")
    if ratio is None:
        return None, "intersection report not available"
    passed, text = _ratio_text(ratio, 1.1, "", higher_is_better=False)
    report = record.details["intersections"]
    extra = (f", {report.get('ellipse_per_gaussian', 0):.2f} per Gaussian, "
             f"{report.get('ellipse_over_original', 0):.2f}x the original's 3-sigma rectangles")
    return passed, f"ellipse / exact minimum = {text}{extra}"


def _check_milliseconds(limit_ms: float) -> Callable[[Record, Sequence[Record]], tuple[bool | None, str]]:
    def check(record: Record, peers: Sequence[Record]) -> tuple[bool | None, str]:
        return _ratio_text(record.timing.p50_ms, limit_ms, " ms", higher_is_better=False)
    return check


def _check_spills(record: Record, peers: Sequence[Record]) -> tuple[bool | None, str]:
    spilled = record.details.get("spilled_bytes")
    if spilled is None:
        return None, "spill count not reported"
    return spilled == 0, f"{spilled} bytes spilled" + ("" if spilled == 0 else " (must be 0)")


TARGETS: tuple[Target, ...] = (
    Target("forward_h100", "forward >= 3000 fps and >= 1.2x gsplat at 300k Gaussians, 640x360, one H100",
           "render", "forward", _check_forward_fps, backends=("triton",), device_contains="H100",
           n_gaussians=300_000, resolution=(640, 360), cases=RANDOM_CASES),
    Target("forward_backward_h100", "forward + backward >= 1.5x gsplat with memory <= gsplat's at 300k "
           "Gaussians, 640x360, one H100", "step", "forward_backward", _check_forward_backward_vs_gsplat,
           backends=("triton",), device_contains="H100", n_gaussians=300_000, resolution=(640, 360),
           cases=RANDOM_CASES),
    Target("torch_cpu_forward_backward", "torch backend forward + backward <= 2 s at 50k Gaussians, 640x360, "
           "2 CPU cores", "step", "forward_backward", _check_milliseconds(2000.0), backends=("torch",),
           device_contains="cpu", n_gaussians=50_000, resolution=(640, 360), cases=RANDOM_CASES),
    # The torch backend's tile compositor on 2 CPU cores (forward + backward, `python -m bench stages`).
    Target("torch_cpu_basketball_early", "torch backend forward + backward <= 0.05 s on basketball-early (8,441 "
           "Gaussians, 160x90, D = 6, densify_channels=3), 2 CPU cores", "stages", "forward_backward",
           _check_milliseconds(50.0), backends=("torch",), device_contains="cpu", resolution=(160, 90),
           case_prefix="basketball-early"),
    Target("torch_cpu_fitted_run", "torch backend forward + backward <= 0.05 s at 160x90 on a fitted run "
           "(fitted:RUN, basketball after 300+ steps, ~30k Gaussians, D = 6), 2 CPU cores", "stages",
           "forward_backward", _check_milliseconds(50.0), backends=("torch",), device_contains="cpu",
           resolution=(160, 90), case_prefix="fitted:"),
    Target("torch_cpu_fitted", "torch backend forward + backward <= 0.3 s at 50k Gaussians, 640x360, fitted, "
           "2 CPU cores", "stages", "forward_backward", _check_milliseconds(300.0), backends=("torch",),
           device_contains="cpu", n_gaussians=50_000, resolution=(640, 360), cases=("fitted",)),
    Target("torch_cpu_random", "torch backend forward + backward <= 0.2 s at 50k Gaussians, 640x360, random, "
           "2 CPU cores", "stages", "forward_backward", _check_milliseconds(200.0), backends=("torch",),
           device_contains="cpu", n_gaussians=50_000, resolution=(640, 360), cases=("random",)),
    Target("intersections", "intersections within 1.1x of the exact minimum", "stages", "forward_backward",
           _check_intersections),
    Target("rigidity_h100", "rigidity losses < 1 ms per step at 100k foreground Gaussians, one H100", "step",
           "rigidity_losses", _check_milliseconds(1.0), device_contains="H100", n_gaussians=100_000),
    Target("zero_spills", "zero register spills in every Triton kernel", "compile_report", "compile",
           _check_spills),
)


def targets_for(record: Record) -> list[Target]:
    """The targets about this record's benchmark, metric and backend (in TARGETS order)."""
    return [target for target in TARGETS
            if target.benchmark == record.benchmark and target.metric == record.metric
            and (target.backends is None or record.backend in target.backends)]


def target_for(record: Record) -> Target | None:
    """The first target about this record's benchmark, metric and backend, if any."""
    targets = targets_for(record)
    return targets[0] if targets else None


def _why_not_applicable(target: Target, record: Record, device_only: bool = False) -> str | None:
    if target.device_contains is not None:
        if target.device_contains == "cpu":
            if record.device != "cpu":
                return "not measured on this device (target is for a CPU)"
        else:
            name = machine_info(record.device)["device_name"] if record.device != "cpu" else "cpu"
            if target.device_contains.lower() not in name.lower():
                return f"not measured on this device (target is for an {target.device_contains})"
    if device_only:
        return None
    if not target.matches_case(record.case):
        return f"target is for the {'/'.join(target.cases or (target.case_prefix.rstrip(':') + '...',))} scene"
    if target.n_gaussians is not None and record.n_gaussians != target.n_gaussians:
        return f"target is at {target.n_gaussians // 1000}k Gaussians"
    if target.resolution is not None and (record.width, record.height) != target.resolution:
        return f"target is at {target.resolution[0]}x{target.resolution[1]}"
    return None


def apply_targets(records: Sequence[Record]) -> None:
    """Fill target, meets_target and target_status of every record of one run, in place.

    A record that several targets apply to (a stages record: a time target and the intersection target)
    gets the first as `target`, all of them in details["targets"] ({id, text, meets_target, status}), a
    status joining theirs with "; ", and meets_target True only when none fails.
    """
    for record in records:
        if record.skipped is not None:
            record.target_status = f"N/A: skipped ({record.skipped})"
            continue
        targets = targets_for(record)
        if not targets:
            record.target_status = "N/A: no target for this measurement"
            continue
        outcomes = []
        first_reason = None
        for target in targets:
            reason = _why_not_applicable(target, record)
            if reason is not None:
                first_reason = first_reason or reason
                continue
            passed, text = target.check(record, records)
            if record.device == "cpu" and target.device_contains == "cpu":
                cores = machine_info("cpu")["cpu_count"]
                if cores != 2:
                    text += f" (measured with {cores} cores, target is for 2)"
            outcomes.append((target, passed, {True: "PASS", False: "MISS", None: "N/A"}[passed] + ": " + text))
        record.details.pop("targets", None)
        if not outcomes:
            record.target = targets[0].as_dict()
            record.meets_target = None
            record.target_status = f"N/A: {first_reason}"
            continue
        record.target = outcomes[0][0].as_dict()
        verdicts = [passed for _, passed, _ in outcomes if passed is not None]
        record.meets_target = all(verdicts) if verdicts else None
        record.target_status = "; ".join(status for _, _, status in outcomes)
        if len(outcomes) > 1:
            record.details["targets"] = [dict(target.as_dict(), meets_target=passed, status=status)
                                         for target, passed, status in outcomes]


def _verdicts(record: Record) -> list[tuple[str, bool | None, str]]:
    """(target id, meets_target, status) of every target applied to the record."""
    if "targets" in record.details:
        return [(t["id"], t["meets_target"], t["status"]) for t in record.details["targets"]]
    if record.target is None:
        return []
    return [(record.target["id"], record.meets_target, record.target_status)]


def target_summary(records: Sequence[Record]) -> list[tuple[str, str]]:
    """One line per target: its status in this run, or why it was not measured."""
    lines = []
    for target in TARGETS:
        verdicts = [(meets, status) for r in records for tid, meets, status in _verdicts(r) if tid == target.id]
        decided = [(meets, status) for meets, status in verdicts if meets is not None]
        if not decided:
            if verdicts:
                status = verdicts[0][1]
            elif target.device_contains and records and _why_not_applicable(target, records[0], device_only=True):
                status = "N/A: " + _why_not_applicable(target, records[0], device_only=True)
            else:
                status = "N/A: not measured in this run"
        elif all(meets for meets, _ in decided):
            status = decided[0][1]
        else:
            status = next(status for meets, status in decided if not meets)
        lines.append((target.text, status))
    return lines


def _format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.0f} MiB"


def format_table(records: Sequence[Record]) -> str:
    """Fixed-width text table: one row per record, the target and PASS/MISS/N/A beside it."""
    header = ("benchmark", "metric", "case", "backend", "N", "WxH", "p50 ms", "p20-p80 ms", "fps", "memory",
              "load", "target status")
    rows = [header]
    for r in records:
        size = f"{r.width}x{r.height}" if r.width else "-"
        n = f"{r.n_gaussians:,}" if r.n_gaussians else "-"
        if r.timing is not None:
            p50, spread, fps = (f"{r.timing.p50_ms:.1f}", f"{r.timing.p20_ms:.1f}-{r.timing.p80_ms:.1f}",
                                f"{r.timing.fps:.2f}" if r.timing.fps < 100 else f"{r.timing.fps:.0f}")
        else:
            p50, spread, fps = "-", "-", "-"
        status = r.target_status or ""
        memory = _format_bytes(r.peak_memory.bytes) if r.peak_memory else "-"
        load = f"{r.load_average_1m:.1f}" if r.load_average_1m is not None and r.timing is not None else "-"
        rows.append((r.benchmark, r.metric, r.case, r.backend, n, size, p50, spread, fps, memory, load, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])
        if index == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + len(header[-1])))
    return "\n".join(lines)


def format_summary(records: Sequence[Record]) -> str:
    """The targets, one per line, with this run's verdict."""
    lines = []
    for text, status in target_summary(records):
        verdict, _, reason = status.partition(": ")
        lines.append(f"  {verdict:4}  {text}  [{reason}]")
    return "\n".join(lines)
