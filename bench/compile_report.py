"""`bench compile-report`: ahead-of-time compile of every Triton kernel for sm_80 and sm_90.

Needs no GPU: `tritonsplat.aot.compile_report(archs)` compiles in its own subprocess without
TRITON_INTERPRET and returns one row per kernel and architecture (registers, spilled bytes, shared
memory, warps, constexpr configuration). Each row becomes a record of benchmark "compile_report",
metric "compile", backend "triton", device "aot:sm_XX", with the row in `details`; the target is
zero spills, and the command exits non-zero when any kernel spills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .harness import REPO_ROOT, Record

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
    header = ("kernel", "arch", "registers", "spilled bytes", "shared memory", "warps", "config")
    rows = [header] + [
        (str(r.details["kernel"]), str(r.details["arch"]), str(r.details["registers"]), str(r.details["spilled_bytes"]),
         str(r.details["shared_memory_bytes"]), str(r.details["num_warps"]), str(r.details["config"]))
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
