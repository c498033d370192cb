"""Frontier search for the per-modality thresholds."""

from modes.search.frontier import (
    SearchBudgetExhausted,
    SearchPoint,
    SearchResult,
    TargetUnreachableError,
    search,
)
from modes.search.grid import GridSpec

__all__ = [
    "GridSpec",
    "SearchBudgetExhausted",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "search",
]
