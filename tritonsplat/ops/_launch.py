"""Fixed launch settings for every Triton kernel, and small launch helpers.

No multi-config autotuning: it crashes the interpreter and stalls the first call (STYLE.md habit 10).
One table, chosen so that every kernel compiles without spills at sm_80 and sm_90
(checked by tests/test_aot.py and `python -m bench compile-report`):

| kernel                       | block                     | num_warps | why                                   |
|------------------------------|---------------------------|-----------|---------------------------------------|
| projection forward/backward  | 128 Gaussians (1/thread)  | 4         | ~150 live floats per Gaussian in bwd  |
| binning count/emit           | 128 Gaussians (1/thread)  | 4         | per-lane loops over candidate tiles   |
| tile ranges                  | 512 intersections         | 4         | 1024 spilled 8 B (sm_90, triton 3.6)  |
| antialiased opacities        | 256 camera-Gaussian rows  | 4         | elementwise, a few live floats        |

The compositing kernels take their layout from the tile size instead (`compositing.pixel_layout`):
one program per tile, BATCH Gaussians per main-loop iteration (forward 16, backward 8), the tile's
pixels spread over the threads. Figures at 16-px tiles, sm_90 (Triton 3.9, `python -m tritonsplat.aot`):

| kernel (16-px tile)               | pixels/thread | num_warps | registers | instr/pair | spills |
|-----------------------------------|---------------|-----------|-----------|------------|--------|
| compositing forward, D = 3        | 4             | 2         | 79        | 35.0       | 0      |
| compositing forward, D = 6        | 4             | 2         | 87        | 39.0       | 0      |
| compositing backward, D = 3       | 8             | 1         | 196       | 85.5       | 0      |
| backward geometry launch, D > 8   | 4             | 2         | 254       | 248.3      | 0      |
| backward colour chunk, D > 8      | 8             | 1         | 156       | 63.5       | 0      |

The D > 8 geometry launch forms q over all D channels per pair; at 8 pixels per thread it needed
more than 255 registers (512 B spilled at 16-px tiles, 872 B at 32 px, D = 33), at 4 it fits.
Pixels per thread at the other tile sizes: 4 px 1, 8 px 2, 32 px 8 (4 warps; the D > 8 geometry launch
4, 8 warps).
Every variant and tile size: `bench/results/cpu-amd-epyc/compile_all_sm90.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import contiguous_inputs  # noqa: F401  (re-exported for launchers)


@dataclass(frozen=True)
class LaunchSettings:
    block: int
    num_warps: int


_TABLE = {
    "projection": LaunchSettings(block=128, num_warps=4),
    "binning": LaunchSettings(block=128, num_warps=4),
    "tile_ranges": LaunchSettings(block=512, num_warps=4),
    "antialiasing": LaunchSettings(block=256, num_warps=4),
}


def launch_settings(kernel: str) -> LaunchSettings:
    """The fixed launch settings of `kernel` (see the module table)."""
    return _TABLE[kernel]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_signature(kernel, types: dict | None = None, *, pointer: str = "*fp32", scalar: str = "i32") -> dict:
    """Triton argument types of a @triton.jit kernel from its Python signature, for ahead-of-time
    compiles (`tritonsplat.aot`): constexpr parameters as "constexpr", `types` for the named
    arguments, else `pointer` for names ending in _ptr and `scalar` for the rest."""
    import inspect

    types = types or {}
    signature = {}
    for name, parameter in inspect.signature(getattr(kernel, "fn", kernel)).parameters.items():
        if "constexpr" in str(parameter.annotation):
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, pointer if name.endswith("_ptr") else scalar)
    return signature
