"""The two stages of a Dynamic 3D Gaussians fit, run by one optimisation loop.

Luiten et al., "Dynamic 3D Gaussians: Tracking by Persistent Dynamic View Synthesis" (3DV 2024):

- `first_stage`: t = 0, from the initial point cloud, L = L_im + 3 L_seg, densification;
- `next_stage`: t > 0, means, rotations (and colours) initialised at constant velocity from t - 1
  and t - 2, the full loss of `tracking.losses.TERMS`.

Both are a `Stage` (parameters, optimiser, render inputs, what runs after each optimiser step) that
`optimise` runs: render the step's views, the active terms of `losses.TERMS`, backward, Adam, the
stage's hook (`step_once`), and the step's scalars into a device buffer (`ScalarLog`) that is read every
`TrackingConfig.log_every` steps, so a step makes no device-to-host read of its own. With
`TrackingConfig.cuda_graphs`, t > 0 steps run `step_once` as static steps captured in a CUDA graph
(`tracking.capture`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import tritonsplat
from tritonsplat import compilation

from . import losses as L
from .config import TrackingConfig
from .distributed import SINGLE, World, average_gradients, check_in_sync, rank_cameras
from .errors import NaNLossError, TrackingError, fault_at
from .params import ScaleShaping, activated, fused_step, init_params, learning_rates, make_optimizer
from .quaternions import quat_normalize
from .store import FrameRecord, RunRecord
from .strategy import AllGaussiansPrunedError, DensifyStrategy, densify_hook
from .targets import FrameTargets, Views

SEED_STRIDE = 1_000_003  # frame t's generator seed = seed * SEED_STRIDE + t (no hashing)
PROGRESS_UPDATES = 50  # progress-bar refreshes per frame (at most one per scalar-buffer read)
SEG_CHANNELS = 3  # channels 3..5 of the render: the fixed segmentation colours (no colour gradient needed)


def frame_generator(seed: int, t: int) -> torch.Generator:
    """The CPU generator of frame t (camera order, split noise)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) * SEED_STRIDE + int(t))
    return g


def camera_order(gen: torch.Generator, n_cameras: int, steps: int, per_step: int) -> list[list[int]]:
    """The training views of each step: one uniform draw with replacement per step when per_step = 1
    (the original's effective sampling), else per_step distinct cameras per step."""
    if per_step == 1:
        return [[c] for c in torch.randint(n_cameras, (steps,), generator=gen).tolist()]
    return [torch.randperm(n_cameras, generator=gen)[:per_step].tolist() for _ in range(steps)]


# ----------------------------------------------------------------------------- the one render helper
@functools.cache
def _rasterize_keywords() -> frozenset[str]:
    return frozenset(inspect.signature(tritonsplat.rasterize).parameters)


def render(act: dict[str, torch.Tensor], views: Views, index: list[int] | torch.Tensor, config: TrackingConfig, *,
           densify: bool, max_intersections: int | None = None) -> tritonsplat.RasterizeOutput:
    """Every tracking render: the views `index` (C = len(index)) in one rasterize call.

    `index` is a list of camera indices, or a [B] int64 device tensor (picked on the device, no host
    read; the cameras then share one image size, `Views.same_size`). `max_intersections`: the
    rasterizer's capacity mode (no host read at all; `tracking.capture`).

    Only colours are needed, and the segmentation colours (channels 3..5) are fixed labels: when the
    rasterizer offers `outputs=` and `color_grad_channels=`, depth and alpha are not computed and the
    segmentation channels cost no colour-gradient work.
    """
    on_device = isinstance(index, torch.Tensor)
    if not on_device and len(index) == 1:
        c = index[0]
        viewmats, Ks, backgrounds = views.viewmats[c:c + 1], views.Ks[c:c + 1], views.background[None]
    else:
        rows = index if on_device else torch.tensor(index, device=views.viewmats.device)
        viewmats, Ks = views.viewmats.index_select(0, rows), views.Ks.index_select(0, rows)
        backgrounds = views.background[None].expand(rows.shape[0], -1)
    W, H = views.sizes[0 if on_device else index[0]]
    extra = {} if max_intersections is None else {"max_intersections": max_intersections}
    keywords = _rasterize_keywords()
    if "outputs" in keywords:
        extra["outputs"] = ("colors",)
    if "color_grad_channels" in keywords and config.lr.seg_colours == 0:
        extra["color_grad_channels"] = act["colors"].shape[-1] - SEG_CHANNELS
    return tritonsplat.rasterize(
        act["means"], act["quats"], act["scales"], act["opacities"], act["colors"], viewmats, Ks, W, H,
        backgrounds=backgrounds, densify_channels=3 if densify else None, deterministic=config.deterministic,
        backend=config.backend, **config.rasterize_settings(), **extra)


def colour_correct(rgb_hwc: torch.Tensor, cam_m: torch.Tensor, cam_c: torch.Tensor) -> torch.Tensor:
    """exp(m) * rgb + c per channel; rgb [..., H, W, 3], m, c [3] or [B, 1, 1, 3]."""
    return torch.exp(cam_m) * rgb_hwc + cam_c


# ----------------------------------------------------------------------------- one step's context
@dataclass
class FrameConstants:
    """What the t > 0 terms of one frame share, computed once per frame (detached)."""

    prev_fg_means: torch.Tensor  # [Nfg, 3]
    prev_fg_quats: torch.Tensor  # [Nfg, 4] normalised
    prev_offsets: torch.Tensor  # [Nfg, K, 3]
    prev_rgb: torch.Tensor  # [N, 3]


class StepContext:
    """What the loss terms of one step read; each shared quantity is computed once, on first use."""

    def __init__(self, stage: Stage, act: dict[str, torch.Tensor], out, index: list[int] | torch.Tensor,
                 images: torch.Tensor, segs: torch.Tensor | None):
        self.stage, self.act, self.out, self.index = stage, act, out, index
        self.images, self.segs = images, segs  # [B, 3, H, W]
        self._photometric: dict[str, torch.Tensor] | None = None
        self._rigidity: dict[str, torch.Tensor] | None = None
        self._fg_means: torch.Tensor | None = None
        self.rgb: torch.Tensor | None = None  # [B, 3, H, W] corrected render, detached

    @property
    def config(self) -> TrackingConfig:
        return self.stage.config

    def photometric(self) -> dict[str, torch.Tensor]:
        """{"im"} and, with targets, {"seg"}: (1 - s) L1 + s (1 - SSIM), mean over the step's views."""
        if self._photometric is None:
            colors = self.out.colors  # [B, H, W, 6]
            cam_m, cam_c = self.stage.camera_colour()
            s, backend = self.config.weights.ssim, self.config.backend
            if isinstance(self.index, list) and len(self.index) == 1:
                c = self.index[0]
                rgb = colour_correct(colors[0, ..., :3], cam_m[c], cam_c[c]).permute(2, 0, 1)[None]
            else:
                rows = self.index if isinstance(self.index, torch.Tensor) else torch.tensor(self.index,
                                                                                            device=colors.device)
                rgb = colour_correct(colors[..., :3], cam_m.index_select(0, rows)[:, None, None],
                                     cam_c.index_select(0, rows)[:, None, None]).permute(0, 3, 1, 2)
            pairs = [(rgb, self.images)]
            if self.segs is not None:
                pairs.append((colors[..., 3:].permute(0, 3, 1, 2), self.segs))
            self._photometric = dict(zip(("im", "seg"), L.image_losses(pairs, s, backend=backend)))
            self.rgb = rgb.detach()
        return self._photometric

    def opacity_entropy(self) -> torch.Tensor:
        """Binary entropy of the rendered opacities (LossWeights.opacity_entropy)."""
        return L.binary_entropy(self.act["opacities"])

    def flatten(self) -> torch.Tensor:
        """Mean smallest-over-largest scale ratio of the rendered Gaussians (LossWeights.flatten)."""
        return L.flatness(self.act["scales"])

    def fg_means(self) -> torch.Tensor:
        if self._fg_means is None:
            self._fg_means = self.act["means"].index_select(0, self.stage.static.fg_idx)
        return self._fg_means

    def rigidity(self) -> dict[str, torch.Tensor]:
        if self._rigidity is None:
            st, fc = self.stage.static, self.stage.frame
            if st.nb_idx.shape[1] == 0:
                self._rigidity = {}
            elif self.stage.fused and st.fg_idx.numel():
                # One Triton forward and two backward launches for the three terms (eager: ~160).
                from tritonsplat.ops.rigidity import rigidity_losses

                values = rigidity_losses(self.act["means"], self.act["quats"], fc.prev_fg_quats, st.fg_idx, st.nb_idx,
                                         st.nb_w, st.nb_d, fc.prev_offsets, csr=st.csr())
                self._rigidity = dict(zip(("rigid", "rot", "iso"), values.unbind(0)))
            else:
                self._rigidity = L.rigidity_losses_fast(
                    self.fg_means(), self.act["quats"].index_select(0, st.fg_idx), fc.prev_fg_means, fc.prev_fg_quats,
                    st.nb_idx, st.nb_w, st.nb_d, prev_offsets=fc.prev_offsets)
        return self._rigidity

    def floor(self) -> torch.Tensor | None:
        if self.config.floor_y is None or not self.stage.static.fg_idx.numel():
            return None
        return L.floor_loss(self.fg_means(), self.config.floor_y)

    def background(self) -> torch.Tensor | None:
        st = self.stage.static
        if not st.bg_idx.numel():
            return None
        # index_select rather than [index] (rows of unique indices either way): its backward is an index_add_
        # instead of an accumulating index_put_, 0.16 ms instead of 0.24 ms forward + backward for 4,221 of
        # 8,441 rows of 3 (2-core AMD EPYC CPU, 1 thread).
        return L.background_loss(self.act["means"].index_select(0, st.bg_idx),
                                 self.act["quats"].index_select(0, st.bg_idx), st.init_bg_means, st.init_bg_quats)

    def colour(self) -> torch.Tensor:
        return L.l1_rows(self.stage.params["rgb"], self.stage.frame.prev_rgb)


# ----------------------------------------------------------------------------- the device-side scalar log
class ScalarLog:
    """Per-step loss, PSNR and every term in a [log_every, 2 + terms (+ extra)] device buffer, read every
    `log_every` steps (one device-to-host copy) into the per-step curves; a NaN/Inf is reported with
    its step and first non-finite term when its buffer is read.

    `extra` names columns after the terms that are read with the buffer but kept out of the curves (the
    static step's overflow flag and intersection count, `tracking.capture`). A step writes its row from
    the host (`record`: row = steps since the last read) or on the device (`write`: row a [1] int64
    device tensor, then `advance` from the host), so a captured step needs no host value.
    """

    def __init__(self, names: tuple[str, ...], log_every: int, device, t: int, extra: tuple[str, ...] = ()):
        self.names, self.extra = names, extra
        self.t = t
        self.buffer = torch.zeros(log_every, 2 + len(names) + len(extra), device=device)
        self.zero = torch.zeros((), device=device)
        self.curves: dict[str, list[float]] = {"loss": [], "psnr": [], **{k: [] for k in names}}
        self.start = 0  # first step held in the buffer
        self.filled = 0
        self.poisoned: int | None = None

    def _values(self, loss, psnr, terms, extra=()) -> list[torch.Tensor]:
        return [loss.detach(), psnr.detach(), *[terms[k].detach() if k in terms else self.zero for k in self.names],
                *[v.detach().to(self.buffer.dtype) for v in extra]]

    def record(self, step: int, loss: torch.Tensor, psnr: torch.Tensor, terms: dict[str, torch.Tensor],
               poison: bool) -> None:
        torch.stack(self._values(loss, psnr, terms), out=self.buffer[self.filled])
        self.advance(step, poison)

    def write(self, row: torch.Tensor, loss: torch.Tensor, psnr: torch.Tensor, terms: dict[str, torch.Tensor],
              extra: tuple[torch.Tensor, ...] = ()) -> None:
        """The step's values into buffer row `row` ([1] int64 on the device): no host value involved."""
        self.buffer.index_copy_(0, row, torch.stack(self._values(loss, psnr, terms, extra))[None])

    def advance(self, step: int, poison: bool) -> None:
        """Count the row of `step` as written (`poison`: an injected fault, its loss reads as NaN)."""
        if poison:
            self.buffer[self.filled, 0] = float("nan")
            self.poisoned = step
        self.filled += 1

    def due(self) -> bool:
        return self.filled == self.buffer.shape[0]

    def read(self) -> np.ndarray | None:
        """The rows written since the last commit ([filled, columns] float32; one host read), or None."""
        return self.buffer[:self.filled].cpu().numpy() if self.filled else None

    def discard(self) -> None:
        """Forget the rows since the last commit (their steps will be run again)."""
        self.filled = 0
        self.poisoned = None

    def commit(self, rows: np.ndarray) -> tuple[float, float]:
        """Append rows (from `read`) to the curves; returns (last loss, last PSNR).

        Raises:
            NaNLossError: at the first step whose loss is NaN or Inf.
        """
        bad = ~np.isfinite(rows[:, 0])
        if bad.any():
            r = int(np.argmax(bad))
            step = self.start + r
            cols = [k for j, k in enumerate(self.names) if not np.isfinite(rows[r, 2 + j])]
            raise NaNLossError(self.t, step, cols[0] if cols else ("injected" if step == self.poisoned else "total"))
        for j, key in enumerate(("loss", "psnr", *self.names)):
            self.curves[key].extend(float(v) for v in rows[:, j])
        self.start += self.filled
        self.filled = 0
        return float(rows[-1, 0]), float(rows[-1, 1])

    def flush(self) -> tuple[float, float] | None:
        """Read the buffer into the curves; (last loss, last PSNR), or None when empty.

        Raises:
            NaNLossError: at the first step whose loss is NaN or Inf.
        """
        rows = self.read()
        return None if rows is None else self.commit(rows)


class _Progress:
    """A tqdm bar per frame (loss, PSNR, Gaussians; tqdm shows steps/s) and a summary line."""

    def __init__(self, enabled: bool, echo: Callable[[str], None], t: int, n_frames: int, steps: int):
        self.echo = echo
        self.bar = None
        self.every = max(1, steps // PROGRESS_UPDATES)
        self.last = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"frame {t}/{n_frames - 1}", unit="step", leave=False,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, done: int, loss: float, psnr: float, n: int) -> None:
        if self.bar is not None and done - self.last >= self.every:
            self.last = done
            self.bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{psnr:.2f}", n=n, refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
        self.echo(line)


# ----------------------------------------------------------------------------- stages and the loop
@dataclass
class Stage:
    """One frame's optimisation: what `optimise` needs besides the loop itself."""

    name: str  # losses.FIRST or losses.NEXT
    t: int
    steps: int
    config: TrackingConfig
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    render_inputs: Callable[[], dict[str, torch.Tensor]]
    camera_colour: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # (cam_m [C, 3], cam_c [C, 3])
    densify: bool = False
    # Last step whose render computes the densification head (None: every step). Past the strategy's `stop`
    # nothing reads it, and it costs 14 % of a torch forward + backward (basketball-early, 8,441 Gaussians,
    # 160x90, 2-core Intel Xeon, 2 threads: 58.3 against 50.8 ms).
    densify_until: int | None = None
    after_step: Callable[[int, object, list[int]], None] | None = None  # (step, render output, views)
    static: _Static | None = None
    frame: FrameConstants | None = None
    generator: torch.Generator | None = None
    extra_stats: dict = field(default_factory=dict)
    world: World = SINGLE  # torch.distributed ranks sharing each step's cameras (tracking.distributed)

    @property
    def fused(self) -> bool:
        """The GPU-path step: fused Triton losses, fused Adam, one stacked weighted sum (`fused_step`)."""
        return fused_step(self.config, self.params["means"].device)


def step_once(stage: Stage, views: Views, targets: FrameTargets, index: list[int] | torch.Tensor,
              terms_on: list[L.Term], weight_vectors: dict, *, step: int | None = None,
              max_intersections: int | None = None):
    """One optimisation step: render the views `index`, the active terms, backward, Adam, the stage's hook,
    gradients set to None. Returns (render output, loss, PSNR, {term: value}), all on the device.

    Both loops run it: the eager one with host camera indices, the static one (`tracking.capture`) with a
    [B] int64 device index and the rasterizer's capacity mode, eagerly or captured in a CUDA graph.
    """
    config = stage.config
    act = stage.render_inputs()
    densify = stage.densify and (step is None or stage.densify_until is None or step <= stage.densify_until)
    out = render(act, views, index, config, densify=densify, max_intersections=max_intersections)
    images, segs = targets.batch(index)
    ctx = StepContext(stage, act, out, index, images, segs)
    ctx.photometric()
    terms = {}
    for term in terms_on:
        value = term.compute(ctx)
        if value is not None:
            terms[term.name] = value
    loss = L.stacked_total_loss(terms, config, weight_vectors) if stage.fused else L.total_loss(terms, config)
    loss.backward()
    # Each rank's loss is the mean over its views; the mean of the ranks' gradients is the
    # gradient of the mean over all of the step's views, so every rank takes the same step.
    average_gradients(_optimised(stage.optimizer), stage.world)
    stage.optimizer.step()
    if stage.after_step is not None:
        stage.after_step(step, out, index)
    # None, not zeros: a captured backward then writes each gradient afresh into the graph's memory on
    # every replay (accumulating into a kept tensor would need a zeroing launch per parameter).
    stage.optimizer.zero_grad(set_to_none=True)
    return out, loss, L.psnr(ctx.rgb.clamp(0, 1), images), terms


def optimise(stage: Stage, views: Views, targets: FrameTargets, order: list[list[int]], *, n_frames: int,
             progress: bool, echo: Callable[[str], None]) -> dict[str, list[float]]:
    """Run the stage's steps; returns its per-step curves ("loss", "psnr" and every term of the stage).

    With `TrackingConfig.cuda_graphs` on CUDA, a t > 0 stage runs static steps captured as a CUDA graph
    (`tracking.capture`), with the same results.
    """
    from . import capture

    config = stage.config
    terms_on = [term for term in L.TERMS if term.active(config, stage.name)]
    device = stage.params["means"].device
    static = config.cuda_graphs and stage.name == L.NEXT and capture.available(device)
    if static:
        reason = capture.unsupported(stage, views, targets)
        if reason is not None:
            capture.warn_eager(reason)
            static = False
    rows = min(config.log_every, stage.steps)
    log = ScalarLog(L.term_names(stage.name, config), rows, device, stage.t, capture.EXTRA_COLUMNS if static else ())
    bar = _Progress(progress, echo, stage.t, n_frames, stage.steps)
    stage.extra_stats["_bar"] = bar
    weight_vectors: dict = {}
    if static:
        capture.optimise_static(stage, views, targets, order, terms_on, weight_vectors, log, bar, step_once=step_once,
                                render=render)
        return log.curves
    # Every step of a t > 0 stage renders the same Gaussians: with TRITONSPLAT_COMPILE=1 torch.compile's static
    # graphs run there (tritonsplat.compilation); t = 0 and spawn stages change the Gaussian count as they densify.
    with compilation.fixed_shapes() if stage.name == L.NEXT else contextlib.nullcontext():
        for step in range(stage.steps):
            poison = fault_at(stage.t, step) == "nan"
            index = rank_cameras(order[step], stage.world)   # this rank's share of the step's cameras
            _, loss, psnr, terms = step_once(stage, views, targets, index, terms_on, weight_vectors, step=step)
            log.record(step, loss, psnr, terms, poison)
            if log.due() or step == stage.steps - 1:
                check_in_sync(_optimised(stage.optimizer), stage.world, f"frame {stage.t}, step {step}")
                last = log.flush()
                if last is not None:
                    bar.update(step + 1, *last, stage.params["means"].shape[0])
    return log.curves


def _optimised(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _np(x: torch.Tensor) -> np.ndarray:
    """A numpy copy (never sharing memory with a live tensor)."""
    return x.detach().cpu().numpy().copy()


def _adam_record(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict:
    """The Adam state that carries to the next frame: colour moments and every group's step."""
    rec: dict[str, dict] = {}
    for name in ("means", "quats", "rgb"):
        p = params[name]
        state = optimizer.state.get(p, {})
        step = int(state["step"].item()) if "step" in state else 0
        entry: dict = {"step": np.int64(step)}
        if name == "rgb":
            n = p.shape[0]
            zeros = np.zeros((n, 3), np.float32)
            entry["exp_avg"] = _np(state["exp_avg"]) if "exp_avg" in state else zeros
            entry["exp_avg_sq"] = _np(state["exp_avg_sq"]) if "exp_avg_sq" in state else zeros
        rec[name] = entry
    return rec


def _curves_summary(curves: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for k, v in curves.items():
        if v:
            tail = np.asarray(v[-max(1, len(v) // 10):], np.float64)
            out[f"final_{k}"] = float(tail.mean())
    return out


def _finish(stage: Stage, curves, seconds: float, seq, n: int) -> tuple[dict, FrameRecord]:
    t, steps = stage.t, stage.steps
    stats = {**_curves_summary(curves), "n_gaussians": n, "steps": steps, "steps_per_second": steps / seconds,
             "source_frame": int(seq.source_frames[t])}
    if stage.config.cameras_per_step > 1:
        stats["cameras_per_step"] = stage.config.cameras_per_step
    stats.update({k: v for k, v in stage.extra_stats.items() if not k.startswith("_")})
    stage.extra_stats.pop("_bar").close(
        f"frame {t}/{seq.n_frames - 1}: loss {stats['final_loss']:.4f}, train PSNR {stats['final_psnr']:.2f} dB, "
        f"{n:,} Gaussians, {steps} steps in {seconds:.1f} s ({steps / seconds:.1f} steps/s)")
    record = FrameRecord(
        t=t, means=_np(stage.params["means"]), quats=_np(stage.params["quats"]), rgb=_np(stage.params["rgb"]),
        adam=_adam_record(stage.optimizer, stage.params),
        curves={k: np.asarray(v, np.float32) for k, v in curves.items()}, stats=stats, seconds=seconds)
    return stats, record


def _batch_lr_factor(config: TrackingConfig) -> float:
    return math.sqrt(config.cameras_per_step) if config.lr_batch_scaling == "sqrt" else 1.0


# ----------------------------------------------------------------------------- t = 0
def fit_first_frame(seq, points: np.ndarray, config: TrackingConfig, scene_radius: float, has_masks: bool,
                    device: torch.device, *, progress: bool = True, echo: Callable[[str], None] = print,
                    world: World = SINGLE
                    ) -> tuple[dict[str, torch.Tensor], FrameRecord, list[dict]]:
    """Reconstruct frame 0; returns the parameters (CPU), frame 0's record and the densification log."""
    from .targets import load_targets

    t0 = time.perf_counter()
    cams = seq.train_cameras
    views = Views.build(cams, seq.background, device, config.uncovered_is_background)
    views.check_batch(config.cameras_per_step, [str(c.id) for c in cams])
    targets = load_targets(seq, 0, cams, has_masks, device)
    params = init_params(torch.from_numpy(points).to(device), len(cams), n_neighbours=config.init_scale_neighbours,
                         max_scale=None if config.max_init_scale is None else config.max_init_scale * scene_radius)
    lrs = learning_rates(config, scene_radius, scale=_batch_lr_factor(config))
    optimizer = make_optimizer(params, lrs, config)
    strategy = DensifyStrategy(config.densify, scene_radius)
    dstate = strategy.initialize_state(params["means"].shape[0], device)
    gen = frame_generator(config.seed, 0)
    order = camera_order(gen, len(cams), config.steps_first, config.cameras_per_step)

    hook = densify_hook(strategy, params, optimizer, dstate, views.sizes, gen, world, "frame 0")

    def after_step(step: int, out, index: list[int]) -> None:
        try:
            hook(step, out, index)
        except AllGaussiansPrunedError as exc:
            raise TrackingError(str(exc)) from None

    shaping = ScaleShaping(config, cams, every=config.densify.every) if ScaleShaping.wanted(config) else None
    render_inputs = (lambda: shaping.shaped(params)) if shaping is not None else (lambda: activated(params))
    stage = Stage(L.FIRST, 0, config.steps_first, config, params, optimizer, render_inputs,
                  lambda: (params["cam_m"], params["cam_c"]), densify=True,
                  densify_until=strategy.statistics_until, after_step=after_step, generator=gen,
                  world=world)
    curves = optimise(stage, views, targets, order, n_frames=seq.n_frames, progress=progress, echo=echo)
    _, record = _finish(stage, curves, time.perf_counter() - t0, seq, params["means"].shape[0])
    final = {k: v.detach().cpu() for k, v in params.items()}
    if shaping is not None:
        final = shaping.bake(final)
    return final, record, dstate.history


# ----------------------------------------------------------------------------- t > 0
@dataclass
class _Static:
    """What frames t > 0 share, on the device, all from run.h5."""

    log_scales: torch.Tensor  # [N, 3]
    logit_opacities: torch.Tensor  # [N, 1]
    scales: torch.Tensor  # [N, 3] activated, frozen
    opacities: torch.Tensor  # [N]
    seg: torch.Tensor  # [N, 3]
    cam_m: torch.Tensor  # [C, 3]
    cam_c: torch.Tensor  # [C, 3]
    fg_idx: torch.Tensor  # [Nfg] int64
    bg_idx: torch.Tensor  # [Nbg] int64
    init_bg_means: torch.Tensor  # [Nbg, 3]
    init_bg_quats: torch.Tensor  # [Nbg, 4] normalised
    nb_idx: torch.Tensor  # [Nfg, K]
    nb_w: torch.Tensor  # [Nfg, K]
    nb_d: torch.Tensor  # [Nfg, K]
    _csr: object = None

    def csr(self):
        """The neighbour table sorted by destination (`NeighbourCSR`), built once per fit."""
        if self._csr is None:
            from tritonsplat.reference.rigidity import NeighbourCSR

            self._csr = NeighbourCSR.build(self.nb_idx)
        return self._csr

    @classmethod
    def from_run(cls, run: RunRecord, device) -> _Static:
        p = {k: torch.from_numpy(v).to(device) for k, v in run.params0.items()}
        fg = torch.from_numpy(run.fg).to(device)
        bg_idx = torch.nonzero(~fg).squeeze(1)
        return cls(
            log_scales=p["log_scales"], logit_opacities=p["logit_opacities"],
            scales=torch.exp(p["log_scales"]), opacities=torch.sigmoid(p["logit_opacities"]).squeeze(-1),
            seg=p["seg"], cam_m=p["cam_m"], cam_c=p["cam_c"], fg_idx=torch.nonzero(fg).squeeze(1), bg_idx=bg_idx,
            init_bg_means=p["means"][bg_idx], init_bg_quats=quat_normalize(p["quats"][bg_idx]),
            nb_idx=torch.from_numpy(run.neighbour_indices).to(device),
            nb_w=torch.from_numpy(run.neighbour_weights).to(device),
            nb_d=torch.from_numpy(run.neighbour_distances).to(device))

    def extend(self, born: dict[str, np.ndarray]) -> None:
        """Append Gaussians born at a frame t > 0 (`tracking.store` BORN_KEYS; always foreground): their
        fixed parameters and neighbour rows (indices into the foreground subset after appending)."""
        device = self.log_scales.device

        def dev(a):
            return torch.from_numpy(np.asarray(a)).to(device)

        n_old, m = self.log_scales.shape[0], len(born["log_scales"])
        self.log_scales = torch.cat([self.log_scales, dev(born["log_scales"])])
        self.logit_opacities = torch.cat([self.logit_opacities, dev(born["logit_opacities"])])
        self.scales = torch.exp(self.log_scales)
        self.opacities = torch.sigmoid(self.logit_opacities).squeeze(-1)
        self.seg = torch.cat([self.seg, dev(born["seg"])])
        self.fg_idx = torch.cat([self.fg_idx, torch.arange(n_old, n_old + m, device=device)])
        self.nb_idx = torch.cat([self.nb_idx, dev(born["nb_indices"])])
        self.nb_w = torch.cat([self.nb_w, dev(born["nb_weights"])])
        self.nb_d = torch.cat([self.nb_d, dev(born["nb_distances"])])
        self._csr = None   # the neighbour table changed: rebuild it on next use


# Parameters fixed after t = 0 that the "no parameter fixing" ablation optimises in each frame.
UNFROZEN_KEYS = ("logit_opacities", "log_scales", "cam_m", "cam_c")


def fit_next_frame(seq, t: int, prev: FrameRecord, prev2: FrameRecord, static: _Static, views: Views,
                   config: TrackingConfig, scene_radius: float, has_masks: bool, device: torch.device, *,
                   progress: bool = True, echo: Callable[[str], None] = print, world: World = SINGLE
                   ) -> FrameRecord:
    """Fit frame t > 0 from the records of t - 1 and t - 2 (t - 2 = t - 1 at t = 1: zero velocity)."""
    from .targets import load_targets

    t_start = time.perf_counter()
    cams = seq.train_cameras
    targets = load_targets(seq, t, cams, has_masks, device)

    def dev(a):
        return torch.from_numpy(np.asarray(a)).to(device)

    prev_means, prev_quats = dev(prev.means), quat_normalize(dev(prev.quats))
    if config.velocity_init:  # constant velocity (the original's `initialize_per_timestep`)
        prev2_means, prev2_quats = dev(prev2.means), quat_normalize(dev(prev2.quats))
        n2 = prev2_means.shape[0]
        if n2 < prev_means.shape[0]:  # Gaussians born at t - 1 have no t - 2: zero velocity
            prev2_means = torch.cat([prev2_means, prev_means[n2:]])
            prev2_quats = torch.cat([prev2_quats, prev_quats[n2:]])
        means0 = prev_means + (prev_means - prev2_means)
        quats0 = quat_normalize(prev_quats + (prev_quats - prev2_quats))
    else:
        means0, quats0 = prev_means.clone(), prev_quats.clone()
    params = {"means": nn.Parameter(means0), "quats": nn.Parameter(quats0), "rgb": nn.Parameter(dev(prev.rgb).clone())}
    if not config.freeze_after_first:
        for key in UNFROZEN_KEYS:
            params[key] = nn.Parameter(getattr(static, key).clone())
    lrs = learning_rates(config, scene_radius, first=False, scale=_batch_lr_factor(config))
    optimizer = make_optimizer(params, lrs, config)
    for name, p in params.items():
        if p not in optimizer.state and any(p is q for g in optimizer.param_groups for q in g["params"]):
            saved = prev.adam.get(name, {})
            step = torch.tensor(float(saved.get("step", 0)), dtype=torch.float32,
                                device=p.device if optimizer.defaults.get("fused") else None)
            if name == "rgb" and "exp_avg" in saved:
                m1, m2 = dev(saved["exp_avg"]).clone(), dev(saved["exp_avg_sq"]).clone()
            else:  # means and rotations: moments reset each frame, step counter kept
                m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
            optimizer.state[p] = {"step": step, "exp_avg": m1, "exp_avg_sq": m2}

    prev_fg_means = prev_means[static.fg_idx]
    frame = FrameConstants(prev_fg_means=prev_fg_means, prev_fg_quats=prev_quats[static.fg_idx],
                           prev_offsets=L.previous_offsets(prev_fg_means, static.nb_idx), prev_rgb=dev(prev.rgb))
    fixed_colours = None if params["rgb"].requires_grad else torch.cat([params["rgb"], static.seg], -1)

    def render_inputs() -> dict[str, torch.Tensor]:
        colors = fixed_colours if fixed_colours is not None else torch.cat([params["rgb"], static.seg], -1)
        if config.freeze_after_first:
            scales, opacities = static.scales, static.opacities
        else:
            scales = torch.exp(params["log_scales"])
            opacities = torch.sigmoid(params["logit_opacities"]).squeeze(-1)
        return {"means": params["means"], "quats": quat_normalize(params["quats"]), "scales": scales,
                "opacities": opacities, "colors": colors}

    def camera_colour():
        if config.freeze_after_first:
            return static.cam_m, static.cam_c
        return params["cam_m"], params["cam_c"]

    gen = frame_generator(config.seed, t)
    order = camera_order(gen, len(cams), config.steps_per_frame, config.cameras_per_step)
    stage = Stage(L.NEXT, t, config.steps_per_frame, config, params, optimizer, render_inputs, camera_colour,
                  static=static, frame=frame, generator=gen, world=world)
    curves = optimise(stage, views, targets, order, n_frames=seq.n_frames, progress=progress, echo=echo)
    n_tracked = params["means"].shape[0]
    born, spawn_stats = None, {}
    if config.spawn_new:
        from .spawn import spawn_gaussians

        # The spawn stage's bar and summary come after the frame's; its steps draw from the frame's generator.
        seconds = time.perf_counter() - t_start
        _, record = _finish(stage, curves, seconds, seq, n_tracked)
        born, spawn_stats = spawn_gaussians(
            seq, t, {k: v.detach() for k, v in render_inputs().items()}, params["means"].detach()[static.fg_idx],
            static.nb_idx.shape[1], views, targets, config, scene_radius, device, gen, render=render,
            optimise=optimise, make_stage=_spawn_stage(camera_colour, static, world), camera_order=camera_order,
            echo=echo, n_frames=seq.n_frames, progress=progress, world=world)
        record.seconds = time.perf_counter() - t_start
        record.stats.update(spawn_stats)
    else:
        _, record = _finish(stage, curves, time.perf_counter() - t_start, seq, n_tracked)
    record.birth_frame = prev.births()
    if born is not None:
        record = with_born(record, born, t)
    return record


def _spawn_stage(camera_colour, static: _Static, world: World):
    def make(name, t, steps, config, params, optimizer, render_inputs, **kwargs) -> Stage:
        return Stage(name, t, steps, config, params, optimizer, render_inputs, camera_colour, static=static,
                     world=world, **kwargs)
    return make


def with_born(record: FrameRecord, born: dict[str, np.ndarray], t: int) -> FrameRecord:
    """Frame t's record with the Gaussians born at t appended (zero colour moments, birth_frame t)."""
    m = len(born["means"])
    adam = {k: dict(v) for k, v in record.adam.items()}
    zeros = np.zeros((m, 3), np.float32)
    adam["rgb"]["exp_avg"] = np.concatenate([adam["rgb"]["exp_avg"], zeros])
    adam["rgb"]["exp_avg_sq"] = np.concatenate([adam["rgb"]["exp_avg_sq"], zeros])
    record.means = np.concatenate([record.means, born["means"]])
    record.quats = np.concatenate([record.quats, born["quats"]])
    record.rgb = np.concatenate([record.rgb, born["rgb"]])
    record.adam = adam
    record.birth_frame = np.concatenate([record.births(), np.full(m, t, np.int64)])
    record.born = {k: born[k] for k in ("log_scales", "logit_opacities", "seg", "nb_indices", "nb_weights",
                                        "nb_distances")}
    record.stats["n_gaussians"] = int(len(record.means))
    return record
