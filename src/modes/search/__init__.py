"""Frontier search for the per-modality thresholds."""

from modes.search.frontier import (
    SearchBudgetError,
    SearchPoint,
    SearchResult,
    TargetUnreachableError,
    search,
)
from modes.search.grid import GridSpec

__all__ = [
    "GridSpec",
    "SearchBudgetError",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "search",
]
