"""Keep freed memory in the process during long torch CPU runs (glibc malloc settings).

A CPU training step allocates and frees many 1-40 MB temporaries (the torch compositor's
[tiles, K, P] chunks and float64 gradient rows, the SSIM maps). glibc's malloc hands such blocks
back to the kernel (mmap above its dynamic threshold, at most 32 MiB; heap trimming above twice
that threshold), so the next step page-faults them in again, zero-filled. Measured on the 2-core
CPU (AMD EPYC, torch 2.13, 1 thread): the README demo took 40.7 M minor page faults and 75 s of
system time out of 319 s of CPU; one forward + backward of its fitted 16.8k-Gaussian scene at
160x120 took 29k faults and ~60 ms of system time (36 faults and ~0 ms with the settings below).

`keep_freed_memory` serves blocks below 256 MiB from the heap and trims it only when 512 MiB lie
free at its top: the process then keeps up to its peak working set (about 0.9 GB for the demo).
The command lines (`tritonsplat-track`, `python -m bench`) call it; a script that fits or renders
on the CPU for long can call it too. Results are unchanged (allocation only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1   # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
DISABLE_ENV = "TRITONSPLAT_KEEP_FREED_MEMORY"   # "0": leave malloc's defaults

_applied = False


def keep_freed_memory() -> bool:
    """Apply the malloc settings above once per process; True when they are in effect.

    A no-op (False) off Linux/glibc, when `TRITONSPLAT_KEEP_FREED_MEMORY=0`, or when mallopt refuses.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(DISABLE_ENV, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def in_effect() -> bool:
    """Whether `keep_freed_memory` has applied its settings in this process."""
    return _applied
