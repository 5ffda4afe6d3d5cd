"""Gaussian parameters of Dynamic 3D Gaussians, their activations and the optimiser groups.

Parameters (Luiten et al. 2024, original `train.py`), N Gaussians and C training cameras:

| name | shape | activation | init |
|---|---|---|---|
| means | [N, 3] | none | point-cloud xyz |
| rgb | [N, 3] | none (plain colours, no SH) | point-cloud rgb |
| seg | [N, 3] | none | (s, 0, 1 - s) from the cloud's fg label |
| quats | [N, 4] | normalise, (w, x, y, z) | identity |
| logit_opacities | [N, 1] | sigmoid | 0 (opacity 0.5) |
| log_scales | [N, 3] | exp | log RMS distance to the 3 nearest neighbours, isotropic |
| cam_m | [C, 3] | exp (per-channel gain) | 0 |
| cam_c | [C, 3] | none (per-channel offset) | 0 |

A training render of camera c is exp(cam_m[c]) * rgb_render + cam_c[c].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrackingConfig
from .neighbours import knn
from .quaternions import quat_normalize

GAUSSIAN_KEYS = ("means", "rgb", "seg", "quats", "logit_opacities", "log_scales")
CAMERA_KEYS = ("cam_m", "cam_c")
ALL_KEYS = GAUSSIAN_KEYS + CAMERA_KEYS
# Keys that change per frame t > 0 (the others are fixed after t = 0).
DYNAMIC_KEYS = ("means", "quats", "rgb")

MIN_INIT_MEAN_SQ_DISTANCE = 1e-7  # the original's clip of the mean squared neighbour distance


def initial_log_scales(xyz: torch.Tensor, n_neighbours: int = 3, max_scale: float | None = None) -> torch.Tensor:
    """[N, 3] isotropic log scales: log sqrt(mean squared distance to the n nearest neighbours)."""
    n = xyz.shape[0]
    k = min(n_neighbours, n - 1)
    if k < 1:
        return torch.full((n, 3), math.log(0.01), dtype=xyz.dtype, device=xyz.device)
    _, d2 = knn(xyz, k)
    mean_sq = d2.mean(1).clamp_min(MIN_INIT_MEAN_SQ_DISTANCE)
    log_scale = 0.5 * torch.log(mean_sq)
    if max_scale is not None:
        log_scale = log_scale.clamp_max(math.log(max_scale))
    return log_scale[:, None].repeat(1, 3).to(xyz.dtype)


def init_params(points: torch.Tensor, n_cameras: int, *, n_neighbours: int = 3,
                max_scale: float | None = None) -> dict[str, nn.Parameter]:
    """Parameters from an initial cloud.

    Args:
        points: [N, 7] float (x, y, z, r, g, b, seg) with rgb in [0, 1] and seg in {0, 1}.
        n_cameras: training cameras (rows of cam_m / cam_c).
        n_neighbours: neighbours of the initial scale estimate.
        max_scale: optional cap of the initial scale (data units).

    Returns:
        dict name -> nn.Parameter, the table in the module docstring.
    """
    points = points.float()
    xyz = points[:, :3].contiguous()
    seg = points[:, 6:7]
    n = xyz.shape[0]
    quats = torch.zeros(n, 4, device=xyz.device)
    quats[:, 0] = 1.0
    tensors = {
        "means": xyz,
        "rgb": points[:, 3:6].contiguous(),
        "seg": torch.cat([seg, torch.zeros_like(seg), 1 - seg], 1),
        "quats": quats,
        "logit_opacities": torch.zeros(n, 1, device=xyz.device),
        "log_scales": initial_log_scales(xyz, n_neighbours, max_scale),
        "cam_m": torch.zeros(n_cameras, 3, device=xyz.device),
        "cam_c": torch.zeros(n_cameras, 3, device=xyz.device),
    }
    return {k: nn.Parameter(v) for k, v in tensors.items()}


def learning_rates(config: TrackingConfig, scene_radius: float, *, first: bool = True,
                   scale: float = 1.0) -> dict[str, float]:
    """lr per parameter name (means scaled by the scene radius, as in the original); colours use
    lr.rgb at t = 0 (`first`) and lr.rgb_next after; every lr is multiplied by `scale` (the batch rule)."""
    lr = config.lr
    rates = {
        "means": lr.means * scene_radius,
        "rgb": lr.rgb if first else lr.rgb_next,
        "seg": lr.seg_colours,
        "quats": lr.quats,
        "logit_opacities": lr.opacities,
        "log_scales": lr.scales,
        "cam_m": lr.cam_colour,
        "cam_c": lr.cam_colour,
    }
    if scale != 1:
        rates = {k: v * scale for k, v in rates.items()}
    return rates


def fused_step(config: TrackingConfig, device: torch.device) -> bool:
    """Whether a step runs the GPU path: the triton backend (on CUDA, or on the CPU under the Triton
    interpreter, where it is tested) or "auto" on CUDA. The torch backend keeps the eager path, whose bits
    the CPU resume tests pin."""
    return config.backend == "triton" or (config.backend == "auto" and torch.device(device).type == "cuda")


def make_optimizer(params: dict[str, nn.Parameter], lrs: dict[str, float], config: TrackingConfig,
                   names: tuple[str, ...] | None = None) -> torch.optim.Adam:
    """Adam with one group per parameter (group["name"] = the key), eps 1e-15, constant lrs.

    `fused=True` on CUDA and wherever `fused_step` holds. Parameters whose lr is 0 (or not in `names`) are
    left out and get requires_grad False: a zero-lr Adam group changes nothing, so this is the original's
    freezing at lower cost.
    """
    names = tuple(params) if names is None else names
    groups = []
    for key, p in params.items():
        trainable = key in names and lrs[key] > 0
        p.requires_grad_(trainable)
        if trainable:
            groups.append({"params": [p], "lr": lrs[key], "name": key})
    # One fused kernel for every group (about 2 launches a step instead of ~30, and no .item() of the
    # step counters) on CUDA and on the fused step path; the CPU torch path keeps today's per-tensor
    # implementation, whose bits the resume tests pin.
    on_cuda = bool(groups) and all(g["params"][0].is_cuda for g in groups)
    fused = bool(groups) and (on_cuda or fused_step(config, groups[0]["params"][0].device))
    return torch.optim.Adam(groups, lr=0.0, betas=config.adam_betas, eps=config.adam_eps,
                            **({"fused": True} if fused else {}))


def group_of(optimizer: torch.optim.Optimizer, name: str) -> dict | None:
    """The param group whose "name" is `name`, or None."""
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return g
    return None


def activated(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rasterizer inputs: means [N,3], quats normalised [N,4], scales [N,3], opacities [N],
    colors [N, 6] = (rgb, seg) rendered in one pass."""
    return {
        "means": params["means"],
        "quats": quat_normalize(params["quats"]),
        "scales": torch.exp(params["log_scales"]),
        "opacities": torch.sigmoid(params["logit_opacities"]).squeeze(-1),
        "colors": torch.cat([params["rgb"], params["seg"]], dim=-1),
    }


def foreground_mask(params: dict[str, torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """bool [N]: seg red channel > threshold (the original's `seg_colors[:, 0] > 0.5`)."""
    return params["seg"][:, 0].detach() > threshold


def max_sampling_rate(means: torch.Tensor, cameras, near: float, margin: float = 0.15) -> torch.Tensor:
    """[N] nu: the highest sampling rate f / z (pixels per data unit) over the cameras that see each mean
    (z > near, inside the image grown by `margin` of its size on each side: Mip-Splatting's test); 0 where
    no camera does. `cameras`: data_tools.Camera-like (K, w2c, width, height)."""
    x = means.detach()
    nu = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for cam in cameras:
        w2c = torch.as_tensor(cam.w2c, dtype=x.dtype, device=x.device)
        K = torch.as_tensor(cam.K, dtype=x.dtype, device=x.device)
        xc = x @ w2c[:3, :3].T + w2c[:3, 3]
        z = xc[:, 2]
        zc = z.clamp_min(near)
        u = K[0, 0] * xc[:, 0] / zc + K[0, 2]
        v = K[1, 1] * xc[:, 1] / zc + K[1, 2]
        seen = ((z > near) & (u >= -margin * cam.width) & (u <= (1 + margin) * cam.width)
                & (v >= -margin * cam.height) & (v <= (1 + margin) * cam.height))
        nu = torch.where(seen, torch.maximum(nu, 0.5 * (K[0, 0] + K[1, 1]) / zc), nu)
    return nu


class ScaleShaping:
    """The t = 0 Gaussians as rendered when TrackingConfig.isotropic or filter_3d is on (`shaped`), and the
    same Gaussians baked into plain parameters after t = 0 (`bake`), so that every later frame, the readout
    and the renders see exactly what t = 0 fitted.

    The 3D filter (Mip-Splatting, Yu et al., CVPR 2024, Sec. 5.1): Sigma' = Sigma + filter_3d / nu^2 I, with nu
    the Gaussian's highest sampling rate over the training cameras (`max_sampling_rate`), recomputed
    (without gradient) every `every` renders and whenever the Gaussian count changes; R (S^2 + f^2 I) R^T keeps
    the rotation, so the scales become sqrt(s^2 + f^2). The opacity is multiplied by
    sqrt(det Sigma / det Sigma') (filter_3d_opacity).
    """

    def __init__(self, config: TrackingConfig, cameras, every: int = 100):
        self.config, self.cameras, self.every = config, list(cameras), every
        self._var: torch.Tensor | None = None
        self._calls = 0

    @staticmethod
    def wanted(config: TrackingConfig) -> bool:
        return config.isotropic or config.filter_3d > 0

    def filter_variance(self, means: torch.Tensor) -> torch.Tensor | None:
        """[N, 1] the filter's variance (data units squared), or None when filter_3d is 0."""
        if self.config.filter_3d <= 0:
            return None
        if self._var is None or self._var.shape[0] != means.shape[0] or self._calls % self.every == 0:
            nu = max_sampling_rate(means, self.cameras, self.config.near / self.config.metres_per_unit)
            # A Gaussian no camera sees gets the coarsest rate of those seen (Mip-Splatting: the largest depth).
            seen = nu > 0
            floor = nu[seen].min() if bool(seen.any()) else nu.new_tensor(1.0)
            self._var = (self.config.filter_3d / torch.where(seen, nu, floor) ** 2)[:, None]
        return self._var

    def log_scales_and_opacities(self, log_scales: torch.Tensor, logit_opacities: torch.Tensor,
                                 means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales [N, 3], opacities [N]) as rendered."""
        if self.config.isotropic:
            log_scales = log_scales.mean(1, keepdim=True).expand(-1, 3)
        opacities = torch.sigmoid(logit_opacities).squeeze(-1)
        var = self.filter_variance(means)
        if var is None:
            return torch.exp(log_scales), opacities
        s2 = torch.exp(2 * log_scales)
        s2f = s2 + var
        if self.config.filter_3d_opacity:
            opacities = opacities * torch.sqrt((s2 / s2f).prod(1))
        return torch.sqrt(s2f), opacities

    def shaped(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`activated(params)` with the shaping applied."""
        self._calls += 1
        act = activated(params)
        act["scales"], act["opacities"] = self.log_scales_and_opacities(
            params["log_scales"], params["logit_opacities"], params["means"])
        return act

    def bake(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain parameters (CPU tensors) rendering as `shaped` does: log_scales and logit_opacities replaced."""
        self._var = None  # the filter of the final means
        with torch.no_grad():
            scales, opacities = self.log_scales_and_opacities(params["log_scales"], params["logit_opacities"],
                                                              params["means"])
        out = dict(params)
        out["log_scales"] = torch.log(scales).contiguous()
        o = opacities.clamp(1e-7, 1 - 1e-7)
        out["logit_opacities"] = torch.log(o / (1 - o))[:, None].to(params["logit_opacities"].dtype)
        return out
