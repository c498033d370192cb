"""modes: training-free dynamic expert skipping (MoDES) for transformers MoE models."""

from modes.adapters import UnsupportedModelError, register_model, supported_model_types
from modes.engine import apply, model_info, remove, reset_stats, skip_stats
from modes.plan import ModelInfo, PlanError, SkipPlan

__version__ = "0.1.0"

__all__ = [
    "ModelInfo",
    "PlanError",
    "SkipPlan",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "model_info",
    "register_model",
    "remove",
    "reset_stats",
    "skip_stats",
    "supported_model_types",
]
