"""modes: training-free dynamic expert skipping (MoDES) for transformers MoE models.

Pipeline: `calibrate` (alpha per MoE layer and modality) -> `search` (thresholds for a target
skip ratio, a `SkipPlan`) -> `apply` / `applied` (skipped experts are never computed) ->
`evaluate`, `compare`. Policies (MoDES and the baselines) are typed configs in `modes.policies`.

Names load on first use (PEP 562), so ``import modes`` and ``modes --help`` do not pay for
torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "UnsupportedModelError": "modes.adapters",
    "register_model": "modes.adapters",
    "supported_model_types": "modes.adapters",
    "CalibrationSet": "modes.calibration",
    "Importance": "modes.calibration",
    "calibrate": "modes.calibration",
    "Sample": "modes.data",
    "load_samples": "modes.data",
    "ApplyOptions": "modes.engine",
    "ModelInfo": "modes.engine",
    "applied": "modes.engine",
    "apply": "modes.engine",
    "model_info": "modes.engine",
    "remove": "modes.engine",
    "reset_stats": "modes.engine",
    "skip_stats": "modes.engine",
    "execution_info": "modes.engine",
    "PlanError": "modes.errors",
    "UsageError": "modes.errors",
    "UserError": "modes.errors",
    "compare": "modes.evaluation",
    "evaluate": "modes.evaluation",
    "bundled_model_path": "modes.loading",
    "load_model": "modes.loading",
    "load_processor": "modes.loading",
    "SkipPlan": "modes.plan",
    "GridSpec": "modes.thresholds",
    "SearchConfig": "modes.thresholds",
    "SearchResult": "modes.thresholds",
    "SkipRatios": "modes.ratios",
    "TargetOf": "modes.ratios",
    "TargetUnreachableError": "modes.thresholds",
    "search": "modes.thresholds.frontier",
}

__all__ = [
    "ApplyOptions",
    "CalibrationSet",
    "GridSpec",
    "Importance",
    "ModelInfo",
    "PlanError",
    "Sample",
    "SearchConfig",
    "SearchResult",
    "SkipPlan",
    "SkipRatios",
    "TargetOf",
    "TargetUnreachableError",
    "UnsupportedModelError",
    "UsageError",
    "UserError",
    "__version__",
    "applied",
    "apply",
    "bundled_model_path",
    "calibrate",
    "compare",
    "evaluate",
    "execution_info",
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"modes.{name}")  # a subpackage: modes.engine, ...
        except ModuleNotFoundError:
            raise AttributeError(f"module 'modes' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from modes.adapters import UnsupportedModelError, register_model, supported_model_types
    from modes.calibration import CalibrationSet, Importance, calibrate
    from modes.data import Sample, load_samples
    from modes.engine import (
        ApplyOptions,
        ModelInfo,
        applied,
        apply,
        execution_info,
        model_info,
        remove,
        reset_stats,
        skip_stats,
    )
    from modes.errors import PlanError, UsageError, UserError
    from modes.evaluation import compare, evaluate
    from modes.loading import bundled_model_path, load_model, load_processor
    from modes.plan import SkipPlan
    from modes.ratios import SkipRatios, TargetOf
    from modes.thresholds import GridSpec, SearchConfig, SearchResult, TargetUnreachableError
    from modes.thresholds.frontier import search
