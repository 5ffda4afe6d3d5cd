"""Benchmark case registry: name -> scene inputs for `tritonsplat.rasterize`.

`random` (the rasterizer benchmark's definition): Gaussians uniform in the camera frustum at 2-6 m,
log-uniform world scales chosen so that the mean 3-sigma screen radius is about 4 px at any
resolution, random rotations, opacity U(0.05, 1), RGB colours U(0, 1), seed 0. One camera at the
origin looking down +z with fx = fy = 0.8 W and the principal point at the image centre.

`original`: the original renderer's published setting, the `random` scene with 300k Gaussians at
640x360 (850 fps on an RTX 3090); the grid's sizes and resolutions do not apply to it.

`basketball-early`: the start of a fit on real data, the scene a new user meets first. Panoptic
basketball (`basketball-early:DATA`, DATA defaulting to ../shared/data/panoptic/basketball), frame 0
downscaled 4x (160x90), the visual-hull initial points of `data_tools.build_init_points` (8,441 on
that data) with the original's initial parameters (Luiten et al. 2024, `initialize_params`):
isotropic scales sqrt(mean squared distance to the 3 nearest neighbours), identity rotations,
opacity sigmoid(0) = 0.5, colours RGB + segmentation (seg, 0, 1 - seg), D = 6; training camera 0.
The grid's sizes and resolutions do not apply; `extra["rasterize_kwargs"]` holds the keywords a
densifying tracking step renders it with (`TRACKING_STEP_KEYWORDS` and its background). Skipped with the
reason when the data or `data_tools` is absent.

`fitted`: a scene with the large, flat, anisotropic, mostly opaque Gaussians of a fitted scene.
- `fitted` (default): derived from the `data-tools synth` geometry without fitting: N points on the
  surfaces of the synthetic scene's objects at t = 0 (half, by area) and on its floor (half), each a
  Gaussian flattened against the local surface (normal and tangents by PCA of its 16 nearest
  neighbours), tangential standard deviations sqrt(mean squared distance to the 3 nearest
  neighbours) times a and 1/a, the axis ratio a^2 log-uniform in [1, 3], normal standard deviation
  a tenth of that, opacity U(0.8, 1) for 70% and U(0.05, 0.5) for 30%, seen from the synth's first training
  camera (rescaled to the requested resolution). Neighbours come from an approximate kNN (windows
  of the Morton order of two shifted grids), exact enough for initial scales and 100x faster than
  brute force on a CPU. Needs `data_tools`; skipped with the reason when it does not import.
- `fitted:/path/to/run`: the t = 0 parameters of a tracking run, `tracking.load(path).params(0)`,
  seen from the run's first camera (or, when the run exposes none, from a camera looking at the
  Gaussians' centroid); the grid's sizes do not apply. A run with segmentation colours renders as its
  densifying t = 0 steps do: RGB + segmentation (D = 6) with `TRACKING_STEP_KEYWORDS` and the run's background.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}

# World scale range as a multiple of (mean depth / focal): screen sigma is then log-uniform in about
# [0.2, 2.0] px, which gives a mean 3-sigma radius of 4.1 px at 640x360 (measured by
# tests/bench/test_cases.py with the torch projection, including the 0.3 px^2 dilation).
SCALE_RANGE_PX = (0.2, 2.0)
MEAN_DEPTH = 4.0


TRACKING_STEP_KEYWORDS = {"densify_channels": 3, "outputs": ("colors",), "color_grad_channels": 3}
"""rasterize() keywords of a densifying t = 0 tracking step on RGB + segmentation (`tracking.stages.render`
with the default TrackingConfig): the densification head on the RGB channels, colours only (no alpha,
depth or median-depth images), no colour gradient for the fixed segmentation channels."""


@dataclass
class SceneInputs:
    """Positional inputs of `rasterize()` plus a description."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_gaussians(self) -> int:
        return self.means.shape[0]

    def keywords(self) -> dict:
        """The keywords a tracking step renders this case with (`extra["rasterize_kwargs"]`: basketball-early's
        and a segmented fitted:RUN's `TRACKING_STEP_KEYWORDS` and background), tensors on the scene's device; {}
        for the other cases. Every tritonsplat timing of the case passes them (gsplat has no densification
        head)."""
        keywords = self.extra.get("rasterize_kwargs", {})
        return {k: v.to(self.means.device) if isinstance(v, torch.Tensor) else v for k, v in keywords.items()}

    def args(self):
        return (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats,
                self.Ks, self.width, self.height)

    def to(self, device) -> SceneInputs:
        moved = {k: getattr(self, k).to(device) for k in
                 ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")}
        return SceneInputs(**moved, width=self.width, height=self.height, description=self.description,
                           extra=self.extra)

    def requires_grad_(self) -> SceneInputs:
        for name in ("means", "quats", "scales", "opacities", "colors"):
            getattr(self, name).requires_grad_(True)
        return self


def pinhole(width: int, height: int, n_cameras: int = 1, dtype=torch.float32):
    """Identity view matrices and K with fx = fy = 0.8 W, principal point at the centre."""
    focal = 0.8 * width
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)
    return torch.eye(4, dtype=dtype).expand(n_cameras, 4, 4).clone(), K.expand(n_cameras, 3, 3).clone()


def random_scene(n_gaussians: int, width: int = 640, height: int = 360, *, n_channels: int = 3,
                 seed: int = 0, device="cpu", dtype=torch.float32) -> SceneInputs:
    """The `random` case (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    viewmats, Ks = pinhole(width, height, dtype=torch.float64)
    focal = Ks[0, 0, 0]
    depth = uniform(n_gaussians, low=2.0, high=6.0)
    # Uniform in the frustum: pixel position uniform over the image at each depth.
    u = uniform(n_gaussians, low=0.0, high=width)
    v = uniform(n_gaussians, low=0.0, high=height)
    means = torch.stack([(u - width / 2) / focal * depth, (v - height / 2) / focal * depth, depth], -1)
    low, high = (math.log(s * MEAN_DEPTH / focal) for s in SCALE_RANGE_PX)
    scales = torch.exp(uniform(n_gaussians, 3, low=low, high=high))
    quats = torch.randn(n_gaussians, 4, generator=generator, dtype=torch.float64)
    opacities = uniform(n_gaussians, low=0.05, high=1.0)
    colors = uniform(n_gaussians, n_channels)
    tensors = [t.to(device=device, dtype=dtype) for t in (means, quats, scales, opacities, colors,
                                                           viewmats, Ks)]
    return SceneInputs(*tensors, width=width, height=height,
                       description=f"random: {n_gaussians} Gaussians, {width}x{height}, seed {seed}")


def original_scene(device="cpu", dtype=torch.float32) -> SceneInputs:
    """The original paper's setting: 300k Gaussians at 640x360 (850 fps on an RTX 3090)."""
    scene = random_scene(300_000, 640, 360, device=device, dtype=dtype)
    scene.description = "original: 300k random Gaussians at 640x360 (paper: 850 fps, RTX 3090)"
    return scene


CaseBuilder = Callable[..., SceneInputs]


class CaseUnavailable(RuntimeError):
    """A registered case that cannot be built on this installation (the message says why)."""


@dataclass(frozen=True)
class Case:
    """A registered benchmark scene.

    Attributes:
        name: registry name (`--case` value, or its part before ":").
        build: (n_gaussians, width, height, *, device, argument) -> SceneInputs.
        description: one line for listings.
        fixed_n_gaussians: the case's own size (the grid's `--sizes` are ignored), or None.
        fixed_resolution: the case's own (width, height), or None.
        takes_argument: whether "name:argument" is accepted (e.g. a path).
    """

    name: str
    build: CaseBuilder
    description: str
    fixed_n_gaussians: int | None = None
    fixed_resolution: tuple[int, int] | None = None
    takes_argument: bool = False

    def __call__(self, n_gaussians: int | None = None, width: int = 640, height: int = 360, *, device="cpu",
                 argument: str | None = None) -> SceneInputs:
        return self.build(n_gaussians, width, height, device=device, argument=argument)


# ----------------------------------------------------------------------------- fitted-like scene
FITTED_NEIGHBOURS_FOR_NORMALS = 16
FITTED_NEIGHBOURS_FOR_SCALES = 3
FITTED_ANISOTROPY = 3.0        # tangential axis ratio up to 3:1 (log-uniform)
FITTED_FLATNESS = 0.1          # normal sigma / tangential sigma
FITTED_OPAQUE_FRACTION = 0.7   # share of near-opaque Gaussians, opacity U(0.8, 1); the rest U(0.05, 0.5)
MORTON_WINDOW = 24             # neighbours taken on each side in Morton order, per grid


def _spread_bits(values: torch.Tensor) -> torch.Tensor:
    """Insert two zero bits between each of the low 21 bits of int64 `values` (Morton encoding)."""
    x = values & 0x1FFFFF
    x = (x | (x << 32)) & 0x1F00000000FFFF
    x = (x | (x << 16)) & 0x1F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    x = (x | (x << 2)) & 0x1249249249249249
    return x


def morton_codes(points: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """int64 [N] Morton (Z-order) codes of [N, 3] points on a 2^21 grid over their bounding box,
    optionally shifted by `shift` grid extents (a second grid breaks the first one's seams)."""
    low, high = points.min(0).values, points.max(0).values
    extent = float((high - low).max().clamp_min(1e-12))
    cells = ((points - low) / extent * (1 - 1e-6) + shift) % 1.0 * (2**21 - 1)
    cells = cells.to(torch.int64)
    return _spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << 1) | (_spread_bits(cells[:, 2]) << 2)


def approximate_knn(points: torch.Tensor, k: int, window: int = MORTON_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate k nearest neighbours (self excluded) of [N, 3] points.

    Candidates are the `window` points on each side of a point in the Morton order of two grids
    shifted by a third of their extent; the k nearest candidates are returned.

    Returns:
        indices int64 [N, k], squared distances [N, k] (ascending).
    """
    n = points.shape[0]
    if n <= k:
        raise ValueError(f"approximate_knn: need more than k={k} points, got {n}")
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    candidates = []
    for shift in (0.0, 1.0 / 3.0):
        order = torch.argsort(morton_codes(points, shift))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n)
        neighbour_rank = (rank[:, None] + offsets[None]).clamp(0, n - 1)
        candidates.append(order[neighbour_rank])
    candidates = torch.sort(torch.cat(candidates, 1), dim=1).values            # [N, 4 window]
    squared = ((points[candidates] - points[:, None]) ** 2).sum(-1)
    duplicate = torch.zeros_like(candidates, dtype=torch.bool)
    duplicate[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    invalid = duplicate | (candidates == torch.arange(n)[:, None])
    squared = squared.masked_fill(invalid, float("inf"))
    squared, position = torch.topk(squared, k, dim=1, largest=False)
    return candidates.gather(1, position), squared


def rotation_to_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """(w, x, y, z) unit quaternions [N, 4] of rotation matrices [N, 3, 3] (Shepperd's method)."""
    m = rotation
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    candidates = torch.stack([
        torch.stack([1 + trace, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
        torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0],
                     m[:, 0, 2] + m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2],
                     m[:, 1, 2] + m[:, 2, 1]], -1),
        torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                     1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
    ], 1)                                                                         # [N, 4 choices, 4]
    pivots = torch.stack([trace, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1).argmax(-1)
    quats = candidates[torch.arange(m.shape[0]), pivots]
    return quats / quats.norm(dim=-1, keepdim=True)


def gaussians_from_points(points: torch.Tensor, colors: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Surface-aligned anisotropic Gaussians on a float64 point cloud (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    neighbours, squared = approximate_knn(points, FITTED_NEIGHBOURS_FOR_NORMALS)
    base_sigma = squared[:, :FITTED_NEIGHBOURS_FOR_SCALES].mean(1).sqrt().clamp_min(1e-4)
    local = points[neighbours] - points[neighbours].mean(1, keepdim=True)
    covariance = local.transpose(1, 2) @ local / FITTED_NEIGHBOURS_FOR_NORMALS
    _, vectors = torch.linalg.eigh(covariance)                    # ascending: normal first
    rotation = torch.stack([vectors[..., 2], vectors[..., 1], vectors[..., 0]], -1)  # columns t1, t2, n
    flip = torch.linalg.det(rotation) < 0
    rotation[flip, :, 2] *= -1
    log_ratio = torch.rand(n, generator=generator, dtype=torch.float64) * math.log(FITTED_ANISOTROPY)
    anisotropy = torch.exp(log_ratio / 2)                         # t1 / t2 = anisotropy^2
    scales = torch.stack([base_sigma * anisotropy, base_sigma / anisotropy, FITTED_FLATNESS * base_sigma], -1)
    opaque = torch.rand(n, generator=generator, dtype=torch.float64) < FITTED_OPAQUE_FRACTION
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    opacities = torch.where(opaque, 0.8 + 0.2 * uniform, 0.05 + 0.45 * uniform)
    return {"means": points, "quats": rotation_to_quaternion(rotation), "scales": scales,
            "opacities": opacities, "colors": colors}


def _synth_points(n_gaussians: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [N, 3] surface points of the synth scene at t = 0 and their RGB colours [N, 3]."""
    import numpy as np

    from data_tools import synthetic

    rng = np.random.default_rng(seed)
    parts = synthetic.build_scene(seed)
    n_objects = n_gaussians // 2
    areas = np.array([part.area() for part in parts])
    counts = np.floor(n_objects * areas / areas.sum()).astype(int)
    counts[0] += n_objects - counts.sum()
    points, colors = [], []
    for part, count in zip(parts, counts):
        rotation, translation = part.pose(0.0)
        points.append(synthetic.sample_surface(part, int(count), rng) @ rotation.T + translation)
        colors.append(np.clip(part.colors[rng.integers(0, 2, size=count)] + rng.normal(0, 0.05, (count, 3)), 0, 1))
    n_floor = n_gaussians - n_objects
    half = synthetic.FLOOR_HALF
    floor_x, floor_z = rng.uniform(-half, half, n_floor), rng.uniform(-half, half, n_floor)
    points.append(np.stack([floor_x, np.zeros(n_floor), floor_z], -1))
    colors.append(np.clip(0.5 + rng.normal(0, 0.1, (n_floor, 3)), 0, 1))
    return torch.from_numpy(np.concatenate(points)), torch.from_numpy(np.concatenate(colors))


def _synth_camera(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synth scene's first training camera at the requested resolution: viewmats, Ks [1, ...]."""
    from data_tools import synthetic

    train_cameras, _ = synthetic.make_cameras(synthetic.SynthConfig(width=width, height=height))
    camera = train_cameras[0]
    return (torch.from_numpy(camera.w2c.copy())[None], torch.from_numpy(camera.K.copy())[None])


def fitted_synth_scene(n_gaussians: int, width: int = 640, height: int = 360, *, seed: int = 0, device="cpu",
                       dtype=torch.float32) -> SceneInputs:
    """The default `fitted` case (see the module docstring); needs `data_tools`."""
    if n_gaussians < 64:
        raise ValueError(f"fitted: expected at least 64 Gaussians, got {n_gaussians}")
    points, colors = _synth_points(n_gaussians, seed)
    gaussians = gaussians_from_points(points, colors, seed=seed)
    viewmats, Ks = _synth_camera(width, height)
    tensors = [t.to(device=device, dtype=dtype) for t in (
        gaussians["means"], gaussians["quats"], gaussians["scales"], gaussians["opacities"], gaussians["colors"],
        viewmats, Ks)]
    return SceneInputs(*tensors, width=width, height=height,
                       description=f"fitted (synth-derived, not optimised): {n_gaussians} Gaussians, "
                                   f"{width}x{height}, seed {seed}",
                       extra={"source": "data_tools.synthetic, seed 0, t = 0"})


def _first_present(params, names: tuple[str, ...]):
    for name in names:
        if name in params:
            return name, torch.as_tensor(params[name]).detach().to(torch.float64).cpu()
    raise ValueError(f"fitted: the tracking run's parameters have none of {names} (keys: {sorted(params)})")


def tracking_run_scene(path: str, width: int = 640, height: int = 360, *, device="cpu",
                       dtype=torch.float32) -> SceneInputs:
    """`fitted:/path`: t = 0 parameters of a tracking run, activated if stored raw (log scales, logit
    opacities, unnormalised quaternions), seen from the run's first camera at width x height."""
    try:
        import tracking

        run = tracking.load(path)
        params = run.params(0)
    except Exception as error:  # the tracking package is being written; report why, whatever it is
        raise ValueError(f"fitted:{path}: could not read a tracking run ({type(error).__name__}: {error})") from error
    params = dict(params)
    _, means = _first_present(params, ("means", "means3D"))
    _, quats = _first_present(params, ("quats", "rotations", "unnorm_rotations"))
    scale_name, scales = _first_present(params, ("scales", "log_scales"))
    opacity_name, opacities = _first_present(params, ("opacities", "logit_opacities"))
    _, colors = _first_present(params, ("colors", "rgb", "rgb_colors", "colours"))
    if scale_name == "log_scales" or bool((scales <= 0).any()):
        scales = scales.exp()
    opacities = opacities.reshape(-1)
    if opacity_name == "logit_opacities" or bool(((opacities < 0) | (opacities > 1)).any()):
        opacities = torch.sigmoid(opacities)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    colors = colors.reshape(means.shape[0], -1).clamp(0, 1)
    extra: dict = {"source": str(path)}
    channels = ""
    if "seg" in params and colors.shape[-1] == 3:
        # As a densifying t = 0 step renders the run: RGB + segmentation in one pass (D = 6), the densification
        # head on the RGB channels, the run's background (`tracking.targets.Views`: black where the data has
        # none; a blue segmentation background where uncovered pixels count as background).
        colors = torch.cat([colors, params["seg"].reshape(means.shape[0], -1).to(colors.dtype).clamp(0, 1)], -1)
        background = torch.zeros(1, colors.shape[-1], dtype=dtype)
        if getattr(run, "background", None) is not None:
            background[0, :3] = torch.as_tensor(run.background, dtype=dtype).reshape(-1)[:3]
        if getattr(getattr(run, "config", None), "uncovered_is_background", False):
            background[0, 5] = 1.0
        extra["rasterize_kwargs"] = {**TRACKING_STEP_KEYWORDS, "backgrounds": background.to(device)}
        channels = ", D = 6 (RGB + segmentation), densify_channels=3, colours only"
    viewmats, Ks = _tracking_run_camera(run, means, width, height)
    tensors = [t.to(device=device, dtype=dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    return SceneInputs(*tensors, width=width, height=height,
                       description=f"fitted: tracking run {path}, t = 0, {means.shape[0]} Gaussians, {width}x{height}"
                                   f"{channels}",
                       extra=extra)


def _tracking_run_camera(run, means: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's first camera with K rescaled to width x height, else a camera looking at the centroid."""
    cameras = getattr(run, "cameras", None) or getattr(run, "train_cameras", None)
    if cameras:
        camera = cameras[0]
        K = torch.as_tensor(camera.K, dtype=torch.float64).clone()
        K[0] *= width / camera.width
        K[1] *= height / camera.height
        return torch.as_tensor(camera.w2c, dtype=torch.float64)[None].clone(), K[None]
    centre = means.median(0).values
    extent = float((means - centre).norm(dim=-1).quantile(0.9))
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, 3] = -centre + torch.tensor([0.0, 0.0, 2.5 * extent], dtype=torch.float64)
    _, Ks = pinhole(width, height, dtype=torch.float64)
    return viewmat[None], Ks


# ----------------------------------------------------------------------------- basketball early fit
BASKETBALL_DEFAULT_DATA = "../shared/data/panoptic/basketball"
BASKETBALL_DOWNSCALE = 4
BASKETBALL_SCALE_NEIGHBOURS = 3
BASKETBALL_MIN_MEAN_SQ_DISTANCE = 1e-7    # the original's clip of the mean squared neighbour distance


def _mean_squared_neighbour_distance(points: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """Exact mean squared distance of each of [N, 3] points to its k nearest others (blocks of rows)."""
    out = []
    for first in range(0, points.shape[0], block):
        d2 = torch.cdist(points[first:first + block], points).square()
        d2[torch.arange(d2.shape[0]), torch.arange(first, first + d2.shape[0])] = float("inf")
        out.append(d2.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out)


def basketball_early_scene(data: str | None = None, *, device="cpu", dtype=torch.float32) -> SceneInputs:
    """The `basketball-early` case (see the module docstring)."""
    from pathlib import Path

    path = Path(data or BASKETBALL_DEFAULT_DATA)
    if not path.exists():
        raise CaseUnavailable(f"basketball-early: no data at {path} (pass basketball-early:/path/to/basketball)")
    try:
        import data_tools
    except Exception as error:
        raise CaseUnavailable(f"basketball-early: data_tools does not import ({type(error).__name__}: {error})"
                              ) from error
    seq = data_tools.load(path, downscale=BASKETBALL_DOWNSCALE, frames=[0])
    points = torch.from_numpy(data_tools.build_init_points(seq, 0)).to(torch.float64)
    xyz, rgb, seg = points[:, :3], points[:, 3:6], points[:, 6:7]
    mean_sq = _mean_squared_neighbour_distance(xyz, BASKETBALL_SCALE_NEIGHBOURS).clamp_min(
        BASKETBALL_MIN_MEAN_SQ_DISTANCE)
    n = xyz.shape[0]
    scales = mean_sq.sqrt()[:, None].expand(n, 3).contiguous()
    quats = torch.zeros(n, 4, dtype=torch.float64)
    quats[:, 0] = 1.0
    opacities = torch.full((n,), 0.5, dtype=torch.float64)
    colors = torch.cat([rgb, seg, torch.zeros_like(seg), 1 - seg], dim=1)
    camera = seq.train_cameras[0]
    viewmats = torch.as_tensor(camera.w2c, dtype=torch.float64)[None]
    Ks = torch.as_tensor(camera.K, dtype=torch.float64)[None]
    background = torch.zeros(1, 6, dtype=torch.float64)
    if seq.background is not None:
        background[0, :3] = torch.as_tensor(seq.background, dtype=torch.float64)
    tensors = [t.to(device=device, dtype=dtype) for t in (xyz, quats, scales, opacities, colors, viewmats, Ks)]
    return SceneInputs(*tensors, width=int(camera.width), height=int(camera.height),
                       description=f"basketball-early: {path}, frame 0, downscale {BASKETBALL_DOWNSCALE}, "
                                   f"visual-hull start, {n} Gaussians, D = 6, training camera 0",
                       extra={"source": str(path), "rasterize_kwargs": {
                           **TRACKING_STEP_KEYWORDS, "backgrounds": background.to(device=device, dtype=dtype)}})


# ----------------------------------------------------------------------------- registry
def _build_random(n_gaussians, width, height, *, device="cpu", argument=None) -> SceneInputs:
    return random_scene(n_gaussians, width, height, device=device)


def _build_original(n_gaussians, width, height, *, device="cpu", argument=None) -> SceneInputs:
    return original_scene(device=device)


def _build_fitted(n_gaussians, width, height, *, device="cpu", argument=None) -> SceneInputs:
    if argument:
        return tracking_run_scene(argument, width, height, device=device)
    try:
        import data_tools.synthetic  # noqa: F401
    except Exception as error:
        raise CaseUnavailable(f"fitted: data_tools does not import ({type(error).__name__}: {error})") from error
    return fitted_synth_scene(n_gaussians, width, height, device=device)


def _build_basketball_early(n_gaussians, width, height, *, device="cpu", argument=None) -> SceneInputs:
    return basketball_early_scene(argument, device=device)


CASES: dict[str, Case] = {
    "random": Case("random", _build_random, "uniform in the frustum at 2-6 m, mean 3-sigma radius ~4 px, seed 0"),
    "original": Case("original", _build_original, "the original's setting: random, 300k Gaussians at 640x360",
                     fixed_n_gaussians=300_000, fixed_resolution=(640, 360)),
    "fitted": Case("fitted", _build_fitted, "large flat anisotropic Gaussians on the synth scene's surfaces "
                   "(fitted:/path/to/run for a tracking run)", takes_argument=True),
    "basketball-early": Case("basketball-early", _build_basketball_early,
                             "Panoptic basketball frame 0 at 160x90, visual-hull start, D = 6 "
                             "(basketball-early:/path/to/basketball)",
                             fixed_n_gaussians=8441, fixed_resolution=(160, 90), takes_argument=True),
}


def parse_case(spec: str) -> tuple[Case, str | None]:
    """"name" or "name:argument" -> (registered Case, argument or None); ValueError naming the cases."""
    name, _, argument = spec.partition(":")
    if name not in CASES:
        raise ValueError(f"case: expected one of {sorted(CASES)} (or fitted:/path/to/run), got {spec!r}")
    case = CASES[name]
    if argument and not case.takes_argument:
        raise ValueError(f"case: {name!r} takes no argument, got {spec!r}")
    return case, argument or None


def make_case(name: str, n_gaussians: int, width: int, height: int, *, device="cpu") -> SceneInputs:
    """Build a registered case ("name" or "name:argument"); raises ValueError naming the known cases."""
    case, argument = parse_case(name)
    return case(n_gaussians, width, height, device=device, argument=argument)


def expand_grid(specs, sizes, resolutions) -> list[tuple[str, int | None, int, int]]:
    """(case spec, n_gaussians or None when the case fixes it, width, height) for every grid point."""
    points = []
    for spec in specs:
        case, argument = parse_case(spec)
        if case.fixed_n_gaussians is not None and case.fixed_resolution is not None:
            points.append((spec, case.fixed_n_gaussians, *case.fixed_resolution))
            continue
        case_sizes = [None] if argument else list(sizes)
        for width, height in resolutions:
            for n_gaussians in case_sizes:
                points.append((spec, n_gaussians, width, height))
    return points
