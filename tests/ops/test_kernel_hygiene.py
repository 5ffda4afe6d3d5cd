"""What the interpreter cannot catch: out-of-bounds accesses and unmasked loads.

The interpreter does not fault on an out-of-bounds pointer, so every buffer the launchers allocate
(all through the one seam `tritonsplat.ops._alloc`, which the test replaces) is placed inside a larger
one filled with a sentinel (NaN for floats, -1 for ints) and the view itself is
poisoned the same way when it is `empty`: after a full forward + backward, the padding must be
intact (no stray writes), and no output may still hold poison (no unwritten outputs). Inputs are
slices of NaN-padded buffers, so an unmasked read past an end would turn outputs into NaN.

No tolerances: these are exact checks.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

import tritonsplat
from tests.helpers import make_scene
from tritonsplat.ops import _alloc

pytestmark = pytest.mark.interpreter

OPS_DIR = Path(tritonsplat.__file__).parent / "ops"
PAD = 4099  # > the farthest a partial tile or a block tail can reach past an end in these scenes


def _sentinel(dtype):
    return math.nan if dtype.is_floating_point else -1


class PoisonedAllocator:
    """Stands in for `tritonsplat.ops._alloc`; pads and poisons every allocation."""

    def __init__(self):
        self.records = []

    def install(self, monkeypatch):
        for name in ("empty", "empty_like", "zeros", "full"):
            monkeypatch.setattr(_alloc, name, getattr(self, name))

    def _allocate(self, fill, size, dtype=None, device=None):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = dtype or torch.get_default_dtype()
        numel = math.prod(shape)
        big = torch.full((numel + 2 * PAD,), _sentinel(dtype), dtype=dtype, device=device)
        view = big[PAD:PAD + numel].view(shape)
        if fill is not None:
            view.fill_(fill)
        self.records.append((big, numel, fill is None))
        return view

    def empty(self, *size, **kwargs):
        return self._allocate(None, size, **kwargs)

    def empty_like(self, tensor):
        return self._allocate(None, (tensor.shape,), dtype=tensor.dtype, device=tensor.device)

    def zeros(self, *size, **kwargs):
        return self._allocate(0, size, **kwargs)

    def full(self, size, fill_value, **kwargs):
        return self._allocate(fill_value, (size,), **kwargs)

    def check(self):
        assert self.records, "nothing was allocated through the poisoned module"
        for big, numel, was_empty in self.records:
            head, body, tail = big[:PAD], big[PAD:PAD + numel], big[PAD + numel:]
            for name, padding in (("before", head), ("after", tail)):
                intact = padding.isnan().all() if big.dtype.is_floating_point else (padding == -1).all()
                assert intact, f"a kernel wrote {name} a {tuple(body.shape)} {big.dtype} buffer"
            if was_empty and big.dtype.is_floating_point:
                assert not body.isnan().any(), f"an output {big.dtype} buffer of {numel} was left unwritten"


def _padded(tensor):
    """A copy of `tensor` inside a NaN-padded (or -1-padded) buffer."""
    flat = tensor.detach().reshape(-1)
    big = torch.full((flat.numel() + 2 * PAD,), _sentinel(flat.dtype), dtype=flat.dtype)
    big[PAD:PAD + flat.numel()] = flat
    return big[PAD:PAD + flat.numel()].view(tensor.shape)


@pytest.mark.parametrize("extras", [dict(), dict(absgrad=True, densify_channels=2, deterministic=True),
                                    dict(rasterize_mode="antialiased")])
def test_no_out_of_bounds_access_and_no_unwritten_output(monkeypatch, extras):
    poisoned = PoisonedAllocator()
    poisoned.install(monkeypatch)
    scene = make_scene(n=37, width=21, height=19, n_cameras=2, n_channels=3, backgrounds=True, seed=3,
                       dtype=torch.float32)
    leaves = [_padded(t).requires_grad_() for t in (scene.means, scene.quats, scene.scales, scene.opacities,
                                                     scene.colors, scene.viewmats)]
    out = tritonsplat.rasterize(*leaves, _padded(scene.Ks), scene.width, scene.height,
                                backgrounds=_padded(scene.backgrounds), backend="triton", sh_degree=None, **extras)
    (out.colors.sum() + out.depths.sum() + out.alphas.sum()).backward()
    assert torch.isfinite(out.colors).all() and torch.isfinite(out.depths).all()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    poisoned.check()


def _tl_calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
            yield node


def test_every_load_has_a_mask_and_other_and_every_atomic_a_mask():
    checked = 0
    for path in sorted(OPS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _tl_calls(tree, "load"):
            keywords = {k.arg for k in call.keywords}
            assert {"mask", "other"} <= keywords, f"{path.name}:{call.lineno}: tl.load without mask= and other="
            checked += 1
        for call in _tl_calls(tree, "atomic_add"):
            assert "mask" in {k.arg for k in call.keywords}, f"{path.name}:{call.lineno}: atomic without mask="
    assert checked > 50
