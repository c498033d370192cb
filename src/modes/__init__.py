"""modes: training-free dynamic expert skipping (MoDES) for transformers MoE models."""

from modes.adapters import UnsupportedModelError, register_model, supported_model_types
from modes.data import load_samples
from modes.engine import apply, model_info, remove, reset_stats, skip_stats
from modes.evaluation import evaluate
from modes.loading import bundled_model_path, load_model, load_processor
from modes.plan import ModelInfo, PlanError, SkipPlan

__version__ = "0.1.0"

__all__ = [
    "ModelInfo",
    "PlanError",
    "SkipPlan",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "bundled_model_path",
    "evaluate",
    "load_model",
    "load_processor",
    "load_samples",
    "model_info",
    "register_model",
    "remove",
    "reset_stats",
    "skip_stats",
    "supported_model_types",
]
