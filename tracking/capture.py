"""Static t > 0 steps, captured once per frame as a CUDA graph (`TrackingConfig.cuda_graphs`).

A captured step replays fixed kernels on fixed memory: it may not read the device from the host, copy
from the host, or allocate buffers whose size depends on data. A static step (`StaticStep.run`) is the
eager step (`stages.step_once`) with those three removed:

- the rasterizer runs in capacity mode (`max_intersections`): intersection buffers of a capacity fixed
  for the frame, CAPACITY_FACTOR x the largest intersection count of a step, measured once per frame
  by a forward render of every training camera at the frame's initial parameters;
- the step's cameras are picked on the device: the frame's camera order is one [steps, B] int64 tensor
  indexed by a 0-d step counter on the device, which the step advances; poses (`Views`) and targets
  (`FrameTargets.image_stack`, `seg_stack`) are stacked per frame;
- Adam is fused with `capturable=True` (step counters on the device, no host read); gradients are set
  to None after each step, so the captured backward writes them afresh on every replay;
- the step's scalars go into row step % rows of the `ScalarLog` device buffer, with two more columns:
  the render's overflow flag and its intersection count.

Overflow (more intersections than the capacity: the render dropped some) is read with the scalar log,
every `log_every` steps. Such a block of steps is redone, never kept: the parameters, the Adam state and
the step counter go back to a copy taken at the block's start (copied in place: the graph's addresses
stay valid), the capacity grows to CAPACITY_FACTOR x the largest count seen, and the step is warmed up
and captured again. Committed steps therefore never saw a truncated render, and a static fit gives the
eager fit's results (bit-identical on CPU, tests/tracking/test_capture.py).

The first WARMUP_STEPS steps after each capacity change run eagerly (on a side stream on CUDA): they
compile the capacity-mode kernels for that capacity (Triton specialises integer arguments) and fill the
per-frame caches (loss weight vectors, SSIM window, neighbour tables), none of which may happen during
capture. They are real steps of the frame, identical to replayed ones.

On CPU (tests only, `EMULATE_ON_CPU`) "capture" returns the step function itself: the same static
buffers, capacity mode, overflow handling and redo, run eagerly.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from tritonsplat.types import MAX_INTERSECTIONS

from .errors import fault_at

# A step's intersection count stays close to that of its cameras at the frame's start (tiny synthetic
# scene, 40x30, 4 cameras, 8 steps per frame: at most 1,662 of 1,662 and 1,658 of 1,746). The 25 % margin
# is for longer frames with more motion and costs 25 % more sort and bin memory than exact buffers; an
# overflow is still caught and its steps redone, only slower.
CAPACITY_FACTOR = 1.25
# Eager steps before each capture (the PyTorch CUDA-graphs notes warm up 3 iterations on a side stream).
WARMUP_STEPS = 3
EXTRA_COLUMNS = ("_overflow", "_intersections")  # ScalarLog columns after the terms, not in the curves
EMULATE_ON_CPU = False  # tests: run the static path on CPU, with direct calls in place of the graph


def available(device: torch.device) -> bool:
    """Whether a static (captured) step can run on `device`: CUDA (on CPU the option is ignored)."""
    return torch.device(device).type == "cuda" or EMULATE_ON_CPU


def unsupported(stage, views, targets) -> str | None:
    """Why this stage's steps cannot be static, or None."""
    device = stage.params["means"].device
    if device.type == "cuda" and stage.config.backend == "torch":
        return "the torch backend reads the device in every render (capacity mode without host reads is triton's)"
    if stage.densify or stage.after_step is not None:
        return "the stage densifies (its Gaussian count changes between steps)"
    if stage.world.active:
        return "steps are shared between torch.distributed ranks"
    if not views.same_size or targets.image_stack is None:
        return "the training cameras have different image sizes (no stacked targets)"
    if targets.seg_stack is None and any(s is not None for s in targets.segs):
        return "only some training cameras have masks this frame"
    return None


@functools.cache
def warn_eager(reason: str) -> None:
    warnings.warn(f"cuda_graphs: t > 0 steps run eagerly: {reason}", stacklevel=3)


def frame_capacity(peak: float) -> int:
    """Intersection capacity for a frame whose largest step count is `peak`.

    Raises:
        ValueError: the capacity would exceed the rasterizer's 2^31 - 1 (as an exact render would).
    """
    if peak > MAX_INTERSECTIONS:
        raise ValueError(f"tile intersections: {int(peak)} exceed the supported 2^31 - 1 = {MAX_INTERSECTIONS}; "
                         "render fewer cameras or Gaussians per call, or at a lower resolution")
    return max(1, min(MAX_INTERSECTIONS, math.ceil(CAPACITY_FACTOR * peak)))


class StaticStep:
    """The static buffers of one t > 0 frame and its step function (`run`), as captured.

    Args:
        stage, views, targets, terms_on, weight_vectors, log: what `stages.step_once` and the scalar log take.
        order: per step, the step's camera indices (`stages.camera_order`).
        step_once, render: `tracking.stages`' step and render functions (passed in: no import cycle).
    """

    def __init__(self, stage, views, targets, order: list[list[int]], terms_on, weight_vectors: dict, log, *,
                 step_once: Callable, render: Callable):
        self.step_once, self.render = step_once, render
        self.stage, self.views, self.targets = stage, views, targets
        self.terms_on, self.weight_vectors, self.log = terms_on, weight_vectors, log
        device = stage.params["means"].device
        self.order_host = order
        self.order = torch.tensor(order, dtype=torch.int64, device=device)  # [steps, B]
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.rows = log.buffer.shape[0]
        self._saved: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ the captured step
    def run(self, capacity: int) -> None:
        """One step of the frame: its cameras, render, losses, backward, Adam, scalars, counter + 1."""
        index = self.order.index_select(0, self.step.reshape(1))[0]  # [B] int64, on the device
        out, loss, psnr, terms = self.step_once(self.stage, self.views, self.targets, index, self.terms_on,
                                           self.weight_vectors, max_intersections=capacity)
        row = torch.remainder(self.step, self.rows).reshape(1)
        self.log.write(row, loss, psnr, terms, (out.overflow, out.n_intersections))
        self.step.add_(1)

    # ------------------------------------------------------------------ capacity
    @torch.no_grad()
    def peak_intersections(self) -> int:
        """The largest intersection count of a step of this frame: every training camera rendered once
        (forward only) at the frame's initial parameters; a step of B views counts the sum of its views'."""
        act = self.stage.render_inputs()
        counts = [int(self.render(act, self.views, [c], self.stage.config, densify=False).n_intersections)
                  for c in range(len(self.views.sizes))]
        return int(max(sum(counts[c] for c in cams) for cams in self.order_host))

    # ------------------------------------------------------------------ redo support
    def _state(self) -> list[torch.Tensor]:
        """Everything a step changes: optimised parameters, their Adam state, the step counter."""
        tensors = []
        for group in self.stage.optimizer.param_groups:
            for p in group["params"]:
                tensors.append(p.data)
                state = self.stage.optimizer.state[p]
                tensors.extend(state[k] for k in ("step", "exp_avg", "exp_avg_sq"))
        return tensors + [self.step]

    def save(self) -> None:
        """Copy the state (into the same buffers after the first call)."""
        state = self._state()
        with torch.no_grad():
            if self._saved is None:
                self._saved = [t.clone() for t in state]
            else:
                torch._foreach_copy_(self._saved, state)

    def restore(self) -> None:
        """Back to the last `save`, in place."""
        with torch.no_grad():
            torch._foreach_copy_(self._state(), self._saved)


def _capture(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """A replay of fn: a CUDA graph on CUDA; fn itself elsewhere (`EMULATE_ON_CPU`)."""
    if torch.device(device).type != "cuda":
        return fn
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _eager(fn: Callable[[], None], device: torch.device) -> None:
    """fn run once outside any graph: on a side stream on CUDA (as capture warm-up needs)."""
    if torch.device(device).type != "cuda":
        fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


def optimise_static(stage, views, targets, order: list[list[int]], terms_on, weight_vectors: dict, log, bar, *,
                    step_once: Callable, render: Callable) -> None:
    """Run the stage's steps as static steps (see the module docstring); fills `log.curves` and adds
    graph_captures, redone_blocks and intersection_capacity to the frame's stats."""
    device = stage.params["means"].device
    if torch.device(device).type == "cuda":
        for group in stage.optimizer.param_groups:
            group["capturable"] = True  # fused Adam: the same kernel, allowed inside a capture
    runner = StaticStep(stage, views, targets, order, terms_on, weight_vectors, log, step_once=step_once, render=render)
    capacity = frame_capacity(runner.peak_intersections())
    overflow_col, count_col = 2 + len(log.names), 3 + len(log.names)
    replay, warm, captures, redone = None, WARMUP_STEPS, 0, 0
    step = block_start = 0
    runner.save()
    while step < stage.steps:
        poison = fault_at(stage.t, step) == "nan"
        if replay is None and warm == 0:
            replay = _capture(functools.partial(runner.run, capacity), device)
            captures += 1
        if replay is not None:
            replay()
        else:
            _eager(functools.partial(runner.run, capacity), device)
            warm -= 1
        log.advance(step, poison)
        step += 1
        if not (log.due() or step == stage.steps):
            continue
        rows = log.read()
        if (rows[:, overflow_col] != 0).any():   # a truncated render: redo the block with a larger capacity
            capacity = max(capacity + 1, frame_capacity(float(np.max(rows[:, count_col]))))
            runner.restore()
            log.discard()
            step, replay, warm, redone = block_start, None, WARMUP_STEPS, redone + 1
            continue
        last = log.commit(rows)
        bar.update(step, *last, stage.params["means"].shape[0])
        block_start = step
        runner.save()
    stage.optimizer.zero_grad(set_to_none=True)
    stage.extra_stats.update(graph_captures=captures, redone_blocks=redone, intersection_capacity=capacity)


__all__ = ["CAPACITY_FACTOR", "WARMUP_STEPS", "StaticStep", "available", "frame_capacity", "optimise_static",
           "unsupported"]
