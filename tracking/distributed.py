"""Camera-parallel fitting on several processes with `torch.distributed` (launched by `torchrun`).

Data parallelism over views, as in gsplat's distributed trainer and Grendel-GS (Zhao et al. 2024,
"On Scaling Up 3D Gaussian Splatting Training"): every rank holds the whole Gaussian set, renders
its B / N of each step's B cameras, and before the optimiser step

- parameter gradients are averaged (one flat all-reduce per step, so the Adam step is identical on
  every rank: each rank's loss is the mean over its own views, and the mean over ranks of those
  means is the mean over all B views, the one-process loss);
- densification statistics are reduced: screen-space gradient sums and visibility counts summed,
  max radii maxed, so densify / prune decisions agree;
- at every refinement step a cheap parameter checksum (float64 sum and sum of squares per tensor) is
  compared across ranks, and a mismatch stops every rank with a clear error instead of silently
  training different models.

Backends: NCCL on CUDA (`cuda:LOCAL_RANK`), gloo on CPU. A rank that dies makes the others fail
their next collective (gloo: connection closed; NCCL: the process-group timeout), and the error is
turned into a `DistributedError` with exit code 5 within `--dist-timeout` seconds.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrackingError

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(TrackingError):
    """Ranks disagree, a rank died, or the world cannot be formed."""

    exit_code = 5


@dataclass(frozen=True)
class World:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_world(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[World, str | None]:
    """Join the torchrun world (no-op outside torchrun). Returns the world and the device this rank
    uses: `cuda:LOCAL_RANK` when the fit runs on CUDA, else the requested device."""
    if not launched_by_torchrun():
        return SINGLE, device
    if timeout_s <= 0:
        raise DistributedError(f"--dist-timeout: expected a positive number of seconds, got {timeout_s}")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # noqa: BLE001 - any rendezvous failure is one clear message
            raise DistributedError(f"rank {rank}: could not join the {size}-process world ({error})") from error
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend), device


def close_world(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def _collective(world: World, what: str, operation):
    """Run a collective; a dead or hung peer becomes a DistributedError naming what was being done."""
    try:
        return operation()
    except DistributedError:
        raise
    except Exception as error:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses of many kinds
        raise DistributedError(
            f"rank {world.rank}: {what} failed; another rank probably died or timed out ({error}). "
            "Completed frames are kept: rerun the same command to resume") from error


def rank_cameras(step_cameras: Sequence[int], world: World) -> list[int]:
    """This rank's contiguous share of one step's cameras (B must be divisible by the world size)."""
    if len(step_cameras) % world.size:
        raise DistributedError(f"--cameras-per-step: {len(step_cameras)} cameras per step cannot be split over "
                               f"{world.size} processes; use a multiple of {world.size}")
    share = len(step_cameras) // world.size
    return list(step_cameras[world.rank * share:(world.rank + 1) * share])


def average_gradients(parameters: Iterable[torch.Tensor], world: World) -> None:
    """Average `.grad` of every parameter over ranks with one flat all-reduce (missing grads count as 0)."""
    if not world.active:
        return
    parameters = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads]).float()

    def reduce():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

    _collective(world, "gradient all-reduce", reduce)
    flat /= world.size
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        values = flat[offset:offset + n].view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = values
        else:
            p.grad.copy_(values)
        offset += n


def reduce_densify_statistics(grad_sums: torch.Tensor, counts: torch.Tensor, max_radii: torch.Tensor | None,
                              world: World) -> None:
    """In place: screen-space gradient sums and visibility counts summed, max radii maxed over ranks."""
    if not world.active:
        return

    def reduce():
        dist.all_reduce(grad_sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        if max_radii is not None:
            dist.all_reduce(max_radii, op=dist.ReduceOp.MAX)

    _collective(world, "densification statistics all-reduce", reduce)


def gather_views(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """[B / N, ...] per rank -> [B, ...] on every rank, in rank order (= the step's camera order)."""
    if not world.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]

    def gather():
        dist.all_gather(parts, tensor.contiguous())

    _collective(world, "view statistics all-gather", gather)
    return torch.cat(parts)


def parameter_checksum(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """[2 * P] float64: sum and sum of squares of every parameter (cheap, order-fixed)."""
    rows = []
    for p in parameters:
        values = p.detach().double()
        rows += [values.sum(), (values * values).sum()]
    return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64)


def check_in_sync(parameters: Iterable[torch.Tensor], world: World, where: str) -> None:
    """Compare the parameter checksum of every rank with rank 0's; raise on any difference."""
    if not world.active:
        return
    mine = parameter_checksum(parameters)
    reference = mine.clone()

    def broadcast():
        dist.broadcast(reference, src=0)

    _collective(world, f"parameter checksum at {where}", broadcast)
    differs = ~torch.isclose(mine, reference, rtol=0.0, atol=0.0)
    agreed = torch.tensor([0 if bool(differs.any()) else 1], dtype=torch.int64, device=mine.device)

    def gather():
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)

    _collective(world, f"parameter checksum at {where}", gather)
    if int(agreed.item()) == 0:
        raise DistributedError(f"ranks diverged at {where}: parameter checksums differ (rank {world.rank}: "
                               f"{'differs from' if bool(differs.any()) else 'matches'} rank 0); stopping every rank")


def broadcast_object(value, world: World, what: str):
    """Rank 0's value on every rank (e.g. the resume point read from OUT)."""
    if not world.active:
        return value
    box = [value]

    def broadcast():
        dist.broadcast_object_list(box, src=0)

    _collective(world, what, broadcast)
    return box[0]


def barrier(world: World, what: str) -> None:
    if world.active:
        _collective(world, what, dist.barrier)
