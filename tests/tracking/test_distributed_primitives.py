"""The torch.distributed building blocks of camera-parallel fitting, on 2 gloo processes (CPU)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from tracking import distributed as d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, port: int, timeout_s: float = 30.0) -> d.World:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    world, device = d.init_world("cpu", timeout_s)
    assert device == "cpu" and world.backend == "gloo" and world.size == size
    return world


def _reductions_worker(rank: int, size: int, port: int, results) -> None:
    world = _join(rank, size, port)
    try:
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2, 2))
        a.grad = torch.full((3,), float(rank + 1))          # ranks 1, 2 -> mean 1.5
        b.grad = None if rank == 0 else torch.ones(2, 2)     # missing grad counts as zeros -> mean 0.5
        d.average_gradients([a, b], world)
        grad_sums = torch.full((4,), float(rank))
        counts = torch.ones(4)
        radii = torch.tensor([rank, 5 - rank, 0, 2], dtype=torch.float32)
        d.reduce_densify_statistics(grad_sums, counts, radii, world)
        d.check_in_sync([a, b], world, "test step")          # identical parameters: passes
        cameras = d.rank_cameras([7, 3, 9, 1], world)
        diverged = None
        with torch.no_grad():
            a.add_(rank)                                     # make rank 1 differ
        try:
            d.check_in_sync([a, b], world, "step 10")
        except d.DistributedError as error:
            diverged = str(error)
        results[rank] = dict(a=a.grad.tolist(), b=b.grad.tolist(), sums=grad_sums.tolist(), counts=counts.tolist(),
                             radii=radii.tolist(), cameras=cameras, diverged=diverged)
    finally:
        d.close_world(world)


def test_reductions_and_checksum_on_two_gloo_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_reductions_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["a"] == [1.5, 1.5, 1.5]
        assert r["b"] == [[0.5, 0.5], [0.5, 0.5]]
        assert r["sums"] == [1.0] * 4 and r["counts"] == [2.0] * 4
        assert r["radii"] == [1.0, 5.0, 0.0, 2.0]
        assert "ranks diverged at step 10" in r["diverged"]
    assert results[0]["cameras"] == [7, 3] and results[1]["cameras"] == [9, 1]


def test_rank_cameras_rejects_indivisible_batches():
    with pytest.raises(d.DistributedError, match="--cameras-per-step: 3 cameras per step cannot be split over 2"):
        d.rank_cameras([0, 1, 2], d.World(rank=0, size=2))
    assert d.rank_cameras([4, 5, 6], d.SINGLE) == [4, 5, 6]


def _dying_worker(rank: int, size: int, port: int, results) -> None:
    world = _join(rank, size, port, timeout_s=20.0)
    if rank == 1:
        os._exit(9)                                         # dies without leaving the group
    started = time.perf_counter()
    try:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        d.average_gradients([p], world)
        results[rank] = "no error"
    except d.DistributedError as error:
        results[rank] = f"{time.perf_counter() - started:.1f}|{error}"


def test_a_dead_rank_stops_the_other_within_the_timeout():
    manager = mp.Manager()
    results = manager.dict()
    context = mp.spawn(_dying_worker, args=(2, _free_port(), results), nprocs=2, join=False)
    for process in context.processes:
        process.join(60)
    assert all(not p.is_alive() for p in context.processes)
    seconds, message = results[0].split("|", 1)
    assert float(seconds) < 20.0 + 5.0
    assert "gradient all-reduce failed" in message and "rerun the same command to resume" in message
