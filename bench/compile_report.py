"""`bench compile-report`: ahead-of-time compile of every Triton kernel for sm_80 and sm_90.

Needs no GPU: `tritonsplat.aot.compile_report(archs)` compiles in its own subprocess without
TRITON_INTERPRET and returns one row per kernel and architecture (registers, spilled bytes, shared
memory, warps, constexpr configuration). Each row becomes a record of benchmark "compile_report",
metric "compile", backend "triton", device "aot:sm_XX", with the row in `details`; the target is
zero spills, and the command exits non-zero when any kernel spills.

`python -m bench.compile_report [--out bench/results/compile]` writes the full report (every row of
`python -m tritonsplat.aot --json`, including the SASS loop figures of the compositing kernels) to
`compile_report.json` and plots instructions per Gaussian-pixel pair at sm_90 next to the targets and
the CUDA reference design to `compile_report.png` (`plot_compile_report`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .harness import REPO_ROOT, Record, machine_info, now_utc

BENCHMARK = "compile_report"
METRIC = "compile"
ARCHITECTURES = (80, 90)
ROW_KEYS = ("kernel", "arch", "registers", "spilled_bytes", "shared_memory_bytes", "num_warps", "config")


class AotUnavailable(RuntimeError):
    """tritonsplat.aot (or its compile_report) does not import."""


def load_compile_report():
    try:
        from tritonsplat.aot import compile_report
    except Exception as error:  # ImportError today; anything the module raises while it is being written
        raise AotUnavailable(
            f"the AOT module is unavailable: tritonsplat.aot.compile_report does not import "
            f"({type(error).__name__}: {error})") from error
    return compile_report


def run_compile_report(archs: Sequence[int] = ARCHITECTURES, device: str = "cpu") -> list[Record]:
    """Compile every kernel for `archs`; one record per (kernel, arch). Raises AotUnavailable."""
    compile_report = load_compile_report()
    started = time.perf_counter()
    rows = compile_report(archs=tuple(archs))
    elapsed = time.perf_counter() - started
    records = []
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"tritonsplat.aot.compile_report row lacks {missing}: {row}")
        records.append(Record(benchmark=BENCHMARK, metric=METRIC, case=str(row["kernel"]), backend="triton",
                              device=device, details={**dict(row), "arch": str(row["arch"]),
                                                      "compile_seconds_all_kernels": elapsed}))
    return records


def spilling_kernels(records: Sequence[Record]) -> list[str]:
    return [f"{r.details['kernel']} ({r.details['arch']}): {r.details['spilled_bytes']} bytes"
            for r in records if r.skipped is None and r.details.get("spilled_bytes")]


def format_compile_table(records: Sequence[Record]) -> str:
    header = ("kernel", "arch", "registers", "spilled bytes", "shared memory", "warps", "CTAs/SM", "barriers",
              "fences", "instr/pair", "config")
    rows = [header] + [
        (str(r.details["kernel"]), str(r.details["arch"]), str(r.details["registers"]), str(r.details["spilled_bytes"]),
         str(r.details["shared_memory_bytes"]), str(r.details["num_warps"]), str(r.details.get("ctas_per_sm", "-")),
         str(r.details.get("barriers", "-")), str(r.details.get("fences", "-")),
         str(r.details.get("instructions_per_pair", "-")), str(r.details["config"]))
        for r in records if r.skipped is None]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def run_in_subprocess(out_dir: Path, device: str, timeout_s: float) -> tuple[int | None, str]:
    """Run `python -m bench compile-report` in its own process group with a time limit (for `all`).

    Returns (exit status, or None when it timed out and was stopped; its combined output).
    """
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench", "compile-report", "--out", str(out_dir), "--device", device]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # the group we created: the report and its compiler children
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        return None, output or ""


# Instructions per Gaussian-pixel pair at sm_90 (Triton 3.9, cuobjdump -sass, main loop x threads /
# (Gaussians per iteration x pixels per tile)) of the compositing kernels at commit d02f9a1, and of a
# minimal CUDA kernel written like gsplat's forward (nvcc -O3 -arch=sm_90), measured the same way.
BEFORE_SM90 = {"composite_forward[D=3]": 127.0, "composite_forward[D=6]": 176.0, "composite_backward[D=3]": 342.0,
               "composite_backward[D=6]": 420.0}
CUDA_REFERENCE_SM90 = {"forward D=3": (32.0, 55.0), "forward D=6": (32.0, 60.0), "backward (model)": (90.0, 90.0)}
TARGETS_SM90 = {"composite_forward[D=3]": 45.0, "composite_forward[D=6]": 60.0, "composite_backward[D=3]": 120.0}


def plot_compile_report(rows: Sequence[dict], path: Path) -> Path | None:
    """Bar chart: instructions per pair of each compositing variant at sm_90, with targets and the
    figures before this design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("arch") == "sm_90" and r.get("instructions_per_pair") is not None]
    if not measured:
        return None
    figure, axes = plt.subplots(figsize=(10, 0.32 * len(measured) + 1.5))
    names = [r["name"] for r in measured]
    axes.barh(names, [r["instructions_per_pair"] for r in measured], color="tab:blue", label="now")
    before = [(i, BEFORE_SM90[n]) for i, n in enumerate(names) if n in BEFORE_SM90]
    axes.scatter([b for _, b in before], [i for i, _ in before], color="tab:red", marker="x", label="before (d02f9a1)")
    targets = [(i, TARGETS_SM90[n]) for i, n in enumerate(names) if n in TARGETS_SM90]
    axes.scatter([t for _, t in targets], [i for i, _ in targets], color="black", marker="|", s=200, label="target")
    axes.axvspan(*CUDA_REFERENCE_SM90["forward D=3"], color="grey", alpha=0.15, label="CUDA reference forward")
    axes.invert_yaxis()
    axes.set_xlabel("SASS instructions per Gaussian-pixel pair (sm_90, static)")
    axes.set_title("compositing kernels: main loop x threads / (Gaussians per iteration x pixels per tile)", fontsize=9)
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Full compile report -> <out>/compile_report.json and .png; exit 1 on errors, spills or fences."""
    import argparse
    import json

    from tritonsplat import aot

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "compile")
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--only", default=None, help="only variants whose name contains this text")
    parser.add_argument("--all", action="store_true",
                        help="every structurally distinct variant (tritonsplat.aot --all)")
    parser.add_argument("--checkpoint", default=None, help="JSON-lines file to resume from and append to")
    parser.add_argument("--stem", default="compile_report", help="file name of the .json and .png (no suffix)")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(","))
    started = time.perf_counter()
    rows = load_compile_report()(archs=archs, only=args.only, exhaustive=args.all, checkpoint=args.checkpoint,
                                 timeout=24 * 3600.0)
    command = "python -m bench.compile_report " + " ".join(argv if argv is not None else sys.argv[1:])
    failed = [r["name"] + " " + r["arch"] for r in rows if aot.failures(r)]
    payload = {"benchmark": BENCHMARK, "created": now_utc(), "how": command.strip(), "command": command.strip(),
               "n_variants": len(rows), "n_compiled": sum(r["error"] is None for r in rows),
               "n_failed_checks": len(failed), "failed": failed,
               "compile_seconds": round(time.perf_counter() - started, 1),
               "compile_seconds_sum_of_records": round(sum(r.get("compile_seconds") or 0 for r in rows), 1),
               "machine": machine_info("cpu"),
               "before_sm90_instructions_per_pair": BEFORE_SM90, "cuda_reference_sm90": CUDA_REFERENCE_SM90,
               "targets_sm90": TARGETS_SM90, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.stem}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    temporary.replace(path)
    plot_compile_report(rows, args.out / f"{args.stem}.png")
    print(aot.format_table(rows))
    print(f"wrote {path}")
    return 1 if any(aot.failures(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
