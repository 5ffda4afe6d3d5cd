"""Evaluation settings apart from the fit: EvalConfig, its command-line options, injected LPIPS networks,
runs written before the settings moved, and the evaluate -> plots direction of imports.

Tolerances:
| quantity | tolerance | why |
|---|---|---|
| injected LPIPS vs the same network applied here | rel 1e-6 | same float32 renders, summed in another order |
| the readout "highest" vs the *_highest_influence diagnostics (3D and 2D) | exact | the same computation |
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tracking
from tracking.cli import main
from tracking.config import TrackingConfig
from tracking.eval_config import EvalConfig
from tracking.evaluate import ADDED_METRIC_KEYS, METRIC_KEYS, _Lpips, default_eval_config, evaluate

from .conftest import tiny_config

QUIET = {"progress": False, "echo": lambda s: None}
LEGACY = {"test_colour_correction": "mean", "track_influence": 0.3, "lpips": False}


def _fit_files(out: Path) -> dict[str, str]:
    """sha256 of every file the fit wrote (all but the evaluation's metrics.json and plots/)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "metrics.json" and "plots" not in p.parts}


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def _half_mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - b).abs().mean()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def test_eval_config_validation_and_round_trip():
    cfg = EvalConfig(readout="highest", lpips_backbones=("vgg",), cameras_2d="all")
    assert EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.readout_threshold == 0.0 and EvalConfig(influence_threshold=0.2).readout_threshold == 0.2
    for bad, field in ((dict(readout="nearest"), "readout"), (dict(influence_threshold=0.0), "influence_threshold"),
                       (dict(test_colour_correction="train"), "test_colour_correction"),
                       (dict(lpips_backbones=("squeeze",)), "lpips_backbones"),
                       (dict(lpips_backbones=("vgg", "vgg")), "lpips_backbones"),
                       (dict(cameras_2d="some"), "cameras_2d")):
        with pytest.raises(ValueError, match=field):
            EvalConfig(**bad).validate()
    with pytest.raises(ValueError, match="unknown EvalConfig fields"):
        EvalConfig.from_dict({"lpips": True})
    assert not {"test_colour_correction", "track_influence", "lpips"} & set(TrackingConfig().to_dict())


def test_legacy_fields_migrate_to_the_evaluation_defaults():
    stored = {**TrackingConfig().to_dict(), **LEGACY}
    with pytest.warns(UserWarning, match="moved to EvalConfig") as record:
        cfg = TrackingConfig.from_dict(stored)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert cfg == TrackingConfig()
    assert EvalConfig.for_legacy(stored) == EvalConfig(test_colour_correction="mean", influence_threshold=0.3,
                                                       lpips_backbones=())
    assert EvalConfig.for_legacy({"track_influence": 0.0}).readout == "highest"
    assert EvalConfig.for_legacy(TrackingConfig().to_dict()) == EvalConfig()


def test_lpips_without_package_is_null_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    with pytest.warns(UserWarning, match=r"LPIPS \(vgg\) unavailable"):
        net = _Lpips("vgg")
    assert net(torch.zeros(3, 4, 4), torch.ones(3, 4, 4)) is None
    assert _Lpips("alex", _mean_abs)(torch.zeros(3, 4, 4), torch.ones(3, 4, 4)) == pytest.approx(2.0)  # [-1, 1]


def test_evaluate_records_its_settings_and_never_rewrites_the_fit(run_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    before = _fit_files(run_copy)
    cfg = EvalConfig(readout="highest", cameras_2d="all")
    m = evaluate(run_copy, eval_config=cfg, lpips_networks={"alex": _mean_abs, "vgg": _half_mean_abs})
    assert _fit_files(run_copy) == before
    assert list(m)[: len(METRIC_KEYS) + len(ADDED_METRIC_KEYS)] == list(METRIC_KEYS + ADDED_METRIC_KEYS)
    on_disk = json.loads((run_copy / "metrics.json").read_text())
    assert on_disk["eval_config"] == cfg.to_dict()
    assert not (run_copy / "plots").exists()  # evaluate computes; drawing is the caller's
    # injected networks: the mean over frames x test cameras of the network on the [-1, 1] renders
    r = tracking.load(run_copy)
    seq = __import__("data_tools").load(r.data.path, frames=r.source_frames)
    expected = np.mean([float(_mean_abs(r.render(t, c, colour_correction="none").clamp(0, 1).permute(2, 0, 1) * 2,
                                        torch.from_numpy(seq.image(t, c.id)).permute(2, 0, 1) * 2))
                        for t in range(r.n_frames) for c in r.test_cameras])
    assert m["lpips_alex"] == pytest.approx(expected, rel=1e-6) and m["lpips"] == m["lpips_alex"]
    assert m["lpips_vgg"] == pytest.approx(expected / 2, rel=1e-6)
    assert m["psnr_per_channel"] >= m["psnr"]
    assert m["mte_3d"] == m["mte_3d_highest_influence"]  # readout "highest"
    for key in ("mte_2d", "delta_2d", "survival_2d"):
        assert m[key] == m[f"{key}_highest_influence"], key
    assert 0.0 <= m["rotation_error_3d_deg_highest_influence"] < 180.0  # the synthetic truth has object_ids
    for key in ADDED_METRIC_KEYS[3:-1]:
        assert m[key] is not None and np.isfinite(m[key]), key
    # cameras_2d="all" adds the test camera's tracks: another 2D error than the training cameras alone
    train_only = evaluate(run_copy, eval_config=EvalConfig(readout="highest", lpips_backbones=()), write=False)
    assert train_only["lpips_alex"] is None and train_only["lpips_vgg"] is None
    assert train_only["mte_2d_pod"] != m["mte_2d_pod"]


def test_cli_eval_options_and_table(run_copy):
    runner = CliRunner()
    bad = runner.invoke(main, ["eval", str(run_copy), "--influence-threshold", "1.5"])
    assert bad.exit_code == 2 and "--influence-threshold" in bad.output
    bad = runner.invoke(main, ["eval", str(run_copy), "--lpips-backbones", "alex,squeeze"])
    assert bad.exit_code == 2 and "--lpips-backbones" in bad.output
    before = _fit_files(run_copy)
    result = runner.invoke(main, ["eval", str(run_copy), "--readout", "influence", "--influence-threshold", "0.25",
                                  "--test-colour-correction", "mean", "--lpips-backbones", "", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "PointOdyssey: MTE" in result.output and "influence >= 0.25" in result.output
    ev = json.loads((run_copy / "metrics.json").read_text())["eval_config"]
    assert ev == EvalConfig(influence_threshold=0.25, test_colour_correction="mean", lpips_backbones=()).to_dict()
    assert _fit_files(run_copy) == before and not (run_copy / "plots").exists()


def _make_legacy(out: Path) -> None:
    """Rewrite a fresh run's stored config as runs fitted before EvalConfig wrote it."""
    with h5py.File(out / "run.h5", "a") as f:
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), **LEGACY}, sort_keys=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"].update(LEGACY)
    (out / "config.json").write_text(json.dumps(cfg))


def test_run_written_before_the_move_resumes_and_evaluates(tiny_scene, tmp_path):
    out = tmp_path / "legacy"
    tracking.fit(tiny_scene, out, tiny_config(), frames=slice(0, 2), **QUIET)
    _make_legacy(out)
    with pytest.warns(UserWarning, match="moved to EvalConfig"):
        r = tracking.fit(tiny_scene, out, tiny_config(), frames=slice(0, 3), **QUIET)
    assert r.n_frames == 3  # resumed: the moved fields do not count as another config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert default_eval_config(out) == EvalConfig(test_colour_correction="mean", influence_threshold=0.3,
                                                      lpips_backbones=())
        m = evaluate(out, lpips_networks={"alex": _mean_abs})
    assert m["eval_config"]["influence_threshold"] == 0.3 and m["lpips_alex"] is None  # lpips=False carried over
    assert m["psnr"] is not None and m["mte_3d_pod_cm"] is not None


def _imports(path: Path) -> set[str]:
    """Modules a file imports anywhere (functions included), relative imports resolved within tracking."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names.add(f"tracking.{mod}" if node.level else mod)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_evaluate_does_not_import_plots():
    root = Path(tracking.__file__).parent
    assert "tracking.plots" not in _imports(root / "evaluate.py")
    assert "tracking.evaluate" not in _imports(root / "plots.py")
    assert "tracking.evaluate" not in _imports(root / "metrics.py") | _imports(root / "eval_config.py")


def test_rotation_error_needs_object_ids(run_copy, tmp_path):
    r = tracking.load(run_copy)
    with np.load(Path(r.data.path) / "gt_tracks.npz") as z:
        gt = {k: z[k] for k in z.files}
    without = {k: v for k, v in gt.items() if k != "object_ids"}
    np.savez(tmp_path / "no_ids.npz", **without)
    m = evaluate(run_copy, gt_tracks=tmp_path / "no_ids.npz", eval_config=EvalConfig(lpips_backbones=()), write=False)
    assert m["rotation_error_3d_deg_highest_influence"] is None and m["mte_3d"] is not None
    # the default readout: its own 2D keys, and the highest-influence ones beside them
    assert m["mte_2d"] is not None and m["mte_2d_highest_influence"] is not None
    np.savez(tmp_path / "bad_ids.npz", **{**without, "object_ids": gt["object_ids"][:-1]})
    with pytest.raises(tracking.TrackingError, match="object_ids must be"):
        evaluate(run_copy, gt_tracks=tmp_path / "bad_ids.npz", eval_config=EvalConfig(lpips_backbones=()), write=False)


def test_gaussian_turns_carry_tracks_as_the_readout_does(tiny_run):
    """The rotation metric's turn R_t R_0^T of each track's carrier is the one `track()` applies."""
    from tracking.evaluate import gaussian_turns

    r = tracking.load(tiny_run)
    with np.load(Path(r.data.path) / "gt_tracks.npz") as z:
        queries = torch.from_numpy(z["points"][0][:200]).double()
    best, _ = r.assign(queries, threshold=0.0)
    turns = torch.from_numpy(gaussian_turns(r, best, r.n_frames))  # [T, P, 3, 3]
    mu = torch.stack([r.means[t].double()[best] for t in range(r.n_frames)])  # [T, P, 3]
    carried = mu + torch.einsum("tpij,pj->tpi", turns, queries - mu[0])
    tracked = r.track(queries, threshold=0.0).double()
    assert torch.allclose(carried, tracked, atol=1e-5)  # float32 storage of the readout
    assert (turns[1:] - torch.eye(3, dtype=torch.float64)).abs().amax() > 1e-4  # the Gaussians did turn
