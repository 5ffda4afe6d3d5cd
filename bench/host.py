"""`python -m bench host`: host reads and launches of one warm Triton-backend render.

Counted with the project's one counting rule, `tests.helpers.count_host_work` (so this runs from a
checkout): host reads are calls on tensors of item, int(), float(), bool(), tolist, cpu, numpy,
nonzero, unique, masked_select; launches are the torch ops outside Triton launches (views, reshapes,
empty* and metadata ops excluded) plus one per Triton launch. Triton runs through its interpreter on
the CPU (TRITON_INTERPRET=1, set here by re-running in a subprocess when it is not), so the counts are
what the host issues; they do not depend on the device. Scene: 80 Gaussians, one 64 x 48 camera,
D = 3, float32, every kernel compiled first; the budgets are those of tests/test_host_budget.py. Each
call is counted in the classic mode and in rasterize_mode="antialiased" (names prefixed antialiased_).

Writes <out>/host.json: one entry per call (reads, launches, torch ops, Triton launches, budget) and
`how` (the command line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .harness import REPO_ROOT, machine_info, now_utc

BENCHMARK = "host"
CAPACITY = 4096
BUDGETS = {"warm_forward": (1, 25), "warm_forward_backward": (1, 45), "capacity_forward": (0, 25),
           "capacity_forward_backward": (0, 45)}   # (host reads, launches) at most
BUDGETS.update({f"antialiased_{name}": budget for name, budget in BUDGETS.items()})   # the same in that mode


def measure() -> dict:
    """{call: figures} for the four calls of BUDGETS (needs TRITON_INTERPRET=1 before torch/triton import)."""
    import torch

    import tritonsplat
    from tests.helpers import count_host_work, make_scene

    scene = make_scene(n=80, width=64, height=48, seed=0, dtype=torch.float32)

    def forward(**keywords):
        return tritonsplat.rasterize(*scene.args(), backend="triton", **keywords)

    def forward_backward(**keywords):
        leaves = [t.clone().requires_grad_() for t in (scene.means, scene.quats, scene.scales, scene.opacities,
                                                       scene.colors)]
        out = tritonsplat.rasterize(*leaves, *scene.args()[5:], backend="triton", **keywords)
        out.colors.sum().backward()
        return out

    calls = {"warm_forward": (forward, {}), "warm_forward_backward": (forward_backward, {}),
             "capacity_forward": (forward, {"max_intersections": CAPACITY}),
             "capacity_forward_backward": (forward_backward, {"max_intersections": CAPACITY})}
    calls.update({f"antialiased_{name}": (function, dict(keywords, rasterize_mode="antialiased"))
                  for name, (function, keywords) in calls.items()})
    for function, keywords in calls.values():   # warm: compile every variant once
        if function is forward_backward:
            forward_backward(**keywords)
    figures = {}
    for name, (function, keywords) in calls.items():
        out, work = count_host_work(function, **keywords)
        max_reads, max_launches = BUDGETS[name]
        figures[name] = {"host_reads": work.n_reads, "launches": work.n_launches, "reads": work.reads,
                         "torch_launches": len(work.torch_ops), "triton_launches": len(work.triton_launches),
                         "triton_kernels": work.triton_launches, "budget_host_reads": max_reads,
                         "budget_launches": max_launches,
                         "meets_budget": work.n_reads <= max_reads and work.n_launches <= max_launches,
                         "n_intersections": int(out.n_intersections)}
    return figures


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="host reads and launches of a warm Triton render")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "quick")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") != "1":   # the interpreter must be on before triton is imported
        environment = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "bench.host", *argv], cwd=REPO_ROOT, env=environment).returncode
    figures = measure()
    payload = {"benchmark": BENCHMARK, "created": now_utc(), "how": "python -m bench host " + " ".join(argv),
               "scene": "80 Gaussians, one 64x48 camera, D=3, float32, warm; Triton through its interpreter",
               "counting_rule": "tests.helpers.count_host_work", "machine": machine_info("cpu"), "calls": figures}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "host.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    temporary.replace(path)
    for name, f in figures.items():
        print(f"{name:40} reads {f['host_reads']} (<= {f['budget_host_reads']})  launches {f['launches']} "
              f"(<= {f['budget_launches']}: {f['torch_launches']} torch + {f['triton_launches']} triton)  "
              f"{'PASS' if f['meets_budget'] else 'MISS'}")
    print(f"wrote {path}")
    return 0 if all(f["meets_budget"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
