"""`bench step --world-size N`: the camera-parallel training step on N processes (gloo on CPU, NCCL on CUDA).

Every rank renders one camera of the same scene (a step of B = N cameras), then the ranks average
their parameter gradients with one flat all-reduce, as `tracking.distributed.average_gradients`
does, and take the Adam step. Recorded per step (p50 over the repeats, rank 0's clock, after a
barrier so all ranks start together): `render_ms` (forward + backward of the rank's view),
`allreduce_ms`, `step_ms` (everything, Adam included) and `allreduce_bytes` (the flat gradient:
4 bytes x parameters). The expected speed-up on real interconnects follows from those bytes (a
model, not a measurement): a ring all-reduce moves 2 (N - 1) / N x allreduce_bytes per rank; a
tracking step at t > 0 optimises 10 floats per Gaussian (means, rotations, colours), 12 MB at 300k
Gaussians, i.e. 0.13-0.27 ms per step at 90 GB/s (NVLink) and 0.5-1 ms at 25 GB/s (InfiniBand
200 Gb/s), against a render of the rank's views. N ranks then process N views in about the time one
process needs for one view plus that all-reduce (README, "Several GPUs").
"""

from __future__ import annotations

import os
import socket
import time

import torch

from .harness import Record, Timing

BENCHMARK = "step"
METRIC = "distributed_step"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, spec: str, n_gaussians: int, width: int, height: int,
            backend: str, warmup: int, repeats: int, results) -> None:
    import torch.distributed as dist

    import tritonsplat

    from .cases import make_case

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        scene = make_case(spec, n_gaussians, width, height, device="cpu")
        params = [scene.means.clone().requires_grad_(), scene.quats.clone().requires_grad_(),
                  scene.scales.clone().requires_grad_(), scene.opacities.clone().requires_grad_(),
                  scene.colors.clone().requires_grad_()]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        view = slice(rank % scene.viewmats.shape[0], rank % scene.viewmats.shape[0] + 1)
        samples = {"render_ms": [], "allreduce_ms": [], "step_ms": []}
        n_bytes = 4 * sum(p.numel() for p in params)
        for i in range(warmup + repeats):
            dist.barrier()
            start = time.perf_counter()
            means, quats, scales, opacities, colors = params
            out = tritonsplat.rasterize(means, quats, scales, opacities.clamp(0, 1), colors,
                                        scene.viewmats[view], scene.Ks[view], width, height, backend=backend)
            out.colors.mean().backward()
            rendered = time.perf_counter()
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world_size
            reduced = time.perf_counter()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = time.perf_counter()
            if i >= warmup:
                samples["render_ms"].append(1e3 * (rendered - start))
                samples["allreduce_ms"].append(1e3 * (reduced - rendered))
                samples["step_ms"].append(1e3 * (done - start))
        if rank == 0:
            results["samples"] = samples
            results["bytes"] = n_bytes
            results["scene"] = scene.description
    finally:
        dist.destroy_process_group()


def measure_distributed_step(world_size: int, spec: str, n_gaussians: int, width: int, height: int, *,
                             backend: str = "torch", warmup: int = 1, repeats: int = 5) -> Record:
    """One `distributed_step` record (CPU, gloo) with the per-part medians in its details."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"--world-size: expected a positive number of processes, got {world_size}")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world_size, _free_port(), spec, n_gaussians, width, height, backend, warmup, repeats,
                            results), nprocs=world_size, join=True)
    samples = dict(results["samples"])
    parts = {name: Timing(tuple(values)) for name, values in samples.items()}
    details = {"world_size": world_size, "process_group": "gloo", "allreduce_bytes": int(results["bytes"]),
               "scene": results["scene"], "views_per_step": world_size,
               **{name: round(timing.p50_ms, 3) for name, timing in parts.items()}}
    return Record(benchmark=BENCHMARK, metric=METRIC, case=spec, backend=backend, device="cpu",
                  n_gaussians=n_gaussians, width=width, height=height, timing=parts["step_ms"], details=details,
                  warmup=warmup, repeats=repeats)
