"""Counts aten ops (~ kernel launches on a GPU) and device-to-host reads of tracking steps.

A local stand-in for the shared counter (the counting rule: every aten op that is not a view or
metadata op counts as one launch; `_local_scalar_dense` (item/float/bool/int), `nonzero` and
`masked_select` (data-dependent shapes) count as host reads). On the CPU a `.cpu()` copy does not
dispatch, so reads of the tracking scalar buffer are counted by wrapping `ScalarLog.flush`.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

NOT_LAUNCHES = {
    "view", "_unsafe_view", "expand", "t", "permute", "select", "slice", "unsqueeze", "squeeze", "as_strided",
    "detach", "alias", "lift_fresh", "transpose", "unbind", "split", "chunk", "_reshape_alias", "empty",
    "empty_like", "empty_strided", "set_", "resize_", "_to_copy_noop",
}
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select"}


class StepCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0
        self.host_reads = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.host_reads += 1
        if name not in NOT_LAUNCHES:
            self.launches += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        return func(*args, **(kwargs or {}))
