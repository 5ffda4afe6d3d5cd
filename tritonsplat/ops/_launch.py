"""Fixed launch settings for every Triton kernel, and small launch helpers.

No multi-config autotuning: it crashes the interpreter and stalls the first call (STYLE.md habit 10).
One table, chosen so that every kernel compiles without spills at sm_80 and sm_90
(checked by tests/test_aot.py and `python -m bench compile-report`):

| kernel                       | block                     | num_warps | why                                   |
|------------------------------|---------------------------|-----------|---------------------------------------|
| projection forward/backward  | 128 Gaussians (1/thread)  | 4         | ~150 live floats per Gaussian in bwd  |
| binning count/emit           | 128 Gaussians (1/thread)  | 4         | per-lane loops over candidate tiles   |
| tile ranges                  | 512 intersections         | 4         | 1024 spilled 8 B (sm_90, triton 3.6)  |
| compositing forward          | 256 pixels x 8 Gaussians  | 8         | [8, 256] tensors: 8 values per thread |
| compositing backward         | 256 pixels x 8 Gaussians  | 8         | ~20 live [8, 256] temporaries         |

Compositing batch size, from the sm_80 cubins (cuobjdump, 8 warps): forward 80 registers at 8 Gaussians
per batch, 182 at 16 (one block per SM) and spills at 32; backward 195 registers at 8, spills at 16.
8 keeps three forward blocks (24 warps) resident per SM. Speed on a GPU is not measured yet.
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
    "compositing_forward": LaunchSettings(block=8, num_warps=8),   # block = Gaussians per batch
    "compositing_backward": LaunchSettings(block=8, num_warps=8),
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
