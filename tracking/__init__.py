"""tracking: Dynamic 3D Gaussians (Luiten et al., 3DV 2024) as a library.

Turn a synchronised multi-camera video into persistent Gaussians whose motion is a dense 6-DoF
track of the scene, then evaluate, export and render it::

    import tracking
    result = tracking.fit("data/basketball", "runs/basketball", tracking.TrackingConfig.from_preset("demo"))
    result = tracking.load("runs/basketball")
    result.means[t], result.quats[t], result.track(points_at_t0), result.render(t, camera)
    metrics = tracking.evaluate("runs/basketball")          # writes runs/basketball/metrics.json

Command line: ``tritonsplat-track fit | eval | table | export | render | demo`` (see ``--help``).
"""

# The functions fit and evaluate share their names with their modules: importing them last binds the
# package attributes to the functions (the modules stay reachable through sys.modules / `from ... import`).
from .config import DensifyConfig, LearningRates, LossWeights, TrackingConfig
from .errors import ConfigMismatchError, NaNLossError, StorageError, TrackingError
from .eval_config import EvalConfig
from .evaluate import evaluate
from .fit import fit  # noqa: I001
from .result import TrackingResult, load

__all__ = [
    "ConfigMismatchError",
    "DensifyConfig",
    "EvalConfig",
    "LearningRates",
    "LossWeights",
    "NaNLossError",
    "StorageError",
    "TrackingConfig",
    "TrackingError",
    "TrackingResult",
    "evaluate",
    "fit",
    "load",
]
