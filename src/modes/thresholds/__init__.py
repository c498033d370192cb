"""The per-modality thresholds: grids and the frontier search (names load on first use)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GridSpec": "modes.thresholds.grid",
    "SearchBudgetError": "modes.thresholds.frontier",
    "SearchConfig": "modes.thresholds.frontier",
    "SearchPoint": "modes.thresholds.frontier",
    "SearchResult": "modes.thresholds.frontier",
    "TargetUnreachableError": "modes.thresholds.frontier",
    "search": "modes.thresholds.frontier",
}

__all__ = [
    "GridSpec",
    "SearchBudgetError",
    "SearchConfig",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "search",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modes.thresholds' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from modes.thresholds.frontier import (
        SearchBudgetError,
        SearchConfig,
        SearchPoint,
        SearchResult,
        TargetUnreachableError,
        search,
    )
    from modes.thresholds.grid import GridSpec
