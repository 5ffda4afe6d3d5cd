"""Tiny scenes, an independent float64 dense renderer, and comparisons that diagnose.

The dense renderer shares no code with tritonsplat: rotations by quaternion sandwich products, the
2D covariance inverted by torch.linalg.inv, every Gaussian evaluated at every pixel, and compositing
by a sequential loop over depth-sorted Gaussians exactly as the CUDA original blends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_ALPHA = 1.0 / 255.0
STOP = 1e-4


@dataclass
class Scene:
    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    backgrounds: torch.Tensor | None = None

    def args(self):
        return (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats,
                self.Ks, self.width, self.height)

    def to(self, dtype=None, device=None):
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)
        return Scene(move(self.means), move(self.quats), move(self.scales), move(self.opacities),
                     move(self.colors), move(self.viewmats), move(self.Ks), self.width, self.height,
                     move(self.backgrounds))

    def float_tensors(self):
        names = ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "backgrounds"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def look_at(eye, target, up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """World-to-camera matrix (OpenCV: x right, y down, z forward) looking from eye at target."""
    eye = torch.tensor(eye, dtype=torch.float64)
    forward = torch.tensor(target, dtype=torch.float64) - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, torch.tensor(up, dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = rotation
    viewmat[:3, 3] = -rotation @ eye
    return viewmat


def make_scene(n=24, width=23, height=17, n_cameras=1, n_channels=3, seed=0, per_camera_colors=False,
               sh_degree=None, backgrounds=False, scale_range=(0.03, 0.25), opacity_range=(0.1, 0.9),
               depth_range=(2.0, 4.0), dtype=torch.float64) -> Scene:
    """Random Gaussians in front of C cameras placed around the scene centre (0, 0, 3)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)

    focal = 0.9 * width
    depth = uniform(n, low=depth_range[0], high=depth_range[1])
    x = uniform(n, low=-0.55, high=0.55) * width / focal * depth
    y = uniform(n, low=-0.55, high=0.55) * height / focal * depth
    means = torch.stack([x, y, depth], -1) + torch.tensor([0.0, 0.0, 3.0 - 3.0])
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    log_low, log_high = math.log(scale_range[0]), math.log(scale_range[1])
    scales = torch.exp(uniform(n, 3, low=log_low, high=log_high))
    opacities = uniform(n, low=opacity_range[0], high=opacity_range[1])
    viewmats, Ks = [], []
    for c in range(n_cameras):
        angle = 0.35 * c
        eye = (3.0 * math.sin(angle), 0.15 * c, 3.0 - 3.0 * math.cos(angle))
        viewmats.append(look_at(eye, (0.0, 0.0, 3.0)))
        Ks.append(torch.tensor([[focal * (1 + 0.05 * c), 0.0, width / 2 + 0.3 * c],
                                [0.0, focal * (1 - 0.03 * c), height / 2 - 0.2 * c],
                                [0.0, 0.0, 1.0]], dtype=torch.float64))
    if sh_degree is not None:
        colors = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g, dtype=torch.float64)
        colors[:, 0] += 1.0
    elif per_camera_colors:
        colors = uniform(n_cameras, n, n_channels)
    else:
        colors = uniform(n, n_channels)
    bg = uniform(n_cameras, colors.shape[-1] if sh_degree is None else 3) if backgrounds else None
    scene = Scene(means, quats, scales, opacities, colors, torch.stack(viewmats), torch.stack(Ks),
                  width, height, bg)
    return scene.to(dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Independent dense renderer (float64)
# ----------------------------------------------------------------------------------------------

def _quat_multiply(p, q):
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack([pw * qw - px * qx - py * qy - pz * qz, pw * qx + px * qw + py * qz - pz * qy,
                        pw * qy - px * qz + py * qw + pz * qx, pw * qz + px * qy - py * qx + pz * qw], -1)


def _rotate(quats, vectors):
    """Rotate vectors [N, 3] by unit quaternions [N, 4] with q v q*."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    v = torch.cat([torch.zeros_like(vectors[:, :1]), vectors], -1)
    conj = q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype)
    return _quat_multiply(_quat_multiply(q, v), conj)[:, 1:]


def dense_projection(scene: Scene, camera: int, eps2d=0.3, near=0.01, far=1e10, clamp_margin=0.15):
    """Per-Gaussian mean2d [N, 2], 2D covariance [N, 2, 2], depth [N], in-range mask [N]."""
    s = scene.to(dtype=torch.float64)
    n = s.means.shape[0]
    eye3 = torch.eye(3, dtype=torch.float64)
    # Columns of the rotation are the rotated basis vectors.
    rotation = torch.stack([_rotate(s.quats, eye3[i].expand(n, 3)) for i in range(3)], dim=-1)
    cov3 = rotation @ torch.diag_embed(s.scales ** 2) @ rotation.transpose(1, 2)
    view = s.viewmats[camera]
    p = s.means @ view[:3, :3].T + view[:3, 3]
    K = s.Ks[camera]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    W, H = s.width, s.height
    z = p[:, 2]
    ok = (z > near) & (z < far)
    zs = torch.where(ok, z, torch.ones_like(z))
    xz = (p[:, 0] / zs).clamp(-(cx + clamp_margin * W) / fx, (W - cx + clamp_margin * W) / fx)
    yz = (p[:, 1] / zs).clamp(-(cy + clamp_margin * H) / fy, (H - cy + clamp_margin * H) / fy)
    J = torch.zeros(n, 2, 3, dtype=torch.float64)
    J[:, 0, 0] = fx / zs
    J[:, 0, 2] = -fx * xz / zs
    J[:, 1, 1] = fy / zs
    J[:, 1, 2] = -fy * yz / zs
    cov_cam = view[:3, :3] @ cov3 @ view[:3, :3].T
    cov2 = J @ cov_cam @ J.transpose(1, 2) + eps2d * torch.eye(2, dtype=torch.float64)
    mean2 = torch.stack([fx * p[:, 0] / zs + cx, fy * p[:, 1] / zs + cy], -1)
    return mean2, cov2, z, ok


def dense_radii(scene: Scene, camera: int, **kwargs) -> torch.Tensor:
    mean2, cov2, z, ok = dense_projection(scene, camera, **kwargs)
    eig = torch.linalg.eigvalsh(cov2)[:, -1]
    o = scene.opacities.to(torch.float64)
    k = torch.sqrt(2 * torch.log(torch.clamp_min(255 * o, 1.0))).clamp_max(3.33)
    r = torch.ceil(k * eig.sqrt())
    det = torch.linalg.det(cov2)
    W, H = scene.width, scene.height
    keep = ok & (o >= MIN_ALPHA) & (det > 0) & (mean2[:, 0] + r > 0) & (mean2[:, 0] - r < W)
    keep &= (mean2[:, 1] + r > 0) & (mean2[:, 1] - r < H)
    return torch.where(keep, r, torch.zeros_like(r)).to(torch.int32)


@dataclass
class DenseImage:
    colors: torch.Tensor   # [H, W, D]
    alphas: torch.Tensor   # [H, W, 1]
    depths: torch.Tensor   # [H, W, 1]
    median: torch.Tensor   # [H, W, 1]
    near_cutoff: torch.Tensor  # [H, W] bool: some decision was within `band` of a cut-off


def dense_render(scene: Scene, camera: int = 0, alpha_cap=0.99, band=1e-6, colors=None, antialiased=False,
                 **projection_kwargs) -> DenseImage:
    """Every Gaussian at every pixel, sequentially blended front to back, float64. `antialiased`: opacities
    times sqrt(det(Sigma2D) / det(Sigma2D + eps2d I)) from the two determinants (Mip-Splatting's 2D filter)."""
    s = scene.to(dtype=torch.float64)
    mean2, cov2, z, ok = dense_projection(s, camera, **projection_kwargs)
    inverse = torch.linalg.inv(cov2)
    opacities = s.opacities
    if antialiased:
        eps2d = projection_kwargs.get("eps2d", 0.3)
        undilated = cov2 - eps2d * torch.eye(2, dtype=torch.float64)
        ratio = torch.linalg.det(undilated) / torch.linalg.det(cov2)
        opacities = opacities * torch.sqrt(ratio.clamp_min(0))
    H, W = s.height, s.width
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5,
                            torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    if colors is None:
        colors = s.colors[camera] if s.colors.dim() == 3 else s.colors
    colors = colors.to(torch.float64)
    D = colors.shape[-1]
    T = torch.ones(H, W, dtype=torch.float64)
    out = torch.zeros(H, W, D, dtype=torch.float64)
    depth_sum = torch.zeros(H, W, dtype=torch.float64)
    median = torch.zeros(H, W, dtype=torch.float64)
    done = torch.zeros(H, W, dtype=torch.bool)
    near_cutoff = torch.zeros(H, W, dtype=torch.bool)
    order = sorted(range(len(z)), key=lambda i: (float(z[i]), i))
    for i in order:
        if not ok[i] or torch.linalg.det(cov2[i]) <= 0:
            continue
        dx, dy = mean2[i, 0] - xs, mean2[i, 1] - ys
        q = inverse[i]
        power = 0.5 * (q[0, 0] * dx * dx + q[1, 1] * dy * dy) + q[0, 1] * dx * dy
        raw = opacities[i] * torch.exp(-power)
        alpha = raw.clamp_max(alpha_cap)
        near_cutoff |= ~done & (((alpha - MIN_ALPHA).abs() < band * 10) | ((raw - alpha_cap).abs() < band))
        use = ~done & (alpha >= MIN_ALPHA)
        test_T = T * (1 - alpha)
        near_cutoff |= use & ((test_T - STOP).abs() < band * STOP * 10)
        stop = use & (test_T < STOP)
        done |= stop
        use &= ~stop
        weight = torch.where(use, alpha * T, torch.zeros_like(T))
        out += weight[..., None] * colors[i]
        depth_sum += weight * z[i]
        crossing = use & (T >= 0.5) & (test_T < 0.5)
        near_cutoff |= use & ((test_T - 0.5).abs() < band)
        median = torch.where(crossing, z[i].expand_as(median), median)
        T = torch.where(use, test_T, T)
    if s.backgrounds is not None:
        out += T[..., None] * s.backgrounds[camera]
    alpha_img = 1 - T
    depth = torch.where(alpha_img > 0, depth_sum / alpha_img.clamp_min(1e-300), torch.zeros_like(T))
    return DenseImage(out, alpha_img[..., None], depth[..., None], median[..., None], near_cutoff)


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------

def describe_difference(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                        mask: torch.Tensor | None = None) -> tuple[bool, str]:
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    bad |= torch.isnan(actual) != torch.isnan(expected)
    if mask is not None:
        bad &= mask
    if diff.numel() == 0:
        return True, "empty"
    worst = int(torch.argmax(torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    rel_rmse = float(diff.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-30))
    message = (f"max abs err {float(diff.max()):.3e} at {index} (actual {float(actual[index]):.6g}, "
               f"expected {float(expected[index]):.6g}); rel RMSE {rel_rmse:.3e}; "
               f"{int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol})")
    return not bool(bad.any()), message


def assert_close(actual, expected, atol, rtol, name="", mask=None):
    ok, message = describe_difference(actual, expected, atol, rtol, mask)
    assert ok, f"{name}: {message}"


def assert_relative_norm(actual, expected, tolerance, name=""):
    """||actual - expected||_2 <= tolerance * ||expected||_2."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    error = float((a - e).norm())
    reference = float(e.norm())
    assert error <= tolerance * reference + 1e-30, (
        f"{name}: ||diff|| = {error:.3e} > {tolerance} * ||expected|| = {tolerance * reference:.3e}")


# --------------------------------------------------------------------------------------------------
# Host work of a call: host reads and launches (one counting rule for every budget test)
# --------------------------------------------------------------------------------------------------

# Calls that bring device data to the host (each one a synchronising transfer on a GPU).
_HOST_READ_METHODS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy",
                      "nonzero", "unique", "masked_select")
# Aten ops that launch nothing: allocation without initialisation and pure metadata.
_NO_LAUNCH_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
                  "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "lift_fresh",
                  "_unsafe_view", "is_same_size", "is_contiguous", "set_"}


@dataclass
class HostWork:
    """What one call cost the host: reads (synchronising device-to-host transfers) and launches."""

    reads: list                    # names of the read calls, in order
    torch_ops: list                # aten ops that launch work, in order (outside Triton launches)
    triton_launches: list          # kernel names, in order
    compiled_launches: int = 0     # kernels generated by torch.compile (inductor), if any ran

    @property
    def n_reads(self) -> int:
        return len(self.reads)

    @property
    def n_launches(self) -> int:
        return len(self.torch_ops) + len(self.triton_launches) + self.compiled_launches

    def summary(self) -> str:
        from collections import Counter

        ops = ", ".join(f"{name} x{k}" for name, k in Counter(self.torch_ops).most_common())
        kernels = ", ".join(f"{name} x{k}" for name, k in Counter(self.triton_launches).most_common())
        return (f"{self.n_reads} reads {self.reads}; {self.n_launches} launches: torch [{ops}], "
                f"triton [{kernels}], compiled {self.compiled_launches}")


def count_host_work(function, *args, **kwargs) -> tuple[object, HostWork]:
    """Run `function(*args, **kwargs)` and count its host reads and launches.

    Rule: host reads are calls on tensors of item, int(), float(), bool(), tolist, cpu, numpy,
    nonzero, unique and masked_select (seen by a TorchFunctionMode; a .cpu() followed by .tolist()
    counts twice). Launches are the aten ops seen by a TorchDispatchMode outside Triton kernel
    launches (what Triton's interpreter runs inside a launch does not count), except views, reshapes,
    empty* allocations and metadata ops, plus one per Triton launch, plus one per kernel launched by
    torch.compile-generated code. Backward passes run by `function` are counted too (autograd's
    thread inherits neither mode, so backward is run on this thread: call torch.autograd.backward
    inside `function`; the engine runs CPU work on the calling thread).
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    work = HostWork([], [], [])
    depth = [0]     # > 0 while a Triton kernel (or a compiled kernel) is running

    class ReadCounter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if depth[0] == 0 and name in _HOST_READ_METHODS and args and isinstance(args[0], torch.Tensor):
                work.reads.append(name)
            return func(*args, **(kwargs or {}))

    class LaunchCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if depth[0] == 0 and not func.is_view and name not in _NO_LAUNCH_OPS:
                work.torch_ops.append(name)
            return func(*args, **(kwargs or {}))

    patches = []

    def wrap(owner, attribute, record):
        original = getattr(owner, attribute)

        def counted(self, *a, **k):
            if depth[0] == 0:
                record(self)
            depth[0] += 1
            try:
                return original(self, *a, **k)
            finally:
                depth[0] -= 1

        setattr(owner, attribute, counted)
        patches.append((owner, attribute, original))

    def record_triton(kernel):
        work.triton_launches.append(getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "?"))

    def record_compiled(_kernel):
        work.compiled_launches += 1

    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    wrap(interpreter.InterpretedFunction, "run", record_triton)
    wrap(jit.JITFunction, "run", record_triton)
    try:
        from torch._inductor.runtime import triton_heuristics
        wrap(triton_heuristics.CachingAutotuner, "run", record_compiled)
    except ImportError:  # pragma: no cover - inductor ships with torch
        pass
    try:
        with ReadCounter(), LaunchCounter():
            result = function(*args, **kwargs)
    finally:
        for owner, attribute, original in reversed(patches):
            setattr(owner, attribute, original)
    return result, work


def record_rasterize_keywords(monkeypatch) -> list[dict]:
    """Wrap `tritonsplat.rasterize` (restored by monkeypatch): every call still renders, and its keyword
    arguments are appended to the returned list. The wrapper keeps rasterize()'s signature, which callers
    inspect for the keywords they may pass (`tracking.stages.render`)."""
    import functools

    import tritonsplat

    seen: list[dict] = []
    real = tritonsplat.rasterize

    @functools.wraps(real)
    def recording(*args, **keywords):
        seen.append(keywords)
        return real(*args, **keywords)

    monkeypatch.setattr(tritonsplat, "rasterize", recording)
    return seen
