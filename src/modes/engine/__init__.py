"""The skipping engine: patch a transformers MoE model so skipped routed experts cost nothing."""

from modes.engine.info import ModelInfo
from modes.engine.options import ApplyOptions
from modes.engine.patch import (
    Plan,
    SlotCounts,
    add_counts,
    applied,
    apply,
    decoder_layers,
    execution_info,
    is_patched,
    model_info,
    moe_sites,
    remove,
    reset_stats,
    skip_stats,
    slot_counts,
    stats_from_counts,
)
from modes.engine.rules import Routing, SkipRule, ThresholdRule

__all__ = [
    "ApplyOptions",
    "ModelInfo",
    "Plan",
    "Routing",
    "SkipRule",
    "SlotCounts",
    "ThresholdRule",
    "add_counts",
    "applied",
    "apply",
    "decoder_layers",
    "execution_info",
    "is_patched",
    "model_info",
    "moe_sites",
    "remove",
    "reset_stats",
    "skip_stats",
    "slot_counts",
    "stats_from_counts",
]
