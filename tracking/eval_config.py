"""Frozen evaluation settings (`EvalConfig`), apart from the fit's `TrackingConfig`.

Nothing here changes a fitted run: two evaluations of one run with different settings read the same
files, so changing a setting never blocks resuming the fit. `tracking.evaluate` records the settings it
used in metrics.json (key ``eval_config``).

Runs fitted before these settings moved out of `TrackingConfig` still hold them in their config
(`LEGACY_FIELDS`); `TrackingConfig.from_dict` drops them with a one-line warning and `EvalConfig.for_legacy`
turns their stored values into that run's evaluation defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

DEFAULT_INFLUENCE_THRESHOLD = 0.5
"""influence o exp(-d^T Sigma^-1 d / 2) a query point must reach to follow a Gaussian (else it stays
static): the readout of the paper's Sec. 3.8 with the threshold the fit's defaults always used."""

READOUTS = ("influence", "highest")
COLOUR_CORRECTIONS = ("none", "mean")
LPIPS_BACKBONES = ("alex", "vgg")
CAMERAS_2D = ("train", "test", "all")

LEGACY_FIELDS = ("test_colour_correction", "track_influence", "lpips")
"""TrackingConfig fields of runs fitted before the evaluation settings moved here."""


@dataclass(frozen=True)
class EvalConfig:
    """How `tracking.evaluate` reads a fitted run.

    Attributes:
        test_colour_correction: colour correction of held-out camera renders: "none" (they have no
            fitted gain/offset) or "mean" (the training cameras' mean gain and offset).
        readout: 3D/2D track readout (paper Sec. 3.8). "influence": a query point follows the Gaussian
            of highest influence at t = 0 when that influence reaches `influence_threshold`, else it stays
            put (static background). "highest": always follow the highest-influence Gaussian.
        influence_threshold: the "influence" rule's threshold in (0, 1].
        lpips_backbones: LPIPS networks to run ("alex", "vgg"); () skips LPIPS. A backbone whose weights
            cannot be loaded gives null with a warning.
        cameras_2d: cameras whose projections of the ground-truth tracks count in the 2D metrics
            ("train", "test" or "all"), each track kept in the cameras where it is visible at t = 0.
    """

    test_colour_correction: str = "none"
    readout: str = "influence"
    influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD
    lpips_backbones: tuple[str, ...] = LPIPS_BACKBONES
    cameras_2d: str = "train"

    def validate(self) -> EvalConfig:
        """Raise ValueError naming the field for impossible values; returns self."""
        if self.test_colour_correction not in COLOUR_CORRECTIONS:
            raise ValueError(f"test_colour_correction must be one of {COLOUR_CORRECTIONS}, "
                             f"got {self.test_colour_correction!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if not 0 < self.influence_threshold <= 1:
            raise ValueError(f"influence_threshold must be in (0, 1], got {self.influence_threshold}")
        bad = [b for b in self.lpips_backbones if b not in LPIPS_BACKBONES]
        if bad or len(set(self.lpips_backbones)) != len(self.lpips_backbones):
            raise ValueError(f"lpips_backbones must be distinct names from {LPIPS_BACKBONES}, "
                             f"got {self.lpips_backbones}")
        if self.cameras_2d not in CAMERAS_2D:
            raise ValueError(f"cameras_2d must be one of {CAMERAS_2D}, got {self.cameras_2d!r}")
        return self

    @property
    def readout_threshold(self) -> float:
        """The threshold handed to `TrackingResult.track`: 0 follows the highest-influence Gaussian."""
        return 0.0 if self.readout == "highest" else self.influence_threshold

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lpips_backbones"] = list(self.lpips_backbones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        """Inverse of to_dict; unknown keys raise ValueError, missing ones take defaults."""
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown EvalConfig fields: {sorted(unknown)}")
        if "lpips_backbones" in d:
            d["lpips_backbones"] = tuple(d["lpips_backbones"])
        return cls(**d).validate()

    @classmethod
    def for_legacy(cls, stored: dict[str, Any]) -> EvalConfig:
        """Evaluation defaults of a run whose stored TrackingConfig dict may hold `LEGACY_FIELDS`."""
        cfg = cls()
        if "test_colour_correction" in stored:
            cfg = replace(cfg, test_colour_correction=str(stored["test_colour_correction"]))
        if "track_influence" in stored:
            thr = float(stored["track_influence"])
            cfg = replace(cfg, readout="highest") if thr <= 0 else replace(cfg, influence_threshold=thr)
        if "lpips" in stored and not stored["lpips"]:
            cfg = replace(cfg, lpips_backbones=())
        return cfg.validate()


__all__ = ["DEFAULT_INFLUENCE_THRESHOLD", "EvalConfig", "LEGACY_FIELDS"]
