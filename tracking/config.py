"""Frozen configuration of a Dynamic 3D Gaussians fit, with presets.

Defaults are those of the original code (Luiten et al., "Dynamic 3D Gaussians: Tracking by Persistent
Dynamic View Synthesis", 3DV 2024; JonathonLuiten/Dynamic3DGaussians `train.py` / `external.py`).
Every count, weight and threshold is a field; each field states its unit and why it has its value.

Presets (``TrackingConfig.from_preset(name)``):

- ``"original"``: what the released code computes, 10,000 steps at t = 0 and 2,000 per later frame
  (about 2 h for 150 frames on an RTX 3090); its colour-consistency term is off (see LossWeights.colour).
- ``"paper"``: the paper's Table 1 setting: colours fixed for t > 0, no floor loss.
- ``"3gs-online"``: the paper's 3GS-O baseline (per-frame 3DGS from the previous frame, no priors).
- ``"demo"``: the README's main job, tuned to finish the default synthetic scene (160x120, 12 + 2
  cameras, 10 frames) on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tritonsplat.constants import EPS2D

PRIORS = ("rigid", "rot", "iso", "bg")  # the t > 0 priors an ablation may switch off
# Fields that change how a fit runs, not what it computes: excluded from the resume check.
NOT_IDENTITY = ("device", "backend", "log_every", "cuda_graphs")
# Floors of a compressed densification schedule (`scaled_steps`), steps (measured below).
MIN_REFINE_EVERY = 10
MIN_RESET_RECOVERY = 5  # refinement windows between an opacity reset and the final cull
# DensifyConfig.grad_threshold_width = GRAD_THRESHOLD_WIDTH. Measured (2-core CPU, torch backend) with the
# original preset on a 64x48 synthetic scene (6 train + 2 test cameras, 3 frames, 1,448 initial points),
# Gaussians / held-out PSNR:
#   steps scale                 0.02               0.01
#   no floors                   81,893 / 11.6 dB   (not run)
#   MIN_REFINE_EVERY floor      25,149 / 18.0 dB   10,648 / 19.4 dB
#   floor + 640-px threshold     1,285 / 21.6 dB    1,189 / 21.5 dB
# The floor alone still lets the count grow 7-17x: a Gaussian of fixed size falls below a pixel as W shrinks,
# its footprint is then set by the rasterizer's 0.3-pixel dilation, and its NDC gradient (pixel gradient x
# W / 2 of a loss averaged over W x H pixels) grows about as 1 / W, so at 64 px it crosses 2e-4 far more
# often than at the 640 px where 2e-4 was set. Held to 2e-4 x 640 / W, the count stays near the initial
# cloud and the fit gains 2-3.6 dB; the 10-step floor was kept (with the threshold it suffices).
GRAD_THRESHOLD_WIDTH = 640

@dataclass(frozen=True)
class LearningRates:
    """Adam learning rates per parameter group (constant: the original has no schedule)."""

    means: float = 1.6e-4
    """metres per step, multiplied by the scene radius: positions move in scene-size units."""
    rgb: float = 2.5e-3
    """colour units ([0, 1]) per step at t = 0."""
    rgb_next: float = 2.5e-3
    """colour units per step at t > 0: the released code keeps optimising colours (2.5e-3); the paper's
    Table 1 hard-fixes them after t = 0 (0)."""
    quats: float = 1e-3
    """quaternion units per step (unnormalised (w, x, y, z))."""
    opacities: float = 5e-2
    """logit units per step; large, so opacity settles quickly after the reset."""
    scales: float = 1e-3
    """log-metre units per step (the original; 3DGS uses 5e-3)."""
    cam_colour: float = 1e-4
    """per-camera log-gain and offset units per step: absorbs small exposure differences only."""
    seg_colours: float = 0.0
    """segmentation colours are fixed labels from the initial cloud (the code's lr 0)."""


@dataclass(frozen=True)
class DensifyConfig:
    """Densification at t = 0 (`tracking.strategy.DensifyStrategy`): clone, split, prune, reset.

    Step numbers are 0-based iteration indices of the t = 0 stage, as in the original loop.
    """

    start: int = 500
    """first step (steps) at which Gaussians are cloned/split: let the gradients settle first."""
    stop: int = 5000
    """last step (steps) of gradient accumulation and refinement: leave time to converge after."""
    every: int = 100
    """refinement period (steps): averages the screen-space gradient over ~100 views."""
    grad_threshold: float = 2e-4
    """mean screen-space gradient norm (NDC units = pixel gradient x (W/2, H/2)) above which a
    Gaussian is under-reconstructed (3DGS / the original)."""
    grad_threshold_width: int = GRAD_THRESHOLD_WIDTH
    """image width (pixels) at which grad_threshold holds (0: at every width); 640, Panoptic's width, at
    which the original set 2e-4, so the original is unchanged at its own resolution. A view narrower than it
    adds its NDC gradient x W / grad_threshold_width, i.e. it is held to grad_threshold x
    grad_threshold_width / W: Gaussians of a fixed size shrink below a pixel as images shrink, and their
    NDC gradients grow as W shrinks (see GRAD_THRESHOLD_WIDTH for the measurement)."""
    clone_max_scale: float = 0.01
    """fraction of the scene radius: at or below, a Gaussian is cloned, above it is split."""
    split_count: int = 2
    """Gaussians a split Gaussian becomes."""
    split_scale_divisor: float = 1.6
    """scales of split children are divided by this (0.8 x split_count in the original)."""
    prune_opacity: float = 0.005
    """opacity below which a Gaussian is removed at each refinement (it contributes nothing)."""
    final_prune_opacity: float = 0.25
    """opacity threshold of the last refinement (the original's aggressive cull at step 5000)."""
    prune_big_from: int = 3000
    """step (steps) from which Gaussians larger than prune_big_scale are removed."""
    prune_big_scale: float = 0.1
    """fraction of the scene radius above which a Gaussian's largest scale is too big (floaters)."""
    opacity_reset_at: int = 3000
    """step (steps) at which all opacities are set to opacity_reset_value (0 or negative: never)."""
    opacity_reset_value: float = 0.01
    """opacity after the reset: lets unneeded Gaussians fade and be pruned."""
    enabled: bool = True
    """False disables all densification (keeps the initial Gaussians)."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (the original code's; the paper gives none)."""

    im: float = 1.0
    """photometric loss 0.8 L1 + 0.2 (1 - SSIM) of the colour-corrected render."""
    seg: float = 3.0
    """the same loss on the fg/bg segmentation render; the paper's most important ablation."""
    rigid: float = 4.0
    """local rigidity (t > 0): neighbours keep their offsets in the Gaussian's rotating frame."""
    rot: float = 4.0
    """local rotation similarity (t > 0): neighbours rotate alike."""
    iso: float = 2.0
    """long-term isometry (t > 0): neighbour distances keep their t = 0 values."""
    floor: float = 2.0
    """foreground stays above the floor (t > 0; off when TrackingConfig.floor_y is None)."""
    bg: float = 20.0
    """background Gaussians stay at their t = 0 pose (t > 0)."""
    colour: float = 0.0
    """colour consistency with t - 1 (t > 0). 0 reproduces the released code: its
    `initialize_per_timestep` stores prev_col = params['rgb_colors'].detach(), which shares storage with
    the parameter that Adam updates in place, so its l1(rgb, prev_col) compares the colours with
    themselves and is identically zero. 0.01 is the weight that code intended (the `paper` preset).
    Measured on the demo scene (10 frames, the demo preset of 2026-12-04, 2-core AMD EPYC): 33.27 dB with 0.01
    and with 0, 3D MTE following the highest-influence Gaussian 0.42 % and 0.43 %
    (bench/results/cpu-amd-epyc/ablations.md)."""
    ssim: float = 0.2
    """share of (1 - SSIM) in the image and segmentation losses (L1 gets 1 - ssim)."""
    opacity_entropy: float = 0.0
    """binary entropy -o log o - (1 - o) log(1 - o) of the opacities, mean over Gaussians (t = 0): pushes each
    opacity to 0 or 1 (SuGaR, Guedon & Lepetit, CVPR 2024; Binary Opacity Grids, Reiser et al. 2024). 0: off,
    the original."""
    flatten: float = 0.0
    """mean over Gaussians of the smallest of their three scales divided by their largest, min_i s_i / max_i s_i
    (unitless, in (0, 1]), as rendered at t = 0: flattens each Gaussian towards a surface-aligned disc. NeuSG
    (Chen et al. 2023) and PGSR (Chen et al., TVCG 2024) penalise min_i s_i itself (L1), Gaussian Surfels (Dai
    et al., SIGGRAPH 2024) fix it at 0; divided by max_i s_i here so that the weight does not depend on the
    scene's units, with the largest scale a detached reference (it gets no gradient). 0: off, the original.
    Measured on the demo scene (2-frame fits, demo steps, 2-core AMD EPYC Zen 3, 1 thread, 2026-12-02):
    flatten 0.01 / 0.1 / 1 gives test PSNR 31.4 / 31.2 / 31.3 dB (demo 31.3) and no 3D query point reaching
    influence 0.5 (demo 0.06 %): the ball's outermost Gaussians move out only from 43 to 33 mm inside its
    surface while their smallest scale falls from 16 to 4 mm, so o exp(-d^T Sigma^-1 d / 2) at the surface
    falls too (median 0.018 -> 0.011)."""


@dataclass(frozen=True)
class TrackingConfig:
    """Everything that decides the result of `tracking.fit` (device and backend do not, up to
    floating-point rounding, and are excluded from the resume check).

    Nested groups: `lr` (LearningRates), `densify` (DensifyConfig), `weights` (LossWeights).
    """

    preset: str = "original"
    """name of the preset this config came from (recorded in metrics.json)."""
    steps_first: int = 10_000
    """optimisation steps (steps) at t = 0: reconstruct the first frame from scratch."""
    steps_per_frame: int = 2_000
    """optimisation steps (steps) at each t > 0: only motion and colour change."""
    seed: int = 0
    """frame t draws its random numbers from a generator seeded with (seed, t): resumable runs."""
    lr: LearningRates = field(default_factory=LearningRates)
    adam_eps: float = 1e-15
    """Adam epsilon: tiny, as in the original (gradients of means are tiny too)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (torch defaults, the original's)."""
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    knn_k: int = 20
    """neighbours per foreground Gaussian in the rigidity losses (found once, at t = 0)."""
    knn_lambda: float = 2000.0
    """per square metre: neighbour weight exp(-lambda d^2), a ~2.2 cm standard deviation."""
    fg_threshold: float = 0.5
    """a Gaussian is foreground when its segmentation red channel exceeds this."""
    floor_y: float | None = 0.0
    """world y of the floor in data units (+y down, Panoptic's); None disables the floor loss."""
    metres_per_unit: float = 1.0
    """metres per world unit of the data: scales knn_lambda and the metric thresholds."""
    init_scale_neighbours: int = 3
    """initial isotropic scale = RMS distance to this many nearest neighbours."""
    max_init_scale: float | None = None
    """if set, fraction of the scene radius that caps the initial scale (None: uncapped, original)."""
    uncovered_is_background: bool = False
    """False (original): the segmentation render is black where no Gaussian covers a pixel, so the
    blue background target makes background Gaussians cover every pixel (a far shell). True: uncovered
    pixels count as background, for data whose background colour is known (synthetic scenes)."""
    isotropic: bool = False
    """Gaussians stay spheres at t = 0 (one scale each, the mean of the three log scales). False: the original's
    anisotropic Gaussians."""
    filter_3d: float = 0.0
    """variance of the 3D smoothing filter of Mip-Splatting (Yu et al., CVPR 2024) in units of the finest
    training pixel's footprint squared: each Gaussian's covariance is Sigma + filter_3d / nu^2 I, nu the highest
    sampling rate f / z over the training cameras that see it (pixels per data unit), during t = 0, and baked
    into the stored scales after it. 0: off (the original); Mip-Splatting uses 0.2."""
    filter_3d_opacity: bool = True
    """Mip-Splatting's opacity factor sqrt(det Sigma / det(Sigma + filter)) with filter_3d (keeps each
    Gaussian's integral); False keeps the opacity."""
    near: float = 0.2
    """metres of camera z below which Gaussians are culled (the original rasterizer's hard-coded 0.2)."""
    eps2d: float = EPS2D
    """px^2 added to both diagonal entries of every projected 2D covariance (the rasterizer's `eps2d`, the
    low-pass of EWA splatting, Zwicker et al. 2001) in fitting and in every render of the result; the original
    rasterizer's hard-coded 0.3. Smaller renders sharper: at 160x120 it is a good part of a small Gaussian's
    footprint (see the `demo` preset)."""
    device: str | None = None
    """"cuda", "cpu", ... (None: cuda when available). Not part of the result's identity."""
    backend: str = "auto"
    """rasterizer backend: "auto", "torch" or "triton". Not part of the result's identity."""
    deterministic: bool = False
    """bit-reproducible rasterizer gradients on GPU (CPU torch is always reproducible)."""
    priors: tuple[str, ...] = PRIORS
    """physical priors active at t > 0, any subset of rigid, rot, iso, bg (the paper's Table 3 ablations
    drop one at a time)."""
    velocity_init: bool = True
    """initialise frame t at constant velocity from t - 1 and t - 2 (False: copy t - 1; the paper's "no
    forward prop" ablation)."""
    freeze_after_first: bool = True
    """fix opacities, scales and the per-camera colour correction after t = 0 (False: the paper's "no
    parameter fixing" ablation; they are optimised in each frame from their t = 0 values)."""
    cameras_per_step: int = 1
    """training views per optimisation step, rendered in one rasterize call, loss = their mean (1: one
    random camera per step, as in the original)."""
    lr_batch_scaling: str = "none"
    """"none" or "sqrt": multiply every learning rate by sqrt(cameras_per_step) (Grendel-GS's rule,
    Zhao et al. 2024, "On Scaling Up 3D Gaussian Splatting Training")."""
    log_every: int = 40
    """steps between reads of the device-side scalar buffer (curves, NaN check, progress): a read
    stalls the host until the device drains. Not part of the result's identity."""
    cuda_graphs: bool = False
    """capture a t > 0 step once per frame as a CUDA graph and replay it (`tracking.capture`): the
    rasterizer's capacity mode (capacity 1.25 x the frame's largest intersection count; a block of
    log_every steps that overflowed is redone with a larger capacity), cameras picked on the device,
    capturable fused Adam. Same results as eager steps. CUDA only (ignored on CPU); stages that densify,
    torch.distributed runs and cameras of different image sizes run eagerly (warned). Not part of the
    result's identity."""
    spawn_new: bool = False
    """reconstruct objects that enter after t = 0 (`tracking.spawn`): at each t > 0, after the frame's
    optimisation, foreground-mask pixels that the rendered segmentation leaves uncovered in at least
    spawn_min_cameras cameras are carved into new Gaussians. False: the original (a fixed set from t = 0)."""
    spawn_min_cameras: int = 3
    """cameras (cameras) that must show an uncovered foreground region for new Gaussians, and that must see
    each new point on one: the visual hull needs 3 views to bound an object in 3D."""
    spawn_steps: int = 200
    """optimisation steps (steps) of the new Gaussians alone (everything else frozen), with densification
    limited to them; a tenth of a t = 0 reconstruction is enough for one small object."""
    spawn_coverage_threshold: float = 0.5
    """rendered foreground coverage (the segmentation render's foreground channel, 0..1) below which a
    foreground-mask pixel is uncovered: 0.5 is where the render's label flips."""
    spawn_min_pixels: int = 4
    """uncovered pixels (pixels, after the opening) a camera needs to count towards spawn_min_cameras:
    fewer are outline noise of tracked objects."""
    spawn_open_pixels: int = 1
    """radius (pixels) of the morphological opening of the uncovered mask: removes the 1-2 px slivers that
    slightly mis-tracked objects leave along their outlines (0: no opening)."""

    # ------------------------------------------------------------------ presets and derived configs
    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TrackingConfig:
        """The named preset (see `PRESETS`) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def scaled_steps(self, factor: float) -> TrackingConfig:
        """This config with every step count (stage lengths and densification schedule) x factor.

        A compressed schedule keeps what densification needs to be stable: refinements at least
        MIN_REFINE_EVERY steps apart (each averages the screen-space gradient over that many views;
        at 2 steps, 46 refinements in 100 steps grew a 3k-point cloud past 80k Gaussians on a 64x48,
        6-camera scene), a first refinement no earlier than one such window, and no opacity reset
        unless MIN_RESET_RECOVERY refinement windows separate it from the final cull (fewer cannot
        bring the useful Gaussians back above the final 0.25 cull).
        """
        if not factor > 0:
            raise ValueError(f"steps scale must be positive, got {factor}")
        if factor == 1:
            return self

        def s(n: int) -> int:
            return max(1, int(round(n * factor)))

        d = self.densify
        every = max(s(d.every), min(MIN_REFINE_EVERY, d.every))
        start = max(s(d.start), every)
        stop = s(d.stop)
        reset = s(d.opacity_reset_at) if d.opacity_reset_at > 0 else d.opacity_reset_at
        if reset > 0 and stop - reset < MIN_RESET_RECOVERY * every:
            reset = 0
        densify = replace(d, start=start, stop=stop, every=every, prune_big_from=s(d.prune_big_from),
                          opacity_reset_at=reset)
        # spawn_steps only when spawning: a run fitted before the field existed stores none, and must still
        # compare equal to a scaled config without spawning.
        spawn_steps = s(self.spawn_steps) if self.spawn_new else self.spawn_steps
        return replace(self, steps_first=s(self.steps_first), steps_per_frame=s(self.steps_per_frame),
                       spawn_steps=spawn_steps, densify=densify)

    def rasterize_settings(self) -> dict[str, float]:
        """The rasterizer keywords that this config decides, for the fit's renders and its result's alike:
        near (in data units) and eps2d."""
        return {"near": self.near / self.metres_per_unit, "eps2d": self.eps2d}

    def validate(self) -> TrackingConfig:
        """Raise ValueError naming the field for impossible values; returns self."""
        if self.steps_first < 1 or self.steps_per_frame < 1:
            raise ValueError("steps_first and steps_per_frame must be >= 1")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if not self.metres_per_unit > 0:
            raise ValueError(f"metres_per_unit must be positive, got {self.metres_per_unit}")
        if not self.eps2d >= 0:
            raise ValueError(f"eps2d must be >= 0 (px^2), got {self.eps2d}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got {self.backend!r}")
        if self.densify.every < 1:
            raise ValueError("densify.every must be >= 1")
        if not 0 <= self.weights.ssim <= 1:
            raise ValueError("weights.ssim must be in [0, 1]")
        bad = set(self.priors) - set(PRIORS)
        if bad or len(set(self.priors)) != len(self.priors):
            raise ValueError(f"priors must be distinct names among {', '.join(PRIORS)}, got {list(self.priors)}")
        if self.cameras_per_step < 1:
            raise ValueError(f"cameras_per_step must be >= 1, got {self.cameras_per_step}")
        if self.lr_batch_scaling not in ("none", "sqrt"):
            raise ValueError(f"lr_batch_scaling must be 'none' or 'sqrt', got {self.lr_batch_scaling!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.spawn_min_cameras < 2:
            raise ValueError(f"spawn_min_cameras must be >= 2, got {self.spawn_min_cameras}")
        if self.spawn_steps < 1:
            raise ValueError(f"spawn_steps must be >= 1, got {self.spawn_steps}")
        if not 0 < self.spawn_coverage_threshold <= 1:
            raise ValueError(f"spawn_coverage_threshold must be in (0, 1], got {self.spawn_coverage_threshold}")
        if self.spawn_min_pixels < 1 or self.spawn_open_pixels < 0:
            raise ValueError(f"spawn_min_pixels must be >= 1 and spawn_open_pixels >= 0, got "
                             f"{self.spawn_min_pixels}, {self.spawn_open_pixels}")
        for name in ("means", "rgb", "rgb_next", "quats", "opacities", "scales", "cam_colour", "seg_colours"):
            v = getattr(self.lr, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"lr.{name} must be a finite non-negative number, got {v}")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the result (everything but device/backend)."""
        d = self.to_dict()
        for k in NOT_IDENTITY:
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackingConfig:
        """Inverse of to_dict; unknown keys raise ValueError, missing ones take defaults.

        Evaluation settings stored by runs fitted before they moved to `tracking.eval_config.EvalConfig`
        (LEGACY_FIELDS) are dropped with a one-line warning; `EvalConfig.for_legacy` reads their values."""
        import warnings

        from .eval_config import LEGACY_FIELDS

        d = dict(d)
        legacy = [k for k in LEGACY_FIELDS if k in d]
        if legacy:
            warnings.warn(f"this run's config holds evaluation settings {', '.join(legacy)}, which moved to "
                          "EvalConfig: they no longer belong to the fit and become its evaluation defaults",
                          stacklevel=2)
            for k in legacy:
                d.pop(k)
        nested = {"lr": LearningRates, "densify": DensifyConfig, "weights": LossWeights}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrackingConfig fields: {sorted(unknown)}")
        for key, klass in nested.items():
            if key in d and isinstance(d[key], dict):
                sub_known = {f.name for f in fields(klass)}
                bad = set(d[key]) - sub_known
                if bad:
                    raise ValueError(f"unknown {key} fields: {sorted(bad)}")
                d[key] = klass(**d[key])
        for key in ("adam_betas", "priors"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> TrackingConfig:
        return cls.from_dict(json.loads(text))


# The demo preset: the default synthetic scene (160x120, 12 train cameras, 10 frames) on 2 CPU
# cores, tuned for the README's 5-minute budget (data generation, fit, evaluation and renders).
# Measured when tuned (2 CPU cores, torch backend, quiet machine): 215 s end to end (fit 203 s),
# held-out PSNR 30.97 dB, 16,757 Gaussians. With the tile compositor, glibc keeping freed memory
# (tritonsplat.cpu_memory) and the depthwise SSIM blur (2026-12-02, 1 thread, load ~2): 197 s of CPU
# end to end (213 s wall, fit 193 s), 31.03 dB, 16,726 Gaussians, survival_3d 100 %; mte_3d 4.93 % of the extent
# under the 0.5 influence rule (0.06 % of the ground-truth points reach it), 0.87 % following the
# highest-influence Gaussian. 90 steps per frame: 31.17 dB but 279 s of CPU, too close to 5 minutes.
# With eps2d 0.05 (below; 2-core AMD EPYC Zen 3, idle, 2 threads, 2026-12-02): 154-166 s end to end, 32.19 dB,
# 19,297 Gaussians, mte_3d 4.90 % (1.6 % of the points reach 0.5), 0.84 % following the highest-influence Gaussian.
# On a 2-core Intel Xeon (AVX-512, idle, 2 threads, 2026-12-03): 102 s end to end (fit 90 s), 32.14 dB, 19,266
# Gaussians, mte_3d 4.90 % (1.2 % reach 0.5), 0.84 % following the highest-influence Gaussian. On a 2-core AMD EPYC
# with AVX-512 (idle, 2 threads, 2026-12-04, the torch projection's hand-written backward): 79 s end to end (fit
# 67 s), 32.20 dB, 19,374 Gaussians, mte_3d 4.88 % (1.8 % reach 0.5), 0.87 % following the highest-influence one.
# The same machine and day with 900 + 90 steps and rotations at 1e-2 (below): 87 s end to end (fit 83 s), 33.27 dB,
# SSIM 0.981, 19,564 Gaussians, mte_3d 4.87 % (2.1 % reach 0.5), 0.42 % and 3.2 degrees of rotation error
# following the highest-influence Gaussian.
_DEMO = TrackingConfig(
    preset="demo",
    # 600 + 60 steps per frame until the torch backend's tile compositor and projection backward made the demo
    # ~3x faster; the time saved goes to quality (2-core AMD EPYC, AVX-512, 2 threads, 2026-12-04, rotations at
    # 1e-2; fit / held-out PSNR / 3D MTE following the highest-influence Gaussian): 600 + 60: 53 s, 32.34 dB,
    # 0.49 %; 600 + 90: 77 s, 32.64 dB, 0.46 %; 900 + 60: 77 s, 33.08 dB, 0.50 %; 900 + 90: 96 s, 33.27 dB, 0.42 %
    # (one sequence of fits, the machine's speed drifting; the README's run of 900 + 90 later: fit 83 s). The
    # densification schedule is unchanged, so the extra t = 0 steps refine a settled set.
    steps_first=900,
    steps_per_frame=90,
    # Scales must shrink ~3x within a few hundred steps, not 10,000: 5x the original's lr. Rotations must
    # follow up to 8.6 degrees a frame (the ball and the bobber roll) in 60-90 steps, not 2,000: 10x the original's
    # lr. At 1e-3 the Gaussians on the ball turned 15 of its 77 degrees over the 10 frames (the rigidity terms
    # then hold their neighbours' offsets fixed in world axes, so the means turned only 37); at 1e-2, 59 of 77.
    # Whole demo, fit seeds 0 / 1 (2-core AMD EPYC, AVX-512, 2 threads, 2026-12-04): 3D MTE following the
    # highest-influence Gaussian 0.87 / 0.81 -> 0.49 / 0.54 % of the extent, its rotation error 21.2 / 20.8 ->
    # 4.3 / 5.4 degrees (rotation_error_3d_deg_highest_influence), held-out PSNR 32.20 / 32.14 -> 32.34 / 32.62
    # dB; 3e-2 gave 0.48 % and 32.33 dB (seed 0), and 1e-2 at t > 0 alone (1e-3 at t = 0) 0.61 % (600 + 60 steps).
    lr=LearningRates(scales=5e-3, quats=1e-2),
    # Small starting Gaussians and no giant ones keep the torch backend's Gaussian-pixel pairs, i.e. the
    # CPU step time, low (measured 2 CPU cores: 0.1 s/step at 5k Gaussians capped, 0.3-1.4 s uncapped).
    max_init_scale=0.01,
    # The synthetic scene's background colour is known: uncovered pixels need no far shell of Gaussians.
    uncovered_is_background=True,
    # The original's schedule compressed ~12x (refine every 50 steps up to 400, opacity reset at 250, final
    # cull at 0.25), a higher gradient threshold (the 160x120 views give larger NDC gradients per
    # Gaussian) and no Gaussian larger than 0.02 scene radii (~7 cm), from the start.
    # Its threshold was tuned at 160x120 as it stands, so it is not rescaled by width (grad_threshold_width 0).
    densify=DensifyConfig(start=50, stop=400, every=50, grad_threshold=3e-4, grad_threshold_width=0,
                          opacity_reset_at=250, prune_big_from=0, prune_big_scale=0.02),
    # The demo was tuned and measured (numbers above) with the colour term at its intended 0.01.
    weights=LossWeights(colour=0.01),
    # A smaller 2D dilation than the original's 0.3 px^2: at 160x120 the dilation is a good part of a small
    # Gaussian's footprint. The whole demo (2-core AMD EPYC Zen 3, idle, 2 threads, 2026-12-02): held-out PSNR
    # 31.11 -> 32.19 dB, SSIM 0.969 -> 0.976, 2D MTE 6.80 -> 6.20 px, 3D MTE following the highest-influence
    # Gaussian 0.87 -> 0.85 % of the extent, query points reaching influence 0.5 0.06 -> 1.6 %, 16,709 -> 19,297
    # Gaussians, 178 -> 154-166 s end to end (two runs; this machine's speed varies).
    eps2d=0.05,
    # Track readout keeps the documented rule (influence 0.5, else static background) so that mte_3d means the same in
    # every preset. Few surface points reach 0.5: on the ball the foreground Gaussians' centres sit (at eps2d 0.3) 4.9
    # cm, 2.9 sigma along the surface normal, inside the true surface, where o exp(-d^2 / 2 sigma^2) >= 0.5 needs d <=
    # 1.18 sigma even at o = 1. The rendered foreground alpha at the points is high (median over points of the lowest
    # over the views that see them: 0.82) but composited from many weak Gaussians: rays grazing a training silhouette
    # cross many, and the L1-optimal silhouette (alpha 0.5 on the true outline) pulls the whole shell in. Changing the t
    # = 0 Gaussians did not change that (2-frame fits of this scene, 1 thread, 2026-12-02, all at the original's 0.3
    # px^2 dilation unless stated; share of points reaching 0.5 / test PSNR / inset in sigma): the preset 0.06 % / 31.3
    # dB / 2.9; opacity entropy 0.1 (opacities -> 0.99) 0.17 % / 28.9 / 2.9; isotropic + entropy 0.69 % / 27.3 / 2.3;
    # Mip-Splatting's 3D filter 0.2 0.00 % / 30.9 / 2.7, with entropy 0.12 % / 28.6; filter 1 without its opacity factor
    # + entropy 0.29 % / 27.9 / 2.4; filter 4, 0.23-4.7 % / 19-25 dB / 2.1; flat Gaussians (LossWeights.flatten 1) 0.00
    # % / 31.3 / 5.1 in smallest-scale sigma, with entropy 0.06 % / 28.8 / 5.4. The rasterizer's 2D dilation
    # (tritonsplat.constants.EPS2D, 0.3 px^2 in 3DGS) is part of the inset: at 0.05 px^2 the plain demo gives 1.4 % /
    # 32.5 dB / 2.4, at 0.01 px^2 3.1 % / 32.7 dB / 1.3 (with entropy 0.1: 5.9 % / 29.8 dB / 1.2), and at 0.01 px^2 with
    # flatten 1, entropy 0.1 and 1,200 t = 0 steps the ball's outermost Gaussians sit 7.6 mm (0.33 px) instead of 43 mm
    # inside, but 0.4 mm thin, so only 4.0 % reach 0.5 (31.7 dB). A floor under the thin axis does not rescue it: the
    # same with Mip-Splatting's 3D filter as that floor (filter_3d 0.5, no opacity factor; 2-core Intel Xeon, 1 thread,
    # 2026-12-03) gives 4.6 % / 31.9 dB (median influence at the points 0.15), filter_3d 2 pulls the Gaussians further
    # in: 1.1 % / 28.9 dB (median 0.11). A depth-variance term at t = 0 (per pixel sum_i w_i z_i^2 - (sum_i w_i
    # z_i)^2 / sum_i w_i over the blending weights w_i and camera depths z_i of the Gaussians' centres, in cm^2, the
    # spread that Mip-NeRF 360's and 2DGS's distortion losses shrink) at weights 1e-3 / 1e-2 / 1 per cm^2: 3.0 / 7.0
    # / 3.5 % reach 0.5 at 29.2 / 16.6 / 11.9 dB, against 2.3 % at 33.6 dB without (2-frame fits of today's preset,
    # 2-core AMD EPYC, 1 thread, 2026-12-04). metrics.json also reports the readout that always follows the
    # highest-influence Gaussian (keys *_highest_influence). With this preset (10 frames, 2026-12-04) the
    # highest-influence Gaussian at a query point is opaque (median o 0.90), but the point's median offsets
    # from it are 1.47 sigma along its thinnest axis and 0.84 / 0.69 sigma along the others: median
    # d^T Sigma^-1 d 4.9, where influence 0.5 at o = 0.9 needs <= 1.18.
    # What bounds it: a projected Gaussian's alpha at a pixel is its largest influence along the pixel's ray (the
    # EWA projection's affine approximation), so a Gaussian of influence >= 0.5 at a point where a training ray
    # grazes the surface makes that outline pixel half opaque by itself, and the L1 losses (optimal at alpha 0.5 on
    # the true outline) pull it in. The 12 cameras' silhouette curves lie ~15 degrees of longitude (5 cm) apart on
    # the ball, about two Gaussian sigmas, so few points are free of them. Fewer cameras free more points (2-frame
    # fits, 160x120, 600 + 60 steps, rotations at 1e-3; 2-core AMD EPYC, AVX-512, 2026-12-04): 4 / 6 / 12 cameras
    # 5.8 / 3.9 / 1.8 % reach 0.5 (test PSNR 22.4 / 29.4 / 32.6 dB); 320x240 with 12 cameras 1.0 % (33.0 dB).
)

# The paper's Table 1 setting (the released README's "differences to paper"): colours hard-fixed after
# t = 0 and no floor loss. The colour-consistency term keeps its intended weight (it is constant while
# the colours are fixed, and acts again if lr.rgb_next is raised).
_PAPER = TrackingConfig(preset="paper", lr=LearningRates(rgb_next=0.0),
                        weights=LossWeights(floor=0.0, colour=0.01))

# The paper's 3GS-O baseline: 3DGS run online, each frame initialised from the previous one (no
# velocity extrapolation), no physical priors, nothing frozen, densification at t = 0 only (as always);
# plain 3DGS has no segmentation render, so that term is off too.
_3GS_ONLINE = TrackingConfig(preset="3gs-online", priors=(), velocity_init=False, freeze_after_first=False,
                             weights=LossWeights(seg=0.0, floor=0.0, colour=0.0))

PRESETS: dict[str, TrackingConfig] = {
    # What the released code computes (its colour-consistency term is identically zero, see LossWeights).
    "original": TrackingConfig(),
    "paper": _PAPER,
    "demo": _DEMO,
    "3gs-online": _3GS_ONLINE,
}
