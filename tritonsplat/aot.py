"""Ahead-of-time compilation of every Triton kernel for real GPUs, on any machine (no GPU needed).

Each kernel variant that the pipeline launches is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))` and its cubin is read with the
`cuobjdump --dump-resource-usage` shipped inside triton: registers per thread, stack (spill) bytes,
local memory and static shared memory (plus Triton's dynamic shared memory from the metadata).

Each cubin is also disassembled (`cuobjdump -sass`) and read like a profiler would: barriers
(BAR.*), fences (MEMBAR.* / FENCE.*), and, for kernels with a main loop (the compositing kernels),
the static instruction count of that loop (the longest backward branch), the runtime loops nested
inside it (must be none: channels and batch entries are unrolled, so the count is what runs), and

    instructions_per_pair = loop_instructions x threads per CTA / (Gaussians per iteration x pixels per tile)

`ctas_per_sm` is the occupancy limit from registers (allocated per warp in units of 256), shared
memory, threads (2048 per SM) and blocks (32 per SM) on the target architecture.

Kernels decorated while TRITON_INTERPRET=1 is set are interpreter objects and cannot be compiled, so
`compile_report()` runs the compile in a subprocess whose environment has TRITON_INTERPRET removed:

    python -m tritonsplat.aot            # table; exit status 1 if any kernel spills, fences or fails
    python -m tritonsplat.aot --json     # machine-readable records, one per (kernel variant, arch):
        name, arch, registers, spill_bytes, ctas_per_sm, barriers, fences, and for compositing kernels
        loop_instructions, gaussians_per_iteration, pixels_per_thread, instructions_per_pair
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)


@dataclass(frozen=True)
class KernelVariant:
    """One compiled configuration of a kernel."""

    name: str            # report name
    module: str          # tritonsplat.ops.<module>
    kernel: str          # function name in the module
    signature: dict      # argument -> Triton type ("*fp32", "i32", ..., "constexpr")
    constexprs: dict     # constexpr argument -> value
    num_warps: int
    batch: int | None = None              # Gaussians per main-loop iteration (compositing)
    pixels_per_thread: int | None = None  # (compositing)
    tile_pixels: int | None = None        # pixels per program (compositing)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.constexprs.items())


VARIANT_MODULES = ("projection", "antialiasing", "checks", "binning", "sorting", "compositing", "ssim", "rigidity")


def _declared_variants(module: str, exhaustive: bool = False) -> list[KernelVariant]:
    """The variants a `tritonsplat.ops` module declares with its launchers' own constants."""
    import importlib

    declared = importlib.import_module(f"tritonsplat.ops.{module}").compiled_variants(exhaustive)
    return [KernelVariant(v["name"], module, v["kernel"], v["signature"], v["constexprs"], v["num_warps"],
                          v.get("batch"), v.get("pixels_per_thread"), v.get("tile_pixels"))
            for v in declared]


def _identity(variant: KernelVariant) -> tuple:
    """Two variants with the same kernel, constexprs and warps are one compilation."""
    return variant.module, variant.kernel, tuple(sorted(variant.constexprs.items())), variant.num_warps


def kernel_variants(exhaustive: bool = False) -> list[KernelVariant]:
    """The kernel configurations the pipeline launches (worst cases for register pressure); with
    `exhaustive`, every structurally distinct configuration the launchers accept (each tile size, every
    channel count, every SH degree), the default ones first, each compilation once."""
    default = [v for module in VARIANT_MODULES for v in _declared_variants(module)]
    if not exhaustive:
        return default
    seen = {_identity(v) for v in default}
    extra = []
    for module in VARIANT_MODULES:
        for variant in _declared_variants(module, exhaustive=True):
            if _identity(variant) not in seen:
                seen.add(_identity(variant))
                extra.append(variant)
    return default + extra


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.[A-Z0-9_]+)*\s+(?:[!U]*P[T0-9]+\s*,\s*)?(0x[0-9a-f]+)")
# Per-SM limits: (registers, threads, resident blocks, shared memory bytes), shared memory reserved per block.
SM_LIMITS = {80: (65536, 2048, 32, 167936), 90: (65536, 2048, 32, 233472)}
RESERVED_SHARED_PER_BLOCK = 1024


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _opcode(instruction: str) -> str:
    """SASS opcode without predicate guard and modifiers: '@!P0 BRA.DIV UR4, 0x10' -> 'BRA'."""
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", instruction)
    return text.split()[0].split(".")[0] if text else ""


def analyse_sass(sass: str) -> dict:
    """Static figures of one kernel's SASS: instruction count, barriers, fences, and its main loop
    (the longest backward branch: start and end address, instructions, runtime loops nested inside)."""
    instructions = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            instructions.append((int(match.group(1), 16), match.group(2)))
    loops = []
    for address, text in instructions:
        target = _BRANCH_TARGET.search(text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    opcodes = [_opcode(text) for _, text in instructions]
    result = {"instructions": len(instructions), "barriers": sum(op == "BAR" for op in opcodes),
              "fences": sum(op in ("MEMBAR", "FENCE") for op in opcodes),
              "loop_instructions": None, "inner_loops": None, "loop_barriers": None}
    if loops:
        start, end = max(loops, key=lambda loop: loop[1] - loop[0])
        body = [op for (address, _), op in zip(instructions, opcodes) if start <= address <= end]
        result.update(loop_instructions=len(body), loop_barriers=sum(op == "BAR" for op in body),
                      inner_loops=sum(1 for s, e in loops if (s, e) != (start, end) and start <= s and e <= end))
    return result


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM allowed by registers, threads, the block limit and shared memory."""
    register_file, max_threads, max_blocks, shared_per_sm = SM_LIMITS[arch]
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (register_file // registers_per_warp) // num_warps
    by_threads = max_threads // (32 * num_warps)
    by_shared = shared_per_sm // (shared_bytes + RESERVED_SHARED_PER_BLOCK)
    return min(by_registers, by_threads, max_blocks, by_shared)


def _read_checkpoint(path: str | None) -> dict:
    """Records already compiled by an earlier, interrupted run: (name, arch) -> record."""
    if not path or not os.path.exists(path):
        return {}
    done = {}
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut short when the run was stopped
                continue
            done[(record["name"], record["arch"])] = record
    return done


def _compile_in_process(archs=ARCHS, only: str | None = None, exhaustive: bool = False,
                        checkpoint: str | None = None) -> list[dict]:
    """Compile every variant here (TRITON_INTERPRET must be unset before the ops were imported).

    With `checkpoint`, each record is appended to that JSON-lines file as soon as it is made and the
    records already there are reused, so a stopped run resumes; progress goes to stderr."""
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done = _read_checkpoint(checkpoint)
    work = [(variant, arch) for variant in kernel_variants(exhaustive) if not only or only in variant.name
            for arch in archs]
    records = []
    for index, (variant, arch) in enumerate(work, 1):
        if (variant.name, f"sm_{arch}") in done:
            records.append(done[(variant.name, f"sm_{arch}")])
            continue
        started = time.perf_counter()
        module = importlib.import_module(f"tritonsplat.ops.{variant.module}")
        kernel = getattr(module, variant.kernel)
        record = {"name": variant.name, "kernel": variant.name, "arch": f"sm_{arch}",
                  "num_warps": variant.num_warps, "config": variant.describe()}
        try:
            source = ASTSource(fn=kernel, signature=variant.signature, constexprs=variant.constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": variant.num_warps})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                handle.write(compiled.asm["cubin"])
                handle.flush()
                dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name],
                                      capture_output=True, text=True, check=True).stdout
                sass = subprocess.run([_cuobjdump(), "-sass", handle.name],
                                      capture_output=True, text=True, check=True).stdout
            match = _RESOURCE_LINE.search(dump)
            if match is None:
                raise RuntimeError(f"could not parse cuobjdump output: {dump!r}")
            registers, stack, shared, local = (int(v) for v in match.groups())
            shared_total = shared + int(getattr(compiled.metadata, "shared", 0) or 0)
            figures = analyse_sass(sass)
            record.update(registers=registers, spill_bytes=stack + local, spilled_bytes=stack + local,
                          stack_bytes=stack, local_bytes=local, shared_memory_bytes=shared_total,
                          ctas_per_sm=ctas_per_sm(arch, registers, variant.num_warps, shared_total),
                          barriers=figures["barriers"], fences=figures["fences"],
                          sass_instructions=figures["instructions"], error=None)
            if variant.batch is not None:
                loop = figures["loop_instructions"]
                threads = 32 * variant.num_warps
                record.update(
                    loop_instructions=loop, gaussians_per_iteration=variant.batch,
                    pixels_per_thread=variant.pixels_per_thread, inner_loops=figures["inner_loops"],
                    loop_barriers=figures["loop_barriers"],
                    instructions_per_pair=None if loop is None else round(
                        loop * threads / (variant.batch * variant.tile_pixels), 2))
        except Exception as error:  # report, do not hide: a failed compile is a failed check
            record.update(registers=None, spill_bytes=None, spilled_bytes=None, stack_bytes=None,
                          local_bytes=None, shared_memory_bytes=None, ctas_per_sm=None, barriers=None,
                          fences=None, error=f"{type(error).__name__}: {error}")
            if variant.batch is not None:
                record.update(loop_instructions=None, gaussians_per_iteration=variant.batch,
                              pixels_per_thread=variant.pixels_per_thread, instructions_per_pair=None)
        record["compile_seconds"] = round(time.perf_counter() - started, 1)
        records.append(record)
        if checkpoint:
            with open(checkpoint, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if checkpoint or exhaustive:
            print(f"[{index}/{len(work)}] {variant.name} {record['arch']} {record['compile_seconds']} s "
                  f"{' '.join(failures(record)) or 'ok'}", file=sys.stderr, flush=True)
    return records


def compile_report(archs=ARCHS, timeout: float = 3600.0, only: str | None = None, exhaustive: bool = False,
                   checkpoint: str | None = None) -> list[dict]:
    """Compile every kernel (or those whose name contains `only`) for `archs` in a subprocess without
    TRITON_INTERPRET; one dict per (variant, arch) with name (also as kernel), arch, registers,
    spill_bytes (also as spilled_bytes), ctas_per_sm, barriers, fences, shared_memory_bytes, num_warps,
    config, error (None on success), and the loop figures for compositing kernels."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-m", "tritonsplat.aot", "--json", "--archs", ",".join(str(a) for a in archs)]
    if only:
        command += ["--only", only]
    if exhaustive:
        command += ["--all"]
    if checkpoint:
        command += ["--checkpoint", str(checkpoint)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if checkpoint else subprocess.PIPE,
                            text=True, env=environment, timeout=timeout)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"AOT compile subprocess failed ({result.returncode}):\n{(result.stderr or '')[-4000:]}")
    return json.loads(result.stdout)


def failures(record: dict) -> list[str]:
    """What is wrong with one record: a compile error, spills, fences, runtime loops inside the main loop."""
    if record["error"]:
        return ["ERROR " + record["error"][:60]]
    problems = []
    if record["spill_bytes"]:
        problems.append("SPILLS")
    if record["fences"]:
        problems.append("FENCES")
    if record.get("inner_loops"):
        problems.append("INNER LOOPS")
    return problems


def format_table(records: list[dict]) -> str:
    lines = [f"{'kernel':48} {'arch':6} {'regs':>5} {'spill':>5} {'CTA/SM':>6} {'bar':>4} {'fence':>5} "
             f"{'loop':>6} {'B':>3} {'px/t':>4} {'/pair':>6} {'warps':>5}  status"]
    for r in records:
        def cell(key, record=r):
            value = record.get(key)
            return "-" if value is None else str(value)

        lines.append(f"{r['name']:48} {r['arch']:6} {cell('registers'):>5} {cell('spill_bytes'):>5} "
                     f"{cell('ctas_per_sm'):>6} {cell('barriers'):>4} {cell('fences'):>5} "
                     f"{cell('loop_instructions'):>6} {cell('gaussians_per_iteration'):>3} "
                     f"{cell('pixels_per_thread'):>4} {cell('instructions_per_pair'):>6} {r['num_warps']:>5}  "
                     f"{' '.join(failures(r)) or 'ok'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON records")
    parser.add_argument("--archs", default=",".join(str(a) for a in ARCHS))
    parser.add_argument("--only", default=None, help="compile only variants whose name contains this text")
    parser.add_argument("--all", action="store_true",
                        help="every structurally distinct variant the launchers accept (each tile size, D, SH degree)")
    parser.add_argument("--checkpoint", default=None,
                        help="JSON-lines file: append each record as it is made, reuse those already there (resume)")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(","))
    if os.environ.get("TRITON_INTERPRET") == "1":
        records = compile_report(archs, timeout=24 * 3600.0, only=args.only, exhaustive=args.all,
                                 checkpoint=args.checkpoint)
    else:
        records = _compile_in_process(archs, only=args.only, exhaustive=args.all, checkpoint=args.checkpoint)
    print(json.dumps(records, indent=1) if args.json else format_table(records))
    failed = any(failures(r) for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
