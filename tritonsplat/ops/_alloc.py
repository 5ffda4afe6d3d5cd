"""The one seam through which the launchers allocate the buffers their kernels write.

Every ops module allocates kernel outputs (and the zeroed buffers kernels accumulate into) with these
functions, called as `_alloc.empty(...)`, never bound by name, so a test can replace them all in one
place: tests/ops/test_kernel_hygiene.py pads every allocation with a sentinel and poisons `empty` ones
to catch stray writes and outputs a kernel leaves unwritten. Same arguments as the torch functions.
"""

from __future__ import annotations

import torch


def empty(*size, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Uninitialised buffer (every element must be written by a kernel)."""
    return torch.empty(*size, dtype=dtype, device=device)


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    return empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)


def zeros(*size, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Zeroed buffer (kernels accumulate into it, or write only part of it)."""
    return torch.zeros(*size, dtype=dtype, device=device)


def full(size, fill_value, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Buffer filled with `fill_value` (e.g. padding keys a kernel overwrites in part)."""
    return torch.full(size, fill_value, dtype=dtype, device=device)
