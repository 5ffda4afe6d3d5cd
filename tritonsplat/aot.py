"""Ahead-of-time compilation of every Triton kernel for real GPUs, on any machine (no GPU needed).

Each kernel variant that the pipeline launches is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))` and its cubin is read with the
`cuobjdump --dump-resource-usage` shipped inside triton: registers per thread, stack (spill) bytes,
local memory and static shared memory (plus Triton's dynamic shared memory from the metadata).

Kernels decorated while TRITON_INTERPRET=1 is set are interpreter objects and cannot be compiled, so
`compile_report()` runs the compile in a subprocess whose environment has TRITON_INTERPRET removed:

    python -m tritonsplat.aot            # table; exit status 1 if any kernel spills
    python -m tritonsplat.aot --json     # machine-readable records
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

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.constexprs.items())


def _declared_variants(module: str) -> list[KernelVariant]:
    """The variants a `tritonsplat.ops` module declares with its launchers' own constants."""
    import importlib

    declared = importlib.import_module(f"tritonsplat.ops.{module}").compiled_variants()
    return [KernelVariant(v["name"], module, v["kernel"], v["signature"], v["constexprs"], v["num_warps"])
            for v in declared]


def _projection_variants() -> list[KernelVariant]:
    return _declared_variants("projection") + _declared_variants("checks")


def _binning_variants() -> list[KernelVariant]:
    return _declared_variants("binning")


def _sorting_variants() -> list[KernelVariant]:
    return _declared_variants("sorting")


def _compositing_variants() -> list[KernelVariant]:
    from .ops._launch import launch_settings

    forward = launch_settings("compositing_forward")
    backward = launch_settings("compositing_backward")
    pointers = ["means2d_ptr", "conics_ptr", "opacities_ptr", "colors_ptr", "depths_ptr", "backgrounds_ptr"]
    forward_signature = {name: "*fp32" for name in pointers}
    forward_signature.update({
        "ranges_ptr": "*i64", "ids_ptr": "*i32", "out_colors_ptr": "*fp32", "out_alphas_ptr": "*fp32",
        "out_depths_ptr": "*fp32", "out_median_ptr": "*fp32", "out_final_ptr": "*fp32", "out_last_ptr": "*i32",
        "n_gaussians": "i32", "n_channels": "i32", "color_stride_camera": "i32", "width": "i32", "height": "i32",
        "tiles_x": "i32", "n_tiles": "i32", "alpha_cap": "fp32", "TILE_SIZE": "constexpr", "BATCH": "constexpr",
        "HAS_BACKGROUND": "constexpr", "REGISTER_CHANNELS": "constexpr"})
    backward_signature = {name: "*fp32" for name in pointers}
    backward_signature.update({
        "ranges_ptr": "*i64", "ids_ptr": "*i32", "final_ptr": "*fp32", "last_ptr": "*i32",
        "grad_colors_ptr": "*fp32", "grad_alphas_ptr": "*fp32", "grad_depths_ptr": "*fp32",
        "out_grad_means2d_ptr": "*fp32", "out_grad_conics_ptr": "*fp32", "out_grad_opacities_ptr": "*fp32",
        "out_grad_colors_ptr": "*fp32", "out_grad_depths_ptr": "*fp32", "out_grad_abs_ptr": "*fp32",
        "out_grad_densify_ptr": "*fp32", "rows_ptr": "*fp32", "n_gaussians": "i32", "n_channels": "i32",
        "densify_channels": "i32", "color_stride_camera": "i32", "width": "i32", "height": "i32",
        "tiles_x": "i32", "n_tiles": "i32", "alpha_cap": "fp32", "row_width": "i32",
        "TILE_SIZE": "constexpr", "BATCH": "constexpr", "HAS_BACKGROUND": "constexpr", "ABSGRAD": "constexpr",
        "DENSIFY": "constexpr", "DETERMINISTIC": "constexpr"})
    variants = [KernelVariant(f"composite_forward[register_channels={rc}]", "compositing",
                              "_composite_forward_kernel", forward_signature,
                              {"TILE_SIZE": 16, "BATCH": forward.block, "HAS_BACKGROUND": True,
                               "REGISTER_CHANNELS": rc}, forward.num_warps)
                for rc in (0, 4, 8)]
    for deterministic in (False, True):
        for extras in (False, True):
            variants.append(KernelVariant(
                f"composite_backward[{'deterministic' if deterministic else 'atomic'}"
                f"{',absgrad+densify' if extras else ''}]", "compositing", "_composite_backward_kernel",
                backward_signature,
                {"TILE_SIZE": 16, "BATCH": backward.block, "HAS_BACKGROUND": True, "ABSGRAD": extras,
                 "DENSIFY": extras, "DETERMINISTIC": deterministic}, backward.num_warps))
    return variants


def kernel_variants() -> list[KernelVariant]:
    """Every kernel configuration the pipeline launches (worst cases for register pressure)."""
    return _projection_variants() + _binning_variants() + _sorting_variants() + _compositing_variants()


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_in_process(archs=ARCHS) -> list[dict]:
    """Compile every variant here (TRITON_INTERPRET must be unset before the ops were imported)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records = []
    for variant in kernel_variants():
        module = importlib.import_module(f"tritonsplat.ops.{variant.module}")
        kernel = getattr(module, variant.kernel)
        for arch in archs:
            record = {"kernel": variant.name, "arch": f"sm_{arch}", "num_warps": variant.num_warps,
                      "config": variant.describe()}
            try:
                source = ASTSource(fn=kernel, signature=variant.signature, constexprs=variant.constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": variant.num_warps})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                    handle.write(compiled.asm["cubin"])
                    handle.flush()
                    dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name],
                                          capture_output=True, text=True, check=True).stdout
                match = _RESOURCE_LINE.search(dump)
                if match is None:
                    raise RuntimeError(f"could not parse cuobjdump output: {dump!r}")
                registers, stack, shared, local = (int(v) for v in match.groups())
                record.update(registers=registers, spilled_bytes=stack + local, stack_bytes=stack,
                              local_bytes=local,
                              shared_memory_bytes=shared + int(getattr(compiled.metadata, "shared", 0) or 0),
                              error=None)
            except Exception as error:  # report, do not hide: a failed compile is a failed check
                record.update(registers=None, spilled_bytes=None, stack_bytes=None, local_bytes=None,
                              shared_memory_bytes=None, error=f"{type(error).__name__}: {error}")
            records.append(record)
    return records


def compile_report(archs=ARCHS, timeout: float = 1800.0) -> list[dict]:
    """Compile every kernel for `archs` in a subprocess without TRITON_INTERPRET; one dict per
    (kernel, arch) with kernel, arch, registers, spilled_bytes, shared_memory_bytes, num_warps, config,
    error (None on success)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-m", "tritonsplat.aot", "--json", "--archs", ",".join(str(a) for a in archs)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"AOT compile subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def format_table(records: list[dict]) -> str:
    lines = [f"{'kernel':52} {'arch':6} {'regs':>5} {'spill B':>8} {'smem B':>8} {'warps':>5}  status"]
    for r in records:
        status = "ERROR " + r["error"][:60] if r["error"] else ("SPILLS" if r["spilled_bytes"] else "ok")
        lines.append(f"{r['kernel']:52} {r['arch']:6} {r['registers'] or '-':>5} {r['spilled_bytes'] or 0:>8} "
                     f"{r['shared_memory_bytes'] or 0:>8} {r['num_warps']:>5}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON records")
    parser.add_argument("--archs", default=",".join(str(a) for a in ARCHS))
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(","))
    if os.environ.get("TRITON_INTERPRET") == "1":
        records = compile_report(archs)
    else:
        records = _compile_in_process(archs)
    print(json.dumps(records, indent=1) if args.json else format_table(records))
    failed = any(r["error"] or r["spilled_bytes"] for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
