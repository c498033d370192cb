"""modes: training-free dynamic expert skipping (MoDES) for transformers MoE models.

Pipeline: `calibrate` (alpha per MoE layer and modality) -> `search` (thresholds for a target
skip ratio, a `SkipPlan`) -> `apply` / `applied` (skipped experts are never computed) ->
`evaluate`, `compare`. Policies (MoDES and the baselines) are typed configs in `modes.policies`.
"""

# Subpackages first: `modes.search` and `modes.compare` below name the functions, which the
# README promises; `modes.search.frontier` and friends still import as modules.
import modes.search as _search_package  # noqa: F401
from modes.adapters import UnsupportedModelError, register_model, supported_model_types
from modes.calibration import Importance, calibrate
from modes.data import Sample, load_samples
from modes.engine import ApplyOptions, ModelInfo, applied, apply, model_info, remove, reset_stats, skip_stats
from modes.errors import PlanError
from modes.evaluation import compare, evaluate
from modes.loading import bundled_model_path, load_model, load_processor
from modes.plan import SkipPlan
from modes.search import GridSpec, SearchResult, TargetUnreachableError, search

__version__ = "0.1.0"

__all__ = [
    "ApplyOptions",
    "GridSpec",
    "Importance",
    "ModelInfo",
    "PlanError",
    "Sample",
    "SearchResult",
    "SkipPlan",
    "TargetUnreachableError",
    "UnsupportedModelError",
    "__version__",
    "applied",
    "apply",
    "bundled_model_path",
    "calibrate",
    "compare",
    "evaluate",
    "load_model",
    "load_processor",
    "load_samples",
    "model_info",
    "register_model",
    "remove",
    "reset_stats",
    "search",
    "skip_stats",
    "supported_model_types",
]
