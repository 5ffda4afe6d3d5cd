"""Densification at t = 0 as a strategy dataclass whose parameter surgery also fixes Adam's moments.

The schedule is Dynamic 3D Gaussians' (Luiten et al. 2024, original `external.densify`), shorter
and harsher than 3DGS's (Kerbl et al. 2023):

- every step <= stop: accumulate, for each Gaussian visible in the view, the norm of its screen-space
  gradient of the RGB channels in NDC units (pixel gradient x (W/2, H/2)), times W / grad_threshold_width
  for views narrower than grad_threshold_width;
- at steps start..stop that are multiples of `every`: Gaussians whose mean gradient is >= 2e-4 are
  cloned (max scale <= 0.01 x scene radius: an exact copy) or split (larger: two children offset by
  samples of the Gaussian, scales / 1.6, the parent removed); then Gaussians with opacity < 0.005
  (< 0.25 at the last refinement) and, from step 3000, with max scale > 0.1 x scene radius are
  removed; the accumulators are reset;
- at step 3000 every opacity is reset to 0.01.

Surgery keeps the optimiser consistent (gsplat's strategy habit): rows of exp_avg / exp_avg_sq are
selected with the parameter, new rows get zero moments, a value reset zeroes its moments; Adam's step
counter is kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import DensifyConfig
from .distributed import World, check_in_sync, gather_views
from .params import GAUSSIAN_KEYS, group_of
from .quaternions import quat_to_rotmat


class AllGaussiansPrunedError(RuntimeError):
    """Pruning would leave no Gaussian (usually wrong camera poses, units or masks)."""


@dataclass
class DensifyState:
    """Running statistics between refinements (kept outside the frozen strategy).

    grad_sum: [N] sum over views of the NDC screen-space gradient norm.
    count: [N] number of views in which the Gaussian was visible.
    """

    grad_sum: torch.Tensor
    count: torch.Tensor
    history: list[dict] = field(default_factory=list)
    ndc_scales: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (W, H) -> [2] on the device


def _new_moments(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Move Adam state from `old` to `new`, applying `transform` to the moment tensors."""
    state = optimizer.state.pop(old, None)
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = transform(state[key])
        optimizer.state[new] = state


def _swap(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, name: str,
          value: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    old = params[name]
    new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    group = group_of(optimizer, name)
    if group is not None:
        group["params"][0] = new
        _new_moments(optimizer, old, new, transform)
    params[name] = new


def select_gaussians(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, keep: torch.Tensor) -> None:
    """Keep the Gaussians where `keep` [N] bool is True, in parameters and moments."""
    for name in GAUSSIAN_KEYS:
        _swap(params, optimizer, name, params[name].data[keep], lambda m, keep=keep: m[keep])


def append_gaussians(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                     rows: dict[str, torch.Tensor]) -> None:
    """Append Gaussians (rows[name] [M, ...] for every per-Gaussian key) with zero moments."""
    for name in GAUSSIAN_KEYS:
        extra = rows[name].to(params[name].dtype)

        def pad(m, extra=extra):
            return torch.cat([m, torch.zeros_like(extra)], 0)

        _swap(params, optimizer, name, torch.cat([params[name].data, extra], 0), pad)


def reset_parameter(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, name: str,
                    value: torch.Tensor) -> None:
    """Replace one parameter's values, zeroing its moments (step counter kept)."""
    _swap(params, optimizer, name, value, torch.zeros_like)


@dataclass(frozen=True)
class DensifyStrategy:
    """The t = 0 densification (see the module docstring).

    Call `initialize_state(n)` once, then `step_post_backward(...)` after every optimiser step.
    Thresholds in scene-radius fractions are turned into data units with `scene_radius`.
    """

    config: DensifyConfig
    scene_radius: float

    @property
    def last_refine_step(self) -> int:
        """The last step (multiple of `every` in start..stop) at which refinement runs, or -1."""
        c = self.config
        last = (c.stop // c.every) * c.every
        return last if last >= c.start else -1

    @property
    def statistics_until(self) -> int:
        """The last step whose view gradients `accumulate` still counts (`stop`), or -1 when disabled: later
        renders need no densification head."""
        return self.config.stop if self.config.enabled else -1

    def initialize_state(self, n: int, device: torch.device | str) -> DensifyState:
        z = torch.zeros(n, device=device)
        return DensifyState(grad_sum=z, count=z.clone())

    def accumulate(self, state: DensifyState, step: int, densify_grad: torch.Tensor, radii: torch.Tensor,
                   width: int, height: int) -> None:
        """Add one view's statistics. densify_grad [N, 2] pixel units, radii [N]."""
        c = self.config
        if not c.enabled or step > c.stop:
            return
        scale = state.ndc_scales.get((width, height))
        if scale is None:  # one host-to-device copy per image size, not per step
            # Narrow views count less (DensifyConfig.grad_threshold_width): their sub-pixel Gaussians
            # have larger NDC gradients for the same under-reconstruction.
            ref = c.grad_threshold_width
            fewer = width / ref if 0 < width < ref else 1.0
            scale = state.ndc_scales[(width, height)] = densify_grad.new_tensor([width / 2.0 * fewer,
                                                                                 height / 2.0 * fewer])
        ndc = densify_grad * scale
        norm = ndc.norm(dim=-1)
        visible = radii > 0
        state.grad_sum += torch.where(visible, norm, torch.zeros_like(norm))
        state.count += visible.to(state.count.dtype)

    def step_post_backward(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                           state: DensifyState, step: int, generator: torch.Generator | None = None,
                           densify_grad: torch.Tensor | None = None, radii: torch.Tensor | None = None,
                           width: int = 0, height: int = 0) -> dict[str, int] | None:
        """Accumulate (when densify_grad is given), then refine/prune/reset at the scheduled steps.

        Returns a summary {"step", "cloned", "split", "pruned", "n"} when the Gaussians changed.
        """
        c = self.config
        if not c.enabled:
            return None
        if densify_grad is not None:
            self.accumulate(state, step, densify_grad, radii, width, height)
        summary = None
        if c.start <= step <= c.stop and step % c.every == 0:
            summary = self.refine(params, optimizer, state, step, generator)
        if 0 < c.opacity_reset_at == step and step <= c.stop:
            value = torch.logit(torch.tensor(c.opacity_reset_value)).item()
            reset_parameter(params, optimizer, "logit_opacities", torch.full_like(params["logit_opacities"], value))
        return summary

    def refine(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: DensifyState,
               step: int, generator: torch.Generator | None = None) -> dict[str, int]:
        """Clone, split and prune once; resets the statistics."""
        c = self.config
        n0 = params["means"].shape[0]
        mean_grad = state.grad_sum / state.count.clamp_min(1)
        max_scale = torch.exp(params["log_scales"].data).amax(1)
        hot = mean_grad >= c.grad_threshold
        small = max_scale <= c.clone_max_scale * self.scene_radius
        to_clone = hot & small
        to_split = hot & ~small

        clones = {k: params[k].data[to_clone] for k in GAUSSIAN_KEYS}
        children = {k: params[k].data[to_split].repeat(c.split_count, *[1] * (params[k].dim() - 1))
                    for k in GAUSSIAN_KEYS}
        stds = torch.exp(children["log_scales"])
        noise = torch.randn(stds.shape, generator=generator, device=generator.device if generator else None)
        samples = noise.to(stds.device) * stds
        rot = quat_to_rotmat(children["quats"])
        children["means"] = children["means"] + torch.einsum("nij,nj->ni", rot, samples)
        children["log_scales"] = children["log_scales"] - torch.log(torch.tensor(c.split_scale_divisor))

        select_gaussians(params, optimizer, ~to_split)
        rows = {k: torch.cat([clones[k], children[k]], 0) for k in GAUSSIAN_KEYS}
        append_gaussians(params, optimizer, rows)

        opacity = torch.sigmoid(params["logit_opacities"].data).squeeze(-1)
        too_big = torch.zeros_like(opacity, dtype=torch.bool)
        if step >= c.prune_big_from:
            too_big = torch.exp(params["log_scales"].data).amax(1) > c.prune_big_scale * self.scene_radius
        threshold = c.prune_opacity
        if step == self.last_refine_step:
            threshold = c.final_prune_opacity
            if bool(((opacity < threshold) | too_big).all()):
                warnings.warn(f"the final cull (opacity < {threshold}) at step {step} would remove every Gaussian "
                              f"(too few steps since the opacity reset?); pruning at {c.prune_opacity} instead",
                              stacklevel=2)
                threshold = c.prune_opacity
        remove = (opacity < threshold) | too_big
        if bool(remove.all()):
            hint = "check the camera poses, the world units (metres_per_unit) and the initial points"
            if 0 < c.opacity_reset_at <= step < c.opacity_reset_at + 100:
                hint = (f"only {step - c.opacity_reset_at} steps separate the opacity reset (step "
                        f"{c.opacity_reset_at}) from this cull: too few to recover (a --steps-scale below ~0.05?)")
            raise AllGaussiansPrunedError(
                f"densification at step {step} would remove all {len(remove)} Gaussians (opacity < {threshold} or "
                f"too large): {hint}")
        n_pruned = int(remove.sum())
        if n_pruned:
            select_gaussians(params, optimizer, ~remove)
        n = params["means"].shape[0]
        state.grad_sum = torch.zeros(n, device=params["means"].device)
        state.count = torch.zeros(n, device=params["means"].device)
        summary = {"step": step, "cloned": int(to_clone.sum()), "split": int(to_split.sum()), "pruned": n_pruned,
                   "n_before": n0, "n": n}
        state.history.append(summary)
        return summary


def view_gradients(densify_grad: torch.Tensor, n_views: int) -> torch.Tensor:
    """Each view's screen-space gradient of its own loss, from those of a loss that is the mean over
    `n_views` views ([V, N, 2]): x n_views (exact for powers of two; unchanged for one view).

    The densification threshold is for one view's loss (the original renders one view per step); of the
    mean over B views each view gets 1/B of it, so without this factor B views per step would densify as
    if the threshold were B times higher (measured on a 64x48 synthetic scene, demo preset at equal
    rendered views, `bench cameras-per-step`: 15,943 Gaussians at B = 1; 8,881 / 5,028 at B = 2 / 4
    without this factor, 15,747 / 16,379 with it).
    """
    return densify_grad if n_views == 1 else densify_grad * n_views


def densify_hook(strategy: DensifyStrategy, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                 state: DensifyState, sizes: list[tuple[int, int]], generator: torch.Generator, world: World,
                 where: str, first_row: int = 0) -> Callable[[int, object, list[int]], None]:
    """A stage's `after_step` that runs `strategy` on `params`: each of the step's views adds its screen-space
    gradient statistics (`view_gradients`), the last one also runs the schedule (refinements, resets).

    Under torchrun every rank gets every view's statistics, in the step's camera order (`gather_views`), and
    accumulates them as one process does, so the ranks clone, split and prune the same Gaussians; after a
    refinement that changed the count their parameters are compared (`check_in_sync`). `first_row`: the
    statistics are those of the rendered rows first_row.. (the spawn stage renders frozen Gaussians first).
    `sizes`: (W, H) per camera index.
    """

    def after_step(step: int, out, index: list[int]) -> None:
        W, H = sizes[index[0]]
        if out.densify_grad is None:  # past the strategy's statistics (Stage.densify_until): the schedule only
            strategy.step_post_backward(params, optimizer, state, step, generator)
            return
        grad = view_gradients(out.densify_grad[:, first_row:], len(index))
        radii = out.radii[:, first_row:]
        if world.active:
            grad, radii = gather_views(grad, world), gather_views(radii, world)
        n_before = params["means"].shape[0]
        last = grad.shape[0] - 1
        for b in range(last):
            strategy.accumulate(state, step, grad[b], radii[b], W, H)
        strategy.step_post_backward(params, optimizer, state, step, generator, densify_grad=grad[last],
                                    radii=radii[last], width=W, height=H)
        if world.active and params["means"].shape[0] != n_before:
            optimised = [p for group in optimizer.param_groups for p in group["params"]]
            check_in_sync(optimised, world, f"{where}, refinement at step {step}")

    return after_step
