"""Synthetic multi-camera dynamic scenes with exact ground-truth 3D tracks.

The scene (world in metres, +y down, floor at y = 0 like the Panoptic data):

- ``ball``: a rigid sphere (0.4 m) rolling on a circle on the floor;
- ``crate``: a rigid box sliding back and forth on the floor while turning;
- ``spinner``: a floating cube rotating in place about a tilted axis;
- ``arm``: an articulated limb of two capsules (upper arm on a floor pivot, forearm on the elbow)
  that swings and bends;
- ``bobber``: a small sphere floating up and down while turning;
- ``visitor`` (only with ``enter_at = T``): a sphere that is absent before frame T, appears at T in a
  free spot on the floor and rolls from there (an object that enters after the first frame);

over a textured floor square, all with procedural solid textures (3D checker times a
sum-of-sines pattern, evaluated in each part's own frame so the texture moves with the surface).

Images are rendered by an analytic ray caster (ray-sphere / ray-box / ray-capsule / ray-plane
intersection, Lambertian shading with one directional light plus ambient, 4x4 supersampling with
rays through the sub-pixel centres), never by the Gaussian rasterizer. Foreground masks mark pixels
whose supersamples mostly (at least half) hit an object; the floor and the constant background
colour are background.

Ground truth (``gt_tracks.npz``): surface points sampled on every part at t = 0, kept when visible
in at least 2 training cameras at t = 0, and moved by their part's rigid motion, so they are exactly
the geometric surface points at every frame. The visitor's points are sampled the same way at its
entry frame T and are NaN before it (``entry_frame[p]`` = T; 0 for every other point).
``visible[t, p, c]``: inside camera c's image, not
occluded (a ray cast from the camera towards the point hits nothing closer than the point, within
2 mm), and on a foreground pixel of c's mask.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ._common import single_threaded
from .cameras import Camera, look_at_w2c
from .writer import atomic_dir, panoptic_meta, save_mask_png, to_uint8

SCENE_CENTER = np.array([0.0, -0.4, 0.0])  # the point cameras look at
FLOOR_HALF = 3.0  # the floor is the square |x|, |z| <= 3 m at y = 0
LIGHT_DIR = np.array([-0.4, -1.0, -0.3]) / np.linalg.norm([-0.4, -1.0, -0.3])  # towards the light
AMBIENT, DIFFUSE = 0.45, 0.55
OCCLUSION_TOL = 2e-3  # metres
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of :func:`make_synthetic_scene` (all recorded under ``"synth"`` in train_meta.json)."""

    cameras: int = 12
    test_cameras: int = 2
    width: int = 160
    height: int = 120
    frames: int = 10
    seed: int = 0
    supersample: int = 4
    n_track_candidates: int = 2000
    camera_distance: float = 3.2
    enter_at: int | None = None
    """frame at which the ``visitor`` sphere enters (absent before); None: no visitor (the default scene)."""

    def __post_init__(self):
        if self.cameras < 3:
            raise ValueError("a synthetic scene needs at least 3 training cameras")
        if self.test_cameras < 0 or self.frames < 1 or self.width < 8 or self.height < 8:
            raise ValueError(f"invalid synthetic scene size {self}")
        if self.supersample < 1:
            raise ValueError("supersample must be >= 1")
        if self.enter_at is not None and not 1 <= self.enter_at < self.frames:
            raise ValueError(f"enter_at must be a frame in 1..{self.frames - 1} (frames - 1), got {self.enter_at}")

    def meta(self) -> dict:
        """The fields recorded in train_meta.json (enter_at only when set: default scenes stay as they were)."""
        d = asdict(self)
        if d["enter_at"] is None:
            d.pop("enter_at")
        return d


# ----------------------------------------------------------------------------- rotations
def _axis_angle(axis, angle: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def _rot_y(a: float) -> np.ndarray:
    return _axis_angle([0, 1, 0], a)


def _rot_z(a: float) -> np.ndarray:
    return _axis_angle([0, 0, 1], a)


# ----------------------------------------------------------------------------- scene description
Pose = tuple[np.ndarray, np.ndarray]  # (R local->world [3, 3], T [3]): x_world = R x_local + T


@dataclass
class Part:
    """One rigid primitive in its own frame, moved by ``pose(t)``.

    kind: 'sphere' (radius), 'box' (half extents [3], centred at the origin) or 'capsule'
    (segment a->b in local coordinates, radius).
    """

    name: str
    object_id: int  # 1-based; 0 is the floor
    kind: str
    pose: Callable[[float], Pose]
    radius: float = 0.0
    half: np.ndarray = field(default_factory=lambda: np.zeros(3))
    a: np.ndarray = field(default_factory=lambda: np.zeros(3))
    b: np.ndarray = field(default_factory=lambda: np.zeros(3))
    colors: np.ndarray = field(default_factory=lambda: np.ones((2, 3)))  # checker colours
    check: float = 0.09  # checker cell size in metres
    waves: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))  # sum-of-sines: dir*freq (3), phase
    enters_at: float = -math.inf  # frame from which the part exists (absent before)

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        """Centre and radius of a sphere containing the part, in local coordinates."""
        if self.kind == "sphere":
            return np.zeros(3), self.radius
        if self.kind == "box":
            return np.zeros(3), float(np.linalg.norm(self.half))
        return 0.5 * (self.a + self.b), 0.5 * float(np.linalg.norm(self.b - self.a)) + self.radius

    def area(self) -> float:
        if self.kind == "sphere":
            return 4 * math.pi * self.radius**2
        if self.kind == "box":
            h = self.half
            return 8 * (h[0] * h[1] + h[1] * h[2] + h[0] * h[2])
        L = float(np.linalg.norm(self.b - self.a))
        return 2 * math.pi * self.radius * L + 4 * math.pi * self.radius**2


def _waves(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Four random plane waves [4, 4] (direction * spatial frequency, phase) with ~scale metre periods."""
    d = rng.normal(size=(4, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    freq = 2 * math.pi / (scale * rng.uniform(0.7, 1.6, size=(4, 1)))
    return np.concatenate([d * freq, rng.uniform(0, 2 * math.pi, size=(4, 1))], 1)


def _palette(rng: np.random.Generator) -> np.ndarray:
    """Two strongly contrasting saturated colours [2, 3]."""
    hue = rng.uniform(0, 1)
    out = []
    for h, v in ((hue, 0.95), ((hue + 0.5) % 1.0, 0.35)):
        rgb = np.clip(np.abs(((h * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # hue -> RGB
        out.append(v * (0.25 + 0.75 * rgb))
    return np.array(out)


def build_scene(seed: int) -> list[Part]:
    """The five objects (six parts) of the synthetic scene; phases, colours and textures vary with
    the seed, the layout does not (it keeps objects apart and inside every camera's view)."""
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * math.pi, size=8)
    parts: list[Part] = []

    def tex(name, oid, kind, pose, **geo):
        parts.append(
            Part(name, oid, kind, pose, colors=_palette(rng), check=rng.uniform(0.08, 0.11),
                 waves=_waves(rng, rng.uniform(0.05, 0.09)), **geo)
        )

    # 1. ball: rolls on a circle of radius 0.25 m around (0.5, 0.5): 3 cm/frame.
    r_ball, w_ball = 0.2, 0.12

    def ball_pose(t):
        a = ph[0] + w_ball * t
        centre = np.array([0.5 + 0.25 * math.cos(a), -r_ball, 0.5 + 0.25 * math.sin(a)])
        vel = np.array([-math.sin(a), 0.0, math.cos(a)])
        axis = np.cross(vel, [0.0, 1.0, 0.0])  # rolling: omega x (contact offset, +y) = -velocity
        return _axis_angle(axis, 0.25 * w_ball * t / r_ball) @ _rot_y(ph[1]), centre

    tex("ball", 1, "sphere", ball_pose, radius=r_ball)

    # 2. crate: slides along x (3 cm/frame peak) at z = -0.55 while turning about the vertical.
    half_crate = np.array([0.22, 0.15, 0.17])

    def crate_pose(t):
        x = 0.45 + 0.3 * math.sin(ph[2] + 0.1 * t)
        return _rot_y(ph[3] + 0.05 * t), np.array([x, -half_crate[1], -0.55])

    tex("crate", 2, "box", crate_pose, half=half_crate)

    # 3. spinner: a floating cube rotating in place about a tilted axis, 0.12 rad/frame.
    axis_spin = np.array([0.3, -1.0, 0.2])

    def spinner_pose(t):
        R = _axis_angle(axis_spin, ph[4] + 0.12 * t) @ _axis_angle([1, 0, 0], 0.6)
        return R, np.array([-0.55, -0.55, -0.5])

    tex("spinner", 3, "box", spinner_pose, half=np.full(3, 0.16))

    # 4. arm: upper arm on a pivot on the floor, forearm on the elbow; swings and bends.
    pivot, l_up, l_fore = np.array([-0.5, 0.0, 0.45]), 0.5, 0.42

    def upper_pose(t):
        return _rot_y(ph[5] + 0.04 * t) @ _rot_z(0.35 * math.sin(0.1 * t + ph[6])), pivot

    def fore_pose(t):
        R_up, T_up = upper_pose(t)
        bend = 0.7 + 0.45 * math.sin(0.13 * t + ph[7])
        return R_up @ _rot_z(bend), T_up + R_up @ np.array([0.0, -l_up, 0.0])

    tex("arm_upper", 4, "capsule", upper_pose, radius=0.075, a=np.zeros(3), b=np.array([0.0, -l_up, 0.0]))
    tex("arm_fore", 4, "capsule", fore_pose, radius=0.065, a=np.zeros(3), b=np.array([0.0, -l_fore, 0.0]))

    # 5. bobber: a small sphere floating up and down near the middle while turning.
    ph_b = rng.uniform(0, 2 * math.pi)

    def bobber_pose(t):
        y = -0.8 - 0.12 * math.sin(0.2 * t + ph_b)
        return _rot_y(0.15 * t) @ _rot_z(0.5), np.array([0.05, y, 0.0])

    tex("bobber", 5, "sphere", bobber_pose, radius=0.13)
    return parts


OBJECT_NAMES = ["floor", "ball", "crate", "spinner", "arm", "bobber"]
VISITOR_ID = 6  # object id of the entering sphere (``OBJECT_NAMES + ["visitor"]`` with enter_at)
# metres. 0.2, not 0.15: at 96x72 (8 + 2 cameras, demo preset x 0.5 steps) a 0.15 m visitor lowered the held-out
# PSNR of the frames after its entry by only 0.65 dB when nothing reconstructs it, 0.2 m by 1.12 dB. Its
# surface stays >= 5.9 cm from every other object's for 15 frames after entry (seeds 0-2, sampled points).
VISITOR_RADIUS = 0.2
VISITOR_START = np.array([-0.05, -VISITOR_RADIUS, 0.1])  # floor spot free of the other objects' paths
VISITOR_SPEED = 0.02  # metres per frame along -x


def visitor_part(seed: int, enter_at: int) -> Part:
    """The sphere that enters at frame ``enter_at``: appears on the floor at VISITOR_START and rolls along -x
    at VISITOR_SPEED (its own random texture: the other parts' random numbers are unchanged)."""
    rng = np.random.default_rng([seed, 2])
    spin = rng.uniform(0, 2 * math.pi)

    def pose(t):
        s = VISITOR_SPEED * (t - enter_at)
        # rolling along -x: rotation about +z by -s / r (omega x contact offset (+y) = -velocity)
        return _rot_z(s / VISITOR_RADIUS) @ _rot_y(spin), VISITOR_START + np.array([-s, 0.0, 0.0])

    return Part("visitor", VISITOR_ID, "sphere", pose, radius=VISITOR_RADIUS, colors=_palette(rng),
                check=rng.uniform(0.06, 0.08), waves=_waves(rng, rng.uniform(0.04, 0.06)), enters_at=float(enter_at))


def scene_parts(cfg: SynthConfig) -> list[Part]:
    """build_scene(seed), plus the visitor when ``cfg.enter_at`` is set."""
    parts = build_scene(cfg.seed)
    if cfg.enter_at is not None:
        parts.append(visitor_part(cfg.seed, cfg.enter_at))
    return parts


# ----------------------------------------------------------------------------- cameras
def make_cameras(cfg: SynthConfig, parts: list[Part] | None = None) -> tuple[list[Camera], list[Camera]]:
    """Training cameras on a ring at alternating elevations (18 and 38 degrees) and test cameras
    between them (28 degrees), all ``camera_distance`` from the scene centre and looking at it.

    The focal length (shared by all cameras) is the largest for which the surface of every part stays
    at least 4 pixels inside every image at every frame, so all cameras see all objects.
    """
    parts = parts if parts is not None else scene_parts(cfg)
    step = 360.0 / cfg.cameras
    poses = [(i, i * step, 18.0 if i % 2 == 0 else 38.0) for i in range(cfg.cameras)]
    poses += [
        (cfg.cameras + j, (j * 360.0 / max(cfg.test_cameras, 1)) + 0.5 * step + 7.0, 28.0)
        for j in range(cfg.test_cameras)
    ]
    w2cs = []
    for _, azimuth, elevation in poses:
        el, az = math.radians(elevation), math.radians(azimuth)
        eye = SCENE_CENTER + cfg.camera_distance * np.array(
            [math.cos(el) * math.cos(az), -math.sin(el), math.cos(el) * math.sin(az)]
        )
        w2cs.append(look_at_w2c(eye, SCENE_CENTER))
    # Surface samples of every part at every frame must project at least `margin` pixels inside.
    rng = np.random.default_rng(12345)
    local = [sample_surface(p, 600, rng) for p in parts]
    pts = np.concatenate(
        [local[pp.index - 1] @ pp.R.T + pp.T for t in range(cfg.frames) for pp in _place(parts, float(t))]
    )
    f = float(cfg.width)  # at most a 53 degree horizontal field of view
    margin = 4.0
    for w2c in w2cs:
        X = pts @ w2c[:3, :3].T + w2c[:3, 3]
        with np.errstate(divide="ignore"):
            f = min(
                f,
                float(((cfg.width / 2 - margin) * X[:, 2] / np.abs(X[:, 0])).min()),
                float(((cfg.height / 2 - margin) * X[:, 2] / np.abs(X[:, 1])).min()),
            )
    K = np.array([[f, 0, cfg.width / 2], [0, f, cfg.height / 2], [0, 0, 1.0]])
    cams = [Camera(cid, K, w2c, cfg.width, cfg.height) for (cid, _, _), w2c in zip(poses, w2cs)]
    return cams[: cfg.cameras], cams[cfg.cameras :]


# ----------------------------------------------------------------------------- ray casting
def _intersect_local(part: Part, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Ray parameter [M] of the first hit (inf on a miss) for rays o + s d (o [3], d [M, 3] unit) given
    in the part's local frame."""
    inf = torch.full((len(d),), float("inf"), dtype=d.dtype)
    if part.kind == "sphere":
        b = d @ o
        c = o @ o - part.radius**2
        disc = b * b - c
        s = -b - torch.sqrt(disc.clamp_min(0))
        return torch.where((disc >= 0) & (s > 0), s, inf)
    if part.kind == "box":
        h = torch.as_tensor(part.half, dtype=d.dtype)
        inv = 1.0 / d  # +-inf for axis-parallel rays; nan (0 * inf) is mapped to "no constraint" below
        t1, t2 = (-h - o) * inv, (h - o) * inv
        t_near = torch.minimum(t1, t2).nan_to_num(-float("inf")).amax(1)
        t_far = torch.maximum(t1, t2).nan_to_num(float("inf")).amin(1)
        return torch.where((t_far >= t_near) & (t_near > 0), t_near, inf)
    # capsule: infinite-cylinder hit clipped to the segment, otherwise the end-cap spheres
    a = torch.as_tensor(part.a, dtype=d.dtype)
    ba = torch.as_tensor(part.b - part.a, dtype=d.dtype)
    r = part.radius
    oa = o - a
    baba, baoa, oaoa = ba @ ba, ba @ oa, oa @ oa
    bard = d @ ba
    rdoa = d @ oa
    qa = baba - bard * bard
    qb = baba * rdoa - baoa * bard
    qc = baba * oaoa - baoa * baoa - r * r * baba
    h = qb * qb - qa * qc
    s_cyl = (-qb - torch.sqrt(h.clamp_min(0))) / qa.clamp_min(1e-12)
    y = baoa + s_cyl * bard
    on_body = (h >= 0) & (y > 0) & (y < baba) & (s_cyl > 0)
    s = torch.where(on_body, s_cyl, inf)
    for end in (a, a + ba):
        oc = o - end
        b = d @ oc
        disc = b * b - (oc @ oc - r * r)
        s_cap = -b - torch.sqrt(disc.clamp_min(0))
        s = torch.where((disc >= 0) & (s_cap > 0) & (s_cap < s), s_cap, s)
    return s


def _normal_local(part: Part, q: torch.Tensor) -> torch.Tensor:
    """Outward unit normals [M, 3] at local surface points q [M, 3]."""
    if part.kind == "sphere":
        n = q
    elif part.kind == "box":
        h = torch.as_tensor(part.half, dtype=q.dtype)
        axis = (q / h).abs().argmax(1)
        rows = torch.arange(len(q))
        n = torch.zeros_like(q)
        n[rows, axis] = torch.sign(q[rows, axis])
    else:
        a = torch.as_tensor(part.a, dtype=q.dtype)
        ba = torch.as_tensor(part.b - part.a, dtype=q.dtype)
        s = (((q - a) @ ba) / (ba @ ba)).clamp(0, 1)
        n = q - (a + s[:, None] * ba)
    return n / n.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _albedo(part: Part, q: torch.Tensor) -> torch.Tensor:
    """Solid texture [M, 3] at local points q [M, 3]: a 3D checker modulated by plane waves."""
    cell = torch.floor(q / part.check + 0.37).sum(1)  # offset keeps box faces off cell borders
    checker = torch.remainder(cell, 2.0)[:, None]
    colors = torch.as_tensor(part.colors, dtype=q.dtype)
    base = colors[0] * checker + colors[1] * (1 - checker)
    w = torch.as_tensor(part.waves, dtype=q.dtype)
    pattern = torch.sin(q @ w[:, :3].T + w[:, 3]).mean(1, keepdim=True)  # in [-1, 1]
    tint = torch.tensor([1.0, 0.9, 0.8], dtype=q.dtype)
    return (base * (0.8 + 0.3 * pattern * tint)).clamp(0, 1)


def _floor_albedo(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Floor texture [M, 3]: 0.3 m tiles in two warm greys with a fine wavy pattern."""
    tile = torch.remainder(torch.floor(x / 0.3) + torch.floor(z / 0.3), 2.0)[:, None]
    light = torch.tensor([0.72, 0.66, 0.58], dtype=x.dtype)
    dark = torch.tensor([0.42, 0.40, 0.38], dtype=x.dtype)
    wave = (torch.sin(23.0 * x + 7.0 * z) * torch.sin(19.0 * z - 5.0 * x))[:, None]
    return (light * tile + dark * (1 - tile)) * (0.88 + 0.12 * wave)


def _shade(n_world: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
    light = torch.as_tensor(LIGHT_DIR, dtype=n_world.dtype)
    return albedo * (AMBIENT + DIFFUSE * (n_world @ light).clamp_min(0))[:, None]


def _floor_hit(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Ray parameter [M] of the floor square hit (inf on a miss), seen from above (o_y < 0)."""
    inf = torch.full((len(d),), float("inf"), dtype=d.dtype)
    s = -o[1] / d[:, 1]
    p = o + s[:, None] * d
    hit = (d[:, 1] > 0) & (s > 0) & (p[:, 0].abs() <= FLOOR_HALF) & (p[:, 2].abs() <= FLOOR_HALF)
    return torch.where(hit, s, inf)


@dataclass
class _PlacedPart:
    """A part at one frame: its pose and its 1-based id in the hit buffer (0 = floor, -1 = nothing)."""

    part: Part
    R: np.ndarray
    T: np.ndarray
    index: int

    def local_ray(self, o: np.ndarray, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o_l = torch.as_tensor(self.R.T @ (o - self.T), dtype=d.dtype)
        return o_l, d @ torch.as_tensor(self.R, dtype=d.dtype)  # rows: R^T d


def _place(parts: list[Part], t: float) -> list[_PlacedPart]:
    """The parts that exist at frame t, posed (a part absent at t is left out; indices stay 1 + list index)."""
    out = []
    for i, p in enumerate(parts):
        if t < p.enters_at:
            continue
        R, T = p.pose(t)
        out.append(_PlacedPart(p, R, T, i + 1))
    return out


def cast(o: np.ndarray, d: torch.Tensor, placed: list[_PlacedPart]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit of rays o + s d against the floor and all parts: (s [M], buffer id [M])."""
    ot = torch.as_tensor(o, dtype=d.dtype)
    s_best = _floor_hit(ot, d)
    idx = torch.where(torch.isfinite(s_best), 0, -1)
    for pp in placed:
        s = _intersect_local(pp.part, *pp.local_ray(o, d))
        closer = s < s_best
        s_best = torch.where(closer, s, s_best)
        idx = torch.where(closer, pp.index, idx)
    return s_best, idx


class _ViewRays:
    """Supersampled ray directions of one camera on a grid [H*S, W*S] (through sub-pixel centres)."""

    def __init__(self, cam: Camera, S: int):
        self.cam, self.S = cam, S
        Hs, Ws = cam.height * S, cam.width * S
        u = (torch.arange(Ws, dtype=torch.float64) + 0.5) / S
        v = (torch.arange(Hs, dtype=torch.float64) + 0.5) / S
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        pix = torch.stack([uu, vv, torch.ones_like(uu)], -1)
        d_cam = pix @ torch.from_numpy(np.linalg.inv(cam.K)).T
        d = d_cam @ torch.from_numpy(cam.R.copy())  # camera -> world
        self.dirs = (d / d.norm(dim=-1, keepdim=True)).float()  # [Hs, Ws, 3]
        self.origin = cam.center

    def box(self, centre_world: np.ndarray, radius: float) -> tuple[int, int, int, int]:
        """Supersample-grid rectangle (v0, v1, u0, u1) that contains the sphere's projection."""
        Hs, Ws = self.dirs.shape[:2]
        cam = self.cam
        c = cam.R @ centre_world + cam.t
        corners = c + radius * np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
        if corners[:, 2].min() <= 1e-3:
            return 0, Hs, 0, Ws
        # The projection of the cube around the sphere is the hull of its projected corners.
        uv = corners[:, :2] / corners[:, 2:] * np.diag(cam.K)[:2] + cam.K[:2, 2]
        S = self.S
        u0 = int(np.clip(math.floor(uv[:, 0].min() * S - 0.5) - 1, 0, Ws))
        u1 = int(np.clip(math.ceil(uv[:, 0].max() * S - 0.5) + 2, 0, Ws))
        v0 = int(np.clip(math.floor(uv[:, 1].min() * S - 0.5) - 1, 0, Hs))
        v1 = int(np.clip(math.ceil(uv[:, 1].max() * S - 0.5) + 2, 0, Hs))
        return v0, v1, u0, u1


def render_view(
    view: _ViewRays, placed: list[_PlacedPart], background
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one camera: (rgb float32 [H, W, 3], fg bool [H, W], nearest hit distance per
    supersample float32 [H*S, W*S], inf where nothing is hit)."""
    dirs = view.dirs
    Hs, Ws = dirs.shape[:2]
    o = view.origin
    s_best = _floor_hit(torch.as_tensor(o, dtype=dirs.dtype), dirs.reshape(-1, 3)).reshape(Hs, Ws)
    idx = torch.where(torch.isfinite(s_best), 0, -1)
    boxes = {}
    for pp in placed:
        c_local, rad = pp.part.bounding_sphere()
        v0, v1, u0, u1 = boxes[pp.index] = view.box(pp.R @ c_local + pp.T, rad)
        if v1 <= v0 or u1 <= u0:
            continue
        sub = dirs[v0:v1, u0:u1].reshape(-1, 3)
        s = _intersect_local(pp.part, *pp.local_ray(o, sub)).reshape(v1 - v0, u1 - u0)
        closer = s < s_best[v0:v1, u0:u1]
        s_best[v0:v1, u0:u1] = torch.where(closer, s, s_best[v0:v1, u0:u1])
        idx[v0:v1, u0:u1] = torch.where(closer, pp.index, idx[v0:v1, u0:u1])

    rgb = torch.empty(Hs, Ws, 3)
    rgb[:] = torch.as_tensor(background, dtype=torch.float32)
    ot = torch.as_tensor(o, dtype=torch.float32)
    sel = idx == 0
    if sel.any():
        p = ot + s_best[sel][:, None] * dirs[sel]
        n = torch.tensor([[0.0, -1.0, 0.0]]).expand(len(p), 3)
        rgb[sel] = _shade(n, _floor_albedo(p[:, 0], p[:, 2]))
    for pp in placed:
        v0, v1, u0, u1 = boxes[pp.index]
        sel = idx[v0:v1, u0:u1] == pp.index
        if not sel.any():
            continue
        o_l, d_l = pp.local_ray(o, dirs[v0:v1, u0:u1][sel])
        q = o_l + s_best[v0:v1, u0:u1][sel][:, None] * d_l
        n_world = _normal_local(pp.part, q) @ torch.as_tensor(pp.R.T, dtype=q.dtype)
        sub_rgb = rgb[v0:v1, u0:u1]  # a view: writing into it writes into rgb
        sub_rgb[sel] = _shade(n_world, _albedo(pp.part, q))
    S = view.S
    H, W = Hs // S, Ws // S
    image = rgb.reshape(H, S, W, S, 3).mean((1, 3))
    fg_frac = (idx > 0).float().reshape(H, S, W, S).mean((1, 3))
    return image.numpy(), (fg_frac >= 0.5).numpy(), s_best.numpy()


# ----------------------------------------------------------------------------- ground truth
def sample_surface(part: Part, n: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [n, 3] points uniformly distributed (by area) on the part's surface, local frame."""
    if part.kind == "sphere":
        v = rng.normal(size=(n, 3))
        return part.radius * v / np.linalg.norm(v, axis=1, keepdims=True)
    if part.kind == "box":
        h = part.half
        areas = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]] * 2)
        face = rng.choice(6, size=n, p=areas / areas.sum())
        p = rng.uniform(-1, 1, size=(n, 3)) * h
        axis, sign = face % 3, np.where(face < 3, 1.0, -1.0)
        p[np.arange(n), axis] = sign * h[axis]
        return p
    a, b, r = part.a, part.b, part.radius
    L = float(np.linalg.norm(b - a))
    ax = (b - a) / L
    ortho = np.cross(ax, [1.0, 0, 0] if abs(ax[0]) < 0.9 else [0, 1.0, 0])
    ortho /= np.linalg.norm(ortho)
    ortho2 = np.cross(ax, ortho)
    on_body = rng.uniform(size=n) < (2 * math.pi * r * L) / part.area()
    ang = rng.uniform(0, 2 * math.pi, size=(n, 1))
    body = a + rng.uniform(0, L, size=(n, 1)) * ax + r * (np.cos(ang) * ortho + np.sin(ang) * ortho2)
    v = rng.normal(size=(n, 3))
    v = r * v / np.linalg.norm(v, axis=1, keepdims=True)
    caps = np.where((v @ ax)[:, None] < 0, a + v, b + v)  # each hemisphere on its own end
    return np.where(on_body[:, None], body, caps)


def visibility(
    points: np.ndarray, cams: list[Camera], masks: list[np.ndarray], placed: list[_PlacedPart]
) -> np.ndarray:
    """bool [P, C]: point inside the image, not occluded (within OCCLUSION_TOL) and on a foreground
    pixel of the camera's mask."""
    out = np.zeros((len(points), len(cams)), dtype=bool)
    for c, (cam, mask) in enumerate(zip(cams, masks)):
        uv, z = cam.project(points)
        inside = cam.in_image(uv, z)
        o = cam.center
        vec = torch.from_numpy(points - o)
        dist = vec.norm(dim=1)
        s_hit, _ = cast(o, vec / dist[:, None], placed)  # float64 rays straight at the points
        unoccluded = (s_hit >= dist - OCCLUSION_TOL).numpy()
        uv = np.nan_to_num(uv, nan=-1.0, posinf=-1.0, neginf=-1.0)
        iu = np.clip(np.floor(uv[:, 0]), 0, cam.width - 1).astype(np.int64)
        iv = np.clip(np.floor(uv[:, 1]), 0, cam.height - 1).astype(np.int64)
        on_fg = np.zeros(len(points), dtype=bool)
        on_fg[inside] = mask[iv[inside], iu[inside]]
        out[:, c] = inside & unoccluded & on_fg
    return out


def _circumsphere(pts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Smallest sphere with all of 0-4 points on its surface (centre in their affine hull)."""
    if not pts:
        return np.zeros(3), -1.0
    p0 = pts[0]
    if len(pts) == 1:
        return p0.copy(), 0.0
    A = np.stack([p - p0 for p in pts[1:]])  # c = p0 + A^T lam with 2 (A A^T) lam = |A_i|^2
    G = A @ A.T
    lam = np.linalg.lstsq(2 * G, np.diag(G), rcond=None)[0]
    c = p0 + A.T @ lam
    return c, float(np.linalg.norm(c - p0))


def _welzl(pts: list[np.ndarray], boundary: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Exact minimum enclosing ball of a few points (Welzl 1991); ``pts`` in random order."""
    if not pts or len(boundary) == 4:
        return _circumsphere(boundary)
    c, r = _welzl(pts[:-1], boundary)
    if np.linalg.norm(pts[-1] - c) <= r * (1 + 1e-12) + 1e-12:
        return c, r
    return _welzl(pts[:-1], boundary + [pts[-1]])


def bounding_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum enclosing ball (centre [3], radius) of points [N, 3].

    Exact balls (Welzl) of a growing core set: add the farthest point until every point is inside.
    The core set stays small (tens of points) because only extreme points ever enter it.
    """
    P = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    far = int(((P - P[0]) ** 2).sum(1).argmax())
    core = [far, int(((P - P[far]) ** 2).sum(1).argmax())]
    rng = np.random.default_rng(0)
    while True:
        order = rng.permutation(len(core))
        c, r = _welzl([P[core[i]] for i in order], [])
        d = np.sqrt(((P - c) ** 2).sum(1))
        j = int(d.argmax())
        if d[j] <= r * (1 + 1e-9) or j in core:
            return c, float(max(r, d[j]))
        core.append(j)


# ----------------------------------------------------------------------------- writer
@single_threaded
def make_synthetic_scene(
    out: str | Path,
    config: SynthConfig | None = None,
    *,
    progress: bool = False,
    overwrite: bool = False,
    **kwargs,
) -> Path:
    """Render a synthetic dynamic scene into ``out`` (Panoptic layout + ``gt_tracks.npz``).

    Args:
        out: output folder (must not exist or be empty, unless ``overwrite``); written atomically.
        config: a :class:`SynthConfig`; keyword arguments (``cameras=12, test_cameras=2, width=160,
            height=120, frames=10, seed=0``) override its fields.

    Writes ``train_meta.json`` (with ``"background"`` and the generator parameters under ``"synth"``),
    ``test_meta.json``, ``ims/<cam>/<t:06d>.png``, ``seg/<cam>/<t:06d>.png``, ``init_pt_cld.npz`` (built
    by :func:`data_tools.build_init_points` from the rendered masks of frame 0) and ``gt_tracks.npz``:
    ``points`` float32 [T, P, 3], ``visible`` bool [T, P, C], ``cam_ids`` int [C], ``visible_test``
    bool [T, P, C_test], ``test_cam_ids``, ``object_ids`` int [P] (1-based, see ``object_names``) and
    ``extent`` (float32 scalar: diameter of the bounding sphere of ``points`` over all t). With
    ``enter_at = T`` also ``entry_frame`` int64 [P] (T for the visitor's points, which are NaN and invisible
    before T; 0 for all others).
    """
    cfg = config or SynthConfig()
    if kwargs:
        cfg = SynthConfig(**{**asdict(cfg), **kwargs})
    rng = np.random.default_rng([cfg.seed, 1])
    parts = scene_parts(cfg)
    train, test = make_cameras(cfg, parts)
    background = tuple(float(v) for v in np.round(np.array([0.58, 0.66, 0.76]) + rng.uniform(-0.05, 0.05, 3), 3))
    # Ray grids are kept for all cameras unless that takes much memory (then rebuilt per frame).
    n_rays = (len(train) + len(test)) * cfg.width * cfg.height * cfg.supersample**2
    cached = [_ViewRays(c, cfg.supersample) for c in train + test] if n_rays * 12 < 2**28 else None

    # Track candidates: uniform by area over all parts at t = 0 (the visitor at the same density, after
    # the others, so that their samples do not depend on it).
    n_base = len(parts) - (cfg.enter_at is not None)
    areas = np.array([p.area() for p in parts])
    counts = np.floor(cfg.n_track_candidates * areas / areas[:n_base].sum()).astype(int)
    local = [sample_surface(p, int(k), rng) for p, k in zip(parts, counts)]
    part_of = np.concatenate([np.full(k, i) for i, k in enumerate(counts)])
    local_all = np.concatenate(local)
    entry = np.array([math.ceil(max(0.0, parts[i].enters_at)) for i in part_of], dtype=np.int64)

    def world_points(placed):
        out = np.full((len(local_all), 3), np.nan)
        for pp in placed:
            rows = part_of == pp.index - 1
            out[rows] = local_all[rows] @ pp.R.T + pp.T
        return out

    T = cfg.frames
    n_train = len(train)
    points = np.zeros((T, len(local_all), 3))
    vis = np.zeros((T, len(local_all), len(train) + len(test)), dtype=bool)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for t in tqdm(range(T), desc="rendering synthetic scene", unit="frame", disable=not progress):
            placed = _place(parts, float(t))
            masks = []
            for i, cam in enumerate(train + test):
                view = cached[i] if cached is not None else _ViewRays(cam, cfg.supersample)
                rgb, fg, _ = render_view(view, placed, background)
                rel = Path(str(view.cam.id)) / f"{t:06d}.png"
                for sub in ("ims", "seg"):
                    (tmp / sub / rel.parent).mkdir(parents=True, exist_ok=True)
                Image.fromarray(to_uint8(rgb)).save(tmp / "ims" / rel)
                save_mask_png(tmp / "seg" / rel, fg)
                masks.append(fg)
            points[t] = world_points(placed)
            present = entry <= t
            if present.all():
                vis[t] = visibility(points[t], train + test, masks, placed)
            else:
                vis[t, present] = visibility(points[t, present], train + test, masks, placed)

        # Kept: seen by >= 2 training cameras at the point's entry frame (t = 0 for the original objects).
        keep = vis[entry, np.arange(len(entry)), :n_train].sum(1) >= 2
        points, vis, entry = points[:, keep], vis[:, keep], entry[keep]
        object_ids = np.array([parts[i].object_id for i in part_of[keep]], dtype=np.int64)
        finite = points.reshape(-1, 3)
        _, radius = bounding_sphere(finite[np.isfinite(finite).all(1)])
        names = OBJECT_NAMES + (["visitor"] if cfg.enter_at is not None else [])
        synth_meta = {
            **cfg.meta(),
            "generator": f"data_tools.synthetic v{GENERATOR_VERSION}",
            "objects": names[1:],
            "units": "metres, +y down, floor at y = 0",
        }
        for name, cams, extra in (("train_meta.json", train, {"synth": synth_meta}), ("test_meta.json", test, None)):
            meta = panoptic_meta(cams, T, "png", cfg.width, cfg.height, background, extra)
            (tmp / name).write_text(json.dumps(meta))
        np.savez(
            tmp / "gt_tracks.npz",
            points=points.astype(np.float32),
            visible=vis[:, :, :n_train],
            cam_ids=np.array([c.id for c in train], dtype=np.int64),
            visible_test=vis[:, :, n_train:],
            test_cam_ids=np.array([c.id for c in test], dtype=np.int64),
            object_ids=object_ids,
            object_names=np.array(names),
            extent=np.float32(2 * radius),
            **({"entry_frame": entry} if cfg.enter_at is not None else {}),
        )
        # The initial point cloud comes from the rendered masks, like for real captures.
        from .init_points import build_init_points
        from .loader import load

        init = build_init_points(load(tmp), 0)
        np.savez(tmp / "init_pt_cld.npz", data=init)
    return Path(out)
