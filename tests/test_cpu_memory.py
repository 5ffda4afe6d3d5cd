"""`tritonsplat.cpu_memory.keep_freed_memory`: freed MB-sized blocks stay in the process."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from tritonsplat import cpu_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_stops_page_faults():
    assert cpu_memory.keep_freed_memory() and cpu_memory.keep_freed_memory()   # idempotent
    # 40 MB is above glibc's largest dynamic mmap threshold (32 MiB): by default every such block is
    # mapped and unmapped, i.e. ~10k zero-filled page faults per allocation.
    n = 10 << 20
    for _ in range(8):   # the first few aligned blocks grow the heap until freed ones coalesce
        torch.empty(n).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(n).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2_000, faults   # default malloc: ~100k


def test_keep_freed_memory_can_be_disabled(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setenv(cpu_memory.DISABLE_ENV, "0")
    assert not cpu_memory.keep_freed_memory()
