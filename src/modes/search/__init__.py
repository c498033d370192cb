"""Frontier search for the per-modality thresholds (names load on first use, see `modes`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GridSpec": "modes.search.grid",
    "SearchBudgetError": "modes.search.frontier",
    "SearchPoint": "modes.search.frontier",
    "SearchResult": "modes.search.frontier",
    "TargetUnreachableError": "modes.search.frontier",
    "search": "modes.search.frontier",
}

__all__ = [
    "GridSpec",
    "SearchBudgetError",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "search",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modes.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from modes.search.frontier import (
        SearchBudgetError,
        SearchPoint,
        SearchResult,
        TargetUnreachableError,
        search,
    )
    from modes.search.grid import GridSpec
