"""The skipping engine: patch a transformers MoE model so skipped routed experts cost nothing."""

from modes.engine.patch import apply, is_patched, model_info, remove, reset_stats, skip_stats
from modes.engine.rule import SkipRule, ThresholdRule

__all__ = [
    "SkipRule",
    "ThresholdRule",
    "apply",
    "is_patched",
    "model_info",
    "remove",
    "reset_stats",
    "skip_stats",
]
